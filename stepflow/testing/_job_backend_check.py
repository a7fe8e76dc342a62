"""The JobBackend conformance suite: what every backend must do, checked against the real service.

A backend author calls :func:`check_job_backend` (or awaits :func:`acheck_job_backend`) from
their tests with a factory of backend instances and an image that has ``python3``. The suite
runs small :func:`~stepflow.testing.job_command` jobs on the backend, checks each rule of the
contract by name, and removes what it created.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from stepflow.interfaces.operator import RunResources
from stepflow.remote._backend import TERMINAL_PHASES, Job, JobBackend, JobState, Limits
from stepflow.remote._naming import check_limits, clean_labels, job_name
from stepflow.remote._retry import RetryPolicy
from stepflow.testing._fake_backend import job_command

T = TypeVar("T")

#: The check names, in the order they run.
CHECKS = (
    "limits are sane data",
    "is_transient and check answer plainly",
    "prepare succeeds",
    "submit returns an id",
    "submitting the same job again returns the same id and creates no second job",
    "find of an unknown name returns None",
    "poll answers for several jobs in one call",
    "a job exiting 0 succeeds",
    "a job exiting non-zero fails (with its exit code when known)",
    "poll of an unknown id leaves it out or reports it failed",
    "read_logs returns each printed line exactly once, in order",
    "cancel stops a running job",
    "cancelling an ended job is a no-op",
    "a second instance (a resumed runner) finds the job by name and polls it",
    "a job left created but never started starts when submitted again",
    "cleanup after the end does not raise",
)


@attrs.frozen
class JobBackendReport:
    """What :func:`check_job_backend` verified.

    ``passed`` names every check that passed (all that ran, or the suite would have raised),
    ``skipped`` those that did not apply, ``durations`` the seconds each check took and
    ``notes`` how the backend answered where the contract allows a choice (and why a check was
    skipped).
    """

    flavor: str
    backend: str
    passed: tuple[str, ...]
    skipped: tuple[str, ...]
    durations: dict[str, float]
    notes: dict[str, str]


class _Skip(Exception):
    """The check does not apply to this backend (the message says why)."""


async def _maybe_await(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


def _implements(backend: JobBackend, method: str) -> bool:
    return getattr(type(backend), method) is not getattr(JobBackend, method)


class _BackendSuite:
    """State shared by the checks of one conformance run."""

    def __init__(self, make_backend: Callable[[], JobBackend], *, image: str, options: Any,
                 make_job: Callable[..., Job] | None, count_jobs: Callable[[str], int | Awaitable[int]] | None,
                 leave_unstarted: Callable[[JobBackend, Job], str | Awaitable[str]] | None,
                 resources: RunResources | None, timeout: float, cancel_within: float, attempts: int,
                 job_seconds: float) -> None:
        self.make_backend = make_backend
        self.backend = make_backend()
        self.second: JobBackend | None = None
        self.image = image
        self.options = self.backend.config if options is None else options
        self.make_job = make_job
        self.count_jobs = count_jobs if count_jobs is not None else getattr(self.backend, "jobs_created", None)
        self.leave_unstarted = leave_unstarted
        if leave_unstarted is None and callable(getattr(self.backend, "create_unstarted", None)):
            self.leave_unstarted = lambda backend, job: backend.create_unstarted(job)  # type: ignore[attr-defined]
        self.resources = resources
        self.timeout = timeout
        self.cancel_within = cancel_within
        self.seconds = job_seconds
        # Backends never retry on their own: the suite retries transient errors as the operator does.
        self.policy = RetryPolicy(attempts=attempts, base=0.1, cap=2.0)
        self.run_id = f"conf-{uuid.uuid4().hex[:10]}"
        self.token = uuid.uuid4().hex[:8]
        self.jobs: dict[str, Job] = {}
        self.ids: dict[str, str] = {}
        self.final: dict[str, JobState] = {}
        self.cleaned: set[str] = set()
        self.passed: list[str] = []
        self.skipped: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self.durations: dict[str, float] = {}
        self.notes: dict[str, str] = {}

    # -- plumbing ------------------------------------------------------------------------
    async def check(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run one check; record it as passed, skipped (it raised _Skip) or failed."""
        started = time.monotonic()
        try:
            await fn()
        except _Skip as exc:
            self.skipped.append(name)
            self.notes[name] = str(exc)
        except AssertionError as exc:
            self.failures.append((name, str(exc)))
        except Exception as exc:
            self.failures.append((name, f"raised {type(exc).__name__}: {exc}"))
        else:
            self.passed.append(name)
        self.durations[name] = round(time.monotonic() - started, 3)

    async def call(self, fn: Callable[[], Awaitable[T]], backend: JobBackend | None = None) -> T:
        return await self.policy.call(fn, classify=(backend or self.backend).is_transient)

    def job(self, step: str, command: tuple[str, ...]) -> Job:
        limits = self.backend.limits
        name = job_name(self.run_id, step, 1, limits)
        labels = clean_labels({"stepflow.run": self.run_id, "stepflow.step": step, "stepflow.attempt": "1"}, limits)
        if self.make_job is not None:
            job = self.make_job(name, command, image=self.image, options=self.options, run_id=self.run_id, step=step,
                                labels=labels)
        else:
            job = Job(name=name, image=self.image, command=command, env={"HOME": "/tmp"}, labels=labels,
                      run_id=self.run_id, step=step, attempt=1, options=self.options)
        self.jobs[step] = job
        return job

    async def submit(self, step: str, command: tuple[str, ...]) -> str:
        job = self.job(step, command)
        job_id = await self.call(functools.partial(self.backend.submit, job))
        assert isinstance(job_id, str) and job_id, f"submit({job.name}) returned {job_id!r}, not a non-empty id"
        self.ids[step] = job_id
        return job_id

    def need(self, *steps: str) -> list[str]:
        missing = [s for s in steps if s not in self.ids]
        assert not missing, (f"not run: job(s) {', '.join(missing)} were not submitted (see check "
                             "'submit returns an id')")
        return [self.ids[s] for s in steps]

    async def poll(self, ids: Sequence[str], backend: JobBackend | None = None) -> Mapping[str, JobState]:
        b = backend or self.backend
        answer = await self.call(functools.partial(b.poll, list(ids)), b)
        unasked = set(answer) - set(ids)
        assert not unasked, f"poll({list(ids)}) answered about ids it was not asked: {sorted(unasked)}"
        for job_id, state in answer.items():
            assert isinstance(state, JobState), f"poll answered {state!r} for {job_id}, not a JobState"
            assert state.phase in ("pending", "running", *TERMINAL_PHASES), (
                f"poll answered phase {state.phase!r} for {job_id}")
        return answer

    async def until(self, ids: Sequence[str], done: Callable[[Mapping[str, JobState]], bool], within: float,
                    what: str, backend: JobBackend | None = None) -> dict[str, JobState]:
        """Poll ``ids`` in rounds until ``done(states)``; AssertionError after ``within`` seconds."""
        b = backend or self.backend
        pause = min(max(b.poll_interval, 0.05), 1.0)
        states: dict[str, JobState] = {}
        deadline = time.monotonic() + within
        while True:
            states.update(await self.poll(ids, b))
            if done(states):
                return states
            if time.monotonic() > deadline:
                seen = {i: (s.phase, s.status) for i, s in states.items()}
                raise AssertionError(f"{what}: not within {within:g} s; last states {seen}")
            await _sleep(pause)

    def ended(self, states: Mapping[str, JobState], ids: Sequence[str]) -> bool:
        return all(i in states and states[i].terminal for i in ids)

    # -- checks --------------------------------------------------------------------------
    async def limits(self) -> None:
        limits = self.backend.limits
        assert isinstance(limits, Limits), f"limits is {limits!r}, not a stepflow.remote.Limits"
        assert isinstance(limits.name_length, int) and limits.name_length >= 1, (
            f"limits.name_length is {limits.name_length!r}; it must be an int >= 1")
        pattern = limits.name_pattern()
        for value, field in ((limits.env_entries, "env_entries"), (limits.env_value_length, "env_value_length"),
                             (limits.command_items, "command_items"),
                             (limits.command_item_length, "command_item_length"),
                             (limits.label_length, "label_length")):
            assert value is None or (isinstance(value, int) and value >= 1), (
                f"limits.{field} is {value!r}; it must be None or an int >= 1")
        long_step = "Train_the-Model " * 20 + "ÄÖ/é"
        for run_id, step, attempt in ((self.run_id, long_step, 12), ("r" * 200, "s", 1), (self.run_id, "ok", 1)):
            name = job_name(run_id, step, attempt, limits)
            assert name and len(name) <= limits.name_length and not pattern.search(name), (
                f"job_name for step {step[:30]!r}... gives {name!r}, which breaks the backend's own limits "
                f"(at most {limits.name_length} characters of [{limits.name_charset}])")
        probe = self.job("limits-probe", job_command(seconds=1, lines=["x"]))
        del self.jobs["limits-probe"]
        check_limits(probe, limits, what=f"backend '{self.backend.name}'")  # the suite's own jobs must fit

    async def plain_answers(self) -> None:
        for exc in (ValueError("x"), ConnectionResetError("reset"), TimeoutError()):
            answer = self.backend.is_transient(exc)
            assert isinstance(answer, bool), f"is_transient({exc!r}) returned {answer!r}, not a bool"
        problems = self.backend.check(self.options, None)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems), (
            f"check(options, None) returned {problems!r}, not a list of str")
        assert not problems, f"check(options, None) finds problems with the suite's options: {problems}"

    async def prepare(self) -> None:
        if self.resources is None:
            raise _Skip("no resources given (pass resources=RunResources(...) to check prepare)")
        await self.call(functools.partial(self.backend.prepare, self.resources))

    async def submit_ids(self) -> None:
        ok = await self.submit("ok", job_command(seconds=self.seconds, lines=[f"{self.token} ok"]))
        fail = await self.submit("fail", job_command(seconds=self.seconds, exit_code=3, lines=[
            f"{self.token} err {i}" for i in range(1, 4)], fail_output=True))
        assert ok != fail, f"two jobs got the same id {ok!r}"

    async def idempotent(self) -> None:
        (ok,) = self.need("ok")
        job = self.jobs["ok"]
        again = await self.call(functools.partial(self.backend.submit, job))
        assert again == ok, f"submitting job {job.name} again returned id {again!r}, not its id {ok!r}"
        if _implements(self.backend, "find"):
            found = await self.call(functools.partial(self.backend.find, job.name))
            assert found == ok, f"find({job.name!r}) returned {found!r}, not {ok!r}"
        if self.count_jobs is not None:
            count = await _maybe_await(self.count_jobs(job.name))
            assert count == 1, f"the backend holds {count} jobs named {job.name} after two submits; expected 1"
            self.notes["submitting the same job again returns the same id and creates no second job"] = (
                "checked with find and the backend's job count")
        else:
            how = "with find" if _implements(self.backend, "find") else "by id only (no find, no count)"
            self.notes["submitting the same job again returns the same id and creates no second job"] = f"checked {how}"

    async def unknown_name(self) -> None:
        name = job_name(self.run_id, "never-submitted", 1, self.backend.limits)
        found = await self.call(functools.partial(self.backend.find, name))
        assert found is None, f"find({name!r}) of a name never submitted returned {found!r}, not None"
        if not _implements(self.backend, "find"):
            self.notes["find of an unknown name returns None"] = "find is not implemented (the default answers None)"

    async def poll_many(self) -> None:
        ids = self.need("ok", "fail")
        complete = False

        def done(states: Mapping[str, JobState]) -> bool:
            return self.ended(states, ids)

        pause = min(max(self.backend.poll_interval, 0.05), 1.0)
        states: dict[str, JobState] = {}
        deadline = time.monotonic() + self.timeout
        while True:
            answer = await self.poll(ids)
            complete = complete or all(i in answer for i in ids)
            states.update(answer)
            if done(states):
                break
            assert time.monotonic() < deadline, (
                f"jobs {ids} did not end within {self.timeout:g} s; last states "
                f"{ {i: s.phase for i, s in states.items()} }")
            await _sleep(pause)
        assert complete, f"no poll round answered for all of {ids} at once (each round must be one call)"
        self.final.update({s: states[i] for s, i in zip(("ok", "fail"), ids, strict=True)})

    async def succeeded(self) -> None:
        state = self.final.get("ok")
        assert state is not None, "not run: the exit-0 job did not end (see 'poll answers for several jobs')"
        assert state.phase == "succeeded", f"a job exiting 0 ended {state.phase} ({state.status}: {state.detail})"
        assert state.exit_code in (None, 0), f"a job exiting 0 reports exit_code {state.exit_code}"

    async def failed(self) -> None:
        state = self.final.get("fail")
        assert state is not None, "not run: the exit-3 job did not end (see 'poll answers for several jobs')"
        assert state.phase == "failed", f"a job exiting 3 ended {state.phase} ({state.status}: {state.detail})"
        assert state.exit_code in (None, 3), f"a job exiting 3 reports exit_code {state.exit_code}"
        self.notes["a job exiting non-zero fails (with its exit code when known)"] = (
            "exit_code reported" if state.exit_code == 3 else "exit_code not reported (None)")

    async def unknown_id(self) -> None:
        missing = f"no-such-job-{uuid.uuid4().hex[:12]}"
        answer = await self.poll([missing])
        state = answer.get(missing)
        assert state is None or state.phase == "failed", (
            f"poll of an unknown id answered phase {state.phase!r}; the contract allows leaving it out or 'failed'")
        # Both are allowed: a missing id is asked again next round (eventually consistent services),
        # a failed one ends the wait at once.
        self.notes["poll of an unknown id leaves it out or reports it failed"] = (
            "left out" if state is None else f"reported failed ({state.status}: {state.detail})")

    async def logs(self) -> None:
        name = "read_logs returns each printed line exactly once, in order"
        if not _implements(self.backend, "read_logs"):
            raise _Skip("read_logs is not implemented")
        expected = [f"{self.token} log {i}" for i in range(1, 7)]
        logs_id = await self.submit("logs", job_command(seconds=4 * self.seconds, lines=expected))
        ids = [logs_id]
        wanted = {logs_id: expected}
        if "fail" in self.ids:  # its lines went to stderr: both streams must be read
            ids.append(self.ids["fail"])
            wanted[self.ids["fail"]] = [f"{self.token} err {i}" for i in range(1, 4)]
        cursors: dict[str, Any] = dict.fromkeys(ids)
        got: dict[str, list[str]] = {i: [] for i in ids}
        rounds_with_lines = 0
        pause = min(max(self.backend.log_interval, 0.02), 1.0)
        deadline = time.monotonic() + self.timeout
        after_end = 0
        while after_end < 3:  # the last rounds after the end catch lines a backend publishes late
            batches = await self.call(functools.partial(self.backend.read_logs, dict(cursors)))
            unasked = set(batches) - set(ids)
            assert not unasked, f"read_logs answered about ids it was not asked: {sorted(unasked)}"
            new = False
            for job_id, batch in batches.items():
                cursors[job_id] = batch.cursor
                mine = [line.rstrip("\n") for line in batch.lines if self.token in line]
                got[job_id].extend(mine)
                new = new or bool(mine)
            rounds_with_lines += new
            states = await self.poll([logs_id])
            if logs_id in states and states[logs_id].terminal:
                after_end += 1
            assert time.monotonic() < deadline, f"the log job did not end within {self.timeout:g} s"
            await _sleep(pause)
        for job_id, lines in wanted.items():
            assert got[job_id] == lines, (
                f"read_logs with cursors returned {got[job_id]} for job {job_id}; expected each of {lines} exactly "
                "once, in order" + (" (these lines went to stderr)" if job_id != logs_id else ""))
        self.final["logs"] = states[logs_id]
        self.notes[name] = f"lines arrived over {rounds_with_lines} round(s)"

    async def cancel_running(self) -> None:
        long_id = await self.submit("long", job_command(seconds=max(600.0, 5 * self.timeout), lines=[
            f"{self.token} long"]))
        await self.until([long_id], lambda s: long_id in s and s[long_id].phase != "pending", self.timeout,
                         "the long job did not start")
        started = time.monotonic()
        await self.call(functools.partial(self.backend.cancel, long_id))
        states = await self.until([long_id], lambda s: self.ended(s, [long_id]), self.cancel_within,
                                  "the cancelled job did not end")
        state = states[long_id]
        self.final["long"] = state
        assert state.phase == "stopped", (
            f"a cancelled job ended {state.phase} ({state.status}: {state.detail}); expected 'stopped'")
        self.notes["cancel stops a running job"] = f"stopped {time.monotonic() - started:.1f} s after cancel"

    async def cancel_ended(self) -> None:
        (ok,) = self.need("ok")
        assert "ok" in self.final, "not run: the exit-0 job did not end"
        await self.call(functools.partial(self.backend.cancel, ok))
        state = (await self.until([ok], lambda s: ok in s, self.timeout, "poll after cancel"))[ok]
        assert state.phase == "succeeded", f"cancelling an ended job changed it to {state.phase} ({state.status})"

    async def resumed(self) -> None:
        (ok,) = self.need("ok")
        job = self.jobs["ok"]
        second = self.second = self.make_backend()
        assert second is not self.backend, "make_backend() returned the same instance twice; it must make new ones"
        if _implements(second, "find"):
            found = await self.call(functools.partial(second.find, job.name), second)
            assert found == ok, f"a second instance's find({job.name!r}) returned {found!r}, not {ok!r}"
        else:
            self.notes["a second instance (a resumed runner) finds the job by name and polls it"] = (
                "find is not implemented: a resumed runner relies on the run store's job id")
        again = await self.call(functools.partial(second.submit, job), second)
        assert again == ok, f"submitting job {job.name} from a second instance returned {again!r}, not {ok!r}"
        state = (await self.until([ok], lambda s: ok in s, self.timeout, "a second instance's poll", second))[ok]
        assert state.phase == "succeeded", f"a second instance sees the ended job as {state.phase} ({state.status})"

    async def unstarted(self) -> None:
        if self.leave_unstarted is None:
            raise _Skip("no leave_unstarted hook given (a way to create a job without starting it)")
        job = self.job("unstarted", job_command(seconds=self.seconds / 2, lines=[f"{self.token} late"]))
        created = await _maybe_await(self.leave_unstarted(self.backend, job))
        self.ids["unstarted"] = created
        job_id = await self.call(functools.partial(self.backend.submit, job))
        self.ids["unstarted"] = job_id
        if created:
            assert job_id == created, f"submitting the job left created returned {job_id!r}, not its id {created!r}"
        states = await self.until([job_id], lambda s: self.ended(s, [job_id]), self.timeout,
                                  "the job left created did not run to its end after being submitted")
        self.final["unstarted"] = states[job_id]
        assert states[job_id].phase == "succeeded", (
            f"the job left created ended {states[job_id].phase} ({states[job_id].status}: {states[job_id].detail})")

    async def cleanup(self) -> None:
        ended = [s for s in self.ids if s in self.final]
        assert ended, "not run: no job of the suite ended"
        for step in ended:
            await self.call(functools.partial(self.backend.cleanup, self.ids[step], self.final[step]))
            self.cleaned.add(step)

    async def teardown(self) -> None:
        """Stop and remove whatever the suite created, whatever failed."""
        for step, job_id in self.ids.items():
            if step in self.cleaned:
                continue
            with contextlib.suppress(Exception):
                if step not in self.final:
                    await self.backend.cancel(job_id)
            with contextlib.suppress(Exception):
                await self.backend.cleanup(job_id, self.final.get(step))
        for b in (self.backend, self.second):
            if b is not None:
                with contextlib.suppress(Exception):
                    await b.aclose()


