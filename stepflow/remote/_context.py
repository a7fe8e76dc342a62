"""Which project files go into a step image, which stay out, and why.

:func:`list_context` walks a project folder and sorts every entry into *ships* or *excluded*
(with a reason), and warns about shipped files that look like secrets.

Decisions, in order of precedence:

1. **Mandatory exclusions** (:data:`MANDATORY_EXCLUDES`, the stepflow home, virtualenvs found by
   their ``pyvenv.cfg``): never shipped, whatever any ignore file says.
2. ``.stepflowignore`` at the project root, then the caller's ``extra_excludes`` (gitignore syntax,
   last match wins); ``!pattern`` here re-includes what git ignores.
3. Git's rules: ``.gitignore`` files of the project and its subfolders (a deeper file overrides a
   shallower one, as in git), the ``.gitignore`` files between an enclosing repository's top and
   the project root, and ``.git/info/exclude``.

As in git, the contents of an excluded folder are not looked at, with one exception: a negated
``.stepflowignore`` pattern that spells out a path (``!data/model.bin``, ``!/data/keep/*.csv``)
reaches into the folders on that path when git or ``.stepflowignore`` excluded them (never into a
mandatory exclusion). Unanchored negations (``!*.bin``) do not.

Symlinks: a symlinked file ships (its target's bytes) only when its target is inside the project
and would ship itself; symlinked folders are never entered.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import attrs
import pathspec
from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern

from stepflow.errors import ImageBuildError, ProjectRootError

__all__ = [
    "MANDATORY_EXCLUDES",
    "ContextFile",
    "ContextListing",
    "Excluded",
    "ProjectRootError",
    "SecretWarning",
    "format_listing",
    "list_context",
]

#: Never shipped (reason, gitignore patterns); ``.stepflowignore`` cannot re-include any of them.
MANDATORY_EXCLUDES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mandatory: environment file", (".env", ".env.*")),
    ("mandatory: version control", (".git", ".hg", ".svn")),
    ("mandatory: virtualenv", (".venv/", "venv/")),
    ("mandatory: cache", (
        "__pycache__/", "*.pyc", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".tox/", ".nox/",
        ".ipynb_checkpoints/", "node_modules/", ".DS_Store")),
    # Folders only: a script named "build" is code.
    ("mandatory: build output", ("dist/", "build/", "*.egg-info")),
    ("mandatory: credentials", (
        ".ssh", ".aws", ".gnupg", ".docker", ".kube", ".azure", "**/.config/gcloud", ".netrc", ".pypirc",
        ".npmrc", ".git-credentials", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*",
        "id_ecdsa*", "*.keystore", "credentials.json", "service-account*.json", ".htpasswd")),
    # A stray store (an old STEPFLOW_HOME) holds secrets and run history too.
    ("mandatory: stepflow store", ("stepflow.db", "stepflow.db-wal", "stepflow.db-shm", "stepflow.db-journal")),
)
_HOME_REASON = "mandatory: stepflow home"
_VENV_REASON = "mandatory: virtualenv"
#: A folder holding one of these is a Python environment, whatever its name.
_ENV_MARKERS = ("pyvenv.cfg", "conda-meta")
_STEPFLOWIGNORE = ".stepflowignore"
_GITIGNORE = ".gitignore"
#: Content checks read at most this much of each file.
_SCAN_BYTES = 64 * 1024
#: Not read for secrets: binary formats (a NUL byte in the first block skips the others too).
_BINARY_SUFFIXES = frozenset({
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ico", ".pdf", ".zip", ".gz", ".tgz",
    ".bz2", ".xz", ".zst", ".tar", ".whl", ".so", ".dylib", ".dll", ".exe", ".o", ".a", ".pt", ".pth", ".ckpt",
    ".bin", ".safetensors", ".onnx", ".pb", ".tflite", ".h5", ".hdf5", ".npy", ".npz", ".pkl", ".pickle",
    ".joblib", ".parquet", ".feather", ".arrow", ".avro", ".orc", ".db", ".sqlite", ".mp3", ".wav", ".flac",
    ".mp4", ".mov", ".avi", ".woff", ".woff2", ".ttf", ".otf",
})
#: Files where ``password = "..."`` is configuration rather than code.
_CONFIG_SUFFIXES = frozenset({
    ".ini", ".cfg", ".conf", ".cnf", ".config", ".toml", ".yaml", ".yml", ".json", ".properties", ".tfvars",
})
#: Source and docs: a module named ``secrets.py`` is usually code about secrets (contents are still read).
_CODE_SUFFIXES = frozenset({
    ".py", ".pyi", ".pyx", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".kt", ".scala", ".js",
    ".mjs", ".ts", ".tsx", ".jsx", ".rb", ".php", ".sh", ".sql", ".md", ".rst", ".html", ".css",
})
_SECRET_NAME_WORDS = frozenset({
    "secret", "secrets", "token", "password", "passwords", "passwd", "credential", "credentials",
})


@attrs.frozen
class ContextFile:
    """A file that ships in the image."""

    #: Path inside the project, posix separators.
    rel: str
    #: Where to read it (a symlink's resolved target).
    path: Path
    size: int
    executable: bool


@attrs.frozen
class Excluded:
    """A file or folder left out (a folder is listed once, not each file inside it)."""

    rel: str
    reason: str
    is_dir: bool = False


@attrs.frozen
class SecretWarning:
    """A shipped file that looks like it holds a secret."""

    rel: str
    reason: str

    @property
    def ignore_line(self) -> str:
        """The ``.stepflowignore`` line that excludes exactly this file."""
        escaped = re.sub(r"([*?\[\\])", r"\\\1", self.rel)
        stripped = escaped.rstrip(" ")  # git drops unescaped trailing spaces
        return "/" + stripped + "\\ " * (len(escaped) - len(stripped))

    @property
    def message(self) -> str:
        """One line for the user: the file, why it looks secret and how to keep it out."""
        return (f"{self.rel} looks like a secret ({self.reason}); if it is, add '{self.ignore_line}' "
                f"to {_STEPFLOWIGNORE}")


@attrs.frozen
class ContextListing:
    """What :func:`list_context` decided for a project folder."""

    #: The project root, symlinks resolved.
    root: Path
    #: Files that ship, sorted by ``rel``.
    files: tuple[ContextFile, ...]
    #: Top-most excluded entries with their reason, sorted by ``rel``.
    excluded: tuple[Excluded, ...]
    #: Shipped files that look like secrets, sorted by ``rel``.
    warnings: tuple[SecretWarning, ...]

    @property
    def total_size(self) -> int:
        """Bytes shipped."""
        return sum(f.size for f in self.files)


# ------------------------------------------------------------------------------------ ignore files
def _named_groups_to_plain(source: str) -> str:
    # pathspec names a group in every pattern; duplicates cannot share one regex.
    return source.replace("(?P<ps_d>", "(?:")


class _Rules:
    """One list of gitignore lines, matched relative to a base folder.

    ``check`` answers like git for one level: the last matching line decides, ``None`` if none does.
    A combined regex of all lines rejects the (usual) non-matching paths in one call; pathspec then
    gives the exact answer for the few that pass.
    """

    def __init__(self, lines: Sequence[tuple[str, str]], *, strip: str = "", prepend: str = "",
                 strict: bool = False) -> None:
        """``lines`` are (pattern, reason); paths lose ``strip`` and gain ``prepend`` before matching."""
        patterns: list[GitIgnoreSpecPattern] = []
        self.reasons: list[str] = []
        for text, reason in lines:
            try:
                pattern = GitIgnoreSpecPattern(text)
            except ValueError as exc:
                if strict:
                    raise ImageBuildError(f"invalid ignore pattern: {reason}: {exc}") from None
                pattern = GitIgnoreSpecPattern("")  # git skips lines it cannot parse
            patterns.append(pattern)
            self.reasons.append(reason)
        self.spec = pathspec.GitIgnoreSpec(patterns)
        self.active = any(p.include is not None for p in patterns)
        self.strip_len = len(strip)
        self.prepend = prepend
        self.prefilter = _prefilter(patterns)
        #: Literal folders named by anchored negations, e.g. "data/keep" for "!/data/keep/x.bin".
        self.reinclude_dirs = tuple(_literal_dirs(text) for text, _ in lines if text.startswith("!"))

    def check(self, rel: str, is_dir: bool) -> tuple[bool, str] | None:
        """(excluded, reason) of the last matching line, or None."""
        if not self.active:
            return None
        path = self.prepend + rel[self.strip_len:] + ("/" if is_dir else "")
        if self.prefilter is not None and not self.prefilter.may_match(path):
            return None
        result = self.spec.check_file(path)
        if result.include is None or result.index is None:
            return None
        return result.include, self.reasons[result.index]

    def may_reinclude_under(self, rel_dir: str) -> bool:
        """Whether a negated line names a literal path below ``rel_dir``."""
        prefix = rel_dir + "/"
        return any(d == rel_dir or d.startswith(prefix) for d in self.reinclude_dirs if d)


_ANY_FOLDER = "^(?:.+/)?"


def _prefilter(patterns: Sequence[GitIgnoreSpecPattern]) -> _Prefilter | None:
    """Regexes matching (at least) every path some pattern matches; None if that cannot be built."""
    by_name: list[str] = []
    anchored: list[str] = []
    floating: list[str] = []
    for p in patterns:
        if p.include is None or p.regex is None:
            continue
        if p.regex.flags & ~re.UNICODE:
            return None
        source = _named_groups_to_plain(str(p.regex.pattern))
        if source.startswith(_ANY_FOLDER):
            # Most patterns are "<name> in any folder": one shared prefix is much cheaper than one each.
            by_name.append(f"(?:{source[len(_ANY_FOLDER):]})")
        elif source.startswith("^"):
            anchored.append(f"(?:{source})")
        else:
            floating.append(f"(?:{source})")
    if by_name:
        anchored.insert(0, f"(?:{_ANY_FOLDER}(?:{'|'.join(by_name)}))")
    try:
        return _Prefilter(re.compile("|".join(anchored)) if anchored else None,
                          re.compile("|".join(floating)) if floating else None)
    except re.error:
        return None


@attrs.frozen
class _Prefilter:
    #: Used with ``match``: the alternatives all start with "^".
    anchored: re.Pattern[str] | None
    #: Used with ``search``.
    floating: re.Pattern[str] | None

    def may_match(self, path: str) -> bool:
        return ((self.anchored is not None and self.anchored.match(path) is not None)
                or (self.floating is not None and self.floating.search(path) is not None))


_GLOB_CHARS = re.compile(r"[*?\[\\]")


def _literal_dirs(negation: str) -> str:
    """Folder path a negated, anchored pattern spells out literally ("" when it has none)."""
    text = negation[1:].rstrip()
    if "/" not in text.rstrip("/"):
        return ""  # unanchored: matches at any depth, like git it cannot reach into excluded folders
    parts = text.strip("/").split("/")
    literal = []
    for part in parts:
        if _GLOB_CHARS.search(part):
            break
        literal.append(part)
    return "/".join(literal)


def _read_lines(path: str) -> list[str] | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        raise ImageBuildError(f"cannot read ignore file {path}: {exc}") from None
    return text.removeprefix("\ufeff").splitlines()


def _ignore_file(path: str, shown: str, title: str, *, strip: str = "", prepend: str = "") -> _Rules | None:
    lines = _read_lines(path)
    if lines is None:
        return None
    return _Rules([(line, f"{title} ({shown}line {n} '{line.strip()}')") for n, line in enumerate(lines, 1)],
                  strip=strip, prepend=prepend)


def _gitignore(abs_dir: str, rel_dir: str) -> _Rules | None:
    shown = f"{rel_dir}/{_GITIGNORE}: " if rel_dir else f"{_GITIGNORE}: "
    return _ignore_file(os.path.join(abs_dir, _GITIGNORE), shown, _GITIGNORE,
                        strip=f"{rel_dir}/" if rel_dir else "")


def _enclosing_repo_rules(root: Path, user_home: Path | None) -> list[_Rules]:
    """Git's rules that apply to ``root`` from outside it, lowest precedence first.

    Looks up for the repository holding ``root``, stopping below the user's home: a home-directory
    dotfiles repository often ignores ``*`` and is unrelated to the project.
    """
    if os.path.lexists(root / ".git"):
        top = root
    else:
        top = None
        for parent in root.parents:
            if parent == user_home or parent.parent == parent:
                break
            if os.path.lexists(parent / ".git"):
                top = parent
                break
    if top is None:
        return []
    rules: list[_Rules] = []
    exclude = top / ".git" / "info" / "exclude"
    info = _ignore_file(str(exclude), "", os.path.relpath(exclude, root), prepend=_prefix(root, top))
    if info is not None:
        rules.append(info)
    current = top
    for part in root.relative_to(top).parts:
        found = _ignore_file(str(current / _GITIGNORE), f"{os.path.relpath(current / _GITIGNORE, root)}: ",
                             _GITIGNORE, prepend=_prefix(root, current))
        if found is not None:
            rules.append(found)
        current = current / part
    return rules


def _prefix(root: Path, base: Path) -> str:
    rel = root.relative_to(base).as_posix()
    return "" if rel == "." else rel + "/"


@functools.cache
def _mandatory_rules() -> _Rules:
    return _Rules([(p, reason) for reason, patterns in MANDATORY_EXCLUDES for p in patterns], strict=True)


# ------------------------------------------------------------------------------------ root checks
def _user_home() -> Path | None:
    try:
        return Path(os.path.realpath(Path.home()))
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        return None


def _check_root(given: Path, root: Path, user_home: Path | None, home: Path) -> None:
    hint = "Run stepflow from the project folder or set project_root to it."
    if not root.is_dir():
        raise ProjectRootError(f"project root {given} is not a directory. {hint}")
    if root.parent == root:
        raise ProjectRootError(f"refusing to ship the filesystem root {root} as the project. {hint}")
    if user_home is not None and root == user_home:
        raise ProjectRootError(f"refusing to ship your home directory {root} as the project. {hint}")
    if user_home is not None and user_home.parent != user_home and root in user_home.parents:
        raise ProjectRootError(f"refusing to ship {root}: it contains your home directory. {hint}")
    if root == home or home in root.parents:
        raise ProjectRootError(f"refusing to ship {root}: it is inside the stepflow home {home}. {hint}")
    for marker in _ENV_MARKERS:
        if (root / marker).exists():
            raise ProjectRootError(f"refusing to ship {root}: it is a Python environment ({marker}). {hint}")


def _default_home() -> Path:
    from stepflow._store.sqlite import stepflow_home

    return stepflow_home()


# ------------------------------------------------------------------------------------ the walk
class _Walker:
    def __init__(self, root: Path, home: Path, git_rules: list[_Rules], user_rules: _Rules | None) -> None:
        self.mandatory = _mandatory_rules()
        self.root = root
        self.root_str = str(root)
        self.user_rules = user_rules
        self.home_rel: str | None = None
        if root in home.parents:
            self.home_rel = home.relative_to(root).as_posix()
        #: Shipped files with the path to read them as a string (cheaper than ``str(Path)`` later).
        self.files: list[tuple[ContextFile, str]] = []
        self.excluded: list[Excluded] = []
        #: Git rules in force in each visited folder, deepest last.
        self.git_rules: dict[str, tuple[_Rules, ...]] = {"": tuple(git_rules)}

    # -- decisions
    def _under_home(self, rel: str) -> bool:
        h = self.home_rel
        return h is not None and (rel == h or rel.startswith(h + "/"))

    def decide(self, rel: str, is_dir: bool, rules: tuple[_Rules, ...], inherited: str | None) -> str | None:
        """Reason to exclude ``rel`` (its parent folder is not excluded, or only by ``inherited``)."""
        if self._under_home(rel):
            return _HOME_REASON
        hit = self.mandatory.check(rel, is_dir)
        if hit is not None:
            return hit[1]
        if self.user_rules is not None:
            hit = self.user_rules.check(rel, is_dir)
            if hit is not None:
                return hit[1] if hit[0] else None
        for level in reversed(rules):
            hit = level.check(rel, is_dir)
            if hit is not None:
                if hit[0]:
                    return hit[1]
                break  # re-included by git's rules, unless a parent folder is excluded
        return inherited

    def may_reinclude_under(self, rel_dir: str, reason: str) -> bool:
        if reason.startswith("mandatory:") or self.user_rules is None:
            return False
        return self.user_rules.may_reinclude_under(rel_dir)

    def rules_in(self, rel_dir: str, abs_dir: str, parent: tuple[_Rules, ...], names: Iterable[str]) -> tuple[
            _Rules, ...]:
        rules = parent
        if _GITIGNORE in names:
            found = _gitignore(abs_dir, rel_dir)
            if found is not None:
                rules = (*parent, found)
        self.git_rules[rel_dir] = rules
        return rules

    # -- walking
    def walk(self) -> None:
        # (rel, absolute path, git rules of the parent, reason inherited from an excluded parent)
        stack: list[tuple[str, str, tuple[_Rules, ...], str | None]] = [("", self.root_str, (), None)]
        while stack:
            rel_dir, abs_dir, parent_rules, inherited = stack.pop()
            try:
                with os.scandir(abs_dir) as it:
                    entries = list(it)
            except OSError as exc:
                if not rel_dir:
                    raise ProjectRootError(f"cannot list the project root {abs_dir}: {exc}") from None
                self.excluded.append(Excluded(rel_dir, f"unreadable: {exc.strerror or exc}", True))
                continue
            names = {e.name for e in entries}
            if rel_dir:
                marker = next((m for m in _ENV_MARKERS if m in names), None)
                if marker is not None:
                    self.excluded.append(Excluded(rel_dir, f"{_VENV_REASON} ({marker})", True))
                    continue
                rules = self.rules_in(rel_dir, abs_dir, parent_rules, names)
            else:
                rules = self.rules_in("", abs_dir, self.git_rules[""], names)
            prefix = rel_dir + "/" if rel_dir else ""
            dir_path = Path(abs_dir)  # one parse per folder, cheap children below
            for entry in entries:
                rel = prefix + entry.name
                try:
                    is_link = entry.is_symlink()
                    is_dir = not is_link and entry.is_dir(follow_symlinks=False)
                except OSError as exc:
                    self.excluded.append(Excluded(rel, f"unreadable: {exc.strerror or exc}"))
                    continue
                if is_link:
                    self._symlink(rel, entry.path, rules, inherited)
                    continue
                reason = self.decide(rel, is_dir, rules, inherited)
                if is_dir:
                    if reason is None:
                        stack.append((rel, entry.path, rules, None))
                    elif self.may_reinclude_under(rel, reason):
                        stack.append((rel, entry.path, rules, reason))
                    else:
                        self.excluded.append(Excluded(rel, reason, True))
                elif reason is not None:
                    self.excluded.append(Excluded(rel, reason))
                else:
                    self._regular(rel, entry.path, entry, dir_path / entry.name)

    def _regular(self, rel: str, path: str, entry: os.DirEntry[str] | None, as_path: Path | None = None) -> None:
        try:
            st = entry.stat(follow_symlinks=False) if entry is not None else os.stat(path)
        except OSError as exc:
            self.excluded.append(Excluded(rel, f"unreadable: {exc.strerror or exc}"))
            return
        if not stat.S_ISREG(st.st_mode):
            self.excluded.append(Excluded(rel, "not a regular file"))
            return
        file_path = as_path if as_path is not None else Path(path)
        self.files.append((ContextFile(rel, file_path, st.st_size, bool(st.st_mode & 0o111)), path))

    def _symlink(self, rel: str, path: str, rules: tuple[_Rules, ...], inherited: str | None) -> None:
        # The link's own name must pass first: a link named ".env" stays out wherever it points.
        reason = self.decide(rel, False, rules, inherited)
        if reason is not None:
            self.excluded.append(Excluded(rel, reason))
            return
        target = os.path.realpath(path)
        if not os.path.exists(target):
            self.excluded.append(Excluded(rel, "broken symlink"))
            return
        if os.path.isdir(target):
            self.excluded.append(Excluded(rel, "symlink to a folder (symlinked folders are not followed)", True))
            return
        if not target.startswith(self.root_str + os.sep):
            self.excluded.append(Excluded(rel, f"symlink to a file outside the project ({target})"))
            return
        target_rel = Path(target).relative_to(self.root).as_posix()
        reason = self.path_reason(target_rel)
        if reason is not None:
            self.excluded.append(Excluded(rel, f"symlink to an excluded file ({target_rel}: {reason})"))
            return
        self._regular(rel, target, None)

    def path_reason(self, rel: str) -> str | None:
        """Reason to exclude a file anywhere in the project, checking each parent folder on the way."""
        parts = rel.split("/")
        rules = self.git_rules[""]
        inherited: str | None = None
        for depth in range(1, len(parts)):
            rel_dir = "/".join(parts[:depth])
            abs_dir = os.path.join(self.root_str, *parts[:depth])
            reason = self.decide(rel_dir, True, rules, inherited)
            if reason is not None and not self.may_reinclude_under(rel_dir, reason):
                return reason
            inherited = reason
            marker = next((m for m in _ENV_MARKERS if os.path.lexists(os.path.join(abs_dir, m))), None)
            if marker is not None:
                return f"{_VENV_REASON} ({marker})"
            cached = self.git_rules.get(rel_dir)
            if cached is None:
                cached = self.rules_in(rel_dir, abs_dir, rules, (_GITIGNORE,))
            rules = cached
        return self.decide(rel, False, rules, inherited)


# ------------------------------------------------------------------------------------ secrets
_NAME_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_CONTENT = re.compile(
    rb"(?P<pem>-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----)"
    rb"|(?P<aws_id>(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9]))"
    rb"|(?P<aws_secret>(?i:aws_secret_access_key)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+]))"
    rb"|(?P<github>(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}))"
    rb"|(?P<slack>(?<![A-Za-z0-9])xox[baprs]-[A-Za-z0-9-]{10,})"
    rb"|(?P<google>(?<![A-Za-z0-9_])AIza[0-9A-Za-z_-]{35})"
    rb"|(?P<huggingface>(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{34,})"
    rb"|(?P<jwt>(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})"
)
_CONTENT_REASONS = {
    "pem": "content: PEM private key",
    "aws_id": "content: AWS access key id with a secret access key nearby",
    "aws_secret": "content: aws_secret_access_key",
    "github": "content: GitHub token",
    "slack": "content: Slack token",
    "google": "content: Google API key",
    "huggingface": "content: Hugging Face token",
    "jwt": "content: JSON Web Token",
}
#: 40 characters of base64 next to an access key id; mixed case rules out hex digests.
_AWS_SECRET_NEAR = re.compile(rb"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[A-Z])"
                              rb"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])")
_AWS_NEAR_BYTES = 512
_ASSIGNMENT = re.compile(
    rb"(?im)(?:^|[{,])[ \t]*[\"']?(?P<key>[\w.-]*?(?:password|passwd|secret(?:_?key)?|api_?key"
    rb"|(?:access|auth|api|bearer|refresh)_?token))[\"']?[ \t]*[:=][ \t]*"
    rb"(?P<value>\"[^\"\n]*\"|'[^'\n]*'|[^\s#;,}]+)")
_PLACEHOLDERS = frozenset(
    b"null none nil true false ~ changeme change-me password secret xxx todo redacted example".split())


def _name_reason(name: str, suffix: str) -> str | None:
    if name.endswith((".tfstate", ".tfstate.backup")):
        return "name: Terraform state"
    if suffix in _CODE_SUFFIXES:
        return None
    # Whole words only: "tokenizer.json" and "special_tokens_map.json" are model files.
    words = {w.lower() for w in _NAME_SPLIT.split(name) if w}
    hit = sorted(words & _SECRET_NAME_WORDS)
    return f"name contains '{hit[0]}'" if hit else None


def _placeholder(value: bytes) -> bool:
    value = value.strip(b"\"'")
    return (len(value) < 3 or value.lower() in _PLACEHOLDERS or value.startswith((b"$", b"<", b"{", b"%(", b"!"))
            or len(set(value)) == 1)


def _content_reasons(data: bytes, config_like: bool) -> list[str]:
    found: dict[str, None] = {}
    for m in _CONTENT.finditer(data):
        kind = m.lastgroup or ""
        if kind in found:
            continue
        if kind == "aws_id":
            if m.group().endswith(b"EXAMPLE"):  # the documented example key
                continue
            window = data[max(0, m.start() - _AWS_NEAR_BYTES):m.end() + _AWS_NEAR_BYTES]
            if _AWS_SECRET_NEAR.search(window) is None:
                continue
        found[kind] = None
    reasons = [_CONTENT_REASONS[k] for k in found]
    if config_like:
        for m in _ASSIGNMENT.finditer(data):
            if not _placeholder(m.group("value")):
                key = m.group("key").decode("ascii", "replace")
                reasons.append(f"content: assignment to '{key}'")
                break
    return reasons


def _secret_reasons(file: ContextFile, path: str) -> list[str]:
    name = file.rel.rsplit("/", 1)[-1]
    suffix = os.path.splitext(name)[1].lower()
    reasons = []
    by_name = _name_reason(name, suffix)
    if by_name is not None:
        reasons.append(by_name)
    if file.size == 0 or suffix in _BINARY_SUFFIXES:
        return reasons
    try:
        data = _head(path, file.size)
    except OSError:
        return reasons  # unreadable now: copying it will fail loudly later
    if b"\0" in data:
        return reasons
    reasons += _content_reasons(data, suffix in _CONFIG_SUFFIXES or name.startswith(".env"))
    return reasons


def _head(path: str, size: int) -> bytes:
    # os.read skips the buffered file object: this runs once per file of the project.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        chunks = []
        left = min(size, _SCAN_BYTES)  # no extra read to find the end of a small file
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _scan(files: Iterable[tuple[ContextFile, str]]) -> Iterator[SecretWarning]:
    for file, path in files:
        reasons = _secret_reasons(file, path)
        if reasons:
            yield SecretWarning(file.rel, "; ".join(reasons))


# ------------------------------------------------------------------------------------ public API
def list_context(root: Path, *, home: Path | None = None, extra_excludes: Iterable[str] = (),
                 scan_secrets: bool = True) -> ContextListing:
    """Decide which files of the project folder ``root`` go into a step image.

    ``home`` is the stepflow home (default ``$STEPFLOW_HOME`` or ``~/.stepflow``); nothing under it
    ships. ``extra_excludes`` are gitignore patterns applied after ``.stepflowignore``.
    ``scan_secrets=False`` skips reading file contents (names and sizes only).

    Raises :class:`ProjectRootError` when ``root`` is the filesystem root, the home directory
    (or contains it), a Python environment or inside the stepflow home, and ImageBuildError when
    ``.stepflowignore`` or ``extra_excludes`` hold an invalid pattern.
    """
    given = Path(root)
    root_real = Path(os.path.realpath(given.expanduser()))
    home_real = Path(os.path.realpath((home if home is not None else _default_home()).expanduser()))
    user_home = _user_home()
    _check_root(given, root_real, user_home, home_real)

    user_lines: list[tuple[str, str]] = []
    stepflowignore = _read_lines(str(root_real / _STEPFLOWIGNORE))
    for n, line in enumerate(stepflowignore or (), 1):
        user_lines.append((line, f"{_STEPFLOWIGNORE} (line {n} '{line.strip()}')"))
    extras = (extra_excludes,) if isinstance(extra_excludes, str) else extra_excludes
    for text in extras:
        user_lines.append((str(text), f"extra excludes ('{str(text).strip()}')"))
    user_rules = _Rules(user_lines, strict=True) if user_lines else None

    walker = _Walker(root_real, home_real, _enclosing_repo_rules(root_real, user_home), user_rules)
    walker.walk()
    walker.files.sort(key=lambda item: item[0].rel)
    files = tuple(f for f, _ in walker.files)
    excluded = tuple(sorted(walker.excluded, key=lambda e: e.rel))
    warnings = tuple(_scan(walker.files)) if scan_secrets else ()
    return ContextListing(root_real, files, excluded, warnings)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_listing(listing: ContextListing, *, show_excluded: bool = True) -> str:
    """A human-readable report: what ships (with sizes and a total), what is excluded and why, warnings."""
    count = len(listing.files)
    total = f"{count} file{'s' if count != 1 else ''}, {_size(listing.total_size)}"
    lines = [f"Project folder: {listing.root}", "", f"Ships ({total}):"]
    sizes = [_size(f.size) for f in listing.files]
    width = max((len(s) for s in sizes), default=0)
    for file, size in zip(listing.files, sizes, strict=True):
        lines.append(f"  {size:>{width}}  {file.rel}{'  (executable)' if file.executable else ''}")
    if not listing.files:
        lines.append("  (nothing)")
    lines.append(f"Total: {total}")
    if show_excluded:
        lines += ["", f"Excluded ({len(listing.excluded)}):"]
        names = [e.rel + ("/" if e.is_dir else "") for e in listing.excluded]
        name_width = min(max((len(n) for n in names), default=0), 48)
        for entry, name in zip(listing.excluded, names, strict=True):
            lines.append(f"  {name:<{name_width}}  {entry.reason}")
        if not listing.excluded:
            lines.append("  (nothing)")
    if listing.warnings:
        lines += ["", f"Possible secrets ({len(listing.warnings)}), these files ship:"]
        lines += [f"  {w.message}" for w in listing.warnings]
    return "\n".join(lines) + "\n"
