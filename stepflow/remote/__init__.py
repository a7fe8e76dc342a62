"""The remote path, for plugin authors: every container or cloud backend builds on it.

A backend plugin writes a :class:`JobBackend` (``submit``, ``poll``, ``cancel``, optionally
``prepare``, ``find``, ``read_logs``, ``is_transient``, ``check``), its :class:`Limits` as data,
config and settings classes deriving from :class:`JobConfig` / :class:`JobSettings`, and a
:class:`JobBackendFlavor`. :class:`JobOperator` carries everything else: images, signed
payloads, deterministic names, the run-store record, one retry policy, the shared status and
log loops, verified outputs, cancellation. ``stepflow.testing`` has the doubles
(``FakeJobBackend``) and the conformance check (``check_job_backend``).

Importing this package is cheap: no SDK, no event loop machinery until an operator runs.
"""

from typing import TYPE_CHECKING, Any

from stepflow.errors import BackendError, CapacityError, ConfigError, RegistryError, TransientBackendError
from stepflow.interfaces.operator import RunResources
from stepflow.remote._backend import TERMINAL_PHASES, Job, JobBackend, JobState, Limits, LogBatch, Phase
from stepflow.remote._config import JobConfig, JobSettings, merge
from stepflow.remote._distribution import DistributionRegistry
from stepflow.remote._failpoints import failpoint
from stepflow.remote._flavor import JobBackendFlavor
from stepflow.remote._naming import job_name, run_prefix
from stepflow.remote._registry import RegistryAuth, RegistryClient
from stepflow.remote._retry import RetryPolicy
from stepflow.resources import Resources

if TYPE_CHECKING:
    from stepflow.remote._operator import JobOperator, OperatorStats

__all__ = [
    "TERMINAL_PHASES",
    "BackendError",
    "CapacityError",
    "ConfigError",
    "DistributionRegistry",
    "Job",
    "JobBackend",
    "JobBackendFlavor",
    "JobConfig",
    "JobOperator",
    "JobSettings",
    "JobState",
    "Limits",
    "LogBatch",
    "OperatorStats",
    "Phase",
    "RegistryAuth",
    "RegistryClient",
    "RegistryError",
    "Resources",
    "RetryPolicy",
    "RunResources",
    "TransientBackendError",
    "failpoint",
    "job_name",
    "merge",
    "run_prefix",
]


def __getattr__(name: str) -> Any:
    if name in ("JobOperator", "OperatorStats"):  # the operator pulls in anyio and the image code
        from stepflow.remote import _operator

        return getattr(_operator, name)
    raise AttributeError(f"module 'stepflow.remote' has no attribute {name!r}")
