"""The Docker image builder: builds a context directory on a Docker daemon and pushes the result."""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
import tarfile
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio

from stepflow.errors import BackendError, ImageBuildError
from stepflow.interfaces.image_builder import ImageBuilder, Progress

DEFAULT_HOST = "unix:///var/run/docker.sock"
#: Lines of build output quoted in a build error.
TAIL_LINES = 20
#: Builds retried when another client deletes a cached layer mid-build (a daemon race).
STORE_RACE_ATTEMPTS = 3
_STORE_RACE = re.compile(
    r"failed to get digest|unknown parent image|failed to set parent|No such image|layer does not exist"
    r"|image/\w+/imagedb/.*no such file", re.IGNORECASE)
#: Per-layer progress statuses that are pure noise in a log (their final status is kept).
_NOISY = frozenset({"Pushing", "Downloading", "Extracting", "Waiting", "Verifying Checksum"})
#: Seconds python3 may take to answer in a base image (emulated architectures are slow).
PROBE_TIMEOUT = 120.0
#: Run by python3 in a base image: its version, C library and whether it reads user site-packages.
_PROBE = """
import glob, json, os, site, sys
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (ValueError, OSError):
    libc = ""
if not libc and glob.glob("/lib/ld-musl-*"):
    libc = "musl"
print(json.dumps({"python": list(sys.version_info[:2]), "libc": libc, "user_site": bool(site.ENABLE_USER_SITE)}))
"""
#: Docker architecture -> (uname machine, Debian multiarch triplet), to find files in an image.
_MACHINES = {"amd64": ("x86_64", "x86_64-linux-gnu"), "arm64": ("aarch64", "aarch64-linux-gnu"),
             "386": ("i386", "i386-linux-gnu"), "arm": ("armhf", "arm-linux-gnueabihf"),
             "ppc64le": ("ppc64le", "powerpc64le-linux-gnu"), "s390x": ("s390x", "s390x-linux-gnu"),
             "riscv64": ("riscv64", "riscv64-linux-gnu")}
_GLIBC_VERSION = re.compile(rb"GNU C Library[^\n\0]*?version (\d+)\.(\d+)")
_PYTHON_NAME = re.compile(r"python(\d+)\.(\d+)$")


def split_reference(ref: str) -> tuple[str, str]:
    """``registry/repo:tag`` -> (``registry/repo``, ``tag``); the tag defaults to ``latest``."""
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return name, tag


def registry_of(name: str) -> str:
    """The registry host of an image name (``docker.io`` when it names none)."""
    first, sep, _ = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


