"""Step images: build context, content-hash tag, registry check, single-flight build and push.

An image is ``FROM <base image>`` plus a *wheelhouse* (wheels of stepflow, of locally installed
stepflow plugins, of the requested ``requirements`` and of everything they depend on, in the
versions installed on this host) installed with ``pip --no-index`` (hermetic: the build needs no
package index), plus the project's code under ``/opt/stepflow/project``. The tag is a hash of all
of it, so an unchanged project maps to the same tag and the registry is asked before anything is
built. Wheels are built or downloaded on the host and cached under ``cache_dir/wheels``.

Nothing here imports a Docker SDK; the builder does.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from importlib import metadata as md
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import attrs

from stepflow.errors import ImageBuildError
from stepflow.events import ImageBuildFinished, ImageBuildStarted, ImagePushed, LogLine
from stepflow.interfaces.container_registry import ContainerRegistry, RegistryError
from stepflow.interfaces.image_builder import ImageBuilder
from stepflow.remote._context import ContextListing, list_context

__all__ = ["ImageManager", "ImageSpec", "ImageStats"]

WHEEL_DIR = "/opt/stepflow/wheels"
PROJECT_DIR = "/opt/stepflow/project"
#: Bumped when the image layout changes, so old tags are not mistaken for new ones.
_LAYOUT = "stepflow-image/1"
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
    #: OS/architecture the image runs on; the wheels shipped are chosen for it.
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
    #: Seconds spent making the last wheelhouse available (downloads, builds, cache lookups).
    last_wheelhouse_seconds: float = 0.0
    #: Total size of the last wheelhouse, bytes.
    last_wheelhouse_bytes: int = 0
    last_wheel_count: int = 0
    #: Seconds spent computing the last build context (closure, wheels, project copy, hash).
    last_context_seconds: float = 0.0


# ------------------------------------------------------------------------------------ packaging
def _requirement_class() -> Any:
    """``packaging``'s Requirement if importable, else pip's vendored copy."""
    try:
        module = importlib.import_module("packaging.requirements")
    except ImportError:
        module = importlib.import_module("pip._vendor.packaging.requirements")
    return module.Requirement


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


def _make_dist(dist: md.Distribution) -> _Dist:
    display = dist.metadata["Name"] or "?"
    kind, source = _origin(dist)
    return _Dist(_canon(display), display, dist.version, kind, source)


def _installed() -> dict[str, md.Distribution]:
    """Installed distributions by canonical name; the first on sys.path wins, as for imports."""
    out: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(_canon(name), dist)
    return out


def _local_plugins(installed: dict[str, md.Distribution]) -> list[str]:
    """Installed distributions from a local directory that register ``stepflow.*`` entry points."""
    names = []
    for name, dist in sorted(installed.items()):
        try:
            groups = {ep.group for ep in dist.entry_points}
        except Exception:  # a broken installation must not break every image
            continue
        if any(g.startswith("stepflow.") for g in groups) and _origin(dist)[0] == "local":
            names.append(name)
    return names


def resolve_closure(requirements: Iterable[str]) -> tuple[list[_Dist], list[str]]:
    """Every distribution to ship, and the pip install arguments of the roots.

    Roots: stepflow, locally installed stepflow plugins and ``requirements``. Dependencies come
    from the metadata of the versions installed here; environment markers are evaluated for this
    interpreter (the base image must run the same Python minor version), extras only when asked.
    """
    requirement_cls = _requirement_class()
    installed_dists = _installed()
    queue: deque[tuple[Any, str | None]] = deque()
    for text in ["stepflow", *_local_plugins(installed_dists)]:
        queue.append((requirement_cls(text), None))
    for text in requirements:
        try:
            queue.append((requirement_cls(text), None))
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
                f"distribution '{req.name}' (required by {parent}) is not installed on the host; "
                f"reinstall {parent} so its dependencies are complete")
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
            dep = requirement_cls(text)
            for extra in todo:
                if extra == "":
                    applies = dep.marker is None or dep.marker.evaluate({"extra": ""})
                else:
                    applies = (dep.marker is not None and "extra" in str(dep.marker)
                               and dep.marker.evaluate({"extra": extra}))
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


# ------------------------------------------------------------------------------------ Dockerfile
def _env_value(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ImageBuildError("image env values cannot contain newlines")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def render_dockerfile(base_image: str, installs: list[str], env: tuple[tuple[str, str], ...],
                      with_project: bool) -> str:
    """The Dockerfile of a step image (deterministic for equal inputs)."""
    if not base_image or any(c.isspace() for c in base_image):
        raise ImageBuildError(f"invalid base image reference {base_image!r}")
    lines = ["# Generated by stepflow; the image tag is a hash of this file and everything it copies.",
             f"FROM {base_image}"]
    for key, value in env:
        if not _ENV_KEY.match(key):
            raise ImageBuildError(f"invalid environment variable name {key!r} in the image spec")
        lines.append(f"ENV {key}={_env_value(value)}")
    pip = ["python3", "-m", "pip", "install", "--no-index", "--find-links", WHEEL_DIR,
           "--break-system-packages", "--no-cache-dir", "--disable-pip-version-check",
           "--root-user-action=ignore", "--no-warn-script-location", *installs]
    lines += [f"COPY wheels {WHEEL_DIR}", f"RUN {json.dumps(pip)}"]
    if with_project:
        lines += [f"COPY project {PROJECT_DIR}", f"ENV PYTHONPATH={PROJECT_DIR}", f"WORKDIR {PROJECT_DIR}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ locks, flights
_LOCKS_GUARD = threading.Lock()
_LOCKS: dict[str, threading.Lock] = {}


@asynccontextmanager
async def process_lock(key: str) -> AsyncIterator[None]:
    """A lock per ``key`` shared by every manager (and event loop) of this process.

    Acquired by polling so a waiting coroutine never blocks its loop and can be cancelled.
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    delay = 0.005
    while not lock.acquire(blocking=False):
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


