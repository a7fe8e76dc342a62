"""Azure plumbing: credentials, the MLClient, and what errors mean.

Every Azure import happens inside a function: ``import stepflow_azureml.azure`` stays cheap and
``import stepflow`` never imports an Azure module. The SDK is synchronous: callers run these in
worker threads (the operator's limiter), never on the event loop.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any

from stepflow.errors import BackendError

ARM_SCOPE = "https://management.azure.com/.default"
#: HTTP statuses worth retrying (the retry policy decides how).
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Environment variables DefaultAzureCredential reads first (EnvironmentCredential, workload identity).
#: Where the SDK keeps the name of the current cloud (process-wide).
CLOUD_ENV = "AZUREML_CURRENT_CLOUD"
CLOUDS = ("AzureCloud", "AzureChinaCloud", "AzureUSGovernment")
ENV_SOURCES = ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE")


class StaticToken:
    """A credential answering one fixed bearer token: for a local control plane, which accepts any."""

    def __init__(self, token: str = "stepflow-local") -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        """An AccessToken valid for an hour."""
        from azure.core.credentials import AccessToken

        return AccessToken(self.token, int(time.time()) + 3600)


def credential(config: Any) -> Any:
    """The credential of ``config``: a service principal, a local control plane's static token, or the default chain."""
    if getattr(config, "client_id", None):
        from azure.identity import ClientSecretCredential

        return ClientSecretCredential(config.tenant_id, config.client_id, config.client_secret,
                                      authority=authority(getattr(config, "cloud", "AzureCloud")))
    if getattr(config, "endpoint", None):
        return StaticToken()
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


def authority(cloud: str) -> str:
    """The Microsoft Entra host of ``cloud``."""
    return {"AzureChinaCloud": "login.chinacloudapi.cn",
            "AzureUSGovernment": "login.microsoftonline.us"}.get(cloud, "login.microsoftonline.com")


def check_credential(cred: Any, what: str) -> None:
    """Get a token now; BackendError saying which credential sources were tried and how to fix it."""
    from azure.core.exceptions import ClientAuthenticationError

    quiet_sdk()
    try:
        cred.get_token(ARM_SCOPE)
    except ClientAuthenticationError as exc:
        raise BackendError(f"{what}: no Azure credentials: {sources_tried(exc)}. Set AZURE_CLIENT_ID, "
                           "AZURE_TENANT_ID and AZURE_CLIENT_SECRET, run `az login`, run on Azure with a managed "
                           "identity, or register the operator with --client_id/--client_secret/--tenant_id") from None


def sources_tried(exc: BaseException) -> str:
    """What each credential of the chain said, one clause each."""
    text = getattr(exc, "message", None) or str(exc)
    tried = re.findall(r"(\w+Credential): ([^\n]+)", text)
    if tried:
        return "tried " + "; ".join(f"{name} ({_short(reason)})" for name, reason in tried)
    env = ", ".join(f"{name} {'set' if os.environ.get(name) else 'not set'}" for name in ENV_SOURCES)
    return f"{_short(text)} ({env})"


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def ml_client(config: Any) -> Any:
    """The MLClient of ``config``'s workspace, with the SDK's own retries off (stepflow's policy retries).

    An ``endpoint`` is registered as a custom cloud whose every service lives at that address.
    """
    # The SDK records the cloud of its last client in this variable, which child processes inherit;
    # importing the SDK where that cloud is not registered fails, so a custom one is dropped first.
    if os.environ.get(CLOUD_ENV, "") not in ("", *CLOUDS):
        del os.environ[CLOUD_ENV]
    from azure.ai.ml import MLClient

    quiet_sdk()
    kwargs: dict[str, Any] = {"retry_total": 0}
    if config.endpoint:
        base = config.endpoint.rstrip("/") + "/"
        kwargs["cloud"] = "stepflow-" + hashlib.sha256(base.encode()).hexdigest()[:12]
        kwargs["cloud_metadata"] = {"resource_manager": base, "active_directory": base, "aml_resource_id": base,
                                    "azure_portal": base, "storage_endpoint": "core.windows.net",
                                    "registry_discovery_endpoint": base}
        if config.ca_bundle:
            kwargs["connection_verify"] = config.ca_bundle
    else:
        kwargs["cloud"] = config.cloud
    return MLClient(credential(config), config.subscription_id, config.resource_group, config.workspace_name,
                    **kwargs)


def quiet_sdk() -> None:
    """The SDK logs progress at INFO on its own handlers; stepflow reports what matters itself."""
    import logging

    for name in ("azure.ai.ml", "azure.core.pipeline.policies.http_logging_policy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The credential chain logs every source it tried at WARNING; stepflow's own error lists them once.
    logging.getLogger("azure.identity").setLevel(logging.ERROR)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("azure.ai.ml") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.WARNING)
    # "This is an experimental class" for the SDK's own schema classes, and its telemetry's ERROR
    # line for every expected 404 (a job looked up before it is created): nothing a user can act on.
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    logging.getLogger("azure.ai.ml._telemetry").setLevel(logging.CRITICAL)


def status(exc: BaseException) -> int | None:
    """The HTTP status of an azure-core error (None for others)."""
    code = getattr(exc, "status_code", None)
    return int(code) if isinstance(code, int) else None


def error_code(exc: BaseException) -> str:
    """Azure's error code (``ResourceNotFound``, ``TooManyRequests`` ...), or ''."""
    error = getattr(exc, "error", None)
    return str(getattr(error, "code", "") or "")


def is_transient(exc: BaseException) -> bool:
    """429, 408, 5xx, and requests that never got an answer (connection errors, timeouts)."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    return isinstance(exc, (ServiceRequestError, ServiceResponseError)) or status(exc) in TRANSIENT_STATUS


def retry_after(exc: BaseException) -> float | None:
    """Seconds the service asked to wait (Retry-After: seconds or an HTTP date), or None."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    raw = headers.get("Retry-After") or headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def message(exc: BaseException) -> str:
    """``(Code) message`` of an Azure error, on one line."""
    text = getattr(exc, "message", None) or str(exc)
    text = _short(text.split("\nCode:")[0].split("\nMessage:")[0], 400)
    code = error_code(exc)
    return f"({code}) {text}" if code and f"({code})" not in text else text
