"""A Docker/OCI distribution API v2 client that authenticates the way the Docker CLI does.

* :class:`RegistryAuth` finds the credentials for a registry: the ones given explicitly, else the user's
  Docker client config (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``): the credential helper
  named in ``credHelpers`` (per host) or ``credsStore`` (default), else the ``auths`` entry of the host.
* :func:`parse_www_authenticate` reads ``WWW-Authenticate`` challenges (RFC 7235: quoted values may hold
  commas and escaped quotes, one header may hold several challenges).
* :class:`RegistryClient` talks to the registry: HTTP Basic, or the token flow of the Docker registry token
  specification (anonymous or with credentials; the OAuth2 refresh-token grant for identity tokens), with
  tokens cached per scope until they expire.

httpx is imported on first use: importing this module must stay cheap because ``import stepflow`` must.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepflow.errors import (
    CredentialHelperError,
    DigestMismatchError,
    DockerConfigError,
    RegistryAuthError,
    RegistryCredentialsMissingError,
    RegistryError,
    RegistryNotFoundError,
    RegistryPermissionError,
    RegistryReferenceError,
    RegistryResponseError,
    RegistryTLSError,
    RegistryUnreachableError,
)

if TYPE_CHECKING:
    import ssl

    import anyio
    import httpx

__all__ = [
    "DOCKER_HUB_AUTH_KEY",
    "MANIFEST_MEDIA_TYPES",
    "AuthChallenge",
    "CredentialHelperError",
    "DigestMismatchError",
    "DockerConfigError",
    "RegistryAuth",
    "RegistryAuthError",
    "RegistryClient",
    "RegistryCredentialsMissingError",
    "RegistryNotFoundError",
    "RegistryPermissionError",
    "RegistryReferenceError",
    "RegistryResponseError",
    "RegistryTLSError",
    "RegistryUnreachableError",
    "auth_config_key",
    "docker_config_path",
    "parse_www_authenticate",
]

#: The key Docker files Docker Hub credentials under (in ``auths``, and the server URL given to helpers).
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})
#: Where Docker Hub actually serves the registry API.
_DOCKER_HUB_API_HOST = "registry-1.docker.io"

#: Manifest types asked for: Docker v2 schema 2, Docker manifest list, OCI manifest, OCI index.
MANIFEST_MEDIA_TYPES: tuple[str, ...] = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
)
_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
_CLIENT_ID = "stepflow"
#: Lifetime the token specification prescribes when the token service gives no ``expires_in``.
_DEFAULT_TOKEN_SECONDS = 60
_HELPER_TIMEOUT = 60.0

# Docker's reference grammar: path components of a repository name, tags, digests.
_NAME_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"\w[\w.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")

# RFC 7230 token characters, and the characters of an RFC 7235 token68 (before its trailing "=").
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68_CHAR = frozenset("-._~+/0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

_QueryValue = str | int | float | bool | None

# The clock of the token cache; a module attribute so that tests can move time forward.
_monotonic = time.monotonic


# --------------------------------------------------------------------------------------------- errors



# ----------------------------------------------------------------------------------------- challenges


class AuthChallenge:
    """One challenge of a ``WWW-Authenticate`` header.

    ``scheme`` is lower-cased (``"bearer"``, ``"basic"``...), so are the names in ``params``, whose
    values are unquoted and unescaped. ``token68`` holds the opaque value of schemes that use one.
    """

    __slots__ = ("params", "scheme", "token68")

    def __init__(self, scheme: str, params: Mapping[str, str] | None = None, token68: str | None = None) -> None:
        self.scheme = scheme.lower()
        self.params: dict[str, str] = dict(params or {})
        self.token68 = token68

    @property
    def realm(self) -> str | None:
        """The ``realm`` parameter: the token service URL of a Bearer challenge."""
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        """The ``service`` parameter of a Bearer challenge."""
        return self.params.get("service")

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes of the ``scope`` parameter (space-separated), e.g. ``("repository:a/b:pull,push",)``."""
        return tuple(self.params.get("scope", "").split())

    @property
    def error(self) -> str | None:
        """The ``error`` parameter (``invalid_token``, ``insufficient_scope``), if any."""
        return self.params.get("error")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AuthChallenge):
            return NotImplemented
        return (self.scheme, self.params, self.token68) == (other.scheme, other.params, other.token68)

    __hash__ = None  # type: ignore[assignment]  # params is a mutable dict

    def __repr__(self) -> str:
        extra = f", token68={self.token68!r}" if self.token68 is not None else ""
        return f"AuthChallenge({self.scheme!r}, {self.params!r}{extra})"


