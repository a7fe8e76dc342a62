"""A container registry on the Docker/OCI distribution API, with Docker's own authentication."""

from __future__ import annotations

from typing import Any

from stepflow.interfaces.container_registry import ContainerRegistry
from stepflow.remote._registry import RegistryAuth, RegistryClient


class DistributionRegistry(ContainerRegistry):
    """Asks the registry itself whether an image exists and whether pushes will be accepted.

    Credentials: what :meth:`credentials` returns, else the user's Docker client config
    (``docker login``, credential helpers), else anonymous (with the bearer-token flow when the
    registry asks for it).
    """

    def _client(self, credentials: tuple[str, str] | None) -> RegistryClient:
        return RegistryClient(self.uri, credentials)

    async def push_auth(self) -> tuple[str, str] | None:
        """Username and password to push with: explicit ones, else those of the Docker config."""
        explicit = await self.credentials()
        if explicit is not None:
            return explicit
        import anyio

        auth: Any = await anyio.to_thread.run_sync(RegistryAuth.resolve, self.uri)
        if auth.username and auth.password:
            return str(auth.username), str(auth.password)
        return None

    async def has_image(self, repository: str, tag: str) -> bool:
        """HEAD of the manifest ``repository:tag``."""
        async with self._client(await self.credentials()) as client:
            return await client.has_manifest(repository, tag)

    async def check(self, repository: str, *, push: bool = True) -> None:
        """The registry answers, and the credentials may pull (and push) ``repository``."""
        async with self._client(await self.credentials()) as client:
            await client.check(repository, push=push)