async def _sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


async def acheck_job_backend(
    make_backend: Callable[[], JobBackend],
    *,
    image: str,
    options: Any = None,
    make_job: Callable[..., Job] | None = None,
    count_jobs: Callable[[str], int | Awaitable[int]] | None = None,
    leave_unstarted: Callable[[JobBackend, Job], str | Awaitable[str]] | None = None,
    resources: RunResources | None = None,
    timeout: float = 120.0,
    cancel_within: float = 60.0,
    attempts: int = 6,
    job_seconds: float = 1.0,
) -> JobBackendReport:
    """Async :func:`check_job_backend` (same arguments), for tests on an event loop."""
    suite = _BackendSuite(make_backend, image=image, options=options, make_job=make_job, count_jobs=count_jobs,
                          leave_unstarted=leave_unstarted, resources=resources, timeout=timeout,
                          cancel_within=cancel_within, attempts=attempts, job_seconds=job_seconds)
    checks = (suite.limits, suite.plain_answers, suite.prepare, suite.submit_ids, suite.idempotent,
              suite.unknown_name, suite.poll_many, suite.succeeded, suite.failed, suite.unknown_id, suite.logs,
              suite.cancel_running, suite.cancel_ended, suite.resumed, suite.unstarted, suite.cleanup)
    try:
        for name, check in zip(CHECKS, checks, strict=True):
            await suite.check(name, check)
    finally:
        await suite.teardown()
    backend = suite.backend
    if suite.failures:
        details = "\n".join(f"  - check '{name}': {why}" for name, why in suite.failures)
        raise AssertionError(
            f"job backend '{backend.name}' ({backend.flavor or type(backend).__name__}) failed "
            f"{len(suite.failures)} conformance check{'s' if len(suite.failures) > 1 else ''}:\n{details}\n"
            f"passed: {', '.join(suite.passed) or 'none'}")
    return JobBackendReport(backend.flavor, backend.name, tuple(suite.passed), tuple(suite.skipped), suite.durations,
                            suite.notes)


