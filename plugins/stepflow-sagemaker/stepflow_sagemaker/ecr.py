"""The ``ecr`` container registry: Amazon ECR through aiobotocore.

- :meth:`EcrContainerRegistry.credentials`: GetAuthorizationToken, decoded to
  ``("AWS", password)`` for the image builder's push (cached until shortly before it expires).
- :meth:`EcrContainerRegistry.has_image`: makes sure the repository exists first (CreateRepository
  when missing and ``create_repository`` is on), then asks the registry's distribution API
  (basic auth with the token), so the image manager's "check, then build and push" works unchanged.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import anyio

from stepflow.errors import BackendError, RegistryError
from stepflow.remote import DistributionRegistry
from stepflow_sagemaker.aws import Aws, brief, error_code
from stepflow_sagemaker.config import ECR_HOST, ecr_region

#: Re-login this long before the token expires (tokens last 12 hours).
TOKEN_MARGIN_S = 300.0
ATTEMPTS = 6


class EcrContainerRegistry(DistributionRegistry):
    """An ECR registry at ``ACCOUNT.dkr.ecr.REGION.amazonaws.com[/prefix]`` (any host for tests)."""

    flavor = "ecr"

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self.config = config
        self._uri = str(config.uri).strip().rstrip("/")
        self.host, _, self.prefix = self._uri.partition("/")
        match = ECR_HOST.match(self.host)
        self.account = match.group("account") if match else None
        self.aws = Aws(region=config.region or ecr_region(self._uri), profile=config.profile,
                       what=f"container-registry '{name}' (ecr)", max_pool_connections=8)
        self._token: tuple[str, str] | None = None
        self._token_expires = 0.0
        self._repositories: set[str] = set()
        self._lock: anyio.Lock | None = None

    @property
    def uri(self) -> str:
        """``host[/prefix]`` image names are built under."""
        return self._uri

    @property
    def region(self) -> str:
        """The registry's region (uri, option, or the AWS config); BackendError when none."""
        return self.aws.region

    def repository_name(self, repository: str) -> str:
        """The ECR repository of an image repository under this registry's prefix."""
        return f"{self.prefix}/{repository}" if self.prefix else repository

    async def _call(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.aws.call("ecr", method, endpoint_url=self.config.endpoint_url, attempts=ATTEMPTS,
                                   **params)  # a login, not a submission: retried here

    # ---------------------------------------------------------------- ContainerRegistry
    async def credentials(self) -> tuple[str, str] | None:
        """``("AWS", password)`` from GetAuthorizationToken; RegistryError "ECR login failed" otherwise."""
        if self._token is not None and time.time() < self._token_expires - TOKEN_MARGIN_S:
            return self._token
        params: dict[str, Any] = {}
        if self.account is not None:
            params["registryIds"] = [self.account]
        try:
            answer = await self._call("get_authorization_token", **params)
            data = answer["authorizationData"][0]
            user, sep, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
            if not sep:
                raise ValueError("the authorization token is not base64 'user:password'")
        except BackendError as exc:
            raise RegistryError(self._uri, f"ECR login failed: {exc}") from exc
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise RegistryError(self._uri, f"ECR login failed: unexpected GetAuthorizationToken answer ({exc})") \
                from exc
        except Exception as exc:
            err = self.aws.translate(exc, "GetAuthorizationToken", self.config.endpoint_url)
            raise RegistryError(self._uri, f"ECR login failed: {err}") from exc
        expires = data.get("expiresAt")
        self._token = (user, password)
        self._token_expires = expires.timestamp() if hasattr(expires, "timestamp") else time.time() + 3600
        return self._token

    async def has_image(self, repository: str, tag: str) -> bool:
        """Log in, make sure the repository exists, then ask the registry for ``repository:tag``."""
        await self.credentials()
        await self.ensure_repository(repository)
        return await super().has_image(repository, tag)

    async def check(self, repository: str, *, push: bool = True) -> None:
        """Log in (GetAuthorizationToken), create the repository when missing, and check the token works."""
        await self.credentials()
        await self.ensure_repository(repository)
        await super().check(repository, push=push)

    async def ensure_repository(self, repository: str) -> None:
        """Create the ECR repository of ``repository`` when missing (``create_repository``), once."""
        name = self.repository_name(repository)
        if name in self._repositories:
            return
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if name in self._repositories:
                return
            try:
                await self._call("describe_repositories", repositoryNames=[name])
            except Exception as exc:
                if error_code(exc) != "RepositoryNotFoundException":
                    raise RegistryError(self._uri, f"checking ECR repository '{name}' failed: "
                                                   f"{self.aws.translate(exc, 'DescribeRepositories')}") from exc
                if not self.config.create_repository:
                    raise RegistryError(self._uri, (
                        f"ECR repository '{name}' does not exist in {self.region}: create it (aws ecr "
                        f"create-repository --repository-name {name} --region {self.region}) or register the "
                        "registry with --create_repository=true")) from None
                try:
                    await self._call("create_repository", repositoryName=name)
                except Exception as again:
                    if error_code(again) != "RepositoryAlreadyExistsException":  # created meanwhile: fine
                        raise RegistryError(self._uri, f"creating ECR repository '{name}' failed: {brief(again)}") \
                            from again
            self._repositories.add(name)

    async def aclose(self) -> None:
        """Close the ECR client."""
        await self.aws.aclose()
