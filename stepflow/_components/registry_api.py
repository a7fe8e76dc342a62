"""A minimal Docker/OCI distribution API v2 client: does a tag exist."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

from stepflow.interfaces.container_registry import RegistryError

_MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])


def is_local(host: str) -> bool:
    """Loopback registries speak plain HTTP (as Docker allows for them)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in ("localhost", "::1", "[::1]") or name.startswith("127.")


def head_manifest(uri: str, repository: str, tag: str, creds: tuple[str, str] | None) -> bool:
    """True when ``repository:tag`` exists in the registry at ``uri`` (host[:port][/prefix])."""
    host, _, prefix = uri.partition("/")
    path = f"{prefix}/{repository}" if prefix else repository
    url = f"{'http' if is_local(host) else 'https'}://{host}/v2/{path}/manifests/{tag}"
    headers = {"Accept": _MANIFEST_TYPES}
    if creds is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
    try:
        return _head(url, headers)
    except urllib.error.HTTPError as exc:
        challenge = exc.headers.get("WWW-Authenticate", "")
        if exc.code == 401 and creds is not None and challenge.lower().startswith("bearer"):
            token = _bearer_token(challenge, creds)
            try:
                return _head(url, {"Accept": _MANIFEST_TYPES, "Authorization": f"Bearer {token}"})
            except urllib.error.HTTPError as again:
                raise RegistryError(uri, f"HTTP {again.code} {again.reason} asking for {path}:{tag}") from None
        raise RegistryError(uri, f"HTTP {exc.code} {exc.reason} asking for {path}:{tag}") from None
    except OSError as exc:
        raise RegistryError(uri, f"unreachable ({exc}); is the registry running and the address right?") from None


def _head(url: str, headers: dict[str, str]) -> bool:
    request = urllib.request.Request(url, method="HEAD", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise


def _bearer_token(challenge: str, creds: tuple[str, str]) -> str:
    pairs = (part.split("=", 1) for part in challenge.split(" ", 1)[1].split(","))
    fields = {k.strip(): v.strip().strip('"') for k, v in pairs}
    query = "&".join(f"{k}={fields[k]}" for k in ("service", "scope") if k in fields)
    request = urllib.request.Request(f"{fields['realm']}?{query}")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode())
    with urllib.request.urlopen(request, timeout=15) as resp:
        body = json.load(resp)
    return str(body.get("token") or body.get("access_token"))