def parse_www_authenticate(header: str | Iterable[str]) -> list[AuthChallenge]:
    r"""Parse one ``WWW-Authenticate`` value, or all values of the header, into its challenges.

    Follows RFC 7235: ``Bearer realm="https://a/token",service="registry",scope="repository:a/b:pull,push"``
    is one challenge whose ``scope`` keeps its comma; ``\"`` inside quotes is a quote; a comma followed by
    ``name=`` continues the parameters of the current challenge, anything else starts the next challenge.
    Malformed pieces are skipped, not raised on: a registry's header is not ours to reject.
    """
    values = [header] if isinstance(header, str) else list(header)
    challenges: list[AuthChallenge] = []
    for value in values:
        challenges.extend(_parse_challenges(value))
    return challenges


def _skip(text: str, i: int, chars: str) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _span(text: str, i: int, allowed: frozenset[str]) -> int:
    while i < len(text) and text[i] in allowed:
        i += 1
    return i


def _quoted(text: str, i: int) -> tuple[str, int]:
    """The unescaped content of the quoted string starting at ``text[i] == '"'``, and the index after it."""
    out: list[str] = []
    i += 1
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif char == '"':
            return "".join(out), i + 1
        else:
            out.append(char)
            i += 1
    return "".join(out), i  # unterminated: take the rest, leniently


def _skip_item(text: str, i: int) -> int:
    """The index after the next comma that is not inside a quoted string (or the end)."""
    while i < len(text):
        if text[i] == '"':
            i = _quoted(text, i)[1]
        elif text[i] == ",":
            return i + 1
        else:
            i += 1
    return i


def _parse_challenges(text: str) -> list[AuthChallenge]:
    challenges: list[AuthChallenge] = []
    n = len(text)
    i = 0
    while True:
        i = _skip(text, i, " \t,")
        if i >= n:
            return challenges
        end = _span(text, i, _TCHAR)
        if end == i or (end < n and text[end] not in " \t,"):
            i = _skip_item(text, i)  # not a scheme name: drop this list element
            continue
        challenge = AuthChallenge(text[i:end])
        challenges.append(challenge)
        i = _skip(text, end, " \t")
        # A token68 stands alone: it runs to the end of the header or to a comma.
        t68 = _span(text, i, _TOKEN68_CHAR)
        if t68 > i:
            t68_end = _skip(text, t68, "=")
            after = _skip(text, t68_end, " \t")
            if after >= n or text[after] == ",":
                challenge.token68 = text[i:t68_end]
                i = after
        # Parameters: ``name = value`` items separated by commas, until an item is not ``name=``.
        while True:
            i = _skip(text, i, " \t,")
            name_start = i
            name_end = _span(text, i, _TCHAR)
            equals = _skip(text, name_end, " \t")
            if name_end == name_start or equals >= n or text[equals] != "=":
                break  # the end, or the scheme of the next challenge
            value_start = _skip(text, equals + 1, " \t")
            if value_start < n and text[value_start] == '"':
                value, i = _quoted(text, value_start)
            else:
                i = _span(text, value_start, _TCHAR)
                value = text[value_start:i]
            challenge.params.setdefault(text[name_start:name_end].lower(), value)
            i = _skip(text, i, " \t")
            if i < n and text[i] != ",":
                i = _skip_item(text, i)  # junk after a value: drop it, keep what was parsed


# ---------------------------------------------------------------------------------------- credentials