def check_job_backend(
    make_backend: Callable[[], JobBackend],
    *,
    image: str,
    options: Any = None,
    make_job: Callable[..., Job] | None = None,
    count_jobs: Callable[[str], int | Awaitable[int]] | None = None,
    leave_unstarted: Callable[[JobBackend, Job], str | Awaitable[str]] | None = None,
    resources: RunResources | None = None,
    timeout: float = 120.0,
    cancel_within: float = 60.0,
    attempts: int = 6,
    job_seconds: float = 1.0,
) -> JobBackendReport:
    """Run the JobBackend conformance suite; raise AssertionError naming every failed check.

    ``make_backend()`` must return a *new* instance each call, and instances must see the same
    jobs (the second one plays a runner resumed after a crash). Jobs run ``image`` (it needs
    ``python3``) with :func:`~stepflow.testing.job_command` commands. ``options`` is the
    ``Job.options`` object (default: the backend's own config); ``make_job(name, command, *,
    image, options, run_id, step, labels)`` builds a job when the backend needs more.
    ``count_jobs(name)`` (sync or async; default: the backend's ``jobs_created`` method when it
    has one) says how many jobs the service holds under a name. ``leave_unstarted(backend, job)``
    (default: the backend's ``create_unstarted``) creates a job without starting it, as a runner
    dying between create and start leaves it. ``resources`` enables the ``prepare`` check.

    Checks, each by name (:data:`CHECKS`): limits are sane data and a long step's
    :func:`~stepflow.remote.job_name` fits them; ``is_transient`` / ``check`` answer plainly;
    ``prepare`` succeeds; submit returns an id, and submitting again returns the same id and
    creates no second job (through ``find`` and the count); ``find`` of an unknown name is None;
    one ``poll`` call answers for several jobs, which reach ``succeeded`` (exit 0) and ``failed``
    (exit 3, ``exit_code`` 3 or None); ``poll`` of an unknown id leaves it out or reports it
    failed (both allowed; the report's notes say which); ``read_logs`` with cursors returns every
    printed line (stdout and stderr) exactly once, in order; ``cancel`` stops a running job
    (phase ``stopped`` within ``cancel_within`` s) and is a no-op on an ended one; a second
    instance finds a job by name, gets its id on resubmit and polls it; a job left created
    starts when submitted again; ``cleanup`` does not raise. Transient errors are retried
    (``attempts`` tries per call), as the operator does. The suite's jobs last ``job_seconds``
    (its log job four times that, printing a line every 2/3 of it). Timings are asserted only against the
    generous ``timeout`` and ``cancel_within``. Every job created is stopped and cleaned up.

    Returns a :class:`JobBackendReport`. It runs its own event loop: from async tests await
    :func:`acheck_job_backend` instead.
    """
    import anyio

    return anyio.run(functools.partial(
        acheck_job_backend, make_backend, image=image, options=options, make_job=make_job, count_jobs=count_jobs,
        leave_unstarted=leave_unstarted, resources=resources, timeout=timeout, cancel_within=cancel_within,
        attempts=attempts, job_seconds=job_seconds))
