"""The ``azure`` container registry: Azure Container Registry, with admin or Microsoft Entra credentials.

Without a username, a Microsoft Entra access token of DefaultAzureCredential is exchanged at
the registry's ``/oauth2/exchange`` for an ACR refresh token, which Docker and the registry
API take as the password of the all-zero user (what ``az acr login`` does).
"""

from __future__ import annotations

from typing import Any

import anyio

from stepflow.errors import BackendError, RegistryError
from stepflow.remote import DistributionRegistry

#: The user name ACR expects with a refresh token as password.
TOKEN_USER = "00000000-0000-0000-0000-000000000000"


def is_loopback(host: str) -> bool:
    """127.x, localhost, ::1 (with or without a port)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in ("localhost", "::1", "[::1]") or name.startswith("127.")


def entra_token() -> tuple[str, str | None]:
    """``(access token, tenant)`` of DefaultAzureCredential for Azure Resource Manager."""
    from azure.core.exceptions import ClientAuthenticationError
    from azure.identity import DefaultAzureCredential

    from stepflow_azureml import azure

    azure.quiet_sdk()
    try:
        token = DefaultAzureCredential(exclude_interactive_browser_credential=True).get_token(azure.ARM_SCOPE)
    except ClientAuthenticationError as exc:
        raise BackendError(f"no Azure credentials: {azure.sources_tried(exc)}") from None
    return token.token, None


async def exchange(base_url: str, host: str, access_token: str, tenant: str | None) -> str:
    """POST ``/oauth2/exchange``: an ACR refresh token for a Microsoft Entra access token."""
    import httpx

    form = {"grant_type": "access_token", "service": host, "access_token": access_token}
    if tenant:
        form["tenant"] = tenant
    async with httpx.AsyncClient(timeout=30.0) as client:
        try:
            response = await client.post(f"{base_url}/oauth2/exchange", data=form)
        except httpx.HTTPError as exc:
            raise RegistryError(host, f"ACR token exchange at {base_url}/oauth2/exchange failed: {exc}") from exc
    if response.status_code != 200:
        raise RegistryError(host, f"ACR login failed: the token exchange answered HTTP {response.status_code}: "
                                  f"{response.text[:300]}. The identity needs the AcrPush role on the registry "
                                  "(or register the registry with --username/--password of its admin user)")
    token = response.json().get("refresh_token")
    if not token:
        raise RegistryError(host, "ACR login failed: the token exchange answered no refresh_token")
    return str(token)


class AcrContainerRegistry(DistributionRegistry):
    """Pushes with admin credentials, or as the all-zero user with an exchanged ACR refresh token.

    A registry on a loopback address (a local registry in tests and demos) is used anonymously
    when no Azure credentials are found.
    """

    flavor = "azure"

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self.config = config
        self._uri = str(config.uri).strip().rstrip("/")
        self._token: str | None = None
        self._anonymous = False  # a loopback registry and no Azure credentials: asked once

    @property
    def uri(self) -> str:
        """``host/path`` image names are built under."""
        return self._uri

    @property
    def host(self) -> str:
        """The registry's host (and port)."""
        return self._uri.split("/", 1)[0]

    async def credentials(self) -> tuple[str, str] | None:
        """Admin ``(username, password)``, else ``(TOKEN_USER, refresh token)``; RegistryError saying why not."""
        if self.config.username:
            return str(self.config.username), str(self.config.password)
        if self._anonymous:
            return None
        if self._token is None:
            try:
                access, tenant = await anyio.to_thread.run_sync(entra_token)
            except BackendError as exc:
                if is_loopback(self.host):
                    self._anonymous = True
                    return None
                raise RegistryError(self._uri, f"ACR login failed: {exc}") from None
            scheme = "http" if is_loopback(self.host) else "https"
            self._token = await exchange(f"{scheme}://{self.host}", self.host, access,
                                         self.config.tenant_id or tenant)
        return (TOKEN_USER, self._token)
