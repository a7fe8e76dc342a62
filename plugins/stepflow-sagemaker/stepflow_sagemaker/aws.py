"""AWS plumbing on aiobotocore: one session, lazily created clients, retries, clear errors.

- Clients are created inside the running event loop on first use, one per (service, region,
  endpoint), reused, and closed by :meth:`Aws.aclose`.
- Credentials come from botocore's chain (environment, profile, web identity / SSO / process,
  container role, instance role). When none resolve, :class:`~stepflow.errors.BackendError` says
  which sources were tried.
- botocore's own retries are off: :meth:`Aws.call` retries transient failures (throttling,
  HTTP 429 / 5xx, dropped connections) itself, with full-jitter exponential backoff, so callers
  know when a request may have been applied twice, and every attempt is counted in
  :attr:`Aws.stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections import Counter
from typing import Any

import attrs

from stepflow.errors import BackendError, TransientBackendError

THROTTLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "TooManyRequestsException",
    "RequestThrottled", "RequestThrottledException", "RequestLimitExceeded", "SlowDown",
    "ProvisionedThroughputExceededException", "TransactionInProgressException", "PriorRequestNotComplete",
    "BandwidthLimitExceeded", "LimitExceededException",
})
TRANSIENT_CODES = frozenset({
    "InternalFailure", "InternalError", "InternalServerError", "InternalServerException", "ServiceUnavailable",
    "ServiceUnavailableException", "RequestTimeout", "RequestTimeoutException", "IDPCommunicationError",
    "EC2ThrottledException",
})
CREDENTIAL_CODES = frozenset({
    "UnrecognizedClientException", "InvalidClientTokenId", "SignatureDoesNotMatch", "ExpiredToken",
    "ExpiredTokenException", "InvalidAccessKeyId", "AuthFailure", "IncompleteSignature",
    "MissingAuthenticationToken", "InvalidSignatureException",
})
DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "NotAuthorized"})

#: Backoff of :meth:`Aws.call`: full jitter over base * 2**n seconds, capped.
BACKOFF_BASE = 0.2
BACKOFF_CAP = 8.0


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError ('' for other exceptions)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", "") or "")
    return ""


def error_message(exc: BaseException) -> str:
    """The service's message of a ClientError, else ``str(exc)``."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        message = response.get("Error", {}).get("Message")
        if message:
            return str(message)
    return str(exc)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a ClientError."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    return None


def is_throttle(exc: BaseException) -> bool:
    """Throttling: a throttling error code, or HTTP 429."""
    code = error_code(exc)
    return code in THROTTLE_CODES or code.startswith("Throttl") or http_status(exc) == 429


def is_unreachable(exc: BaseException) -> bool:
    """The endpoint cannot be reached at all (refused, unknown host): retrying will not help soon."""
    from botocore.exceptions import EndpointConnectionError

    return isinstance(exc, EndpointConnectionError) and not _is_dropped(exc)


