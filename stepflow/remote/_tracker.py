"""Following jobs: one status loop and one log loop per backend, for every run of the process.

A :class:`Tracker` polls every job it follows in one ``poll(ids)`` round and reads every
running job's new log lines in one ``read_logs(cursors)`` round, whatever the number of steps
and runs waiting. Operators of equal backends (same flavor, name and config) in one event loop
share one tracker, so two concurrent runs on one SageMaker operator cost one round, not two.

Failures: a transient round is skipped with backoff (honouring ``retry_after``); a job missing
from an answer is asked again next round; when rounds keep failing, every waiting job gets its
own exception object (sharing one would grow its traceback with every raise).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from stepflow.errors import BackendError
from stepflow.remote._backend import JobBackend, JobState
from stepflow.remote._retry import RetryPolicy, transient

#: Log rounds a job gets once it ended, for the last lines its backend publishes late.
FINAL_LOG_ROUNDS = 2


@attrs.define
class TrackerStats:
    """What a tracker did (for tests and benchmarks)."""

    poll_rounds: int = 0
    polled_ids: int = 0
    failed_rounds: int = 0
    log_rounds: int = 0


class _Watch:
    __slots__ = ("cursor", "done", "error", "final_rounds", "job_id", "log_failures", "on_lines", "on_state",
                 "state", "wants_logs")

    def __init__(self, job_id: str, on_state: Callable[[JobState], None],
                 on_lines: Callable[[Sequence[str]], None] | None) -> None:
        self.job_id = job_id
        self.on_state = on_state
        self.on_lines = on_lines
        self.wants_logs = on_lines is not None
        self.state: JobState | None = None
        self.cursor: Any = None
        self.final_rounds: int | None = None
        self.log_failures = 0
        self.error: str | None = None
        self.done = asyncio.Event()


class Tracker:
    """Follows the jobs of one backend (see the module docstring)."""

    def __init__(self, backend: JobBackend, *, max_failures: int = 20) -> None:
        self.backend = backend
        self.backends: list[JobBackend] = [backend]
        self.retired: list[JobBackend] = []
        self.max_failures = max_failures
        self.stats = TrackerStats()
        self._watches: dict[str, _Watch] = {}
        self._status: asyncio.Task[None] | None = None
        self._logs: asyncio.Task[None] | None = None
        self._wake_status = asyncio.Event()
        self._wake_logs = asyncio.Event()
        self._has_logs = type(backend).read_logs is not JobBackend.read_logs

    # ------------------------------------------------------------------ following
    def follow(self, job_id: str, on_state: Callable[[JobState], None],
               on_lines: Callable[[Sequence[str]], None] | None = None) -> _Watch:
        """Start following ``job_id``; await :meth:`wait` for its end."""
        watch = _Watch(job_id, on_state, on_lines if self._has_logs else None)
        self._watches[job_id] = watch
        if self._status is None or self._status.done():
            self._status = asyncio.get_running_loop().create_task(self._status_loop())
        if watch.wants_logs and (self._logs is None or self._logs.done()):
            self._logs = asyncio.get_running_loop().create_task(self._log_loop())
        return watch

    async def wait(self, watch: _Watch, timeout: float | None = None) -> JobState | None:
        """The job's terminal state (after its last log lines); None when ``timeout`` passed first."""
        if timeout is None:
            await watch.done.wait()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.done.wait(), timeout)
        if watch.error is not None:
            raise BackendError(watch.error)  # a fresh exception for every waiter
        return watch.state if watch.done.is_set() else None

    def hurry(self) -> None:
        """Poll again soon (a job was just asked to stop)."""
        self._wake_status.set()

    def forget(self, job_id: str) -> None:
        """Stop following ``job_id``."""
        self._watches.pop(job_id, None)

    def close(self) -> None:
        """Stop both loops (the process is leaving the loop)."""
        for task in (self._status, self._logs):
            if task is not None:
                task.cancel()
        for watch in self._watches.values():
            watch.error = watch.error or "stopped following the job (the operator was closed)"
            watch.done.set()

    # ------------------------------------------------------------------ status
    async def _status_loop(self) -> None:
        backend = self.backend
        interval = backend.poll_interval
        failures = 0
        while any(_unsettled(w) for w in self._watches.values()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_status.wait(), interval * random.uniform(0.9, 1.1))
            hurried = self._wake_status.is_set()
            self._wake_status.clear()
            ids = [w.job_id for w in self._watches.values() if _unsettled(w)]
            if not ids:
                continue
            backend = self.backend  # may have been handed over to another run's backend
            try:
                states = await backend.poll(ids)
            except Exception as exc:
                self.stats.failed_rounds += 1
                failures += 1
                if transient(exc, backend.is_transient) and failures < self.max_failures:
                    interval = RetryPolicy(base=backend.poll_interval, cap=backend.max_poll_interval * 3).delay(
                        failures, getattr(exc, "retry_after", None))
                    continue
                message = (f"step-operator '{backend.name}' ({backend.flavor}): following its jobs failed "
                           f"{failures} time(s) in a row: {type(exc).__name__}: {exc}")
                for job_id in ids:
                    self._fail(job_id, message)
                failures = 0
                continue
            failures = 0
            self.stats.poll_rounds += 1
            self.stats.polled_ids += len(ids)
            changed = hurried
            for job_id, state in states.items():
                watch = self._watches.get(job_id)
                if watch is None or (watch.state is not None and watch.state.terminal):
                    continue
                if state != watch.state:
                    changed = True
                    watch.state = state
                    _safely(watch.on_state, state)
                if state.terminal:
                    self._ended(watch)
            interval = backend.poll_interval if changed else min(backend.max_poll_interval, interval * 1.5)

    def _ended(self, watch: _Watch) -> None:
        if watch.wants_logs:
            watch.final_rounds = FINAL_LOG_ROUNDS
            self._wake_logs.set()
        else:
            watch.done.set()

    def _fail(self, job_id: str, message: str) -> None:
        watch = self._watches.get(job_id)
        if watch is not None and not watch.done.is_set():
            watch.error = message
            watch.done.set()

    # ------------------------------------------------------------------ logs
    async def _log_loop(self) -> None:
        """Full rounds every ``log_interval``; in between, quick rounds for jobs that just ended only.

        A step whose job ended waits for its last lines, so those are read soon (0.3 s); the
        jobs still running wait for the next full round, so a busy backend is not read faster
        than its ``log_interval`` (on Docker a round costs one request per job).
        """
        loop = asyncio.get_running_loop()
        last_full = loop.time()
        try:
            while any(w.wants_logs and not w.done.is_set() for w in self._watches.values()):
                finishing = any(w.final_rounds is not None and not w.done.is_set() for w in self._watches.values())
                until_full = max(0.0, self.backend.log_interval - (loop.time() - last_full))
                delay = min(0.3, until_full) if finishing else until_full
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_logs.wait(), delay)
                self._wake_logs.clear()
                full = loop.time() - last_full >= self.backend.log_interval
                if full:
                    last_full = loop.time()
                await self._log_round(only_finishing=not full)
        finally:  # never leave a job waiting for logs that will not come
            for watch in self._watches.values():
                if watch.final_rounds is not None:
                    watch.done.set()

    async def _log_round(self, only_finishing: bool = False) -> None:
        active = [w for w in self._watches.values() if w.wants_logs and not w.done.is_set()
                  and w.state is not None and w.state.phase != "pending"
                  and (w.final_rounds is not None or not only_finishing)]
        if not active:
            return
        try:
            batches = await self.backend.read_logs({w.job_id: w.cursor for w in active})
            error = None
        except Exception as exc:
            batches, error = {}, exc
        self.stats.log_rounds += 1
        for watch in active:
            batch = batches.get(watch.job_id)
            if batch is not None:
                watch.cursor = batch.cursor
                watch.log_failures = 0  # the notice is about an outage: failures in a row, not scattered throttling
                if batch.lines and watch.on_lines is not None:
                    _safely(watch.on_lines, batch.lines)
            elif error is not None:
                watch.log_failures += 1
                if watch.log_failures == 3 and watch.on_lines is not None:
                    _safely(watch.on_lines, [f"[stepflow] cannot read the job's logs: {type(error).__name__}: "
                                             f"{error}"])
            if watch.final_rounds is not None:
                watch.final_rounds -= 1
                if watch.final_rounds <= 0:
                    watch.done.set()


