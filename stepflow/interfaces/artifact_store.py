"""The artifact store interface: where payloads and step outputs live."""

from __future__ import annotations

import abc
from typing import Any, ClassVar


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

    def job_storage_options(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What a job needs to reach this store: ``(public, secret)`` fsspec storage options.

        Public options (endpoints, regions) may appear in a job's description; secret ones
        (keys, tokens, connection strings) reach a job only through a private channel, or not
        at all when the job's own identity grants access.
        """
        return {}, {}
