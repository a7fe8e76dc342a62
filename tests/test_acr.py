"""The azure (ACR) container registry flavor, on the wire: a real registry (htpasswd auth) behind
an ACR-style front that serves ``/oauth2/exchange`` and passes everything else through.

ACR takes either its admin user, or the all-zero user with a refresh token that the registry's
own ``/oauth2/exchange`` gives for a Microsoft Entra access token. The front checks the exchange
form as ACR does; the registry behind only knows the passwords.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stepflow.errors import RegistryError
from tests.test_registry_auth import require_registry_binary, serve_registry

ADMIN, ADMIN_PASSWORD = "myregistry", "admin-Pass-1"
ZERO = "00000000-0000-0000-0000-000000000000"
REFRESH = "acr-refresh-token-for-entra-token"
ENTRA = "entra-access-token"


class AcrFront:
    """An aiohttp server on its own loop: ``POST /oauth2/exchange``, and a pass-through to ``upstream``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.exchanges: list[dict[str, str]] = []
        self.host = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _exchange(self, request: Any) -> Any:
        from aiohttp import web

        form = dict(await request.post())
        self.exchanges.append({k: str(v) for k, v in form.items()})
        if form.get("grant_type") != "access_token" or form.get("service") != self.host \
                or form.get("access_token") != ENTRA:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "invalid token"}]}, status=401)
        return web.json_response({"refresh_token": REFRESH})

    async def _proxy(self, request: Any) -> Any:
        import aiohttp
        from aiohttp import web

        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with aiohttp.ClientSession() as session, session.request(
                request.method, f"http://{self.upstream}{request.path_qs}", headers=headers,
                data=await request.read(), allow_redirects=False) as upstream:
            body = await upstream.read()
            out = {k: v for k, v in upstream.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")}
            if "Location" in out:
                out["Location"] = out["Location"].replace(self.upstream, self.host)
            return web.Response(status=upstream.status, body=body, headers=out)

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/oauth2/exchange", self._exchange)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.host = f"127.0.0.1:{runner.addresses[0][1]}"
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> AcrFront:
        self._thread.start()
        assert self._ready.wait(10), "the ACR front did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def acr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcrFront]:
    import bcrypt

    require_registry_binary()
    root = tmp_path_factory.mktemp("acr")
    htpasswd = root / "htpasswd"
    htpasswd.write_text("".join(f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                                for user, pw in ((ADMIN, ADMIN_PASSWORD), (ZERO, REFRESH))))
    with serve_registry(root, auth={"htpasswd": {"realm": "acr", "path": str(htpasswd)}}) as upstream, \
            AcrFront(upstream) as front:
        yield front


def registry(uri: str, **options: Any) -> Any:
    from stepflow_azureml.config import AcrRegistryConfig
    from stepflow_azureml.registry import AcrContainerRegistry

    return AcrContainerRegistry("acr", AcrRegistryConfig(uri=uri, **options))


async def test_admin_credentials_push_and_a_wrong_password_is_a_clear_login_error(acr: AcrFront) -> None:
    await registry(f"{acr.host}/steps", username=ADMIN, password=ADMIN_PASSWORD).check("steps/app")
    with pytest.raises(RegistryError) as bad:
        await registry(f"{acr.host}/steps", username=ADMIN, password="wrong").check("steps/app")
    assert acr.host in str(bad.value) and ("401" in str(bad.value) or "denied" in str(bad.value).lower()
                                           or "unauthorized" in str(bad.value).lower())
    assert not acr.exchanges  # admin credentials need no exchange


async def test_an_entra_token_is_exchanged_for_the_refresh_token_acr_takes(acr: AcrFront,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from stepflow_azureml import registry as module

    monkeypatch.setattr(module, "entra_token", lambda: (ENTRA, None))  # the credential chain's answer
    reg = registry(f"{acr.host}/steps", tenant_id="my-tenant")
    assert await reg.credentials() == (ZERO, REFRESH)
    await reg.check("steps/app")  # the registry behind accepts the exchanged token
    assert acr.exchanges[-1] == {"grant_type": "access_token", "service": acr.host, "access_token": ENTRA,
                                 "tenant": "my-tenant"}
    before = len(acr.exchanges)
    await reg.credentials()
    assert len(acr.exchanges) == before  # exchanged once per registry component


async def test_a_refused_exchange_names_the_role_to_grant(acr: AcrFront, monkeypatch: pytest.MonkeyPatch) -> None:
    from stepflow_azureml import registry as module

    monkeypatch.setattr(module, "entra_token", lambda: ("a-token-acr-refuses", None))
    with pytest.raises(RegistryError, match=r"ACR login failed: the token exchange answered HTTP 401.*AcrPush"):
        await registry(f"{acr.host}/steps").credentials()


async def test_no_azure_credentials_for_a_remote_registry_says_which_sources_were_tried(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9/token")  # a managed identity endpoint that is down
    monkeypatch.setenv("IDENTITY_HEADER", "x")
    with pytest.raises(RegistryError, match=r"myregistry\.azurecr\.io.*ACR login failed: no Azure credentials: tried "
                                            r".*EnvironmentCredential"):
        await registry("myregistry.azurecr.io/steps").credentials()