def _unsettled(watch: _Watch) -> bool:
    """Still worth a status call: not ended, and not already failed (a failed job's waiter is stopping it)."""
    return not watch.done.is_set() and (watch.state is None or not watch.state.terminal)


def _safely(callback: Callable[[Any], None], value: Any) -> None:
    with contextlib.suppress(Exception):  # a failing event emitter must not stop the loop
        callback(value)


# ---------------------------------------------------------------------- sharing
_TRACKERS: dict[tuple[Any, ...], Tracker] = {}


def _key(backend: JobBackend) -> tuple[Any, ...]:
    return (type(backend), backend.name, repr(backend.config), id(asyncio.get_running_loop()))


def acquire(backend: JobBackend) -> Tracker:
    """The tracker of ``backend``'s kind in this event loop (shared with equal backends)."""
    key = _key(backend)
    tracker = _TRACKERS.get(key)
    if tracker is None:
        tracker = _TRACKERS[key] = Tracker(backend)
    else:
        tracker.backends.append(backend)
    return tracker


async def release(tracker: Tracker, backend: JobBackend) -> None:
    """Give up one use of ``tracker`` and close ``backend`` (now, or once the loops let go of it).

    When the backend leaving is the one the loops use and others remain, the loops move to
    another run's backend; the old one is closed with the tracker, since a round may be using it.
    """
    with contextlib.suppress(ValueError):
        tracker.backends.remove(backend)
    if tracker.backends:
        if tracker.backend is backend:
            tracker.backend = tracker.backends[0]
            tracker.retired.append(backend)
            return
        await _close(backend)
        return
    tracker.close()
    for key, value in list(_TRACKERS.items()):
        if value is tracker:
            del _TRACKERS[key]
    for old in [*tracker.retired, backend]:
        await _close(old)


async def _close(backend: JobBackend) -> None:
    with contextlib.suppress(Exception):  # closing must not hide a run's outcome
        await backend.aclose()
