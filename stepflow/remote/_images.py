"""Step images: build context, content-hash tag, registry check, single-flight build and push.

An image is ``FROM <base image>`` plus the Python packages a step needs (stepflow, locally
installed stepflow plugins, the requested ``requirements`` and everything they depend on, in the
versions installed on this host) plus the project's code under ``/opt/stepflow/project``.

The packages are chosen for the image's platform, not the host's: binary wheels are downloaded
for the target architecture, CPython minor version and C library of the base image, pure-Python
ones work anywhere, and wheels built here are accepted only when they can run there. The wheels
are unpacked on the host into a user-site layout (``PYTHONUSERBASE=/opt/stepflow``) that the
Dockerfile adds as one archive: no ``RUN`` step, so an image for another architecture is assembled
without emulation, and the build needs no package index.

The tag is a hash of all of it, so an unchanged project maps to the same tag and the registry is
asked before anything is built. Wheels and their unpacked trees are cached under
``cache_dir/wheels/<target>``, shared by every process using that cache (file locks).

Nothing here imports a Docker SDK; the builder does.
"""

from __future__ import annotations

import asyncio
import base64
import configparser
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from importlib import metadata as md
from pathlib import Path, PurePosixPath
from platform import machine as _host_machine
from typing import Any, Generic, TypeVar

import anyio
import attrs

from stepflow.errors import ImageBuildError
from stepflow.events import ImageBuildFinished, ImageBuildStarted, ImagePushed, LogLine
from stepflow.interfaces.container_registry import ContainerRegistry, RegistryError
from stepflow.interfaces.image_builder import ImageBuilder
from stepflow.remote._context import ContextListing, list_context
from stepflow.remote._failpoints import failpoint

__all__ = ["ImageManager", "ImageSpec", "ImageStats", "WheelTarget", "check_base", "normalize_platform"]

#: ``PYTHONUSERBASE`` of step images: packages in lib/pythonX.Y/site-packages, scripts in bin.
USER_BASE = "/opt/stepflow"
PROJECT_DIR = "/opt/stepflow/project"
#: Bumped when the image layout changes, so old tags are not mistaken for new ones.
_LAYOUT = "stepflow-image/2"
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: One path component of an image name (Docker's reference grammar).
_NAME_PART = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_PIP_TAIL = 15
#: pip processes at once (downloads are network-bound), and batches the downloads are split into.
_PIP_PROCESSES = 6
_DOWNLOAD_BATCHES = 3
#: Build contexts and partial downloads older than this are leftovers of killed processes.
_STALE_SECONDS = 6 * 3600.0
_BUILD_TAIL = 20
#: Date of the entries of the packages archive (1980-01-01, the oldest a zip file can hold).
_ARCHIVE_MTIME = 315532800
#: Docker architecture (with variant) -> machine name in wheel platform tags.
_MACHINES = {"amd64": "x86_64", "arm64": "aarch64", "386": "i686", "arm/v7": "armv7l", "ppc64le": "ppc64le",
             "s390x": "s390x", "riscv64": "riscv64"}
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "arm64/v8": "arm64", "i386": "386",
                 "i686": "386", "armv7l": "arm/v7", "arm": "arm/v7", "armhf": "arm/v7"}
#: glibc assumed when the builder cannot inspect the base image (manylinux_2_28: RHEL 8, Debian 10+).
_DEFAULT_GLIBC = (2, 28)
#: musl of current Alpine releases; musllinux_1_1 wheels run on it too.
_DEFAULT_MUSL = (1, 2)
#: Oldest glibc with a manylinux tag per machine (manylinux1 = 2.5, manylinux2014 = 2.17).
_OLDEST_GLIBC = {"x86_64": 5, "i686": 5}
_LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
#: Compiles the unpacked packages in parallel, with the paths they have in the image (argv: image
#: site dir, then host site dirs); hash-checked pycs do not depend on file times.
_COMPILE = """
import compileall, functools, os, py_compile, sys
from concurrent.futures import ProcessPoolExecutor
files, ddirs = [], []
for site in sys.argv[2:]:
    for parent, _, names in os.walk(site):
        ddir = os.path.normpath(os.path.join(sys.argv[1], os.path.relpath(parent, site)))
        for name in names:
            if name.endswith(".py"):
                files.append(os.path.join(parent, name))
                ddirs.append(ddir)
one = functools.partial(compileall.compile_file, quiet=2,
                        invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
with ProcessPoolExecutor() as pool:
    list(pool.map(one, files, ddirs, chunksize=64))
"""


def _tuple_of_str(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _env_pairs(value: Any) -> tuple[tuple[str, str], ...]:
    items = value.items() if hasattr(value, "items") else value
    return tuple((str(k), str(v)) for k, v in items)


def _opt_path(value: Any) -> Path | None:
    return None if value is None else Path(value)


@attrs.frozen
class ImageSpec:
    """What goes into a step image. Equal specs of an unchanged project give the same tag."""

    #: ``FROM`` image, e.g. "stepflow-base:py3.11"; must be on the builder's daemon or pullable.
    base_image: str
    #: Extra distributions installed on the host to ship (with their dependencies), e.g. ("numpy",).
    requirements: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    #: The user's code, copied to /opt/stepflow/project (None: no code).
    project_root: Path | None = attrs.field(default=None, converter=_opt_path)
    #: Image repository name in the registry.
    repository: str = "stepflow-steps"
    #: ``ENV`` lines baked into the image (a dict is accepted too).
    env: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_env_pairs)
    #: OS/architecture the image runs on; the wheels shipped are chosen for it, and the base image
    #: must be of it.
    platform: str = "linux/amd64"


@attrs.define
class ImageStats:
    """Counters of one :class:`ImageManager` (what it actually did, for tests and benchmarks)."""

    ensures: int = 0
    registry_checks: int = 0
    builds: int = 0
    pushes: int = 0
    pip_runs: int = 0
    wheels_downloaded: int = 0
    wheels_built: int = 0
    wheels_reused: int = 0
    #: Wheels unpacked (and compiled) into the cache for an image layout.
    wheels_unpacked: int = 0
    #: Base images inspected (platform, Python, C library); once per image id and process.
    base_inspections: int = 0
    #: Seconds spent making the last wheelhouse available (downloads, builds, cache lookups).
    last_wheelhouse_seconds: float = 0.0
    #: Seconds spent unpacking and compiling wheels for the last image (0 when all were cached).
    last_unpack_seconds: float = 0.0
    #: Total size of the last wheelhouse, bytes.
    last_wheelhouse_bytes: int = 0
    last_wheel_count: int = 0
    #: Seconds spent computing the last build context (closure, wheels, project copy, hash).
    last_context_seconds: float = 0.0


