"""The Docker image builder: builds a context directory on a Docker daemon and pushes the result."""

from __future__ import annotations

import asyncio
import os
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
    async def build(self, context: Path, tag: str, *, progress: Progress | None = None) -> str:
        """Build ``context`` (a Dockerfile at its root) as ``tag``; return the image id."""
        tarball = await anyio.to_thread.run_sync(_tar_context, Path(context))
        try:
            for attempt in range(1, STORE_RACE_ATTEMPTS + 1):
                emit = _Lines(progress)
                try:
                    image_id = await self._build_once(tarball, tag, emit)
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

    async def _build_once(self, tarball: str, tag: str, emit: _Lines) -> str | None:
        import aiodocker

        image_id: str | None = None
        async with self._daemon() as docker:
            try:
                with open(tarball, "rb") as fh:
                    stream = docker.images.build(fileobj=fh, encoding="identity", tag=tag, stream=True,
                                                 rm=True, forcerm=True)
                    async for chunk in stream:
                        if "aux" in chunk and isinstance(chunk["aux"], dict):
                            image_id = chunk["aux"].get("ID") or image_id
                        emit.chunk(chunk)
            except aiodocker.DockerError as exc:
                if exc.status == 900:
                    raise
                message = (f"building image {tag} failed: {exc.message}\n"
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


def _unlink(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)
