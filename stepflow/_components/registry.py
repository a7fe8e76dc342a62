"""The default container registry: any Docker/OCI distribution registry."""

from __future__ import annotations

from typing import Any

from stepflow.remote._distribution import DistributionRegistry


class DefaultContainerRegistry(DistributionRegistry):
    """A registry at ``host[:port][/prefix]``, with optional username/password.

    Without a username, ``docker login`` credentials (and credential helpers) are used when the
    registry asks for them.
    """

    flavor = "default"

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self._uri = config.uri.rstrip("/")
        self._username = config.username
        self._password = config.password

    @property
    def uri(self) -> str:
        return self._uri

    async def credentials(self) -> tuple[str, str] | None:
        if self._username is None:
            return None
        return self._username, self._password or ""