# ------------------------------------------------------------------------------------ platforms
def normalize_platform(platform: str) -> str:
    """``linux/<docker arch>`` for a platform such as "linux/arm64", "linux/aarch64" or "linux/arm64/v8"."""
    os_name, _, arch = str(platform).strip().lower().partition("/")
    arch = _ARCH_ALIASES.get(arch, arch)
    if os_name != "linux" or arch not in _MACHINES:
        raise ImageBuildError(f"unsupported image platform {platform!r}: step images run on Linux; use one of "
                              f"{', '.join('linux/' + a for a in _MACHINES)}")
    return f"linux/{arch}"


def host_platform() -> str | None:
    """The Docker platform of this host (None when it is not Linux: nothing built here runs in an image)."""
    if not sys.platform.startswith("linux"):
        return None
    arch = _host_machine().lower()
    arch = _ARCH_ALIASES.get(arch, arch)
    return f"linux/{arch}" if arch in _MACHINES else None


def _int_pair(value: Any) -> tuple[int, int]:
    return int(value[0]), int(value[1])


def _version_pair(text: str) -> tuple[int, int] | None:
    found = re.search(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


@attrs.frozen
class WheelTarget:
    """Where shipped wheels must run: the image's platform, CPython minor version and C library."""

    platform: str = attrs.field(converter=normalize_platform)
    python: tuple[int, int] = attrs.field(converter=_int_pair)
    #: "glibc" (manylinux wheels) or "musl" (musllinux wheels).
    libc: str = "glibc"
    #: Newest C library version the wheels may need.
    libc_version: tuple[int, int] = _DEFAULT_GLIBC

    @classmethod
    def of(cls, platform: str, python: Iterable[int], libc: str = "") -> WheelTarget:
        """From the C library a base image reports: "glibc 2.36", "musl" or "" (unknown: glibc 2.28)."""
        pair = tuple(python)
        text = libc.strip().lower()
        if text.startswith("musl"):
            return cls(platform, pair, "musl", _version_pair(text) or _DEFAULT_MUSL)
        return cls(platform, pair, "glibc", _version_pair(text) or _DEFAULT_GLIBC)

    @property
    def machine(self) -> str:
        """The architecture as wheel tags spell it, e.g. "aarch64"."""
        return _MACHINES[self.platform.partition("/")[2]]

    @property
    def python_tag(self) -> str:
        """E.g. "cp311"."""
        return f"cp{self.python[0]}{self.python[1]}"

    @property
    def key(self) -> str:
        """Cache directory name: Python tag and newest platform tag, e.g. "cp311-manylinux_2_36_aarch64"."""
        return f"{self.python_tag}-{self.platform_tags()[0]}"

    def describe(self) -> str:
        """E.g. "linux/arm64 (CPython 3.11, glibc 2.36)"."""
        return (f"{self.platform} (CPython {self.python[0]}.{self.python[1]}, "
                f"{self.libc} {self.libc_version[0]}.{self.libc_version[1]})")

    def platform_tags(self) -> list[str]:
        """Wheel platform tags that run on the target, newest first (never the host-only ``linux_*``)."""
        m = self.machine
        if self.libc == "musl":
            major, minor = self.libc_version
            return [f"musllinux_{major}_{n}_{m}" for n in range(minor, 0, -1)]
        tags = []
        oldest = _OLDEST_GLIBC.get(m, 17)
        for n in range(self.libc_version[1], oldest - 1, -1):
            tags.append(f"manylinux_2_{n}_{m}")
            legacy = _LEGACY_MANYLINUX.get(n)
            if legacy is not None and (n == 17 or m in _OLDEST_GLIBC):
                tags.append(f"{legacy}_{m}")
        if not tags or self.libc_version[0] != 2:
            raise ImageBuildError(f"glibc {self.libc_version[0]}.{self.libc_version[1]} is not supported: "
                                  f"manylinux wheels for {self.platform} need glibc 2.{oldest} or newer")
        return tags

    def pip_args(self) -> list[str]:
        """``pip download`` options that select wheels for the target."""
        args = []
        for tag in self.platform_tags():
            args += ["--platform", tag]
        return [*args, "--python-version", f"{self.python[0]}.{self.python[1]}", "--implementation", "cp",
                "--abi", self.python_tag, "--abi", "abi3", "--abi", "none"]

    def accepts(self, wheel_name: str) -> bool:
        """Whether the wheel file ``wheel_name`` runs on the target.

        Wheels built on this host (``linux_x86_64``...) count only when the host is the target.
        """
        from packaging.utils import parse_wheel_filename

        tags = parse_wheel_filename(wheel_name)[3]
        if not tags.isdisjoint(_supported_tags(self)):
            return True
        if self.platform == host_platform() and self.python == sys.version_info[:2]:
            from packaging.tags import sys_tags

            return not tags.isdisjoint(sys_tags())
        return False


@functools.cache
def _supported_tags(target: WheelTarget) -> frozenset[Any]:
    from packaging.tags import compatible_tags, cpython_tags

    plats = target.platform_tags()
    return frozenset([*cpython_tags(target.python, abis=[target.python_tag], platforms=plats),
                      *compatible_tags(target.python, target.python_tag, plats)])


def check_base(base_image: str, info: Mapping[str, Any], platform: str,
               runner: tuple[int, int] | None = None) -> WheelTarget:
    """The wheel target of a step image on ``base_image``; ImageBuildError when the base cannot run it.

    ``info`` is what the builder found in the base image (``platform``, ``python``, ``libc``,
    ``user_site``); ``runner`` the Python of this process (payloads are pickled by cloudpickle,
    which needs the same minor version on both sides).
    """
    want = normalize_platform(platform)
    runner = runner or (sys.version_info[0], sys.version_info[1])
    found = str(info.get("platform") or "")
    if found:
        try:
            same = normalize_platform(found) == want
        except ImageBuildError:
            same = False
        if not same:
            raise ImageBuildError(
                f"base image '{base_image}' is a {found} image, but the step image is for {want}: the result would "
                f"say {want} while its programs still need {found}. Use a {want} variant of the base image (e.g. "
                f"`docker pull --platform {want} IMAGE` or `docker buildx build --platform {want}`, under its own "
                f"tag) or set the step's platform to {found}")
    python = info.get("python")
    if not python or len(python) < 2:
        raise ImageBuildError(f"cannot tell which Python base image '{base_image}' has: it needs python3 "
                              f"{runner[0]}.{runner[1]} on its PATH")
    major, minor = int(python[0]), int(python[1])
    if (major, minor) != tuple(runner):
        raise ImageBuildError(
            f"base image '{base_image}' has Python {major}.{minor}, but this runner uses Python "
            f"{runner[0]}.{runner[1]}: step payloads are pickled with cloudpickle, which needs the same Python "
            f"minor version on both sides. Use a base image with Python {runner[0]}.{runner[1]} (--base_image), "
            f"or run stepflow with Python {major}.{minor}")
    if info.get("user_site") is False:
        raise ImageBuildError(
            f"the python3 of base image '{base_image}' ignores user site-packages (a virtualenv without system "
            f"site packages, or PYTHONNOUSERSITE set), where step images put their packages (PYTHONUSERBASE="
            f"{USER_BASE}): use a base image whose python3 is a system interpreter")
    return WheelTarget.of(want, (major, minor), str(info.get("libc") or ""))


# ------------------------------------------------------------------------------------ packaging
def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@attrs.frozen
class _Dist:
    """One distribution of the closure, as installed on the host."""

    name: str          # canonical
    display: str       # as in its metadata
    version: str
    kind: str          # "index" | "local" (a source directory) | "direct" (other PEP 610 URL)
    source: str = ""   # local: directory; direct: file path of a wheel or a PEP 508 URL target
    pure: bool | None = None  # the installed copy is pure Python (its WHEEL file; None: unknown)


def _origin(dist: md.Distribution) -> tuple[str, str]:
    """How ``dist`` was installed, from PEP 610 ``direct_url.json``: (kind, source)."""
    text = dist.read_text("direct_url.json")
    if not text:
        return "index", ""
    try:
        info = json.loads(text)
    except ValueError:
        return "index", ""
    url = str(info.get("url", ""))
    if url.startswith("file:"):
        path = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
        if "dir_info" in info:
            return "local", path
        if "archive_info" in info:
            return "direct", path
    vcs = info.get("vcs_info")
    if vcs and vcs.get("commit_id"):
        return "direct", f"{vcs.get('vcs', 'git')}+{url}@{vcs['commit_id']}"
    if "archive_info" in info:
        return "direct", url
    return "index", ""


def _is_pure(dist: md.Distribution) -> bool | None:
    for line in (dist.read_text("WHEEL") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "root-is-purelib":
            return value.strip().lower() == "true"
    return None


def _make_dist(dist: md.Distribution) -> _Dist:
    display = dist.metadata["Name"] or "?"
    kind, source = _origin(dist)
    return _Dist(_canon(display), display, dist.version, kind, source, _is_pure(dist))


def _installed() -> dict[str, md.Distribution]:
    """Installed distributions by canonical name; the first on sys.path wins, as for imports."""
    out: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(_canon(name), dist)
    return out


def resolve_closure(requirements: Iterable[str],
                    target: WheelTarget | None = None) -> tuple[list[_Dist], list[str]]:
    """Every distribution to ship, and the pip install arguments of the roots.

    Roots: stepflow and ``requirements``. Dependencies come
    from the metadata of the versions installed here; environment markers are evaluated for this
    interpreter (the base image must run the same Python minor version) on the ``target``'s
    architecture, extras only when asked.
    """
    from packaging.requirements import Requirement

    env: dict[str, str] = {}
    if target is not None:
        env = {"platform_machine": target.machine, "sys_platform": "linux", "platform_system": "Linux",
               "os_name": "posix", "python_version": f"{target.python[0]}.{target.python[1]}"}
    installed_dists = _installed()
    queue: deque[tuple[Any, str | None]] = deque()
    # Only what a job runs: stepflow's entrypoint, the store's fsspec backend and the user's
    # requirements. Plugins stay on the runner: shipping them (a cloud SDK each) would make every
    # image carry every backend's dependencies.
    queue.append((Requirement("stepflow"), None))
    for text in requirements:
        try:
            queue.append((Requirement(text), None))
        except Exception as exc:
            raise ImageBuildError(f"invalid requirement {text!r} in the image spec: {exc}") from None
    roots: dict[str, tuple[str, set[str]]] = {}
    found: dict[str, _Dist] = {}
    extras_done: dict[str, set[str]] = {}
    while queue:
        req, parent = queue.popleft()
        name = _canon(req.name)
        installed = installed_dists.get(name)
        if installed is None:
            if parent is None:
                raise ImageBuildError(
                    f"distribution '{req.name}' is not installed on the host: step images ship the "
                    f"versions installed here, so install it (pip install {req.name}) or drop it from "
                    "the requirements")
            raise ImageBuildError(
                f"distribution '{req.name}' (required by {parent}"
                f"{f' on {target.platform}' if target is not None else ''}) is not installed on the host; "
                f"install it (pip install '{req}') or reinstall {parent} so its dependencies are complete")
        if req.specifier and not req.specifier.contains(installed.version, prereleases=True):
            raise ImageBuildError(
                f"'{req}'{f' (required by {parent})' if parent else ''} does not match the installed "
                f"{req.name} {installed.version}; step images ship the installed versions")
        first = name not in found
        if first:
            found[name] = _make_dist(installed)
        if parent is None:
            entry = roots.setdefault(name, (found[name].display, set()))
            entry[1].update(req.extras)
        done = extras_done.setdefault(name, set())
        todo = ([""] if first else []) + sorted(set(req.extras) - done)
        done.update(req.extras)
        if not todo:
            continue
        for text in installed.requires or ():
            dep = Requirement(text)
            for extra in todo:
                if extra == "":
                    applies = dep.marker is None or dep.marker.evaluate(dict(env, extra=""))
                else:
                    applies = (dep.marker is not None and "extra" in str(dep.marker)
                               and dep.marker.evaluate(dict(env, extra=extra)))
                if applies:
                    queue.append((dep, found[name].display))
                    break
    installs = []
    for name in sorted(roots):
        display, extras = roots[name]
        suffix = f"[{','.join(sorted(extras))}]" if extras else ""
        installs.append(f"{display}{suffix}=={found[name].version}")
    return [found[k] for k in sorted(found)], installs


# ------------------------------------------------------------------------------------ file trees
def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_hash(root: Path, *, home: Path | None = None) -> str:
    """Content hash of a source tree: the files that would ship from it (see :mod:`._context`)."""
    h = hashlib.sha256()
    for f in list_context(root, home=home, scan_secrets=False).files:
        h.update(f"{f.rel}\0{_file_sha(f.path)}\0{f.executable}\n".encode())
    return h.hexdigest()


def stage_project(root: Path, dest: Path, *, home: Path | None = None) -> tuple[list[tuple[str, str, bool]],
                                                                                 ContextListing]:
    """Copy the project's shippable files into ``dest``, hashing each file as it is copied.

    The tag then describes exactly what goes into the image, even if a file changes meanwhile.
    """
    listing = list_context(root, home=home)
    entries = []
    for f in listing.files:
        target = dest / f.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(f.path, "rb") as src, open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        target.chmod(0o755 if f.executable else 0o644)
        entries.append((f.rel, h.hexdigest(), f.executable))
    return entries, listing


def wheel_digest(path: Path) -> str:
    """Hash of a wheel's contents (member names, modes and bytes), independent of zip timestamps."""
    h = hashlib.sha256()
    with zipfile.ZipFile(path) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if info.is_dir():
                continue
            member = hashlib.sha256()
            with zf.open(info) as fh:
                while chunk := fh.read(1 << 20):
                    member.update(chunk)
            mode = (info.external_attr >> 16) & 0o111
            h.update(f"{info.filename}\0{mode:o}\0{member.hexdigest()}\n".encode())
    return h.hexdigest()


def _site_rel(python: tuple[int, int]) -> str:
    """The user site-packages of a user base, relative to it (as ``site.getusersitepackages``)."""
    return f"lib/python{python[0]}.{python[1]}/site-packages"


_DOTTED = re.compile(r"^[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*$")


def _launcher(value: str) -> str | None:
    """A console-script launcher for entry point ``module:attr [extras]`` (None if malformed)."""
    module, _, attr = value.partition(":")
    module, attr = module.strip(), attr.split("[", 1)[0].strip()
    if not _DOTTED.match(module) or not _DOTTED.match(attr):
        return None
    return (f"#!/usr/bin/env python3\nimport sys\n\nfrom {module} import {attr.split('.')[0]}\n\n"
            f"if __name__ == \"__main__\":\n    sys.exit({attr}())\n")


def _record_line(path: Path, site: Path) -> str:
    data = path.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{os.path.relpath(path, site).replace(os.sep, '/')},sha256={digest},{len(data)}"


def unpack_wheel(wheel: Path, dest: Path, python: tuple[int, int]) -> None:
    """Install ``wheel`` into ``dest`` laid out as a user base (``PYTHONUSERBASE``), as pip would.

    Packages (and ``.data/purelib``/``platlib``) go to lib/pythonX.Y/site-packages, ``.data/scripts``
    (``#!python`` rewritten) and console-script launchers to bin, headers to include and
    ``.data/data`` to ``dest`` itself; the dist-info gets INSTALLER and a RECORD of what was written.
    Interpreter lines say ``/usr/bin/env python3``: the image's python3, whatever the host's is.
    """
    from packaging.utils import parse_wheel_filename

    name = parse_wheel_filename(wheel.name)[0]
    site = dest / _site_rel(python)
    homes = {"purelib": site, "platlib": site, "scripts": dest / "bin", "data": dest,
             "headers": dest / "include" / f"python{python[0]}.{python[1]}" / name}
    written: list[Path] = []
    info_dirs: set[str] = set()
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            parts = PurePosixPath(info.filename).parts
            if (not parts or info.filename.startswith("/") or "\\" in info.filename
                    or any(p in ("", ".", "..") for p in parts)):
                raise ImageBuildError(f"wheel {wheel.name} has an unsafe member path {info.filename!r}")
            scheme = ""
            if len(parts) > 2 and parts[0].endswith(".data"):
                scheme = parts[1]
                if scheme not in homes:
                    raise ImageBuildError(f"wheel {wheel.name} has an unknown .data directory {scheme!r}")
                target = homes[scheme].joinpath(*parts[2:])
            else:
                target = site.joinpath(*parts)
                if parts[0].endswith(".dist-info"):
                    info_dirs.add(parts[0])
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                if scheme == "scripts":
                    first = src.readline()
                    out.write(b"#!/usr/bin/env python3\n" if first.startswith(b"#!python") else first)
                shutil.copyfileobj(src, out)
            executable = scheme == "scripts" or (info.external_attr >> 16) & 0o111
            target.chmod(0o755 if executable else 0o644)
            written.append(target)
    if len(info_dirs) != 1:
        raise ImageBuildError(f"wheel {wheel.name} has {len(info_dirs)} .dist-info directories, not one")
    dist_info = site / info_dirs.pop()
    entry_points = dist_info / "entry_points.txt"
    if entry_points.is_file():
        parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
        parser.optionxform = str  # type: ignore[assignment,method-assign]  # script names are case-sensitive
        try:
            parser.read_string(entry_points.read_text(encoding="utf-8"))
        except (configparser.Error, UnicodeDecodeError) as exc:
            raise ImageBuildError(f"wheel {wheel.name} has an invalid entry_points.txt: {exc}") from None
        for group in ("console_scripts", "gui_scripts"):
            if not parser.has_section(group):
                continue
            for script, value in parser.items(group):
                text = _launcher(value)
                if text is None or "/" in script or script in ("", ".", ".."):
                    continue
                path = dest / "bin" / script
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                path.chmod(0o755)
                written.append(path)
    (dist_info / "INSTALLER").write_text("stepflow\n")
    record = dist_info / "RECORD"
    lines = [_record_line(p, site) for p in sorted(set(written) | {dist_info / "INSTALLER"}) if p != record]
    record.write_text("\n".join([*lines, f"{os.path.relpath(record, site).replace(os.sep, '/')},,"]) + "\n")
    for parent, _, _ in os.walk(dest):
        os.chmod(parent, 0o755)  # readable by any user the image runs as, whatever this umask


def _pack_trees(trees: list[tuple[str, Path]], archive: Path) -> list[str]:
    """Write the files of the unpacked ``(name, tree)`` pairs into the tar ``archive``.

    One archive, ADDed by the Dockerfile, is much cheaper for the daemon than thousands of files
    in the context. Entries are sorted, owned by root and dated :data:`_ARCHIVE_MTIME` (the pycs are
    hash-checked), so equal wheels give an equal archive. A path shipped by two distributions
    keeps the first one's file; returns a warning for each such path whose contents differ.
    """
    files: dict[str, tuple[str, Path]] = {}
    dirs: set[str] = set()
    warnings = []
    for name, tree in trees:
        for parent, _, names in os.walk(tree):
            rel_parent = Path(parent).relative_to(tree).as_posix()
            if rel_parent != ".":
                dirs.add(rel_parent)
            for file in names:
                rel = file if rel_parent == "." else f"{rel_parent}/{file}"
                src = Path(parent) / file
                if rel in files:
                    owner, first = files[rel]
                    if "__pycache__" not in rel and _file_sha(src) != _file_sha(first):
                        warnings.append(f"{rel} is shipped by both {owner} and {name}; the image has {owner}'s")
                    continue
                files[rel] = (name, src)
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(dirs):
            info = tarfile.TarInfo(rel)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _ARCHIVE_MTIME
            tar.addfile(info)
        for rel in sorted(files):
            src = files[rel][1]
            info = tarfile.TarInfo(rel)
            st = src.stat()
            info.size, info.mtime = st.st_size, _ARCHIVE_MTIME
            info.mode = 0o755 if st.st_mode & 0o111 else 0o644
            with open(src, "rb") as fh:
                tar.addfile(info, fh)
    return warnings


# ------------------------------------------------------------------------------------ Dockerfile
def _env_value(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ImageBuildError("image env values cannot contain newlines")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def render_dockerfile(base_image: str, env: tuple[tuple[str, str], ...], with_project: bool,
                      python: tuple[int, int]) -> str:
    """The Dockerfile of a step image (deterministic for equal inputs).

    It only copies files (no ``RUN``): the packages arrive unpacked, so an image for another
    architecture builds without emulation. ``python`` is the base image's Python (major, minor).
    """
    if not base_image or any(c.isspace() for c in base_image):
        raise ImageBuildError(f"invalid base image reference {base_image!r}")
    lines = ["# Generated by stepflow; the image tag is a hash of this file and everything it copies.",
             f"FROM {base_image}"]
    for key, value in env:
        if not _ENV_KEY.match(key):
            raise ImageBuildError(f"invalid environment variable name {key!r} in the image spec")
        lines.append(f"ENV {key}={_env_value(value)}")
    # The user site of PYTHONUSERBASE comes before the base image's site-packages, .pth files included.
    lines += [f"# Python {python[0]}.{python[1]} packages in {USER_BASE}/{_site_rel(python)}, scripts in "
              f"{USER_BASE}/bin (ADD unpacks the archive).",
              f'ENV PYTHONUSERBASE={USER_BASE} PATH="{USER_BASE}/bin:${{PATH}}"',
              f"ADD python.tar {USER_BASE}/"]
    if with_project:
        lines += [f"COPY project {PROJECT_DIR}", f"ENV PYTHONPATH={PROJECT_DIR}", f"WORKDIR {PROJECT_DIR}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ locks, flights
@asynccontextmanager
async def file_lock(path: Path) -> AsyncIterator[None]:
    """An exclusive lock on the file ``path``, shared by every process (and event loop) of this machine.

    Polled without blocking so a waiting coroutine never blocks its loop and can be cancelled.
    """
    from filelock import FileLock, Timeout

    await anyio.to_thread.run_sync(lambda: path.parent.mkdir(parents=True, exist_ok=True))
    lock = FileLock(str(path), thread_local=False)  # one instance per holder: never reentrant
    delay = 0.005
    while True:
        try:
            lock.acquire(blocking=False)
            break
        except Timeout:
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.1)
    try:
        yield
    finally:
        lock.release()


T = TypeVar("T")


class _Flight(Generic[T]):
    """One in-flight computation awaited by any number of callers.

    The work runs in its own task, so one caller's cancellation does not abort it for the others;
    when the last waiter goes away it is cancelled. It is dropped from its table when done, so a
    failure is reported to everyone waiting and the next caller starts afresh.
    """

    def __init__(self, table: dict[Any, _Flight[T]], key: Any, work: Awaitable[T], owner: object) -> None:
        self.table, self.key, self.owner = table, key, owner
        self.waiters = 0
        self.task: asyncio.Future[T] = asyncio.ensure_future(work)
        self.task.add_done_callback(self._done)
        table[key] = self

    def _done(self, task: asyncio.Future[T]) -> None:
        if self.table.get(self.key) is self:
            del self.table[self.key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when nobody waits

    async def wait(self) -> T:
        self.waiters += 1
        try:
            return await asyncio.shield(self.task)
        finally:
            self.waiters -= 1
            if self.waiters == 0 and not self.task.done():
                if self.table.get(self.key) is self:
                    del self.table[self.key]  # a newcomer starts a fresh flight
                self.task.cancel()


@attrs.frozen
class _Prepared:
    tag: str
    context: Path
    base_id: str
    platform: str


class _Call:
    """Identity of one ``ensure()`` call (who reports the build)."""

    __slots__ = ("step",)

    def __init__(self, step: str | None) -> None:
        self.step = step



#: What builders found in base images, by image id (an id names fixed contents, so it never changes).
_BASE_INFO: dict[str, dict[str, Any]] = {}


# ------------------------------------------------------------------------------------ the manager
class ImageManager:
    """Makes sure step images exist in a registry: one build and push per content hash.

    ``emit(EventClass, **fields)`` publishes events (run_id/seq/ts filled by the caller); every
    ``ensure()`` call reports exactly one :class:`ImageBuildFinished` (``cached=False`` only for
    the call that built the image). Build and push output goes out as :class:`LogLine` events.
    """

    def __init__(self, builder: ImageBuilder, registry: ContainerRegistry, *, cache_dir: Path,
                 emit: Callable[..., None] | None = None, home: Path | None = None) -> None:
        self.builder = builder
        self.registry = registry
        self.cache_dir = Path(cache_dir)
        #: The stepflow home: never shipped, wherever it sits in a project.
        self.home = Path(home) if home is not None else _stepflow_home()
        self.emit = emit
        self.stats = ImageStats()
        self._spec_flights: dict[ImageSpec, _Flight[tuple[str, object]]] = {}
        self._tag_flights: dict[str, _Flight[str]] = {}
        self._pip_limit = anyio.CapacityLimiter(_PIP_PROCESSES)
        self._inspect_locks: dict[str, anyio.Lock] = {}
        self._swept = False

    # -- public -------------------------------------------------------------------------
    async def ensure(self, spec: ImageSpec, *, step: str | None = None) -> str:
        """Return ``<registry uri>/<repository>:<content hash>``, the pullable image of ``spec``.

        Builds and pushes it unless the registry already has it; concurrent calls share one build.
        """
        started = time.perf_counter()
        self.stats.ensures += 1
        call = _Call(step)
        flight = self._spec_flights.get(spec)
        if flight is None:
            flight = _Flight(self._spec_flights, spec, self._ensure_spec(spec, call), call)
        ref, reporter = await flight.wait()
        if reporter is not call:
            self._emit(ImageBuildFinished, image=ref, cached=True,
                       duration=time.perf_counter() - started, step=step)
        return ref

    async def wheelhouse(self, requirements: Iterable[str], target: WheelTarget, *,
                         progress: Callable[[str], None] | None = None) -> list[Path]:
        """The wheels an image for ``target`` ships with ``requirements``, from the cache or made now."""
        dists, _ = await anyio.to_thread.run_sync(resolve_closure, tuple(requirements), target)
        return [path for path, _ in await self._wheelhouse(dists, target, progress)]

    # -- one spec: context then one tag flight ---------------------------------------------
    async def _ensure_spec(self, spec: ImageSpec, call: _Call) -> tuple[str, object]:
        ref = self.registry.image_ref(spec.repository, "0")
        _check_name(ref.rsplit(":", 1)[0])
        prepared = await self._prepare(spec, self._progress(call.step))
        ref = self.registry.image_ref(spec.repository, prepared.tag)
        handed_over = False
        try:
            flight = self._tag_flights.get(ref)
            if flight is None:
                flight = _Flight(self._tag_flights, ref, self._publish(prepared, spec.repository, ref, call), call)
                handed_over = True  # the tag flight removes the context when it is done
            return await flight.wait(), flight.owner
        finally:
            if not handed_over:
                await _remove_tree(prepared.context)

    async def _publish(self, prepared: _Prepared, repository: str, ref: str, call: _Call) -> str:
        """Registry check, then build + push unless present. Emits the build events."""
        started = time.perf_counter()
        lock = self.cache_dir / "locks" / f"image-{hashlib.sha256(ref.encode()).hexdigest()[:32]}.lock"
        try:
            # Other managers and processes sharing this cache wait, then find the image pushed.
            async with file_lock(lock):
                self.stats.registry_checks += 1
                try:
                    present = await self.registry.has_image(repository, prepared.tag)
                except RegistryError as exc:
                    raise ImageBuildError(f"cannot check whether {ref} exists: {exc}") from exc
                if present:
                    self._emit(ImageBuildFinished, image=ref, cached=True,
                               duration=time.perf_counter() - started, step=call.step)
                    return ref
                progress = self._progress(call.step)
                self._emit(ImageBuildStarted, image=ref, step=call.step)
                t0 = time.perf_counter()
                self.stats.builds += 1
                failpoint("image.build")
                extra = {"platform": prepared.platform} if _accepts_platform(self.builder.build) else {}
                await self.builder.build(prepared.context, ref, progress=progress, **extra)
                self._emit(ImageBuildFinished, image=ref, cached=False,
                           duration=time.perf_counter() - t0, step=call.step)
                t1 = time.perf_counter()
                self.stats.pushes += 1
                failpoint("image.push")
                await self.builder.push(ref, await _push_auth(self.registry), progress=progress)
                self._emit(ImagePushed, image=ref, duration=time.perf_counter() - t1)
                return ref
        finally:
            await _remove_tree(prepared.context)

    # -- context -----------------------------------------------------------------------
    async def _prepare(self, spec: ImageSpec, progress: Callable[[str], None] | None) -> _Prepared:
        t0 = time.perf_counter()
        if not self._swept:  # leftovers of killed processes
            self._swept = True
            await anyio.to_thread.run_sync(_sweep, self.cache_dir)
        base_id = await self._base_image_id(spec.base_image)
        target = await self._target(spec, base_id)
        dists, _ = await anyio.to_thread.run_sync(resolve_closure, spec.requirements, target)
        project = spec.project_root.resolve() if spec.project_root is not None else None
        if project is not None and not project.is_dir():
            raise ImageBuildError(f"project_root {project} is not a directory")
        dockerfile = render_dockerfile(spec.base_image, spec.env, project is not None, target.python)
        wheels = await self._wheelhouse(dists, target, progress)
        trees = await self._trees(wheels, target)
        context = self.cache_dir / "contexts" / uuid.uuid4().hex

        warnings: list[str] = []

        def stage() -> str:
            context.mkdir(parents=True)
            (context / "Dockerfile").write_text(dockerfile)
            warnings.extend(_pack_trees([(d.display, t) for d, t in zip(dists, trees, strict=True)],
                                        context / "python.tar"))
            files: list[tuple[str, str, bool]] = []
            if project is not None:
                (context / "project").mkdir()
                files, listing = stage_project(project, context / "project", home=self.home)
                warnings.extend(w.message for w in listing.warnings)
            h = hashlib.sha256(f"{_LAYOUT}\n".encode())
            h.update(f"dockerfile\0{dockerfile}\0base\0{spec.base_image}\0{base_id}\n".encode())
            h.update(f"target\0{target.platform}\0{target.key}\n".encode())
            for path, digest in sorted(wheels, key=lambda w: w[0].name):
                h.update(f"wheel\0{path.name}\0{digest}\n".encode())
            for rel, sha, executable in files:
                h.update(f"file\0{rel}\0{sha}\0{int(executable)}\n".encode())
            return h.hexdigest()[:16]

        try:
            tag = await anyio.to_thread.run_sync(stage)
        except BaseException:
            await _remove_tree(context)
            raise
        for line in warnings:  # shipped anyway: the user decides (.stepflowignore)
            if progress is not None:
                progress(f"warning: {line}")
        self.stats.last_context_seconds = time.perf_counter() - t0
        return _Prepared(tag, context, base_id, target.platform)

    async def _base_image_id(self, base_image: str) -> str:
        image_id = getattr(self.builder, "image_id", None)
        if image_id is None:
            return ""  # the builder cannot tell: the reference alone goes into the tag
        found = await image_id(base_image)
        if found is None and hasattr(self.builder, "pull"):
            try:
                await self.builder.pull(base_image)
            except ImageBuildError as exc:
                raise ImageBuildError(
                    f"base image '{base_image}' not found on the Docker daemon and not pullable ({exc}): "
                    "build it (scripts/services.sh does) or set --base_image") from None
            found = await image_id(base_image)
        if found is None:
            raise ImageBuildError(f"base image '{base_image}' not found on the Docker daemon: build it "
                                  "(scripts/services.sh does) or set --base_image")
        return str(found)

    async def _target(self, spec: ImageSpec, base_id: str) -> WheelTarget:
        """What the wheels must run on, after checking the base image can run the step at all."""
        platform = normalize_platform(spec.platform)
        inspect_base = getattr(self.builder, "inspect_base", None)
        if inspect_base is None or not base_id:  # the builder cannot tell: trust the spec
            return WheelTarget(platform, sys.version_info[:2])
        lock = self._inspect_locks.setdefault(base_id, anyio.Lock())
        async with lock:
            info = _BASE_INFO.get(base_id)
            if info is None:
                self.stats.base_inspections += 1
                info = dict(await inspect_base(base_id))
                _BASE_INFO[base_id] = info
        return check_base(spec.base_image, info, platform)

    # -- wheelhouse --------------------------------------------------------------------
    async def _wheelhouse(self, dists: list[_Dist], target: WheelTarget,
                          progress: Callable[[str], None] | None = None) -> list[tuple[Path, str]]:
        """(wheel path, content digest) of every distribution, from the cache or made now."""
        t0 = time.perf_counter()
        root = self.cache_dir / "wheels" / target.key
        keys = await anyio.to_thread.run_sync(self._cache_keys, dists, root)
        found = await anyio.to_thread.run_sync(_lookup, dists, keys)
        self.stats.wheels_reused += len(found)
        missing = [d for d in dists if d.name not in found]
        if missing:
            async with file_lock(root / ".lock"):
                # Another manager or process may have made some of them while we waited.
                again = await anyio.to_thread.run_sync(_lookup, missing, keys)
                found.update(again)
                self.stats.wheels_reused += len(again)
                still = [d for d in missing if d.name not in found]
                if still:
                    found.update(await self._make_wheels(still, keys, target))
        wheels = [found[d.name] for d in dists]
        self.stats.last_wheelhouse_seconds = time.perf_counter() - t0
        if missing and progress is not None:
            progress(f"wheelhouse for {target.describe()}: {len(wheels)} wheels, {len(wheels) - len(missing)} "
                     f"from the cache, {len(missing)} downloaded or built in "
                     f"{self.stats.last_wheelhouse_seconds:.1f} s")
        self.stats.last_wheel_count = len(wheels)
        self.stats.last_wheelhouse_bytes = sum(p.stat().st_size for p, _ in wheels)
        return wheels

    def _cache_keys(self, dists: list[_Dist], root: Path) -> dict[str, Path]:
        keys = {}
        for d in dists:
            if d.kind == "local":
                src = Path(d.source)
                if not src.is_dir():
                    raise ImageBuildError(f"distribution '{d.display}' was installed from {src}, which no "
                                          "longer exists; reinstall it")
                digest = tree_hash(src, home=self.home)[:16]
                keys[d.name] = root / "local" / f"{d.name}-{d.version}-{digest}"
            elif d.kind == "direct":
                digest = hashlib.sha256(d.source.encode()).hexdigest()[:16]
                keys[d.name] = root / "direct" / f"{d.name}-{d.version}-{digest}"
            else:
                keys[d.name] = root / "index" / f"{d.name}-{d.version}"
        return keys

    async def _make_wheels(self, dists: list[_Dist], keys: dict[str, Path],
                           target: WheelTarget) -> dict[str, tuple[Path, str]]:
        """Download or build the missing wheels, several pip processes at once.

        Index distributions are fetched in a few batched ``pip download`` runs (one run per
        distribution only when its batch fails); local sources are built meanwhile.
        """
        out: dict[str, tuple[Path, str]] = {}
        errors: list[ImageBuildError] = []
        index = [d for d in dists if d.kind == "index"]
        other = [d for d in dists if d.kind != "index"]

        async def one(d: _Dist) -> None:
            async with self._pip_limit:
                try:
                    out[d.name] = await self._make_one(d, keys[d.name], target)
                except ImageBuildError as exc:
                    errors.append(exc)  # the others still finish (and are cached for next time)

        async def batch(chunk: list[_Dist]) -> None:
            async with self._pip_limit:
                tmp = self._tmp()
                try:
                    ok, _ = await self._pip(["download", "--no-deps", "--only-binary=:all:", *target.pip_args(),
                                             "--dest", str(tmp), *(f"{d.name}=={d.version}" for d in chunk)])
                    if ok:
                        by_name = {_canon(p.name.split("-", 1)[0]): p for p in tmp.glob("*.whl")}
                        for d in chunk:
                            if d.name in by_name:
                                out[d.name] = await anyio.to_thread.run_sync(_store_wheel, by_name[d.name],
                                                                             keys[d.name])
                                self.stats.wheels_downloaded += 1
                finally:
                    await _remove_tree(tmp)
            for d in chunk:
                if d.name not in out:
                    await one(d)

        async with anyio.create_task_group() as tg:
            for d in other:  # local builds are the slowest: start them first
                tg.start_soon(one, d)
            if len(index) == 1:
                tg.start_soon(one, index[0])
            elif index:
                size = max(4, -(-len(index) // _DOWNLOAD_BATCHES))
                for i in range(0, len(index), size):
                    tg.start_soon(batch, index[i:i + size])
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ImageBuildError(f"{len(errors)} wheels of the image could not be made:\n"
                                  + "\n".join(f"- {e}" for e in errors))
        return out

    async def _make_one(self, d: _Dist, key: Path, target: WheelTarget) -> tuple[Path, str]:
        tmp = self._tmp()
        host = host_platform()
        here = f"this {host} host" if host else "this host, which is not Linux"
        elsewhere = (f"build the image on a {target.platform} host" if host != target.platform
                     else "make its source build here")
        pin = f"{d.name}=={d.version}"
        try:
            if d.kind == "direct" and d.source.endswith(".whl") and Path(d.source).is_file():
                await anyio.to_thread.run_sync(_copy_into, Path(d.source), tmp)
            elif d.kind == "index":
                what = f"cannot get a wheel of '{pin}' for {target.describe()}"
                advice = (f"Pin a version of {d.display} that publishes wheels for {target.platform} "
                          f"({target.platform_tags()[-1]} or newer up to {target.platform_tags()[0]}), "
                          f"{elsewhere}, or choose another platform for the image")
                ok, log = await self._pip(["download", "--no-deps", "--only-binary=:all:", *target.pip_args(),
                                           "--dest", str(tmp), pin])
                if ok:
                    self.stats.wheels_downloaded += 1
                else:
                    if d.pure is False and host != target.platform:  # building would be wasted
                        raise ImageBuildError(
                            f"{what}: the package index has none, and the copy installed here is not pure Python "
                            f"(a wheel built from its source on {here} would not run there). {advice}.\n"
                            f"pip said:\n{_tail(log, 5)}")
                    ok, log2 = await self._pip(["wheel", "--no-deps", "--wheel-dir", str(tmp), pin])
                    if not ok:
                        raise ImageBuildError(
                            f"{what}: the package index has none (pip download found no matching wheel) and "
                            f"building one from source on {here} failed. {advice}.\npip said:\n{_tail(log, 5)}\n"
                            f"---\n{_tail(log2, _PIP_TAIL)}")
                    self.stats.wheels_built += 1
            else:
                source = d.source if d.kind == "local" else f"{d.display} @ {d.source}"
                ok, log = await self._pip(["wheel", "--no-deps", "--wheel-dir", str(tmp), source])
                if not ok:
                    raise ImageBuildError(
                        f"cannot build a wheel of '{d.display}' from {d.source} (pip wheel failed):\n"
                        f"{_tail(log, _PIP_TAIL)}")
                self.stats.wheels_built += 1
            built = sorted(tmp.glob("*.whl"))
            if len(built) != 1:
                raise ImageBuildError(f"expected one wheel of '{d.display}' in {tmp}, found "
                                      f"{[p.name for p in built] or 'none'}")
            if not target.accepts(built[0].name):  # before caching: a target's cache only holds wheels for it
                raise ImageBuildError(_foreign_wheel(d, built[0].name, target, here, elsewhere))
            return await anyio.to_thread.run_sync(_store_wheel, built[0], key)
        finally:
            await _remove_tree(tmp)

    async def _trees(self, wheels: list[tuple[Path, str]], target: WheelTarget) -> list[Path]:
        """The unpacked tree (a user-base layout) of every wheel, unpacked and compiled now if missing.

        A tree lies next to its wheel in the cache, so it is made once per wheel and target.
        """
        trees = [path.parent / "tree" for path, _ in wheels]
        missing = [path for path, _ in wheels if not (path.parent / "tree").is_dir()]
        self.stats.last_unpack_seconds = 0.0
        if not missing:
            return trees
        t0 = time.perf_counter()
        async with file_lock(self.cache_dir / "wheels" / target.key / ".lock"):
            missing = [path for path in missing if not (path.parent / "tree").is_dir()]
            staged: list[tuple[Path, Path]] = []
            try:
                def unpack() -> None:
                    for path in missing:
                        staging = self._tmp()
                        staged.append((path, staging))
                        unpack_wheel(path, staging, target.python)

                await anyio.to_thread.run_sync(unpack)
                if staged and target.python == sys.version_info[:2]:  # bytecode of this interpreter's minor
                    site = _site_rel(target.python)
                    await anyio.run_process([sys.executable, "-c", _COMPILE, f"{USER_BASE}/{site}",
                                             *(str(s / site) for _, s in staged)],
                                            check=False, stdin=subprocess.DEVNULL)

                def place() -> None:
                    for path, staging in staged:
                        with suppress(OSError):  # placed by another process meanwhile
                            staging.rename(path.parent / "tree")

                await anyio.to_thread.run_sync(place)
            finally:
                for _, staging in staged:
                    await _remove_tree(staging)
        self.stats.wheels_unpacked += len(staged)
        self.stats.last_unpack_seconds = time.perf_counter() - t0
        return trees

    def _tmp(self) -> Path:
        """A fresh scratch directory path in the wheel cache (swept when stale)."""
        return self.cache_dir / "wheels" / "tmp" / uuid.uuid4().hex

    async def _pip(self, args: list[str]) -> tuple[bool, str]:
        self.stats.pip_runs += 1
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_PROGRESS_BAR="off")
        proc = await anyio.run_process([sys.executable, "-m", "pip", *args], check=False, env=env,
                                       stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        return proc.returncode == 0, proc.stdout.decode(errors="replace")

    # -- events ------------------------------------------------------------------------
    def _emit(self, cls: type, **fields: Any) -> None:
        if self.emit is not None:
            self.emit(cls, **fields)

    def _progress(self, step: str | None) -> Callable[[str], None] | None:
        emit = self.emit
        if emit is None:
            return None
        who = step or "image"

        def progress(line: str) -> None:
            emit(LogLine, step=who, line=line, stream="build")

        return progress


def _foreign_wheel(d: _Dist, name: str, target: WheelTarget, here: str, elsewhere: str) -> str:
    """Why the wheel ``name`` made for ``d`` cannot ship to ``target``, and what to do."""
    from packaging.utils import parse_wheel_filename

    runs_on = ", ".join(sorted({t.platform for t in parse_wheel_filename(name)[3]}))
    if d.kind == "index":
        origin = (f"the package index has no wheel of '{d.name}=={d.version}' for it, and its source, built on "
                  f"{here}, gives {name}")
        fix = (f"Pin a version of {d.display} that publishes {target.platform} wheels, {elsewhere}, or choose "
               "another platform for the image")
    elif d.kind == "direct" and d.source.endswith(".whl"):
        origin = f"it was installed from the wheel {name} ({d.source})"
        fix = f"Install a wheel of it made for {target.platform}, or choose another platform for the image"
    else:
        origin = f"it is installed from {d.source}, and built on {here} it gives {name}"
        fix = (f"Build the image on a {target.platform} host, make '{d.display}' pure Python, or choose another "
               "platform for the image")
    return f"'{d.display}' has no wheel for {target.describe()}: {origin}, which runs only on {runs_on}. {fix}"


def _accepts_platform(build: Callable[..., Any]) -> bool:
    """Whether an ImageBuilder's ``build`` takes ``platform=`` (an optional extension of the interface)."""
    try:
        params = inspect.signature(build).parameters
    except (TypeError, ValueError):
        return False
    return "platform" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _stepflow_home() -> Path:
    from stepflow._store.sqlite import stepflow_home

    return stepflow_home()


async def _push_auth(registry: ContainerRegistry) -> tuple[str, str] | None:
    """Explicit credentials, else (for distribution registries) those of ``docker login``."""
    push_auth = getattr(registry, "push_auth", None)
    if push_auth is not None:
        found: tuple[str, str] | None = await push_auth()
        return found
    return await registry.credentials()


def _check_name(name: str) -> None:
    """ImageBuildError unless ``name`` (registry/path, no tag) is a valid image name."""
    first, _, rest = name.partition("/")
    parts = rest.split("/") if rest and ("." in first or ":" in first or first == "localhost") else name.split("/")
    bad = [p for p in parts if not _NAME_PART.match(p)]
    if bad:
        raise ImageBuildError(
            f"invalid image name {name!r}: {', '.join(repr(b) for b in bad)} must be lowercase letters and digits "
            "separated by '.', '_' or '-' (check the registry uri and the repository)")


# ------------------------------------------------------------------------------------ file helpers
def _tail(text: str, n: int) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def _sweep(cache_dir: Path, max_age: float = _STALE_SECONDS) -> None:
    """Remove build contexts and partial downloads older than ``max_age`` seconds."""
    limit = time.time() - max_age
    for parent in (cache_dir / "contexts", cache_dir / "wheels" / "tmp"):
        try:
            children = list(parent.iterdir())
        except OSError:
            continue
        for child in children:
            try:
                if child.stat().st_mtime < limit:
                    shutil.rmtree(child, ignore_errors=True)
            except OSError:
                pass


def _lookup(dists: list[_Dist], keys: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    hits = {}
    for d in dists:
        hit = _cached_wheel(keys[d.name])
        if hit is not None:
            hits[d.name] = hit
    return hits


def _cached_wheel(key: Path) -> tuple[Path, str] | None:
    """The wheel stored under ``key`` and its digest, or None."""
    try:
        wheels = [p for p in key.iterdir() if p.suffix == ".whl"]
        if len(wheels) != 1:
            return None
        digest = wheels[0].with_name(wheels[0].name + ".digest").read_text().strip()
    except OSError:
        return None
    return (wheels[0], digest) if digest else None


def _store_wheel(wheel: Path, key: Path) -> tuple[Path, str]:
    """Move ``wheel`` into the cache under ``key`` (atomically: readers see all or nothing)."""
    digest = wheel_digest(wheel)
    staging = key.parent / f".{key.name}.{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    shutil.move(str(wheel), staging / wheel.name)
    (staging / (wheel.name + ".digest")).write_text(digest + "\n")
    try:
        staging.rename(key)
    except OSError:  # someone else stored it first
        shutil.rmtree(staging, ignore_errors=True)
        hit = _cached_wheel(key)
        if hit is None:
            raise
        return hit
    return key / wheel.name, digest


def _copy_into(path: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, directory / path.name)


async def _remove_tree(path: Path) -> None:
    with anyio.CancelScope(shield=True):  # also runs while a cancelled flight unwinds
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))
