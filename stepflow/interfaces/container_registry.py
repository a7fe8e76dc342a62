"""The container registry interface: where step images are pushed."""

from __future__ import annotations

import abc
from typing import ClassVar

from stepflow.errors import RegistryError


class ContainerRegistry(abc.ABC):
    """A registry reachable by the image builder (push) and the compute backend (pull).

    Implementations on the Docker/OCI distribution API subclass
    :class:`stepflow.remote.DistributionRegistry`, which speaks the API (and Docker's
    authentication) for them.
    """

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

    @abc.abstractmethod
    async def has_image(self, repository: str, tag: str) -> bool:
        """Whether ``repository:tag`` exists in the registry."""

    async def check(self, repository: str, *, push: bool = True) -> None:  # noqa: B027 - optional hook
        """Raise :class:`~stepflow.errors.RegistryError` unless the registry answers and accepts the credentials."""


__all__ = ["ContainerRegistry", "RegistryError"]
