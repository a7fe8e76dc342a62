"""The container registry interface: where step images are pushed."""

from __future__ import annotations

import abc
from typing import ClassVar


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