class DockerImageBuilder(ImageBuilder):
    """Builds images with the Docker Engine API (aiodocker) and pushes them.

    The aiodocker client is created lazily inside the running event loop and closed by
    :meth:`aclose`.
    """

    flavor = "docker"

    def __init__(self, name: str = "docker", config: Any = None) -> None:
        self.name = name
        self.config = config
        self.docker_host: str | None = getattr(config, "docker_host", None)
        self._docker: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def host(self) -> str:
        """The daemon address in use (for messages)."""
        if self._docker is not None:
            return str(getattr(self._docker, "_connection_info", None) or self.docker_host or DEFAULT_HOST)
        return self.docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST

    # -- client ------------------------------------------------------------------------
    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._docker is not None and self._loop is loop:
            return self._docker
        import aiodocker

        try:
            docker = aiodocker.Docker(url=self.docker_host)
        except (AssertionError, ValueError, aiodocker.DockerError) as exc:
            if self.docker_host is not None:
                raise self._unreachable(exc) from None
            docker = aiodocker.Docker(url=DEFAULT_HOST)  # no socket found: fails on first use, clearly
        self._docker, self._loop = docker, loop
        return docker

    def _unreachable(self, error: object) -> BackendError:
        return BackendError(
            f"cannot reach the Docker daemon at {self.host}: {error}. Start it (e.g. `sudo systemctl "
            "start docker`, or `dockerd` / `scripts/services.sh` in this repo) or set --docker_host")

    @asynccontextmanager
    async def _daemon(self) -> AsyncIterator[Any]:
        """The client; connection failures become BackendError."""
        import aiodocker
        import aiohttp

        docker = self._client()
        try:
            yield docker
        except aiodocker.DockerError as exc:
            if exc.status == 900:  # aiodocker's "cannot connect"
                raise self._unreachable(exc.message) from None
            raise
        except (aiohttp.ClientConnectionError, ConnectionError, FileNotFoundError) as exc:
            raise self._unreachable(exc) from None

    async def aclose(self) -> None:
        """Close the aiodocker client (if one was created)."""
        docker, self._docker = self._docker, None
        if docker is not None:
            await docker.close()

    # -- ImageBuilder ------------------------------------------------------------------
    async def build(self, context: Path, tag: str, *, progress: Progress | None = None,
                    platform: str | None = None) -> str:
        """Build ``context`` (a Dockerfile at its root) as ``tag``; return the image id.

        ``platform`` (e.g. "linux/arm64") is the platform the image is for; its base image must be of it.
        """
        tarball = await anyio.to_thread.run_sync(_tar_context, Path(context))
        try:
            for attempt in range(1, STORE_RACE_ATTEMPTS + 1):
                emit = _Lines(progress)
                try:
                    image_id = await self._build_once(tarball, tag, emit, platform)
                except _StoreRace as race:
                    if attempt == STORE_RACE_ATTEMPTS:
                        raise ImageBuildError(race.message) from None
                    emit.line(f"the daemon's image store changed during the build ({race.reason}); retrying")
                    continue
                if image_id is None:
                    raise ImageBuildError(f"building image {tag} reported success but the image is missing:\n"
                                          f"{emit.tail_text()}")
                return image_id
        finally:
            await anyio.to_thread.run_sync(_unlink, tarball)
        raise AssertionError("unreachable")

    async def _build_once(self, tarball: str, tag: str, emit: _Lines, platform: str | None) -> str | None:
        import aiodocker

        image_id: str | None = None
        async with self._daemon() as docker:
            # aiodocker streams the context without ever yielding (the daemon's socket drains at
            # once): a large context would hold the event loop for its whole upload.
            docker.images._stream = _yielding_stream  # type: ignore[method-assign]
            try:
                with open(tarball, "rb") as fh:
                    stream = docker.images.build(fileobj=fh, encoding="identity", tag=tag, stream=True,
                                                 rm=True, forcerm=True, platform=platform)
                    async for chunk in stream:
                        if "aux" in chunk and isinstance(chunk["aux"], dict):
                            image_id = chunk["aux"].get("ID") or image_id
                        emit.chunk(chunk)
            except aiodocker.DockerError as exc:
                if exc.status == 900:
                    raise
                hint = ""
                if platform and re.search(r"platform|exec format", exc.message, re.IGNORECASE):
                    hint = (f" (the image is for {platform}: its base image must be a {platform} image, and "
                            "RUN steps need emulation of that architecture on the daemon's host)")
                message = (f"building image {tag} failed: {exc.message}{hint}\n"
                           f"--- last lines of the build output ---\n{emit.tail_text()}")
                if _STORE_RACE.search(exc.message):
                    # Another client deleted a cached layer this build was using: a rerun
                    # no longer finds it and builds the step instead.
                    raise _StoreRace(message, exc.message) from None
                raise ImageBuildError(message) from None
            if image_id is None:
                image_id = await self.image_id(tag)
        return image_id

    async def push(self, tag: str, credentials: tuple[str, str] | None = None, *,
                   progress: Progress | None = None) -> None:
        """Push ``tag`` to the registry it names."""
        import aiodocker

        name, version = split_reference(tag)
        registry = registry_of(name)
        auth = {"username": credentials[0], "password": credentials[1]} if credentials else None
        emit = _Lines(progress)
        async with self._daemon() as docker:
            try:
                async for chunk in docker.images.push(name, tag=version, auth=auth, stream=True):
                    emit.chunk(chunk)
            except aiodocker.DockerError as exc:
                if exc.status == 900:
                    raise
                hint = ""
                low = exc.message.lower()
                if "unauthorized" in low or "denied" in low or "authentication required" in low:
                    hint = " (check the container registry's username/password)"
                elif "connection refused" in low or "no such host" in low or "timeout" in low:
                    hint = " (is the registry running and its address right?)"
                raise ImageBuildError(
                    f"pushing {tag} to registry {registry} failed: the Docker daemon said: "
                    f"{exc.message}{hint}") from None

    # -- extras used by ImageManager ---------------------------------------------------
    async def image_id(self, ref: str) -> str | None:
        """The id of image ``ref`` on the daemon, or None when it has no such image."""
        import aiodocker

        async with self._daemon() as docker:
            try:
                info = await docker.images.inspect(ref)
            except aiodocker.DockerError as exc:
                if exc.status == 404:
                    return None
                raise
        return str(info["Id"])

    async def inspect_base(self, ref: str, *, run: bool = True) -> dict[str, Any]:
        """What a step image needs to know about base image ``ref`` (on the daemon).

        Keys: ``platform`` (e.g. "linux/arm64"), ``python`` ([major, minor]), ``libc`` ("glibc 2.36",
        "musl", or "" when unknown) and ``user_site`` (whether its python3 reads user site-packages;
        None when unknown). Runs python3 in a throw-away container; an image of an architecture the
        daemon cannot run (no emulation), or ``run=False``, is read from its files instead, without
        running anything.
        """
        import aiodocker

        async with self._daemon() as docker:
            try:
                info = await docker.images.inspect(ref)
            except aiodocker.DockerError as exc:
                if exc.status == 404:
                    raise ImageBuildError(f"base image '{ref}' not found on the Docker daemon") from None
                raise
            arch = str(info.get("Architecture") or "")
            platform = "/".join(str(p) for p in (info.get("Os"), arch, info.get("Variant")) if p)
            config = info.get("Config") or {}
            env = dict(str(e).partition("=")[::2] for e in config.get("Env") or ())
            found: dict[str, Any] | None = None
            if run:
                found = await self._run_probe(docker, ref, str(info["Id"]))
            if found is None:
                found = await self._read_probe(docker, ref, str(info["Id"]), env, arch)
        return {"platform": platform, **found}

    async def _run_probe(self, docker: Any, ref: str, image_id: str) -> dict[str, Any] | None:
        """Ask python3 in ``image_id``; None when the daemon cannot run that architecture."""
        import aiodocker

        config = {"Image": image_id, "Entrypoint": ["python3"], "Cmd": ["-c", _PROBE], "Labels": {"stepflow": "probe"},
                  "NetworkDisabled": True, "HostConfig": {"NetworkMode": "none"}}
        container = await docker.containers.create(config)
        try:
            try:
                await container.start()
            except aiodocker.DockerError as exc:
                if "exec format error" in exc.message:
                    return None
                if "not found" in exc.message or "no such file" in exc.message.lower():
                    raise ImageBuildError(f"base image '{ref}' has no python3 on its PATH: step images run "
                                          "`python3 -m stepflow.entrypoint` (use a base image with Python)") from None
                raise ImageBuildError(f"cannot run python3 in base image '{ref}': {exc.message}") from None
            with anyio.fail_after(PROBE_TIMEOUT):
                result = await container.wait()
            if result.get("StatusCode") != 0:
                text = "".join(await container.log(stdout=True, stderr=True)).strip()
                if "exec format error" in text:
                    return None
                raise ImageBuildError(f"python3 in base image '{ref}' failed (exit {result.get('StatusCode')}):\n"
                                      f"{text[-2000:]}")
            text = "".join(await container.log(stdout=True)).strip()
            try:
                found: dict[str, Any] = json.loads(text.splitlines()[-1])
            except (ValueError, IndexError):
                raise ImageBuildError(f"python3 in base image '{ref}' gave an unexpected answer: "
                                      f"{text[-500:]!r}") from None
            return found
        finally:
            with anyio.CancelScope(shield=True):
                await container.delete(force=True)

    async def _read_probe(self, docker: Any, ref: str, image_id: str, env: dict[str, str],
                          arch: str) -> dict[str, Any]:
        """Python version and C library of ``image_id`` from its files (nothing runs)."""
        container = await docker.containers.create({"Image": image_id, "Entrypoint": ["python3"], "Cmd": [],
                                                    "Labels": {"stepflow": "probe"}})  # never started
        try:
            python: list[int] | None = None
            version = re.match(r"(\d+)\.(\d+)", env.get("PYTHON_VERSION", ""))  # official python images
            if version:
                python = [int(version.group(1)), int(version.group(2))]
            for directory in (env.get("PATH") or "/usr/local/bin:/usr/bin:/bin").split(":"):
                if python is not None or not directory.startswith("/"):
                    continue
                resolved = await _fetch(container, posixpath.join(directory, "python3"), _PYTHON_NAME)
                named = _PYTHON_NAME.search(resolved[0] if resolved else "")
                if named:
                    python = [int(named.group(1)), int(named.group(2))]
            if python is None:
                raise ImageBuildError(f"cannot tell the Python version of base image '{ref}' ({arch} image) without "
                                      "running it: no python3 -> python3.X link on its PATH and no PYTHON_VERSION")
            machine, triplet = _MACHINES.get(arch, (arch, f"{arch}-linux-gnu"))
            libc = "musl" if await _fetch(container, f"/lib/ld-musl-{machine}.so.1") is not None else ""
            for path in (f"/lib/{triplet}/libc.so.6", f"/usr/lib/{triplet}/libc.so.6", "/lib64/libc.so.6",
                         "/usr/lib64/libc.so.6", "/lib/libc.so.6"):
                if libc:
                    break
                found = await _fetch(container, path)
                glibc = _GLIBC_VERSION.search(found[1] if found else b"")
                if glibc:
                    libc = f"glibc {int(glibc.group(1))}.{int(glibc.group(2))}"
            no_user_site = bool(env.get("PYTHONNOUSERSITE"))
            return {"python": python, "libc": libc, "user_site": False if no_user_site else None}
        finally:
            with anyio.CancelScope(shield=True):
                await container.delete(force=True)

    async def pull(self, ref: str, *, progress: Progress | None = None) -> None:
        """Pull ``ref`` onto the daemon; ImageBuildError with the daemon's message on failure."""
        import aiodocker

        name, version = split_reference(ref)
        emit = _Lines(progress)
        async with self._daemon() as docker:
            try:
                async for chunk in docker.images.pull(name, tag=version, stream=True):
                    emit.chunk(chunk)
            except aiodocker.DockerError as exc:
                if exc.status == 900:
                    raise
                raise ImageBuildError(f"pulling {ref} failed: {exc.message}") from None


