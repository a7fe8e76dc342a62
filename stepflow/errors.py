"""Exceptions raised by stepflow.

Every error a user can trigger by bad input derives from :class:`StepflowError` and carries a
message that names what is wrong and how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class StepflowError(Exception):
    """Base class of every error stepflow raises on purpose."""


class PipelineDefinitionError(StepflowError):
    """A pipeline is malformed. ``problems`` lists every problem found, not just the first."""

    def __init__(self, pipeline: str, problems: Iterable[str]) -> None:
        self.pipeline = pipeline
        self.problems: list[str] = list(problems)
        count = len(self.problems)
        head = f"pipeline '{pipeline}' is invalid ({count} problem{'s' if count != 1 else ''}):"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class StepOutputUsageError(StepflowError):
    """A step's output placeholder was used as if it were a value while recording a pipeline."""


class UnknownOperatorError(StepflowError):
    """A step names a step operator that is not available."""


class StepFailedError(StepflowError):
    """Raised by :meth:`RunResult.raise_for_status` when a run did not succeed."""


class OutputNotPicklableError(StepflowError):
    """A step returned a value that cannot be serialized with cloudpickle."""


class StepTimeoutError(StepflowError, TimeoutError):
    """A step attempt ran longer than its ``timeout``."""


class NonRetryableError(StepflowError):
    """Raise (or subclass) this inside a step to fail it at once, without using its retries."""


class PipelineLoadError(StepflowError):
    """A ``module:attribute`` pipeline reference could not be loaded."""


class ParameterError(StepflowError):
    """A pipeline parameter given on the command line is unknown or has a bad value."""


class ConfigError(StepflowError):
    """Options given to a component, stack or step settings are unknown, missing or invalid."""


class StoreError(StepflowError):
    """The stepflow store is missing, corrupt, locked or refused an operation."""


class NotFoundError(StoreError, KeyError):
    """A named component, stack or run does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PluginError(StepflowError):
    """A plugin (flavor) failed to import, is malformed, or raised while being created."""


class ImageBuildError(StepflowError):
    """Building or pushing a step image failed (the message holds the log tail)."""


class RemoteStepError(StepflowError):
    """A step failed on a remote backend. ``remote_traceback`` holds the job's traceback."""

    def __init__(self, message: str, remote_traceback: str = "", remote_type: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback
        self.remote_type = remote_type


class BackendError(StepflowError):
    """A compute backend (Docker, SageMaker, ...) is unreachable or refused a request."""


class JobStoppedError(StepflowError):
    """A remote job was stopped on its backend from outside stepflow; its step is reported cancelled."""


class TransientBackendError(BackendError):
    """A backend call failed in a way worth retrying (throttling, 5xx, connection reset).

    ``retry_after`` (seconds) is the backend's own hint (an HTTP Retry-After), honoured by the
    retry policy when given.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CapacityError(BackendError):
    """The backend has no capacity for the job now (quota, no spot capacity, zone exhausted).

    Not retried in place: it is the signal for moving the job to other capacity.
    """


class RegistryError(StepflowError):
    """A container registry could not be reached or refused a request."""

    def __init__(self, uri: str, detail: str) -> None:
        super().__init__(f"container registry {uri}: {detail}")
        self.uri = uri


class _KeepsState:
    """Lets the errors below pickle: their ``__init__`` takes more than the message."""

    uri: str
    detail: str

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.uri, self.detail), dict(vars(self)))


class RegistryReferenceError(_KeepsState, RegistryError, ValueError):
    """A registry address, repository name, tag or digest is malformed."""

    def __init__(self, uri: str, detail: str) -> None:
        super().__init__(uri, detail)
        self.detail = detail


class DockerConfigError(_KeepsState, RegistryError):
    """The Docker client config file cannot be read or holds a malformed entry."""

    def __init__(self, uri: str, detail: str) -> None:
        super().__init__(uri, detail)
        self.detail = detail


class CredentialHelperError(_KeepsState, RegistryError):
    """A Docker credential helper is missing, failed, or answered something that is not its JSON."""

    def __init__(self, uri: str, detail: str, *, helper: str = "") -> None:
        super().__init__(uri, detail)
        self.detail = detail
        self.helper = helper


class RegistryUnreachableError(_KeepsState, RegistryError):
    """No HTTP answer from the registry or its token service: refused, unresolvable, timed out, reset."""

    def __init__(self, uri: str, detail: str) -> None:
        super().__init__(uri, detail)
        self.detail = detail


class RegistryTLSError(RegistryUnreachableError):
    """TLS failed: an untrusted certificate, or HTTPS spoken to a plain-HTTP port (or the reverse)."""


class RegistryAuthError(_KeepsState, RegistryError):
    """The registry or its token service refused the credentials; ``source`` says where they came from."""

    def __init__(self, uri: str, detail: str, *, source: str = "") -> None:
        super().__init__(uri, detail)
        self.detail = detail
        self.source = source


class RegistryCredentialsMissingError(RegistryAuthError):
    """The registry asks for credentials and none were given or found."""


class RegistryPermissionError(RegistryAuthError):
    """The credentials are valid but do not grant the access asked for (e.g. push to that repository)."""


class RegistryResponseError(_KeepsState, RegistryError):
    """The registry answered with an unexpected status or body; ``status`` is the HTTP status, if any."""

    def __init__(self, uri: str, detail: str, *, status: int | None = None) -> None:
        super().__init__(uri, detail)
        self.detail = detail
        self.status = status


class RegistryNotFoundError(RegistryResponseError):
    """The manifest or blob asked for does not exist (HTTP 404)."""


class DigestMismatchError(RegistryResponseError):
    """Content read from the registry does not hash to the digest it was asked for by."""


class PayloadError(StepflowError):
    """An envelope (payload, output, stored value) was refused: tampered, foreign or truncated."""


class VersionMismatchError(PayloadError):
    """An envelope was written by another Python or cloudpickle version."""


class ArtifactStoreError(StepflowError):
    """An artifact store failed or refused an operation; the message names store and URI."""


class BucketNotFoundError(ArtifactStoreError):
    """The bucket (container) an artifact store points at does not exist."""


class AccessDeniedError(ArtifactStoreError, PermissionError):
    """The credentials of an artifact store may not do what was asked."""


class ProjectRootError(ImageBuildError):
    """The project root cannot be shipped as a whole (filesystem root, home directory, ...)."""


class StorePathError(ConfigError, ValueError):
    """A remote artifact store's path has the wrong scheme or no bucket.

    A ValueError too, so config validation reports it with the component's name; raised as is
    when an ``{{env.VAR}}`` reference resolves to a bad path at creation time.
    """
