"""The container registry interface: where step images are pushed."""

from __future__ import annotations

import abc
from typing import ClassVar

from stepflow.errors import StepflowError


class ContainerRegistry(abc.ABC):
    """A registry reachable by the image builder (push) and the compute backend (pull)."""

    flavor: ClassVar[str] = ""
    name: str = ""

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """``host[:port][/prefix]`` that image names are built under."""

    async def credentials(self) -> tuple[str, str] | None:
        """``(username, password)`` for pushing, or None for anonymous access."""
        return None

    def image_ref(self, repository: str, tag: str) -> str:
        """Full pullable reference of ``repository:tag`` in this registry."""
        return f"{self.uri}/{repository}:{tag}"

    async def has_image(self, repository: str, tag: str) -> bool:
        """Ask the registry (Docker/OCI distribution API v2) whether ``repository:tag`` exists."""
        import anyio

        from stepflow._components.registry_api import head_manifest

        creds = await self.credentials()
        return await anyio.to_thread.run_sync(head_manifest, self.uri, repository, tag, creds)

class RegistryError(StepflowError):
    """The registry could not be reached or refused a request."""

    def __init__(self, uri: str, detail: str) -> None:
        super().__init__(f"container registry {uri}: {detail}")
        self.uri = uri
