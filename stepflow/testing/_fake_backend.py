"""An in-process :class:`~stepflow.remote.JobBackend` double, and the job commands it understands.

:func:`job_command` describes a job by what it does (print lines, sleep, exit with a code) as a
real, shell-free command: ``("python3", "-c", JOB_SCRIPT, JSON_SPEC)``. Real backends run it for
real in any image with ``python3``; :class:`FakeJobBackend` reads the JSON spec (the last
argument) and simulates it on the event loop clock: no thread, no subprocess, no I/O, so one
process follows 10,000+ jobs for a fraction of a CPU-second per hundred.

Several :class:`FakeJobBackend` instances over one :class:`FakeJobService` see the same jobs,
as a runner resumed after a crash sees the jobs its predecessor submitted.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import attrs

from stepflow.errors import BackendError, ConfigError, TransientBackendError
from stepflow.remote._backend import Job, JobBackend, JobState, Limits, LogBatch
from stepflow.remote._config import JobConfig
from stepflow.remote._naming import check_limits

#: Key of the JSON spec that marks a command made by :func:`job_command`.
SPEC_MARKER = "stepflow_fake_job"

#: What a real backend runs: each line printed (flushed) at an even pace over ``seconds``, then
#: the exit code. The fake reproduces exactly this timing.
#: Kept under 256 characters: SageMaker's limit on one container argument.
JOB_SCRIPT = (
    "import json,sys,time\n"
    "s=json.loads(sys.argv[-1]);o=sys.stderr if s['stderr'] else sys.stdout;L=s['lines']\n"
    "for x in L:print(x,file=o,flush=True);time.sleep(s['seconds']/len(L))\n"
    "L or time.sleep(s['seconds']);sys.exit(s['exit_code'])\n"
)


def job_command(*, seconds: float = 0.0, exit_code: int = 0, lines: Sequence[str] = (),
                fail_output: bool = False) -> tuple[str, ...]:
    """A shell-free command that prints ``lines``, takes ``seconds`` and exits with ``exit_code``.

    The lines are printed at an even pace: line ``i`` of ``n`` after ``i * seconds / n`` seconds,
    so a job's log grows while it runs (the test of log cursors). ``fail_output`` prints them to
    stderr instead of stdout: a backend's ``read_logs`` must return both streams. Real backends
    run it with the image's ``python3``; :class:`FakeJobBackend` simulates it.
    """
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    if not 0 <= exit_code <= 255:
        raise ValueError(f"exit_code must be 0..255 (a process exit status), got {exit_code}")
    lines = [str(line) for line in lines]
    if any("\n" in line or "\r" in line for line in lines):
        raise ValueError("a line must not contain a newline: real backends would split it in two")
    spec = {SPEC_MARKER: 1, "seconds": float(seconds), "exit_code": int(exit_code), "lines": lines,
            "stderr": bool(fail_output)}
    return ("python3", "-c", JOB_SCRIPT, json.dumps(spec, separators=(",", ":"), sort_keys=True))


@attrs.frozen
class JobSpec:
    """What a :func:`job_command` job does (parsed back from its command)."""

    seconds: float = 0.0
    exit_code: int = 0
    lines: tuple[str, ...] = ()
    stderr: bool = False

    @classmethod
    def parse(cls, command: Sequence[str]) -> JobSpec | None:
        """The spec of a :func:`job_command` command, or None for any other command."""
        if len(command) != 4 or command[1] != "-c" or command[2] != JOB_SCRIPT:
            return None
        try:
            spec = json.loads(command[3])
        except ValueError:
            return None
        if not isinstance(spec, dict) or spec.get(SPEC_MARKER) != 1:
            return None
        return cls(float(spec["seconds"]), int(spec["exit_code"]), tuple(spec["lines"]), bool(spec["stderr"]))


@attrs.define
class FakeStats:
    """Calls a :class:`FakeJobService` received, by method, and what they did.

    A call refused by a knob (throttled, faulted) is counted too: it reached the service. With
    ``batch_poll=False`` every id of a ``poll`` is one call (``poll_calls == ids_polled``).
    """

    submit_calls: int = 0
    jobs_created: int = 0
    poll_calls: int = 0
    ids_polled: int = 0
    cancel_calls: int = 0
    log_calls: int = 0
    #: Job ids asked about in log calls (what a backend reading one log per job pays per id).
    log_ids: int = 0
    find_calls: int = 0
    cleanup_calls: int = 0
    #: Calls answered with a throttling error, with a 5xx-like error, and submits whose answer was lost.
    throttled: int = 0
    faults: int = 0
    lost_answers: int = 0
    #: Jobs created per name (a name above 1 was created twice) and status calls (or ids) per job id.
    created_by_name: collections.Counter[str] = attrs.field(factory=collections.Counter)
    polls_by_id: collections.Counter[str] = attrs.field(factory=collections.Counter)

    @property
    def calls(self) -> int:
        """Every call, of every method."""
        return (self.submit_calls + self.poll_calls + self.cancel_calls + self.log_calls + self.find_calls
                + self.cleanup_calls)

    def created_twice(self) -> list[str]:
        """Names under which more than one job was created (empty when submission is idempotent)."""
        return sorted(name for name, count in self.created_by_name.items() if count > 1)


# States shared by every job in that state: polling 10,000 jobs allocates nothing per job.
_CREATED = JobState("created", "pending", "created, not started")
_QUEUED = JobState("queued", "pending")
_RUNNING = JobState("running", "running")
_SUCCEEDED = JobState("exited", "succeeded", "", 0)
_STOPPED = JobState("stopped", "stopped", "stopped on request")
_REMOVED = JobState("removed", "failed", "no such job (removed, or never created)")


class _FakeJob:
    __slots__ = ("end_at", "exit_code", "failed", "id", "job", "lines", "name", "run_at", "seconds", "started_at",
                 "stderr", "stopped_at")

    def __init__(self, job_id: str, job: Job, spec: JobSpec) -> None:
        self.id = job_id
        self.name = job.name
        self.job = job
        self.lines = spec.lines
        self.stderr = spec.stderr
        self.seconds = spec.seconds
        self.exit_code = spec.exit_code
        self.started_at: float | None = None
        self.run_at = self.end_at = 0.0
        self.stopped_at: float | None = None
        self.failed = JobState("exited", "failed", f"exit code {spec.exit_code}", spec.exit_code)

    def start(self, now: float, start_delay: float) -> None:
        self.started_at = now
        self.run_at = now + start_delay
        self.end_at = self.run_at + self.seconds

    def ended(self, now: float) -> bool:
        return self.stopped_at is not None or (self.started_at is not None and now >= self.end_at)

    def state(self, now: float) -> JobState:
        if self.stopped_at is not None:
            return _STOPPED
        if self.started_at is None:
            return _CREATED
        if now < self.run_at:
            return _QUEUED
        if now < self.end_at:
            return _RUNNING
        return _SUCCEEDED if self.exit_code == 0 else self.failed

    def printed(self, now: float) -> int:
        """How many lines the job has printed by ``now``."""
        if self.started_at is None or not self.lines:
            return 0
        t = min(now, self.end_at) if self.stopped_at is None else min(self.stopped_at, self.end_at)
        if t < self.run_at:
            return 0
        duration = self.end_at - self.run_at
        if duration <= 0:
            return len(self.lines)
        return min(len(self.lines), int((t - self.run_at) * len(self.lines) / duration) + 1)


class FakeJobService:
    """The jobs and call counts of one simulated service, shared by every backend instance over it."""

    def __init__(self) -> None:
        self.jobs: dict[str, _FakeJob] = {}
        self.by_name: dict[str, str] = {}
        self.stats = FakeStats()
        self._next = 0

    def new_id(self) -> str:
        """A fresh job id (unique within this service)."""
        self._next += 1
        return f"fj-{self._next:07d}"


class FakeJobBackend(JobBackend):
    """An in-process job service: jobs are :func:`job_command` specs simulated on the loop clock.

    Knobs (each call draws once, in this order):

    - ``throttle_rate``: fraction of calls answered with ``TransientBackendError`` carrying
      ``retry_after`` (like HTTP 429); ``fault_rate``: fraction answered with a 5xx-like
      ``TransientBackendError`` without it. A refused call does nothing.
    - ``fail_submit_after_create``: fraction of first submissions of a name that create the job
      and then lose the answer (a ``TransientBackendError``): resubmitting must return the same id.
      The job stays created but not started (a container left "created" by a runner that died)
      until submitted again, unless ``lost_submit_starts``.
    - ``batch_poll``: when False, ``poll(ids)`` makes one call per id (counted and refused one
      by one; refused ids are missing from the answer, and the round raises only when all were).
    - ``latency``: seconds every call takes (once per method call: per-id calls run concurrently).
    - ``start_delay``: seconds a started job stays pending (queued) before it runs.
    - ``unknown_commands``: ``"reject"`` (default) refuses a command not made by
      :func:`job_command` with a clear ``BackendError``; ``"succeed"`` runs it as a job that
      succeeds after 0 s and prints nothing (its real effects, e.g. a step's output, do not happen).

    ``poll`` of an unknown or cleaned-up id reports it ``failed`` (status ``removed``), as the docker
    backend does. ``cancel`` stops a job at once (phase ``stopped``); cancelling an ended or
    unknown job does nothing. ``cleanup`` removes the job (``remove_on_cleanup``). ``refuse(method,
    error)`` makes every later call of one method raise a fresh ``error()`` (e.g. credentials that
    expired). ``limits`` and the loop intervals can be set per instance.
    """

    flavor: ClassVar[str] = "fake"
    limits: ClassVar[Limits] = Limits(name_length=63, name_charset="a-z0-9-", env_entries=256,
                                      env_value_length=32_768, command_items=256, command_item_length=65_536,
                                      label_length=63, label_charset="a-zA-Z0-9_.-")
    poll_interval: ClassVar[float] = 0.25
    max_poll_interval: ClassVar[float] = 2.0
    log_interval: ClassVar[float] = 0.5

    def __init__(self, name: str = "fake", config: Any = None, *, service: FakeJobService | None = None,
                 throttle_rate: float = 0.0, fault_rate: float = 0.0, retry_after: float = 0.05,
                 fail_submit_after_create: float = 0.0, lost_submit_starts: bool = False, batch_poll: bool = True,
                 latency: float = 0.0, start_delay: float = 0.0,
                 unknown_commands: Literal["reject", "succeed"] = "reject", remove_on_cleanup: bool = True,
                 limits: Limits | None = None, poll_interval: float | None = None,
                 max_poll_interval: float | None = None, log_interval: float | None = None,
                 seed: int | None = 0) -> None:
        super().__init__(name, JobConfig() if config is None else config)
        if not 0 <= throttle_rate + fault_rate <= 1:
            raise ValueError("throttle_rate + fault_rate must be within 0..1")
        if unknown_commands not in ("reject", "succeed"):
            raise ValueError(f"unknown_commands must be 'reject' or 'succeed', got {unknown_commands!r}")
        self.service = service if service is not None else FakeJobService()
        self.throttle_rate = throttle_rate
        self.fault_rate = fault_rate
        self.retry_after = retry_after
        self.fail_submit_after_create = float(fail_submit_after_create)
        self.lost_submit_starts = lost_submit_starts
        self.batch_poll = batch_poll
        self.latency = latency
        self.start_delay = start_delay
        self.unknown_commands = unknown_commands
        self.remove_on_cleanup = remove_on_cleanup
        self.refusals: dict[str, Callable[[], BaseException]] = {}
        self._rng = random.Random(seed)
        # The contract declares limits and intervals as class data; a double varies them per instance.
        for attr, value in (("limits", limits), ("poll_interval", poll_interval),
                            ("max_poll_interval", max_poll_interval), ("log_interval", log_interval)):
            if value is not None:
                setattr(self, attr, value)
        self._knobs: dict[str, Any] = {
            "throttle_rate": throttle_rate, "fault_rate": fault_rate, "retry_after": retry_after,
            "fail_submit_after_create": fail_submit_after_create, "lost_submit_starts": lost_submit_starts,
            "batch_poll": batch_poll, "latency": latency, "start_delay": start_delay,
            "unknown_commands": unknown_commands, "remove_on_cleanup": remove_on_cleanup, "limits": limits,
            "poll_interval": poll_interval, "max_poll_interval": max_poll_interval, "log_interval": log_interval}

    # ------------------------------------------------------------------ helpers for tests
    @property
    def stats(self) -> FakeStats:
        """The call counts of the service (shared with every twin)."""
        return self.service.stats

    def twin(self, *, seed: int | None = None) -> FakeJobBackend:
        """Another instance over the same service with the same knobs: a runner resumed after a crash."""
        return FakeJobBackend(self.name, self.config, service=self.service, seed=seed, **self._knobs)

    def jobs_created(self, name: str) -> int:
        """How many jobs the service ever created under ``name`` (read by ``check_job_backend``)."""
        return self.service.stats.created_by_name[name]

    def refuse(self, method: str, error: Callable[[], BaseException] | None) -> None:
        """Make every later call of ``method`` ("submit", "poll", ...) raise ``error()``; None stops it."""
        if error is None:
            self.refusals.pop(method, None)
        else:
            self.refusals[method] = error

    async def create_unstarted(self, job: Job) -> str:
        """Create ``job`` without starting it, as a runner that died between create and start leaves it."""
        return self._create(job).id

    # ------------------------------------------------------------------ the contract
    async def submit(self, job: Job) -> str:
        """Create and start the job; a job of that name gets its id back (and is started if it never was)."""
        stats = self.service.stats
        stats.submit_calls += 1
        await self._enter("submit")
        found = self.service.by_name.get(job.name)
        if found is not None:
            rec = self.service.jobs[found]
            if rec.started_at is None and rec.stopped_at is None:
                rec.start(self._now(), self.start_delay)
            return rec.id
        rec = self._create(job)
        if self.fail_submit_after_create and self._rng.random() < self.fail_submit_after_create:
            stats.lost_answers += 1
            if self.lost_submit_starts:
                rec.start(self._now(), self.start_delay)
            raise TransientBackendError(f"fake: connection reset after job {job.name} was created (answer lost)")
        rec.start(self._now(), self.start_delay)
        return rec.id

    async def poll(self, job_ids: Sequence[str]) -> Mapping[str, JobState]:
        """States of ``job_ids``: one call, or one per id when ``batch_poll`` is off."""
        stats = self.service.stats
        jobs = self.service.jobs
        polls = stats.polls_by_id
        stats.ids_polled += len(job_ids)
        for job_id in job_ids:
            polls[job_id] += 1
        if self.batch_poll:
            stats.poll_calls += 1
            await self._enter("poll")
            now = self._now()
            return {i: (rec.state(now) if (rec := jobs.get(i)) is not None else _REMOVED) for i in job_ids}
        stats.poll_calls += len(job_ids)
        await self._enter("poll", refuse=False)
        now = self._now()
        out: dict[str, JobState] = {}
        error: BaseException | None = None
        for job_id in job_ids:
            refused = self._refused("poll")
            if refused is not None:
                error = refused
                continue
            rec = jobs.get(job_id)
            out[job_id] = rec.state(now) if rec is not None else _REMOVED
        if error is not None and not out:
            raise error
        return out

    async def cancel(self, job_id: str) -> None:
        """Stop the job at once; an ended or unknown job is left alone."""
        self.service.stats.cancel_calls += 1
        await self._enter("cancel")
        rec = self.service.jobs.get(job_id)
        now = self._now()
        if rec is not None and not rec.ended(now):
            rec.stopped_at = now

    async def find(self, name: str) -> str | None:
        """The id of the job named ``name``, or None."""
        self.service.stats.find_calls += 1
        await self._enter("find")
        return self.service.by_name.get(name)

    async def read_logs(self, cursors: Mapping[str, Any]) -> Mapping[str, LogBatch]:
        """Lines printed since each cursor (a count of lines already read); unknown ids are left out."""
        self.service.stats.log_calls += 1
        self.service.stats.log_ids += len(cursors)
        await self._enter("read_logs")
        now = self._now()
        out: dict[str, LogBatch] = {}
        jobs = self.service.jobs
        for job_id, cursor in cursors.items():
            rec = jobs.get(job_id)
            if rec is None:
                continue
            start = int(cursor or 0)
            end = rec.printed(now)
            out[job_id] = LogBatch(rec.lines[start:end] if end > start else (), max(start, end))
        return out

    async def cleanup(self, job_id: str, state: JobState | None) -> None:
        """Remove the job (when ``remove_on_cleanup``): it is gone from ``find`` and ``poll``."""
        self.service.stats.cleanup_calls += 1
        await self._enter("cleanup")
        if self.remove_on_cleanup:
            rec = self.service.jobs.pop(job_id, None)
            if rec is not None and self.service.by_name.get(rec.name) == job_id:
                del self.service.by_name[rec.name]

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _create(self, job: Job) -> _FakeJob:
        try:
            check_limits(job, self.limits, what=f"fake backend '{self.name}'")
        except ConfigError as exc:
            raise BackendError(str(exc)) from None
        spec = JobSpec.parse(job.command)
        if spec is None:
            if self.unknown_commands == "reject":
                raise BackendError(f"fake backend '{self.name}' runs only commands made by "
                                   f"stepflow.testing.job_command(...), got {list(job.command)[:3]}... for job "
                                   f"{job.name} (pass unknown_commands='succeed' to run any command as a job "
                                   "that succeeds at once)")
            spec = JobSpec()
        service = self.service
        rec = _FakeJob(service.new_id(), job, spec)
        service.jobs[rec.id] = rec
        service.by_name[job.name] = rec.id
        service.stats.jobs_created += 1
        service.stats.created_by_name[job.name] += 1
        return rec

    async def _enter(self, method: str, *, refuse: bool = True) -> None:
        """One call reaching the service: its latency, then (unless per-id) its refusal draw."""
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if refuse:
            error = self._refused(method)
            if error is not None:
                raise error

    def _refused(self, method: str) -> BaseException | None:
        refusal = self.refusals.get(method)
        if refusal is not None:
            return refusal()
        if not (self.throttle_rate or self.fault_rate):
            return None
        draw = self._rng.random()
        if draw < self.throttle_rate:
            self.service.stats.throttled += 1
            return TransientBackendError(f"fake: {method} throttled (rate exceeded)", retry_after=self.retry_after)
        if draw < self.throttle_rate + self.fault_rate:
            self.service.stats.faults += 1
            return TransientBackendError(f"fake: {method} failed with HTTP 503 (service unavailable)")
        return None
