"""The remote path, for plugin authors: every container or cloud backend builds on it."""

from stepflow.remote._operator import (
    BackendError,
    JobSpec,
    JobState,
    RemoteJobOperator,
    RunResources,
    TransientBackendError,
    job_name,
)

__all__ = [
    "BackendError",
    "JobSpec",
    "JobState",
    "RemoteJobOperator",
    "RunResources",
    "TransientBackendError",
    "job_name",
]