class _StoreRace(Exception):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message, self.reason = message, reason


class _Lines:
    """Turns Docker's JSON progress chunks into log lines; keeps the last ones for errors."""

    def __init__(self, progress: Callable[[str], None] | None) -> None:
        self.progress = progress
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    def line(self, text: str) -> None:
        text = text.rstrip()
        if not text:
            return
        self.tail.append(text)
        if self.progress is not None:
            try:
                self.progress(text)
            except Exception:
                self.progress = None  # a broken callback must not break the build

    def chunk(self, chunk: dict[str, Any]) -> None:
        stream = chunk.get("stream")
        if isinstance(stream, str):
            for text in stream.splitlines():
                self.line(text)
            return
        status = chunk.get("status")
        if isinstance(status, str):
            if status in _NOISY and chunk.get("progressDetail"):
                return
            ident = chunk.get("id")
            self.line(f"{ident}: {status}" if ident else status)

    def tail_text(self) -> str:
        return "\n".join(self.tail) or "(no output)"


async def _fetch(container: Any, path: str, stop: re.Pattern[str] | None = None) -> tuple[str, bytes] | None:
    """(path with symbolic links followed, contents) of the file ``path`` in ``container``, or None.

    Stops at a path whose name matches ``stop``, without fetching it (its contents are then b"").
    """
    import aiodocker

    for _ in range(10):  # more links than this: a loop
        if stop is not None and stop.search(path):
            return path, b""
        try:
            tar = await container.get_archive(path)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise
        with tar:
            member = tar.next()
            if member is None:
                return None
            if member.issym():
                path = posixpath.normpath(posixpath.join(posixpath.dirname(path), member.linkname))
                continue
            fh = tar.extractfile(member) if member.isfile() else None
            return (path, fh.read()) if fh is not None else None
    return None


def _tar_context(context: Path) -> str:
    """Write ``context`` as an uncompressed tar to a temporary file; return its path."""
    if not (context / "Dockerfile").is_file():
        raise ImageBuildError(f"build context {context} has no Dockerfile")

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    fd, name = tempfile.mkstemp(prefix="stepflow-context-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for child in sorted(context.iterdir()):
                tar.add(child, arcname=child.name, filter=normalize)
    except BaseException:
        _unlink(name)
        raise
    return name


async def _yielding_stream(fileobj: Any) -> AsyncIterator[bytes]:
    """The file in 64 KiB chunks, letting the event loop run between them."""
    while chunk := fileobj.read(65536):
        yield chunk
        await anyio.sleep(0)


def _unlink(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)
