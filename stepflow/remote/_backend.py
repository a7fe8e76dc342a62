"""The JobBackend contract: what a compute backend plugin writes, and nothing more.

A backend turns one :class:`Job` into a job on its service and answers questions about it. Each
method makes one backend call (a round of calls for ``poll`` / ``read_logs``); everything else
of the remote path (images, payloads, names, records, retries, the status and log loops,
outputs, cancellation bookkeeping) belongs to the operator that wraps the backend
(:class:`stepflow.remote.JobOperator`).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import attrs

from stepflow.interfaces.operator import RunResources
from stepflow.resources import Resources

Phase = Literal["pending", "running", "succeeded", "failed", "stopped"]
TERMINAL_PHASES: frozenset[str] = frozenset({"succeeded", "failed", "stopped"})


@attrs.frozen
class JobState:
    """A backend's view of a job: its raw ``status``, the normalized ``phase`` and details.

    ``phase`` is one of pending, running, succeeded, failed, stopped. A job that ended because
    it was stopped (by anyone) is ``stopped``; the operator knows whether it stopped it itself.
    """

    status: str
    phase: Phase
    detail: str = ""
    exit_code: int | None = None

    @property
    def terminal(self) -> bool:
        """True once the job will not change any more."""
        return self.phase in TERMINAL_PHASES


@attrs.frozen
class Limits:
    """What a backend accepts, as data: the operator checks every job against it before submit."""

    #: Longest job name, and the characters a name may use (a regex character class body).
    name_length: int = 63
    name_charset: str = "a-z0-9-"
    #: Environment: most entries, longest value (None: no limit).
    env_entries: int | None = None
    env_value_length: int | None = None
    #: Command: most items, longest item (None: no limit).
    command_items: int | None = None
    command_item_length: int | None = None
    #: Label (tag) keys and values: longest of each (None: no limit), and a character class body
    #: of the characters allowed in them (None: any).
    label_length: int | None = None
    label_charset: str | None = None

    def name_pattern(self) -> re.Pattern[str]:
        """A regex matching one character *not* allowed in a job name."""
        return re.compile(f"[^{self.name_charset}]")


@attrs.frozen
class Job:
    """One step attempt as a backend job. Everything in it is safe to show in a job description.

    ``secrets`` is the exception: values the job needs that must not be shown (a one-time token,
    storage credentials). A backend with :attr:`JobBackend.secret_channel` delivers them privately
    (a mounted file); the others put them in the environment, which the operator allows only
    when told to (and then says so).
    """

    name: str
    image: str
    command: tuple[str, ...]
    env: Mapping[str, str]
    labels: Mapping[str, str]
    run_id: str
    step: str
    attempt: int
    #: The operator's config with the step's settings merged over it (the backend's own class).
    options: Any
    resources: Resources | None = None
    timeout: float | None = None
    secrets: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    #: Local paths the job must reach when the artifact store is a local directory:
    #: ``{path: "ro" | "rw"}`` (empty for remote stores).
    local_paths: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class LogBatch:
    """New log lines of one job since its cursor, and the cursor to ask with next time."""

    lines: Sequence[str]
    cursor: Any


class JobBackend(abc.ABC):
    """A compute backend: submit, poll, cancel (and optionally prepare, find, read_logs).

    Subclass it in the implementation module of a step-operator flavor and point the flavor's
    ``implementation`` at it; stepflow wraps it in a :class:`~stepflow.remote.JobOperator`.
    Methods raise :class:`~stepflow.errors.BackendError` with a clear message, or
    :class:`~stepflow.errors.TransientBackendError` when a retry may succeed (set its
    ``retry_after``); :meth:`is_transient` may classify other exceptions.
    """

    #: Flavor name, e.g. "docker".
    flavor: ClassVar[str] = ""
    limits: ClassVar[Limits] = Limits()
    #: Seconds between status rounds while jobs change, and the most when they do not.
    poll_interval: ClassVar[float] = 1.0
    max_poll_interval: ClassVar[float] = 10.0
    #: Seconds between log rounds.
    log_interval: ClassVar[float] = 1.0
    #: Can deliver :attr:`Job.secrets` without showing them in the job's description.
    secret_channel: ClassVar[bool] = False
    #: Jobs read the artifact store through a local bind (a local artifact store works).
    local_store: ClassVar[bool] = False
    #: Path inside the job where the service reads the job's failure message (e.g. SageMaker's
    #: /opt/ml/output/failure): a failed step writes "Type: message (step name)" there, so the
    #: cloud's own console and API explain the failure.
    failure_file: ClassVar[str | None] = None

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self.config = config

    async def prepare(self, resources: RunResources) -> None:  # noqa: B027 - optional hook
        """Check what every job of a run needs (credentials, buckets, roles) once per run."""

    @abc.abstractmethod
    async def submit(self, job: Job) -> str:
        """Start ``job`` and return its id; when a job of that name exists, return its id.

        Must not wait for the job. A job that exists but never started (left by a runner that
        died) must be started, or replaced under the same name.
        """

    @abc.abstractmethod
    async def poll(self, job_ids: Sequence[str]) -> Mapping[str, JobState]:
        """States of many jobs in one round. A job missing from the answer is asked again next round."""

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> None:
        """Ask the backend to stop the job; return without waiting. Stopping an ended job is a no-op."""

    async def find(self, name: str) -> str | None:
        """The id of the job named ``name``, or None."""
        return None

    async def read_logs(self, cursors: Mapping[str, Any]) -> Mapping[str, LogBatch]:
        """New log lines of each job since its cursor (None: from the start), in one round."""
        return {}

    async def cleanup(self, job_id: str, state: JobState | None) -> None:  # noqa: B027 - optional hook
        """Release what a finished job holds (e.g. remove a container)."""

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a failed call may succeed when retried (beyond TransientBackendError)."""
        return False

    def check(self, options: Any, resources: Resources | None) -> list[str]:
        """Problems of one step's merged options and resources (empty when it can run)."""
        return []

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections at the end of a run."""