def docker_config_path() -> Path:
    """The Docker client config file: ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    directory = os.environ.get("DOCKER_CONFIG")
    return Path(directory or Path.home() / ".docker") / "config.json"


def _split_address(address: str) -> tuple[str | None, str, str]:
    """``(scheme or None, host[:port], path prefix)`` of ``[scheme://]host[:port][/prefix]``."""
    scheme, sep, rest = address.strip().partition("://")
    if not sep:
        scheme, rest = "", scheme
    host, _, prefix = rest.partition("/")
    return (scheme.lower() or None), host, prefix.strip("/")


def _canonical_host(host: str) -> str:
    """Lower-cased ``host[:port]``; every Docker Hub alias maps to one name."""
    host = host.lower()
    return "index.docker.io" if host in _DOCKER_HUB_HOSTS else host


def auth_config_key(registry: str) -> str:
    """The key Docker files a registry's credentials under.

    ``https://index.docker.io/v1/`` for Docker Hub, else ``host[:port]``. It is also the server URL a
    credential helper is asked about.
    """
    host = _split_address(registry)[1]
    return DOCKER_HUB_AUTH_KEY if host.lower() in _DOCKER_HUB_HOSTS else host


def _key_matches(key: str, host: str) -> bool:
    """Whether a config key (``host``, ``https://host``, ``http://host/v1/``...) names ``host``, as Docker does."""
    return _canonical_host(_split_address(key)[1]) == _canonical_host(host)


def _find_key(table: Mapping[str, Any], host: str) -> str | None:
    """The key of ``table`` for ``host``: the exact key Docker would use first, else any key naming it."""
    for key in (auth_config_key(host), host):
        if key in table:
            return key
    return next((key for key in table if _key_matches(key, host)), None)


class RegistryAuth:
    """Credentials for one registry, and where they came from (``source``, quoted in error messages).

    At most one kind is set: ``username``/``password`` (HTTP Basic, and Basic auth at the token service),
    ``identity_token`` (an OAuth2 refresh token, as ``docker login`` stores for some registries) or
    ``registry_token`` (a bearer token sent to the registry as is). None of them set means anonymous.
    Secrets never appear in ``repr`` nor in any message.
    """

    __slots__ = ("identity_token", "password", "registry", "registry_token", "source", "username")

    def __init__(self, registry: str, *, username: str | None = None, password: str | None = None,
                 identity_token: str | None = None, registry_token: str | None = None,
                 source: str = "no credentials") -> None:
        self.registry = registry
        self.username = username
        self.password = password
        self.identity_token = identity_token
        self.registry_token = registry_token
        self.source = source

    @property
    def anonymous(self) -> bool:
        """True when there is nothing to authenticate with."""
        return not (self.username or self.password or self.identity_token or self.registry_token)

    def describe(self) -> str:
        """What authenticates, and from where: ``the credentials of user 'alice' (explicit credentials)``."""
        if self.anonymous:
            return f"no credentials ({self.source})"
        if self.identity_token:
            return f"the identity token ({self.source})"
        if self.registry_token:
            return f"the registry token ({self.source})"
        return f"the credentials of user {self.username!r} ({self.source})"

    def __repr__(self) -> str:
        secrets = [name for name in ("password", "identity_token", "registry_token") if getattr(self, name)]
        hidden = "".join(f", {name}=<hidden>" for name in secrets)
        return f"RegistryAuth({self.registry!r}, username={self.username!r}{hidden}, source={self.source!r})"

    @classmethod
    def resolve(cls, registry: str, credentials: tuple[str, str] | None = None, *,
                config_path: str | os.PathLike[str] | None = None) -> RegistryAuth:
        """The credentials to use for ``registry`` (``[scheme://]host[:port][/prefix]``).

        In order: ``credentials`` given by the caller; else the Docker client config file (``config_path``,
        default :func:`docker_config_path`): the credential helper of ``credHelpers`` for the host, else the
        one of ``credsStore``, run as ``docker-credential-<helper> get``; when the helper has nothing for
        the host, or there is no helper, the host's ``auths`` entry. Anonymous when nothing matches.

        Raises :class:`DockerConfigError` for an unreadable config file or entry and
        :class:`CredentialHelperError` for a helper that is missing or fails.
        """
        host = _split_address(registry)[1]
        if credentials is not None:
            username, password = credentials
            return cls(host, username=username, password=password, source="explicit credentials")
        path = Path(config_path) if config_path is not None else docker_config_path()
        config = _read_docker_config(path, host)
        if config is None:
            return cls(host, source=f"no Docker config file at {path}")

        helpers = config.get("credHelpers")
        helper_key = _find_key(helpers, host) if isinstance(helpers, dict) else None
        if isinstance(helpers, dict) and helper_key is not None and helpers[helper_key]:
            found = _ask_helper(str(helpers[helper_key]), host, f"credHelpers[{helper_key!r}] of {path}")
            if found is not None:
                return found
        elif isinstance(config.get("credsStore"), str) and config["credsStore"]:
            found = _ask_helper(config["credsStore"], host, f"credsStore of {path}")
            if found is not None:
                return found

        auths = config.get("auths")
        auth_key = _find_key(auths, host) if isinstance(auths, dict) else None
        if isinstance(auths, dict) and auth_key is not None and isinstance(auths[auth_key], dict):
            found = _from_auths_entry(host, auths[auth_key], f"Docker config file {path}, auths[{auth_key!r}]")
            if found is not None:
                return found
        return cls(host, source=f"no credentials for {host} in {path}")


def _read_docker_config(path: Path, host: str) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DockerConfigError(host, f"cannot read the Docker config file {path} ({exc.strerror})") from exc
    try:
        config = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise DockerConfigError(host, f"the Docker config file {path} is not valid JSON ({exc}): fix or remove "
                                      "it, then run `docker login` again") from None
    if not isinstance(config, dict):
        raise DockerConfigError(host, f"the Docker config file {path} does not hold a JSON object")
    return config


def _from_auths_entry(host: str, entry: Mapping[str, Any], source: str) -> RegistryAuth | None:
    """The credentials of one ``auths`` entry, None for an empty one (as ``credsStore`` setups leave)."""
    import base64
    import binascii

    username = entry.get("username") or None
    password = entry.get("password") or None
    encoded = entry.get("auth")
    if encoded:
        try:
            decoded = base64.b64decode(str(encoded), validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        username, sep, password = decoded.partition(":")
        if not sep:
            # Say nothing about the content: it is a secret.
            raise DockerConfigError(host, f"the 'auth' field of {source} is not base64 of 'user:password': "
                                          f"run `docker login {host}` again")
    identity_token = entry.get("identitytoken") or None
    registry_token = entry.get("registrytoken") or None
    if not (username or password or identity_token or registry_token):
        return None
    return RegistryAuth(host, username=username or None, password=password or None,
                        identity_token=identity_token, registry_token=registry_token, source=source)


def _ask_helper(helper: str, host: str, origin: str) -> RegistryAuth | None:
    """Run ``docker-credential-<helper> get`` for ``host``; None when the helper holds nothing for it."""
    import shutil
    import subprocess

    program = f"docker-credential-{helper}"
    server_url = auth_config_key(host)
    source = f"credential helper {program}, {origin}"
    executable = shutil.which(program)
    if executable is None:
        raise CredentialHelperError(host, f"the Docker config names the credential helper {program} for {host} "
                                          f"({origin}), but there is no `{program}` on PATH: install it, or "
                                          "remove it from the config file", helper=program)
    try:
        done = subprocess.run([executable, "get"], input=server_url, capture_output=True, text=True,
                              timeout=_HELPER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise CredentialHelperError(host, f"the {source} did not answer within {_HELPER_TIMEOUT:.0f} s when asked for "
                                          f"{server_url}", helper=program) from None
    except OSError as exc:
        raise CredentialHelperError(host, f"the {source} cannot be run ({exc.strerror})", helper=program) from exc
    if done.returncode != 0:
        said = " ".join((done.stdout + " " + done.stderr).split())
        # The docker-credential-helpers protocol's way of saying "nothing stored for this server".
        if "credentials not found" in said.lower():
            return None
        raise CredentialHelperError(host, f"the {source} failed for {server_url} (exit status {done.returncode}: "
                                          f"{said[-300:] or 'no message'}); check it with "
                                          f"`echo {server_url} | {program} get`", helper=program)
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        # Not quoted: the output may hold the secret.
        raise CredentialHelperError(host, f"the {source} answered something that is not a JSON object for {server_url}",
                                    helper=program)
    username = str(answer.get("Username") or "")
    secret = str(answer.get("Secret") or "")
    if not secret:
        return None
    if username == "<token>":
        return RegistryAuth(host, identity_token=secret, source=source)
    return RegistryAuth(host, username=username, password=secret, source=source)


# --------------------------------------------------------------------------------------------- client


def _is_loopback(host: str) -> bool:
    """Whether ``host[:port]`` is a loopback address, which Docker lets speak plain HTTP."""
    import ipaddress

    if host.startswith("["):
        name = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        name = host.partition(":")[0]
    else:
        name = host
    name = name.lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _scope(name: str, actions: Iterable[str]) -> str:
    return f"repository:{name}:{','.join(actions)}"


def _basic(username: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _granted_actions(token: str, name: str) -> set[str] | None:
    """The actions a Docker-style JWT grants on repository ``name``; None when the token is not one."""
    import base64
    import binascii

    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    access = claims.get("access") if isinstance(claims, dict) else None
    if not isinstance(access, list):
        return None
    granted: set[str] = set()
    for item in access:
        if isinstance(item, dict) and item.get("type") == "repository" and item.get("name") == name:
            granted.update(str(action) for action in item.get("actions") or ())
    return granted


def _error_detail(response: httpx.Response) -> str:
    """`` (CODE: message)`` from a registry's JSON error body, or ``""``."""
    try:
        errors = response.json().get("errors")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(errors, list):
        return ""
    parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict)]
    text = "; ".join(p for p in parts if p)
    return f" ({text[:300]})" if text else ""


def _hash_matches(digest: str, content: bytes) -> bool | None:
    """Whether ``content`` hashes to ``digest``; None for an algorithm hashlib does not know."""
    import hashlib

    algorithm, _, expected = digest.partition(":")
    try:
        hasher = hashlib.new(algorithm)
    except ValueError:
        return None
    hasher.update(content)
    return hasher.hexdigest() == expected.lower()


def _ssl_error_text(exc: BaseException) -> str | None:
    """The message of the ``ssl.SSLError`` behind an httpx error, if there is one."""
    import ssl

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return str(current)
        current = current.__cause__ or current.__context__
    text = str(exc)
    return text if "SSL" in text or "CERTIFICATE" in text else None


class RegistryClient:
    """An async client of one Docker/OCI registry (distribution API v2), with Docker's authentication.

    ``uri`` is ``[scheme://]host[:port][/prefix]``: repository names given to the methods are taken under
    ``prefix``. ``credentials`` is ``(username, password)``, a resolved :class:`RegistryAuth`, or None to
    look them up with :meth:`RegistryAuth.resolve` (Docker config file, credential helpers) the first time
    the registry asks for authentication. ``insecure`` chooses plain HTTP: by default (None) loopback hosts
    (``127.x``, ``localhost``, ``::1``) get HTTP and every other host HTTPS, as Docker does; a scheme in
    ``uri`` decides too. ``verify`` is the TLS verification: True (system CAs, ``SSL_CERT_FILE``), False,
    a CA bundle path or an ``ssl.SSLContext``. ``timeout`` bounds each HTTP exchange, in seconds.
    ``config_path`` is the Docker config file to read credentials from (default :func:`docker_config_path`).

    Use it as ``async with RegistryClient(...) as client:`` or call :meth:`aclose`.
    """

    def __init__(self, uri: str, credentials: tuple[str, str] | RegistryAuth | None = None, *,
                 insecure: bool | None = None, verify: bool | str | ssl.SSLContext = True,
                 timeout: float = 30.0, config_path: str | os.PathLike[str] | None = None) -> None:
        scheme, host, prefix = _split_address(uri)
        if not host or any(c in host for c in " \t@?#"):
            raise RegistryReferenceError(uri, "not a registry address: expected [scheme://]host[:port][/prefix]")
        if scheme not in (None, "http", "https"):
            raise RegistryReferenceError(uri, f"unsupported scheme {scheme!r}: use http:// or https:// or none")
        if scheme is not None and insecure is not None and insecure != (scheme == "http"):
            raise RegistryReferenceError(uri, f"the address says {scheme}:// but insecure={insecure} was given")
        for part in prefix.split("/") if prefix else ():
            if not _NAME_COMPONENT.fullmatch(part):
                raise RegistryReferenceError(uri, f"the path prefix {prefix!r} is not a valid repository path "
                                                  "(lower-case letters, digits and . _ - separators)")
        plain_http = scheme == "http" if scheme is not None else (_is_loopback(host) if insecure is None else insecure)
        self.host = host
        self.prefix = prefix
        self.uri = f"{host}/{prefix}" if prefix else host
        self.hub = host.lower() in _DOCKER_HUB_HOSTS
        self.base_url = f"{'http' if plain_http else 'https'}://{_DOCKER_HUB_API_HOST if self.hub else host}"
        self._explicit = credentials if isinstance(credentials, tuple) else None
        self._auth: RegistryAuth | None = credentials if isinstance(credentials, RegistryAuth) else None
        self._config_path = None if config_path is None else Path(config_path)
        self._verify = verify
        self._timeout = timeout
        self._http: httpx.AsyncClient | None = None
        self._pinged = False
        self._challenge: AuthChallenge | None = None  # None after a ping: the registry is open
        self._tokens: dict[tuple[str, str, tuple[str, ...]], tuple[str, float]] = {}
        self._lock: anyio.Lock | None = None

    def __repr__(self) -> str:
        return f"RegistryClient({self.uri!r}, base_url={self.base_url!r})"

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections (the client can be used again afterwards: it reconnects)."""
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    # --------------------------------------------------------------------------------- public API

    async def check(self, repository: str, *, push: bool) -> None:
        """Verify that the registry answers and that the credentials allow pull (and push) on ``repository``.

        Asks ``GET /v2/`` anonymously to learn how the registry authenticates, then authenticates for the
        scope ``repository:<name>:pull[,push]`` (a token from the token service, or Basic credentials) and
        has the registry accept it. When the token is a JWT listing its grants (the Docker token format),
        the grants must include the actions asked for. Raises a :class:`RegistryError` subclass saying what
        is wrong and what to do.
        """
        name = self._name(repository)
        actions = ("pull", "push") if push else ("pull",)
        what = f"{' and '.join(actions)} {name}"
        challenge = await self._ping()
        if challenge is None:
            return
        authorization = await self._authorization(challenge, (_scope(name, actions),), what, fresh=True)
        response = await self._send("GET", f"{self.base_url}/v2/", headers={"Authorization": authorization})
        if response.status_code in (401, 403):
            raise await self._refused(response, challenge, what)
        if response.status_code != 200:
            raise self._unexpected(response, f"{self.base_url}/v2/")
        if challenge.scheme != "bearer":
            return
        granted = _granted_actions(authorization.partition(" ")[2], name)
        missing = [a for a in actions if granted is not None and a not in granted and "*" not in granted]
        if missing:
            auth = await self._credentials()
            if auth.anonymous:
                raise self._missing(auth, what)
            have = f"only {', '.join(sorted(granted))}" if granted else "no access"
            raise RegistryPermissionError(
                self.uri, f"{auth.describe()} may not {' and '.join(missing)} {name}: the token service granted "
                          f"{have} to it. Ask for access to the repository (does it exist?), or use other "
                          "credentials", source=auth.source)

    async def has_manifest(self, repository: str, tag: str) -> bool:
        """Whether ``repository:tag`` (or ``repository@digest``) exists: ``HEAD`` of its manifest."""
        name = self._name(repository)
        self._check_reference(tag)
        url = f"{self.base_url}/v2/{name}/manifests/{tag}"
        response = await self._request("HEAD", url, name=name, what=f"read {name}:{tag}",
                                       headers={"Accept": _ACCEPT})
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise self._unexpected(response, url)

    async def get_manifest(self, repository: str, reference: str) -> tuple[str, dict[str, Any]]:
        """``(media type, manifest)`` of ``repository`` at a tag or digest.

        Asks for Docker v2, manifest list, OCI manifest and OCI index types. A manifest asked for by digest
        is checked against it (:class:`DigestMismatchError`); :class:`RegistryNotFoundError` when missing.
        """
        name = self._name(repository)
        self._check_reference(reference)
        url = f"{self.base_url}/v2/{name}/manifests/{reference}"
        response = await self._request("GET", url, name=name, what=f"read {name}:{reference}",
                                       headers={"Accept": _ACCEPT})
        if response.status_code == 404:
            raise RegistryNotFoundError(self.uri, f"no manifest {name}:{reference}{_error_detail(response)}",
                                        status=404)
        if response.status_code != 200:
            raise self._unexpected(response, url)
        content = response.content
        if ":" in reference and _hash_matches(reference, content) is False:
            raise DigestMismatchError(self.uri, f"the manifest {name}@{reference} read back does not match its "
                                                "digest: the registry or a proxy altered it", status=200)
        try:
            manifest = json.loads(content)
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict):
            raise RegistryResponseError(self.uri, f"the manifest {name}:{reference} is not a JSON object",
                                        status=200)
        media_type = manifest.get("mediaType") or response.headers.get("content-type", "").partition(";")[0]
        return str(media_type).strip(), manifest

    async def get_blob(self, repository: str, digest: str) -> bytes:
        """The content of blob ``digest`` of ``repository`` (following redirects to storage), digest-checked."""
        name = self._name(repository)
        if not _DIGEST.fullmatch(digest):
            raise RegistryReferenceError(self.uri, f"{digest!r} is not a digest (algorithm:hex)")
        url = f"{self.base_url}/v2/{name}/blobs/{digest}"
        response = await self._request("GET", url, name=name, what=f"read blob {digest} of {name}",
                                       follow_redirects=True)
        if response.status_code == 404:
            raise RegistryNotFoundError(self.uri, f"no blob {digest} in {name}{_error_detail(response)}", status=404)
        if response.status_code != 200:
            raise self._unexpected(response, url)
        content = response.content
        matches = _hash_matches(digest, content)
        if matches is None:
            raise RegistryReferenceError(self.uri, f"cannot verify {digest}: unknown digest algorithm")
        if not matches:
            raise DigestMismatchError(self.uri, f"the blob {digest} of {name} read back ({len(content)} bytes) does "
                                                "not match its digest: the registry or a proxy altered it",
                                      status=200)
        return content

    # ----------------------------------------------------------------------------------- plumbing

    def _name(self, repository: str) -> str:
        """The full repository name in the registry: ``prefix/repository`` (``library/x`` on Docker Hub)."""
        parts = repository.strip("/").split("/")
        if not repository or not all(_NAME_COMPONENT.fullmatch(p) for p in parts):
            raise RegistryReferenceError(self.uri, f"{repository!r} is not a valid repository name (lower-case "
                                                   "letters, digits and . _ - separators, / between parts)")
        name = f"{self.prefix}/{repository.strip('/')}" if self.prefix else repository.strip("/")
        return f"library/{name}" if self.hub and "/" not in name else name

    def _check_reference(self, reference: str) -> None:
        if not (_TAG.fullmatch(reference) or _DIGEST.fullmatch(reference)):
            raise RegistryReferenceError(self.uri, f"{reference!r} is neither a tag nor a digest")

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:  # the TLS context is shared: loading the trusted CAs costs ~15 ms of CPU
            import httpx

            from stepflow._version import __version__

            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout, connect=min(self._timeout, 10.0)), verify=_tls(self._verify),
                headers={"User-Agent": f"stepflow/{__version__}"}, follow_redirects=False)
        return self._http

    async def _credentials(self) -> RegistryAuth:
        """The credentials, looked up once (a credential helper may run: off the event loop)."""
        if self._auth is None:
            import anyio

            self._auth = await anyio.to_thread.run_sync(
                lambda: RegistryAuth.resolve(self.host, self._explicit, config_path=self._config_path))
        return self._auth

    async def _send(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                    params: list[tuple[str, _QueryValue]] | None = None, data: Mapping[str, str] | None = None,
                    follow_redirects: bool = False) -> httpx.Response:
        """One HTTP exchange; transport failures become :class:`RegistryUnreachableError` with a hint."""
        import anyio
        import httpx

        # The first client loads the trusted CAs (~20 ms of CPU): off the event loop.
        client = self._http if self._http is not None else await anyio.to_thread.run_sync(self._client)
        try:
            response = await client.request(method, url, headers=headers, params=params, data=data,
                                            follow_redirects=follow_redirects)
        except httpx.TimeoutException as exc:
            raise RegistryUnreachableError(self.uri, f"no answer from {url} within {self._timeout:g} s "
                                                     f"({type(exc).__name__}): is the registry up, and reachable "
                                                     "from here (proxy, firewall)?") from exc
        except httpx.TransportError as exc:
            raise self._transport_error(exc, url) from exc
        if (response.status_code == 400 and url.startswith("http://")
                and b"HTTP request to an HTTPS server" in response.content):
            raise RegistryTLSError(self.uri, f"{url.split('/v2/')[0]} serves HTTPS, but it was spoken to in plain "
                                             "HTTP: do not mark the registry insecure (insecure=False)")
        return response

    def _transport_error(self, exc: httpx.TransportError, url: str) -> RegistryError:
        ssl_text = _ssl_error_text(exc)
        if ssl_text is not None:
            if "CERTIFICATE_VERIFY_FAILED" in ssl_text:
                hint = ("its TLS certificate is not trusted here: add the CA that signed it to the system trust "
                        "store (or point SSL_CERT_FILE at a bundle holding it)")
            elif any(s in ssl_text.upper() for s in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                                                      "RECORD LAYER FAILURE", "PACKET_LENGTH_TOO_LONG",
                                                      "HTTP_REQUEST")):
                hint = ("it does not speak TLS on that port: if it serves plain HTTP, mark the registry "
                        "insecure (insecure=True; Docker needs it in `insecure-registries` too)")
            else:
                hint = "check the registry's TLS setup (certificate, protocol versions)"
            return RegistryTLSError(self.uri, f"TLS with {url} failed ({ssl_text}): {hint}")
        text = str(exc) or type(exc).__name__
        lowered = text.lower()
        if any(s in lowered for s in ("name or service not known", "nodename nor servname", "name resolution",
                                      "no address associated", "getaddrinfo failed")):
            host = url.split("://", 1)[-1].split("/", 1)[0]
            return RegistryUnreachableError(self.uri, f"cannot resolve the host of {host} ({text}): is the "
                                                      "registry address right?")
        return RegistryUnreachableError(self.uri, f"cannot connect to {url} ({text}): is the registry running, "
                                                  "and are its host and port right?")

    def _unexpected(self, response: httpx.Response, url: str) -> RegistryResponseError:
        return RegistryResponseError(self.uri, f"{response.request.method} {url} answered HTTP "
                                               f"{response.status_code} {response.reason_phrase}"
                                               f"{_error_detail(response)}", status=response.status_code)

    async def _ping(self) -> AuthChallenge | None:
        """``GET /v2/`` anonymously: None when the registry is open, else the challenge to answer."""
        url = f"{self.base_url}/v2/"
        response = await self._send("GET", url)
        if response.status_code == 200:
            challenge = None
        elif response.status_code == 401:
            challenge = self._pick_challenge(response, url)
        elif response.status_code == 404:
            raise RegistryResponseError(self.uri, f"{url} answered HTTP 404: no registry API v2 there; is the "
                                                  "address right?", status=404)
        else:
            raise self._unexpected(response, url)
        self._pinged, self._challenge = True, challenge
        return challenge

    def _pick_challenge(self, response: httpx.Response, url: str) -> AuthChallenge:
        challenges = parse_www_authenticate(response.headers.get_list("www-authenticate"))
        for scheme in ("bearer", "basic"):
            for challenge in challenges:
                if challenge.scheme == scheme:
                    return challenge
        offered = ", ".join(c.scheme for c in challenges) or "none"
        raise RegistryAuthError(self.uri, f"{url} asks for authentication with a scheme this client does not "
                                          f"support (offered: {offered}; supported: Bearer, Basic)")

    async def _request(self, method: str, url: str, *, name: str, what: str,
                       headers: Mapping[str, str] | None = None, follow_redirects: bool = False) -> httpx.Response:
        """A pull request on repository ``name``, authenticated as the registry asks; refusals raise."""
        if not self._pinged:
            await self._ping()
        scopes = (_scope(name, ("pull",)),)
        sent = dict(headers or {})
        challenge = self._challenge
        if challenge is not None:
            sent["Authorization"] = await self._authorization(challenge, scopes, what)
        response = await self._send(method, url, headers=sent, follow_redirects=follow_redirects)
        if response.status_code == 401:
            # The registry asks (again): a token that expired early, a scope it wants named differently, or
            # a registry that lets /v2/ through anonymously. Answer its challenge once.
            previous, challenge = challenge, self._pick_challenge(response, url)
            self._challenge = challenge
            if not (previous is not None and previous.scheme == "basic" == challenge.scheme):
                wanted = tuple(dict.fromkeys((*scopes, *challenge.scopes)))
                sent["Authorization"] = await self._authorization(challenge, wanted, what, fresh=True)
                response = await self._send(method, url, headers=sent, follow_redirects=follow_redirects)
        if response.status_code in (401, 403):
            raise await self._refused(response, challenge, what)
        return response

    async def _authorization(self, challenge: AuthChallenge, scopes: tuple[str, ...], what: str, *,
                             fresh: bool = False) -> str:
        """The ``Authorization`` header value answering ``challenge`` for ``scopes``."""
        auth = await self._credentials()
        if challenge.scheme == "basic":
            if auth.username is None or auth.password is None:
                raise self._missing(auth, what)
            return _basic(auth.username, auth.password)
        if auth.registry_token:
            return f"Bearer {auth.registry_token}"
        return f"Bearer {await self._token(challenge, scopes, auth, what, fresh=fresh)}"

    async def _token(self, challenge: AuthChallenge, scopes: tuple[str, ...], auth: RegistryAuth, what: str, *,
                     fresh: bool) -> str:
        """A bearer token for ``scopes`` from the challenge's token service, cached until it expires."""
        import anyio

        realm = challenge.realm
        if not realm:
            raise RegistryAuthError(self.uri, "the registry's Bearer challenge names no token service (realm)")
        service = challenge.service or ""
        key = (realm, service, tuple(sorted(set(scopes))))
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            cached = self._tokens.get(key)
            if cached is not None and not fresh and cached[1] > _monotonic():
                return cached[0]
            token, lifetime = await self._fetch_token(realm, service, key[2], auth, what)
            # Renew a little before the token service's deadline: clocks and transit eat into it.
            self._tokens[key] = (token, _monotonic() + lifetime * 0.9)
            return token

    async def _fetch_token(self, realm: str, service: str, scopes: tuple[str, ...], auth: RegistryAuth,
                           what: str) -> tuple[str, float]:
        """Ask the token service (Docker registry token spec) for a token: ``(token, lifetime in s)``."""
        import httpx

        url = str(httpx.URL(self.base_url).join(realm))
        if auth.identity_token:
            # Docker's OAuth2 flow for identity tokens: a refresh-token grant, POSTed as a form.
            form = {"grant_type": "refresh_token", "refresh_token": auth.identity_token, "client_id": _CLIENT_ID}
            if service:
                form["service"] = service
            if scopes:
                form["scope"] = " ".join(scopes)
            response = await self._send("POST", url, data=form)
        else:
            params: list[tuple[str, _QueryValue]] = [("service", service)] if service else []
            params += [("scope", scope) for scope in scopes]
            headers = {}
            if auth.username is not None and auth.password is not None:
                params.append(("account", auth.username))
                headers["Authorization"] = _basic(auth.username, auth.password)
            response = await self._send("GET", url, params=params, headers=headers)
        if response.status_code in (401, 403):
            if auth.anonymous:
                raise self._missing(auth, what)
            raise RegistryAuthError(
                self.uri, f"the token service {url} rejected {auth.describe()} with HTTP {response.status_code}"
                          f"{_error_detail(response)}: check them, run `docker login {self.host}` again, or fix "
                          "--username/--password on the container registry", source=auth.source)
        if response.status_code != 200:
            raise RegistryResponseError(self.uri, f"the token service {url} answered HTTP {response.status_code} "
                                                  f"{response.reason_phrase}{_error_detail(response)}",
                                        status=response.status_code)
        try:
            body = response.json()
        except ValueError:
            body = None
        token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryResponseError(self.uri, f"the token service {url} answered without a token", status=200)
        expires_in = body.get("expires_in") if isinstance(body, dict) else None
        lifetime = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else None
        return token, lifetime or _DEFAULT_TOKEN_SECONDS

    def _missing(self, auth: RegistryAuth, what: str) -> RegistryCredentialsMissingError:
        return RegistryCredentialsMissingError(
            self.uri, f"the registry asks for credentials (to {what}): run `docker login {self.host}` or set "
                      f"--username/--password on the container registry (none found: {auth.source})",
            source=auth.source)

    async def _refused(self, response: httpx.Response, challenge: AuthChallenge | None, what: str) -> RegistryError:
        """The error for a 401/403 the registry gave to an authenticated request."""
        auth = await self._credentials()
        status = f"with HTTP {response.status_code}{_error_detail(response)}"
        if auth.anonymous:
            return self._missing(auth, what)
        again = parse_www_authenticate(response.headers.get_list("www-authenticate"))
        insufficient = any(c.error == "insufficient_scope" for c in again)
        if response.status_code == 403 or insufficient:
            return RegistryPermissionError(self.uri, f"{auth.describe()} may not {what}: the registry refused "
                                                     f"{status}; ask for access to the repository, or use other "
                                                     "credentials",
                                           source=auth.source)
        if challenge is not None and challenge.scheme == "bearer":
            return RegistryAuthError(self.uri, f"the registry did not accept the token its token service issued for "
                                               f"{auth.describe()}: it answered {status}; the registry and its "
                                               "token service disagree (issuer, service name or signing "
                                               "certificate), or the token expired", source=auth.source)
        return RegistryAuthError(self.uri, f"the registry rejected {auth.describe()} {status}: check them, run "
                                           f"`docker login {self.host}` again, or fix --username/--password on "
                                           "the container registry", source=auth.source)


@functools.lru_cache(maxsize=8)
def _tls(verify: Any) -> Any:
    """One TLS context per trust setting for every client of the process (the system's CAs, or a file/dir)."""
    import ssl

    if verify is False or isinstance(verify, ssl.SSLContext):
        return verify
    if isinstance(verify, str):
        return ssl.create_default_context(capath=verify) if os.path.isdir(verify) else ssl.create_default_context(
            cafile=verify)
    import certifi

    return ssl.create_default_context(cafile=certifi.where())
