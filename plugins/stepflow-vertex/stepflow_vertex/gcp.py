"""Google plumbing: credentials (ADC), the GAPIC clients, and what errors mean.

Every Google import happens inside a function: ``import stepflow_vertex.gcp`` stays cheap and
`import stepflow` never imports a Google module.
"""

from __future__ import annotations

import os
from typing import Any

from stepflow.errors import BackendError, RegistryError

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
#: gRPC status codes worth retrying (the retry policy decides how).
TRANSIENT = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "ABORTED", "INTERNAL"})


def is_loopback(host: str) -> bool:
    """127.x, localhost, ::1 (with or without a port)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in ("localhost", "::1", "[::1]") or name.startswith("127.")


def sources_tried() -> str:
    """The places Application Default Credentials looks, with what was found of each."""
    env = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    home = os.path.expanduser("~/.config/gcloud/application_default_credentials.json")
    return "; ".join([
        f"GOOGLE_APPLICATION_CREDENTIALS ({env or 'not set'})",
        f"gcloud's application default credentials file {home} ({'found' if os.path.exists(home) else 'missing'})",
        "the metadata server of a Google Cloud machine (none answered)",
    ])


def credentials() -> tuple[Any, str | None]:
    """``(credentials, project)`` from Application Default Credentials; BackendError listing the sources tried."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        creds, project = google.auth.default(scopes=SCOPES)
    except DefaultCredentialsError:
        raise BackendError(f"no Google Cloud credentials found; tried: {sources_tried()}. Point "
                           "GOOGLE_APPLICATION_CREDENTIALS at a service-account key, run `gcloud auth application-"
                           "default login`, or run on Google Cloud with a service account") from None
    return creds, project


def adc_token() -> str:
    """A fresh access token of the default credentials (for registry logins)."""
    from google.auth.transport.requests import Request

    try:
        creds, _ = credentials()
    except BackendError as exc:
        raise RegistryError("gcp", str(exc)) from None
    creds.refresh(Request())
    return str(creds.token)


def code(exc: BaseException) -> str:
    """The gRPC status code name of a google.api_core error ('' for others)."""
    grpc_code = getattr(exc, "grpc_status_code", None)
    if grpc_code is not None:
        return str(getattr(grpc_code, "name", grpc_code))
    return ""


def is_transient(exc: BaseException) -> bool:
    """UNAVAILABLE, RESOURCE_EXHAUSTED (quota), DEADLINE_EXCEEDED, ABORTED, INTERNAL."""
    return code(exc) in TRANSIENT


def message(exc: BaseException) -> str:
    """``CODE: message`` of a Google API error."""
    text = getattr(exc, "message", None) or str(exc)
    name = code(exc)
    return f"{name}: {text}" if name else f"{type(exc).__name__}: {text}"


def clients(endpoint: str | None, region: str) -> tuple[Any, Any]:
    """The async JobService and LoggingServiceV2 clients for ``endpoint``.

    ``http://HOST:PORT`` is a local control plane: plain gRPC, no credentials, logging served
    there too. Otherwise the region's endpoint with TLS and Application Default Credentials.
    """
    from google.cloud.aiplatform_v1 import JobServiceAsyncClient
    from google.cloud.logging_v2.services.logging_service_v2 import LoggingServiceV2AsyncClient

    if endpoint and endpoint.startswith("http://"):
        import grpc
        from google.cloud.aiplatform_v1.services.job_service.transports import JobServiceGrpcAsyncIOTransport
        from google.cloud.logging_v2.services.logging_service_v2.transports import (
            LoggingServiceV2GrpcAsyncIOTransport,
        )

        target = endpoint.removeprefix("http://").rstrip("/")
        channel = grpc.aio.insecure_channel(target)
        jobs = JobServiceAsyncClient(transport=JobServiceGrpcAsyncIOTransport(channel=channel))
        logs = LoggingServiceV2AsyncClient(
            transport=LoggingServiceV2GrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(target)))
        return jobs, logs
    creds, _ = credentials()
    from google.api_core.client_options import ClientOptions

    options = ClientOptions(api_endpoint=endpoint or f"{region}-aiplatform.googleapis.com")
    return (JobServiceAsyncClient(credentials=creds, client_options=options),
            LoggingServiceV2AsyncClient(credentials=creds))
