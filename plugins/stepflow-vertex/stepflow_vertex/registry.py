"""The ``gcp`` container registry: Artifact Registry and gcr.io, with a Google access token."""

from __future__ import annotations

from typing import Any

import anyio

from stepflow.errors import RegistryError
from stepflow.remote import DistributionRegistry
from stepflow_vertex.gcp import adc_token, is_loopback


class GcpContainerRegistry(DistributionRegistry):
    """Pushes as ``oauth2accesstoken`` with a token from Application Default Credentials.

    A registry on a loopback address (a local registry in tests and demos) is used anonymously
    when no Google credentials are found.
    """

    flavor = "gcp"

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self.config = config
        self._uri = str(config.uri).strip().rstrip("/")

    @property
    def uri(self) -> str:
        """``host/path`` image names are built under."""
        return self._uri

    async def credentials(self) -> tuple[str, str] | None:
        """``("oauth2accesstoken", token)``; RegistryError saying which credential sources were tried."""
        try:
            token = await anyio.to_thread.run_sync(adc_token)
        except RegistryError:
            if is_loopback(self._uri.split("/", 1)[0]):
                return None
            raise
        except Exception as exc:
            raise RegistryError(self._uri, f"getting a Google access token failed: {exc}") from exc
        return ("oauth2accesstoken", token)