def _is_dropped(exc: BaseException) -> bool:
    from botocore.exceptions import ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError

    return isinstance(exc, (ConnectionClosedError, ReadTimeoutError, ConnectTimeoutError))


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, 5xx, a transient error code, a dropped or timed-out connection."""
    if is_throttle(exc) or error_code(exc) in TRANSIENT_CODES:
        return True
    status = http_status(exc)
    if status is not None and status >= 500:
        return True
    if _is_dropped(exc):
        return True
    try:
        import aiohttp

        if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
            return True
    except ImportError:  # pragma: no cover - aiohttp comes with aiobotocore
        pass
    return isinstance(exc, (asyncio.TimeoutError, ConnectionResetError))


def brief(exc: BaseException) -> str:
    """``Code: message`` of an AWS error, ``Type: message`` of others."""
    code = error_code(exc)
    if code:
        return f"{code}: {error_message(exc)}"
    return f"{type(exc).__name__}: {exc}"


def backoff(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Full-jitter exponential backoff for retry ``attempt`` (1 = first retry)."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


@attrs.define
class CallStats:
    """What an :class:`Aws` sent: every attempt by API operation, throttled and retried ones."""

    calls: Counter[str] = attrs.field(factory=Counter)
    throttled: Counter[str] = attrs.field(factory=Counter)
    retried: Counter[str] = attrs.field(factory=Counter)

    def summary(self) -> dict[str, dict[str, int]]:
        """``{"calls": {...}, "throttled": {...}, "retried": {...}}`` as plain dicts."""
        return {"calls": dict(self.calls), "throttled": dict(self.throttled), "retried": dict(self.retried)}


class Aws:
    """A session of one AWS identity (profile or the default chain) in one region.

    ``what`` names the component in messages, e.g. ``step-operator 'sagemaker'``.
    """

    def __init__(self, *, region: str | None, profile: str | None, what: str,
                 max_pool_connections: int = 64) -> None:
        self.configured_region = region
        self.profile = profile
        self.what = what
        self.stats = CallStats()
        self._max_pool = max_pool_connections
        self._session: Any = None
        self._credentials: Any = None
        self._clients: dict[tuple[str, str, str | None], Any] = {}
        self._stack: contextlib.AsyncExitStack | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None

    # ---------------------------------------------------------------- session, region, credentials
    def session(self) -> Any:
        """The aiobotocore session (created on first use)."""
        if self._session is None:
            from aiobotocore.session import AioSession
            from botocore.exceptions import ProfileNotFound

            try:
                session = AioSession(profile=self.profile)
                session.get_scoped_config()  # a missing profile fails here, clearly
            except ProfileNotFound:
                raise BackendError(f"{self.what}: AWS profile '{self.profile}' not found in "
                                   f"{_config_file()} or {_credentials_file()}") from None
            self._session = session
        return self._session

    @property
    def region(self) -> str:
        """The region in use: the configured one, else the AWS config's; BackendError when none."""
        if self.configured_region:
            return self.configured_region
        found = self.session().get_config_variable("region")
        if not found:
            raise BackendError(f"{self.what}: no AWS region: set --region, or AWS_REGION / AWS_DEFAULT_REGION, or "
                               f"region in the profile of {_config_file()}")
        return str(found)

    async def credentials(self) -> Any:
        """The resolved credentials (cached); BackendError listing the sources tried when none."""
        if self._credentials is None:
            from botocore.exceptions import BotoCoreError, ProfileNotFound

            session = self.session()
            try:
                creds = await session.get_credentials()
            except ProfileNotFound:
                raise BackendError(f"{self.what}: AWS profile '{self.profile}' not found in "
                                   f"{_config_file()} or {_credentials_file()}") from None
            except BotoCoreError as exc:
                raise BackendError(f"{self.what}: resolving AWS credentials failed: {exc}") from exc
            if creds is None:
                raise BackendError(f"{self.what}: no AWS credentials found; tried: {self.sources_tried()}. "
                                   "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or --profile / AWS_PROFILE, "
                                   "or run where a container or instance role is available")
            self._credentials = creds
        return self._credentials

    def sources_tried(self) -> str:
        """The credential sources of botocore's chain, with what was found of each."""
        env = os.environ
        profile = self.profile or env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
        keys = "set" if env.get("AWS_ACCESS_KEY_ID") else "not set"
        container = ("set" if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
                     or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") else "not set")
        disabled = env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"
        metadata = "disabled by AWS_EC2_METADATA_DISABLED" if disabled else "no instance metadata service answered"
        return "; ".join([
            f"environment variables AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ({keys})",
            f"profile '{profile}' in {_credentials_file()} and {_config_file()} (keys, web identity, SSO, "
            "credential_process, role_arn)",
            f"container role (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI / _FULL_URI: {container})",
            f"EC2 instance metadata role ({metadata})",
        ])

    # ---------------------------------------------------------------- clients
    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop: clients of the old one cannot be used here
            self._clients, self._stack, self._lock, self._loop = {}, None, asyncio.Lock(), loop

    async def client(self, service: str, endpoint_url: str | None = None) -> Any:
        """The client of ``service`` (created in the running loop on first use, then reused)."""
        self._bind_loop()
        key = (service, self.region, endpoint_url)
        client = self._clients.get(key)
        if client is not None:
            return client
        assert self._lock is not None
        async with self._lock:
            client = self._clients.get(key)
            if client is None:
                from aiobotocore.config import AioConfig

                await self.credentials()
                if self._stack is None:
                    self._stack = contextlib.AsyncExitStack()
                config = AioConfig(retries={"total_max_attempts": 1}, connect_timeout=10, read_timeout=60,
                                   max_pool_connections=self._max_pool)
                client = await self._stack.enter_async_context(self.session().create_client(
                    service, region_name=key[1], endpoint_url=endpoint_url, config=config))
                self._clients[key] = client
        return client

    async def call(self, service: str, method: str, *, endpoint_url: str | None = None, attempts: int = 1,
                   **params: Any) -> dict[str, Any]:
        """Call ``method`` (botocore's snake_case name) of ``service``; retry transient failures.

        ``attempts`` bounds the tries (1: no retry). The last failure is raised as is (a
        botocore ClientError or connection error); use :func:`is_transient` and friends on it.
        """
        client = await self.client(service, endpoint_url)
        api = client.meta.method_to_api_mapping.get(method, method)
        for attempt in range(1, attempts + 1):
            self.stats.calls[api] += 1
            try:
                return dict(await getattr(client, method)(**params))
            except Exception as exc:
                if is_throttle(exc):
                    self.stats.throttled[api] += 1
                if attempt >= attempts or not is_transient(exc):
                    raise
                self.stats.retried[api] += 1
                await asyncio.sleep(backoff(attempt))
        raise AssertionError("unreachable")

    def translate(self, exc: BaseException, doing: str, endpoint: str | None = None) -> BackendError:
        """A clear BackendError for a failed call (TransientBackendError when worth retrying later)."""
        from botocore.exceptions import BotoCoreError, NoCredentialsError

        where = endpoint or "the region's endpoint"
        if isinstance(exc, NoCredentialsError):
            return BackendError(f"{self.what}: {doing}: no AWS credentials; tried: {self.sources_tried()}")
        if is_unreachable(exc):
            return BackendError(f"{self.what}: {doing}: cannot reach {where}: {exc}")
        code = error_code(exc)
        if code in CREDENTIAL_CODES:
            return BackendError(f"{self.what}: {doing}: AWS rejected the credentials ({brief(exc)}); check the "
                                "access key, profile or role in use")
        if code in DENIED_CODES:
            return BackendError(f"{self.what}: {doing}: access denied ({brief(exc)}); the identity in use needs "
                                "that permission")
        if is_transient(exc):
            return TransientBackendError(f"{self.what}: {doing}: {brief(exc)}")
        if isinstance(exc, BotoCoreError):
            return BackendError(f"{self.what}: {doing}: {exc}")
        return BackendError(f"{self.what}: {doing}: {brief(exc)}")

    async def aclose(self) -> None:
        """Close every client (they are re-created if used again)."""
        stack, self._stack, self._clients = self._stack, None, {}
        if stack is not None and self._loop is asyncio.get_running_loop():
            with contextlib.suppress(Exception):
                await stack.aclose()


def _config_file() -> str:
    return os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"


def _credentials_file() -> str:
    return os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