class _Call:
    """Identity of one ``ensure()`` call (who reports the build)."""

    __slots__ = ("step",)

    def __init__(self, step: str | None) -> None:
        self.step = step


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
        try:
            async with process_lock(f"image:{ref}"):
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
                await self.builder.build(prepared.context, ref, progress=progress)
                self._emit(ImageBuildFinished, image=ref, cached=False,
                           duration=time.perf_counter() - t0, step=call.step)
                t1 = time.perf_counter()
                self.stats.pushes += 1
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
        dists, installs = await anyio.to_thread.run_sync(resolve_closure, spec.requirements)
        project = spec.project_root.resolve() if spec.project_root is not None else None
        if project is not None and not project.is_dir():
            raise ImageBuildError(f"project_root {project} is not a directory")
        dockerfile = render_dockerfile(spec.base_image, installs, spec.env, project is not None)
        wheels = await self._wheelhouse(dists, progress)
        context = self.cache_dir / "contexts" / uuid.uuid4().hex

        warnings: list[str] = []

        def stage() -> str:
            (context / "wheels").mkdir(parents=True)
            (context / "Dockerfile").write_text(dockerfile)
            for path, _ in wheels:
                _link_or_copy(path, context / "wheels" / path.name)
            files: list[tuple[str, str, bool]] = []
            if project is not None:
                (context / "project").mkdir()
                files, listing = stage_project(project, context / "project", home=self.home)
                warnings.extend(w.message for w in listing.warnings)
            h = hashlib.sha256(f"{_LAYOUT}\n".encode())
            h.update(f"dockerfile\0{dockerfile}\0base\0{spec.base_image}\0{base_id}\n".encode())
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
        return _Prepared(tag, context, base_id)

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

    # -- wheelhouse --------------------------------------------------------------------
    async def _wheelhouse(self, dists: list[_Dist],
                          progress: Callable[[str], None] | None = None) -> list[tuple[Path, str]]:
        """(wheel path, content digest) of every distribution, from the cache or made now."""
        t0 = time.perf_counter()
        root = self.cache_dir / "wheels"
        keys = await anyio.to_thread.run_sync(self._cache_keys, dists, root)
        found = await anyio.to_thread.run_sync(_lookup, dists, keys)
        self.stats.wheels_reused += len(found)
        missing = [d for d in dists if d.name not in found]
        if missing:
            async with process_lock(f"wheels:{root}"):
                # Another manager may have made some of them while we waited.
                again = await anyio.to_thread.run_sync(_lookup, missing, keys)
                found.update(again)
                self.stats.wheels_reused += len(again)
                still = [d for d in missing if d.name not in found]
                if still:
                    found.update(await self._make_wheels(still, keys, root))
        wheels = [found[d.name] for d in dists]
        self.stats.last_wheelhouse_seconds = time.perf_counter() - t0
        if missing and progress is not None:
            progress(f"wheelhouse: {len(wheels)} wheels, {len(wheels) - len(missing)} from the cache, "
                     f"{len(missing)} downloaded or built in {self.stats.last_wheelhouse_seconds:.1f} s")
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
                           root: Path) -> dict[str, tuple[Path, str]]:
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
                    out[d.name] = await self._make_one(d, keys[d.name], root)
                except ImageBuildError as exc:
                    errors.append(exc)  # the others still finish (and are cached for next time)

        async def batch(chunk: list[_Dist]) -> None:
            async with self._pip_limit:
                tmp = root / "tmp" / uuid.uuid4().hex
                try:
                    ok, _ = await self._pip(["download", "--no-deps", "--only-binary=:all:", "--dest", str(tmp),
                                             *(f"{d.name}=={d.version}" for d in chunk)])
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

    async def _make_one(self, d: _Dist, key: Path, root: Path) -> tuple[Path, str]:
        tmp = root / "tmp" / uuid.uuid4().hex
        try:
            if d.kind == "direct" and d.source.endswith(".whl") and Path(d.source).is_file():
                await anyio.to_thread.run_sync(_copy_into, Path(d.source), tmp)
            elif d.kind == "index":
                pin = f"{d.name}=={d.version}"
                ok, log = await self._pip(["download", "--no-deps", "--only-binary=:all:", "--dest", str(tmp), pin])
                if ok:
                    self.stats.wheels_downloaded += 1
                else:
                    ok, log2 = await self._pip(["wheel", "--no-deps", "--wheel-dir", str(tmp), pin])
                    if not ok:
                        raise ImageBuildError(
                            f"cannot get a wheel of '{d.display}=={d.version}' for the image: pip download "
                            f"found no wheel and pip wheel failed; pip said:\n{_tail(log, 5)}\n---\n"
                            f"{_tail(log2, _PIP_TAIL)}")
                    self.stats.wheels_built += 1
            else:
                target = d.source if d.kind == "local" else f"{d.display} @ {d.source}"
                ok, log = await self._pip(["wheel", "--no-deps", "--wheel-dir", str(tmp), target])
                if not ok:
                    raise ImageBuildError(
                        f"cannot build a wheel of '{d.display}' from {d.source} (pip wheel failed):\n"
                        f"{_tail(log, _PIP_TAIL)}")
                self.stats.wheels_built += 1
            built = sorted(tmp.glob("*.whl"))
            if len(built) != 1:
                raise ImageBuildError(f"expected one wheel of '{d.display}' in {tmp}, found "
                                      f"{[p.name for p in built] or 'none'}")
            return await anyio.to_thread.run_sync(_store_wheel, built[0], key)
        finally:
            await _remove_tree(tmp)

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


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


async def _remove_tree(path: Path) -> None:
    with anyio.CancelScope(shield=True):  # also runs while a cancelled flight unwinds
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))
