"""The artifact store interface: where payloads and step outputs live."""

from __future__ import annotations

import abc
from typing import ClassVar


class ArtifactStore(abc.ABC):
    """A place to put bytes by URI, reachable by the runner (and, when remote, by jobs)."""

    flavor: ClassVar[str] = ""
    #: True when other machines (remote jobs) can read and write it.
    is_remote: ClassVar[bool] = False

    name: str = ""
    #: Distributions a job needs to reach this store (shipped in step images), e.g. ("s3fs",).
    image_requirements: ClassVar[tuple[str, ...]] = ()

    @property
    @abc.abstractmethod
    def root(self) -> str:
        """The URI every artifact of this store lives under."""

    @abc.abstractmethod
    async def write_bytes(self, uri: str, data: bytes) -> None:
        """Store ``data`` at ``uri`` (under :attr:`root`)."""

    @abc.abstractmethod
    async def read_bytes(self, uri: str) -> bytes:
        """Return the bytes at ``uri``; raise FileNotFoundError when absent."""

    @abc.abstractmethod
    async def exists(self, uri: str) -> bool:
        """Whether ``uri`` exists."""
