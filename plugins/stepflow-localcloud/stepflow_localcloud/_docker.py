"""The Docker client the control planes share: one aiodocker client without a connection cap."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError


@contextlib.asynccontextmanager
async def docker_client(url: str | None) -> AsyncIterator[aiodocker.Docker]:
    """An aiodocker client of ``url`` (default: ``DOCKER_HOST``, else the local socket).

    Its connector has no limit: each running job holds a connection (its output stream).
    """
    host = url or os.environ.get("DOCKER_HOST")
    if host is None:
        host = next((f"unix://{p}" for p in ("/run/docker.sock", "/var/run/docker.sock") if os.path.exists(p)), None)
    connector = None
    if host is not None and host.startswith("unix://"):
        connector = aiohttp.UnixConnector(host.removeprefix("unix://"), limit=0)
        host = "unix://localhost"  # aiodocker's placeholder host for socket connections
    docker = aiodocker.Docker(url=host, connector=connector)
    try:
        yield docker
    finally:
        await docker.close()
        if connector is not None:
            await connector.close()


class ImagePuller:
    """Makes images present locally: pulls only the missing ones, once per image for concurrent jobs."""

    def __init__(self, docker: aiodocker.Docker) -> None:
        self.docker = docker
        self._pulls: dict[str, asyncio.Task[object]] = {}

    async def ensure(self, image: str) -> None:
        """Return once ``image`` is on the daemon; raise DockerError when it cannot be pulled."""
        try:
            await self.docker.images.inspect(image)
            return
        except DockerError as exc:
            if exc.status != 404:
                raise
        pull = self._pulls.get(image)
        if pull is None or pull.done():
            pull = asyncio.get_running_loop().create_task(self.docker.images.pull(image))
            self._pulls[image] = pull
        await asyncio.shield(pull)
