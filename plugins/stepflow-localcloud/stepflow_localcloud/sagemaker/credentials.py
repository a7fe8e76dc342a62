"""The container credentials endpoint: how a training job's container gets its execution role.

SageMaker does not put keys in a training container's environment. The AWS SDKs in the container
find the job's IAM role (``RoleArn``) through the *container credentials provider*: the environment
holds ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` and ``AWS_CONTAINER_AUTHORIZATION_TOKEN``, the SDK GETs
that URL with the token as its ``Authorization`` header and receives
``{"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}`` (botocore's ``ContainerProvider``),
refetching before ``Expiration``.

:class:`CredentialsEndpoint` serves that format on 127.0.0.1: botocore accepts plain HTTP for this
only from a loopback address, and job containers share the host's network. Each job gets its own
URL, with an unguessable path and its own token, revoked when the job ends. The keys served stand
for the role's: by default the control plane's own (moto accepts any).
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger(__name__)

ENV_FULL_URI = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
ENV_AUTH_TOKEN = "AWS_CONTAINER_AUTHORIZATION_TOKEN"
#: What moto accepts; used when the control plane has no credentials of its own.
TEST_KEY = TEST_SECRET = "testing"
HOST = "127.0.0.1"
ROUTE = "/v1/credentials/{key}"
#: The role session length SageMaker uses by default (the role's MaxSessionDuration).
DEFAULT_LIFETIME = 3600.0


@dataclass(frozen=True)
class RoleCredentials:
    """The keys served as the credentials of every job's execution role."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> RoleCredentials:
        """The ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` of ``environ``.

        ``environ`` defaults to this process's environment; without keys there, moto's test keys.
        """
        env = os.environ if environ is None else environ
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            return cls(TEST_KEY, TEST_SECRET)
        return cls(key, secret, env.get("AWS_SESSION_TOKEN") or None)


@dataclass(frozen=True)
class _Grant:
    role_arn: str
    token: str


class CredentialsEndpoint:
    """An HTTP server on 127.0.0.1 handing each job's container its role credentials.

    ``issue()`` opens a URL for one job and returns the environment that points the container's
    SDKs at it; ``revoke()`` closes it. A request without the job's token is refused (401 when the
    ``Authorization`` header is missing, 403 when it is wrong); an unknown or revoked URL is 404.
    """

    def __init__(self, credentials: RoleCredentials, *, port: int = 0, lifetime: float = DEFAULT_LIFETIME) -> None:
        self.credentials = credentials
        self.port = port
        self.lifetime = lifetime
        self.served = self.refused = 0
        self._grants: dict[str, _Grant] = {}
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://{HOST}:{self.port}"

    @property
    def active(self) -> int:
        """How many job URLs are open."""
        return len(self._grants)

    async def start(self) -> None:
        """Listen (on a free port when ``port`` is 0)."""
        app = web.Application()
        app.router.add_get(ROUTE, self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, self.port).start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening and forget every grant."""
        self._grants.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def issue(self, role_arn: str) -> tuple[str, dict[str, str]]:
        """Open a URL serving ``role_arn``'s credentials: (grant id for ``revoke``, container environment)."""
        key, token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._grants[key] = _Grant(role_arn=role_arn, token=token)
        return key, {ENV_FULL_URI: f"{self.url}{ROUTE.format(key=key)}", ENV_AUTH_TOKEN: token}

    def revoke(self, grant: str) -> None:
        """Close a URL opened by ``issue`` (a no-op when it is already closed)."""
        self._grants.pop(grant, None)

    async def _serve(self, request: web.Request) -> web.Response:
        grant = self._grants.get(request.match_info["key"])
        if grant is None:
            return self._refuse(404, "NotFound", "No credentials are served at this address.")
        given = request.headers.get("Authorization")
        if given is None:
            return self._refuse(401, "Unauthorized", "The Authorization header is missing.")
        if not hmac.compare_digest(given.encode(), grant.token.encode()):
            return self._refuse(403, "AccessDenied", "The authorization token is not valid for this address.")
        self.served += 1
        creds = self.credentials
        expiration = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.lifetime)
        return web.json_response({
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.secret_access_key,
            # Long-term keys have no session token: botocore signs without an empty one, not so a made-up one.
            "Token": creds.session_token or "",
            "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "RoleArn": grant.role_arn,
            "AccountId": _account_of(grant.role_arn),
        })

    def _refuse(self, status: int, code: str, message: str) -> web.Response:
        self.refused += 1
        return web.json_response({"code": code, "message": message}, status=status)


def _account_of(role_arn: str) -> str:
    """The account id of ``arn:aws:iam::ACCOUNT:role/NAME`` (validated by CreateTrainingJob)."""
    parts = role_arn.split(":")
    return parts[4] if len(parts) > 5 else ""
