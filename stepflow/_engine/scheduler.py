"""The scheduler: runs every ready step at once, within limits, and reports each change.

Design notes (measured on the target machine, see benchmarks/overhead.py):
- Steps are spawned only when their last dependency succeeds (Kahn's algorithm), so no task
  ever sits waiting for its inputs, and a step waiting for a concurrency slot is an int in a
  deque, not a parked task.
- Step attempts run as plain asyncio tasks tracked by the scheduler rather than through an
  anyio task group: anyio's ``start_soon`` costs about 4x as much per task and 3x the memory,
  which alone would break the 3x-of-raw-asyncio overhead budget. The scheduler owns their
  cancellation (run cancelled, fail-fast) and awaits them before the run returns, which is
  the structured-concurrency guarantee the task group would have given.
- Events are only built when someone listens (``EventBus.active``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import pickle
import random
import time
import traceback
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from stepflow._bus.bus import EventBus
from stepflow._dsl.pipeline import Pipeline, StepNode
from stepflow._dsl.step import StepOutput
from stepflow._engine.context import _CTX
from stepflow._engine.result import RunResult, StepError, StepResult
from stepflow.errors import JobStoppedError, NonRetryableError, OutputNotPicklableError, StepTimeoutError
from stepflow.events import (
    RunFinished,
    RunStarted,
    StepCancelled,
    StepFailed,
    StepQueued,
    StepRetrying,
    StepSkipped,
    StepStarted,
    StepSucceeded,
)
from stepflow.interfaces.operator import Invocation, StepOperator
from stepflow.interfaces.sink import EventSink

_MISSING: Any = object()
_now = time.time
_PLAIN = frozenset({int, float, str, bool, type(None), bytes})
IN_PROCESS = "in-process"


def new_run_id() -> str:
    """A short, unique, sortable-enough run id."""
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class Runner:
    """Executes one :class:`Pipeline` once. Create, ``await execute()``, read the result."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        bus: EventBus,
        operators: Mapping[str, StepOperator],
        run_id: str | None = None,
        max_concurrency: int | None = None,
        operator_concurrency: Mapping[str, int] | None = None,
        fail_fast: bool = False,
        max_threads: int = 128,
        check_outputs: bool = True,
        stack: str | None = None,
        sinks: Sequence[EventSink] = (),
        components: Mapping[str, Any] | None = None,
        run_store: Any = None,
        target: str | None = None,
        preloaded: Mapping[str, Any] | None = None,
        cache_dir: Any = None,
        home: Any = None,
        resumed: bool = False,
    ) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.pipeline = pipeline
        self.bus = bus
        self.run_id = run_id or new_run_id()
        self.operators = operators
        self.fail_fast = fail_fast
        self.check_outputs = check_outputs
        self.stack = stack
        self._sinks = list(sinks)
        self.components = dict(components or {})
        self.run_store = run_store  # persistence (resume) is on when set
        self.target = target
        self._preloaded = dict(preloaded or {})
        self._cache_dir = cache_dir
        self._home = home
        self.resumed = resumed
        self._recorder: Any = None
        self._max = max_concurrency or 0
        limits: dict[str, int] = {}
        for name, op in operators.items():
            if op.max_concurrency:
                limits[name] = op.max_concurrency
        for name, limit in (operator_concurrency or {}).items():
            if limit < 1:
                raise ValueError(f"operator_concurrency[{name!r}] must be >= 1, got {limit}")
            limits[name] = limit
        self._op_limit = limits
        self._op_running: dict[str, int] = dict.fromkeys(limits, 0)
        self._max_threads = max_threads
        nodes = pipeline.nodes
        n = len(nodes)
        self._remaining = [len(node.deps) for node in nodes]
        self._outputs: list[Any] = [_MISSING] * n
        self._results: list[StepResult | None] = [None] * n
        self._unfinished = n
        self._running = 0
        self._waiting: collections.deque[int] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: asyncio.Event | None = None
        self._seq = 0
        self._stopping: str | None = None  # reason, once the run is being cancelled
        self._cancel_requested = False
        self._limiter: anyio.CapacityLimiter | None = None

    # -- events --------------------------------------------------------------------------
    def _emit(self, cls: Any, *args: Any) -> None:
        bus = self.bus
        if bus._active:
            self._seq += 1
            bus.publish(cls(self.run_id, self._seq, _now(), *args))

    def emit_for(self, step: str) -> Any:
        """An ``emit(EventClass, **fields)`` callable bound to ``step``, for operators."""

        def emit(cls: Any, **fields: Any) -> None:
            if self.bus.active:
                self._seq += 1
                self.bus.publish(cls(run_id=self.run_id, seq=self._seq, ts=time.time(),
                                     step=step, **fields))

        return emit

    # -- lifecycle -----------------------------------------------------------------------
    async def execute(self) -> RunResult:
        """Run the pipeline to completion; re-raises outside cancellation after cleanup."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = asyncio.Event()
        self._limiter = anyio.CapacityLimiter(self._max_threads)
        await self._attach_operators()  # a stack that cannot work fails here, before the run is recorded
        beat = None
        if self.run_store is not None:
            await self._open_run_store()
            beat = loop.create_task(self._heartbeat())
        for sink in self._sinks:  # the stack's sinks see this run only
            self.bus.add_sink(sink)
        started = time.time()
        self._emit(RunStarted, self.pipeline.name, len(self.pipeline.nodes),
                   _printable(self.pipeline.params), self.stack)
        cancelled_from_outside = False
        try:
            self._apply_preloaded()
            for node in self.pipeline.nodes:
                if self._remaining[node.index] == 0 and self._results[node.index] is None:
                    self._ready(node.index)
            self._check_done()
            if self._unfinished:
                await self._done.wait()
            if self._cancel_requested:
                await self._stop_all("run cancelled", "cancelled")
        except asyncio.CancelledError:
            cancelled_from_outside = True
            with anyio.CancelScope(shield=True):
                await self._stop_all("run cancelled", "cancelled")
        finally:
            if self._tasks:  # only after an unexpected error: never leave orphans
                for task in self._tasks:
                    task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(*self._tasks, return_exceptions=True)
        result = self._result(started, time.time(), cancelled_from_outside)
        if beat is not None:
            beat.cancel()
        with anyio.CancelScope(shield=True):
            self._emit(RunFinished, result.status, result.duration, result.counts())
            await self.bus.flush()
            if self.run_store is not None:
                with contextlib.suppress(Exception):
                    await anyio.to_thread.run_sync(self.run_store.finish_run, self.run_id, result.status)
            await self._close_operators()
            for sink in self._sinks:
                if sink in self.bus.sinks:
                    self.bus.remove_sink(sink)
                with contextlib.suppress(Exception):
                    await sink.aclose()
        if cancelled_from_outside:
            raise asyncio.CancelledError
        return result

    async def _open_run_store(self) -> None:
        from stepflow._store.sink import RunStoreSink

        store = self.run_store
        params = dict(self.pipeline.params)
        await anyio.to_thread.run_sync(store.start_run, self.run_id, self.pipeline.name, self.target, params,
                                       self.stack, len(self.pipeline.nodes))
        if self._preloaded or self.resumed:  # a resumed run continues its event sequence
            self._seq = await anyio.to_thread.run_sync(store.last_seq, self.run_id)
        self._sinks.insert(0, RunStoreSink(store))
        from stepflow._store.outputs import OutputRecorder
        from stepflow.remote._keys import stored_value_key

        self._recorder = OutputRecorder(store, self.run_id, stored_value_key(self.derive_key),
                                        self.components.get("artifact_store"))

    async def _attach_operators(self) -> None:
        """Hand every operator the run's resources, then let each check it can work.

        The checks run before any step starts, so a misconfigured stack fails the run at once
        with the operator's own message (the CLI exits 2), not inside the first remote step.
        """
        from pathlib import Path

        from stepflow.interfaces.operator import RunResources

        def emit(cls: Any, **fields: Any) -> None:
            if self.bus.active:
                self._seq += 1
                self.bus.publish(cls(run_id=self.run_id, seq=self._seq, ts=time.time(), **fields))

        home = Path(self._home) if self._home is not None else Path(self._cache_dir or ".").parent
        resources = RunResources(
            run_id=self.run_id, stack=self.stack,
            artifact_store=self.components.get("artifact_store"),
            container_registry=self.components.get("container_registry"),
            image_builder=self.components.get("image_builder"),
            run_store=self.run_store, emit=emit, cache_dir=self._cache_dir, home=home,
            derive_key=self.derive_key, resumed=self.resumed,
        )
        for op in self.operators.values():
            await op.attach(resources)
        checks = [op.prepare() for op in self.operators.values() if type(op).prepare is not StepOperator.prepare]
        errors = [e for e in await asyncio.gather(*checks, return_exceptions=True) if isinstance(e, BaseException)]
        if errors:
            await self._close_operators()
            raise errors[0]

    async def _close_operators(self) -> None:
        for op in self.operators.values():
            with contextlib.suppress(Exception):  # closing must not hide the run's outcome
                await op.aclose()
        for component in self.components.values():
            closer = getattr(component, "aclose", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()

    def _apply_preloaded(self) -> None:
        """Resumed run: steps whose outputs were stored count as done and are not re-run."""
        for name, value in self._preloaded.items():
            i = self.pipeline.by_name[name]
            self._results[i] = StepResult(name, "succeeded", self._op_label(i), 0,
                                          reason="output reused from the interrupted run")
            self._outputs[i] = value
            self._unfinished -= 1
        for name in self._preloaded:
            for c in self.pipeline.children[self.pipeline.by_name[name]]:
                self._remaining[c] -= 1

    async def _heartbeat(self) -> None:
        """Tell other processes this run's runner lives (they show the run interrupted otherwise)."""
        from stepflow._store.runs import HEARTBEAT_S

        while True:
            await asyncio.sleep(HEARTBEAT_S)
            with contextlib.suppress(Exception):  # a busy store must not fail the run
                await anyio.to_thread.run_sync(self.run_store.heartbeat, self.run_id)

    def derive_key(self, purpose: str) -> bytes:
        """A key for ``purpose``, derived from the home's master key (see stepflow._store.keys)."""
        from pathlib import Path

        from stepflow._store import keys

        home = Path(self._home) if self._home is not None else Path(self._cache_dir or ".").parent
        return keys.derive(keys.master_key(home), purpose)

    def cancel(self) -> None:
        """Ask the run to stop: running steps are cancelled, pending ones never start."""
        self._cancel_requested = True
        if self._done is not None:
            self._done.set()

    async def _stop_all(self, reason: str, pending_status: str) -> None:
        """Cancel running steps, mark every unstarted step, and wait for the cancellations."""
        self._stopping = reason
        for i in self._waiting:
            self._finish_unstarted(i, pending_status, reason)
        self._waiting.clear()
        for i, res in enumerate(self._results):
            if res is None:
                self._finish_unstarted(i, pending_status, reason)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _finish_unstarted(self, i: int, status: str, reason: str) -> None:
        res = self._results[i]
        if res is None:
            res = self._results[i] = StepResult(self.pipeline.nodes[i].name, operator=self._op_label(i))
        elif res.status not in ("pending", "queued"):
            return
        res.status = status  # type: ignore[assignment]
        res.reason = reason
        self._unfinished -= 1
        if status == "cancelled":
            self._emit(StepCancelled, res.name, reason)
        else:
            self._emit(StepSkipped, res.name, reason)

    def _op_label(self, i: int) -> str:
        return self.pipeline.nodes[i].step.step_operator or IN_PROCESS

    # -- scheduling ----------------------------------------------------------------------
    def _ready(self, i: int) -> None:
        node = self.pipeline.nodes[i]
        op = node.step.step_operator
        self._results[i] = StepResult(node.name, "queued", op or IN_PROCESS)
        self._emit(StepQueued, node.name, op or IN_PROCESS)
        if self._has_slot(op):
            self._start(i, op)
        else:
            self._waiting.append(i)

    def _has_slot(self, op: str | None) -> bool:
        if self._max and self._running >= self._max:
            return False
        if op is not None and op in self._op_limit:
            return self._op_running[op] < self._op_limit[op]
        return True

    def _start(self, i: int, op: str | None) -> None:
        self._running += 1
        if op is not None and op in self._op_running:
            self._op_running[op] += 1
        task = self._loop.create_task(self._run_step(i))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, op: str | None) -> None:
        self._running -= 1
        if op is not None and op in self._op_running:
            self._op_running[op] -= 1
        if self._waiting and self._stopping is None:
            # Start waiting steps that fit now; one blocked operator must not stall others.
            nodes = self.pipeline.nodes
            for _ in range(len(self._waiting)):
                if self._max and self._running >= self._max:
                    break
                j = self._waiting.popleft()
                jop = nodes[j].step.step_operator
                if self._has_slot(jop):
                    self._start(j, jop)
                else:
                    self._waiting.append(j)

    def _resolve(self, value: Any) -> Any:
        cls = type(value)
        if cls is StepOutput:
            out = self._outputs[value._node]
            return out if value._index is None else out[value._index]
        if cls is list:
            return [self._resolve(v) for v in value]
        if cls is tuple:
            return tuple(self._resolve(v) for v in value)
        if cls is dict:
            return {k: self._resolve(v) for k, v in value.items()}
        if cls is set or cls is frozenset:
            return cls(self._resolve(v) for v in value)
        if isinstance(value, (list, tuple, dict)):  # subclasses: rebuild as the base type
            if isinstance(value, dict):
                return {k: self._resolve(v) for k, v in value.items()}
            return type(value)(self._resolve(v) for v in value) if isinstance(value, list) \
                else tuple(self._resolve(v) for v in value)
        return value

    async def _run_step(self, i: int) -> None:
        node = self.pipeline.nodes[i]
        res = self._results[i]
        assert res is not None
        op = node.step.step_operator
        res.status = "running"
        res.started_at = time.time()
        try:
            value = await self._attempts(node, res, op)
            if self._recorder is not None:  # durable before any dependent starts
                await self._recorder.record(node.name, value)
        except (asyncio.CancelledError, JobStoppedError) as exc:
            # JobStoppedError: stopped on its backend by someone else, which is a cancellation too.
            res.finished_at = time.time()
            res.status = "cancelled"
            res.reason = (str(exc) if isinstance(exc, JobStoppedError) else None) or self._stopping or "cancelled"
            self._unfinished -= 1
            self._emit(StepCancelled, node.name, res.reason)
            if isinstance(exc, JobStoppedError) and self._stopping is None:
                # The run goes on without this step: its descendants can never run (without
                # this they stayed pending and the run never finished).
                self._skip_descendants(i, f"upstream step '{node.name}' was cancelled")
            self._release(op)
            self._check_done()
            return
        except BaseException as exc:
            res.finished_at = time.time()
            self._on_failure(i, node, res, exc)
            self._release(op)
            self._check_done()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)) and not isinstance(exc, Exception):
                raise
            return
        res.finished_at = time.time()
        res.status = "succeeded"
        self._outputs[i] = value
        self._unfinished -= 1
        self._emit(StepSucceeded, node.name, res.attempts, res.finished_at - res.started_at)
        self._release(op)
        if self._stopping is None:
            remaining = self._remaining
            for c in self.pipeline.children[i]:
                remaining[c] -= 1
                if remaining[c] == 0:
                    self._ready(c)
        self._check_done()

    def _check_done(self) -> None:
        if self._unfinished == 0 and self._done is not None:
            self._done.set()

    async def _attempts(self, node: StepNode, res: StepResult, op: str | None) -> Any:
        step = node.step
        args, kwargs = node.args, node.kwargs
        if node.resolve:
            args = self._resolve(args)
            kwargs = self._resolve(kwargs) if kwargs else None
        attempt = 0
        while True:
            attempt += 1
            res.attempts = attempt
            self._emit(StepStarted, node.name, attempt, op or IN_PROCESS)
            token = _CTX.set((self.run_id, node.name, attempt, self.pipeline.name))
            try:
                if step.timeout is None:
                    if op is None and step.is_async:  # the hot path, without an extra frame
                        value = await (step.fn(*args, **kwargs) if kwargs else step.fn(*args))
                    else:
                        value = await self._call(node, args, kwargs, attempt, op)
                else:
                    try:
                        async with asyncio.timeout(step.timeout):
                            value = await self._call(node, args, kwargs, attempt, op)
                    except TimeoutError as exc:
                        if isinstance(exc, StepTimeoutError):
                            raise
                        raise StepTimeoutError(
                            f"step '{node.name}' timed out after {step.timeout:g} s "
                            f"(attempt {attempt} of {step.retries + 1})"
                        ) from None
                if self.check_outputs and type(value) not in _PLAIN:
                    _check_picklable(node.name, value)
                return value
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if (attempt > step.retries or isinstance(exc, (NonRetryableError, JobStoppedError))
                        or not isinstance(exc, step.retry_on)):
                    raise
                delay = _backoff(step, attempt)
                self._emit(StepRetrying, node.name, attempt, delay, f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
            finally:
                _CTX.reset(token)

    async def _call(self, node: StepNode, args: Any, kwargs: Any, attempt: int,
                    op: str | None) -> Any:
        step = node.step
        if op is None:
            if step.is_async:
                return await (step.fn(*args, **kwargs) if kwargs else step.fn(*args))
            call = functools.partial(step.fn, *args, **kwargs) if kwargs else (
                functools.partial(step.fn, *args) if args else step.fn)
            return await anyio.to_thread.run_sync(call, limiter=self._limiter,
                                                  abandon_on_cancel=True)
        operator = self.operators[op]
        settings = _settings_for(step.settings, op, operator.flavor)
        return await operator.launch(Invocation(
            self.run_id, node.name, attempt, step.fn, tuple(args), dict(kwargs or {}), settings,
            step.timeout, step.is_async, self.emit_for(node.name), self.pipeline.name, step.resources,
        ))

    def _on_failure(self, i: int, node: StepNode, res: StepResult, exc: BaseException) -> None:
        res.status = "failed"
        tb = getattr(exc, "remote_traceback", None) or "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__))
        res.error = StepError(type(exc).__name__, str(exc), tb)
        self._unfinished -= 1
        self._emit(StepFailed, node.name, res.attempts, res.error.type, res.error.message, tb)
        reason = f"upstream step '{node.name}' failed"
        if self.fail_fast and self._stopping is None:
            self._stopping = f"fail_fast: step '{node.name}' failed"
            for j in self._waiting:
                self._finish_unstarted(j, "skipped", self._stopping)
            self._waiting.clear()
            for j, r in enumerate(self._results):
                if r is None:
                    self._finish_unstarted(j, "skipped", self._stopping)
            for task in list(self._tasks):
                if task is not asyncio.current_task():
                    task.cancel()
            return
        self._skip_descendants(i, reason)

    def _skip_descendants(self, i: int, reason: str) -> None:
        # Skip every descendant: none of them can have started, all their results are None.
        stack = list(self.pipeline.children[i])
        while stack:
            j = stack.pop()
            if self._results[j] is None:
                self._finish_unstarted(j, "skipped", reason)
                stack.extend(self.pipeline.children[j])

    def _result(self, started: float, finished: float, cancelled: bool) -> RunResult:
        nodes = self.pipeline.nodes
        steps: dict[str, StepResult] = {}
        outputs: dict[str, Any] = {}
        any_failed = any_cancelled = False
        for i, node in enumerate(nodes):
            res = self._results[i] or StepResult(node.name, "cancelled", self._op_label(i))
            steps[node.name] = res
            if res.status == "succeeded":
                outputs[node.name] = self._outputs[i]
            elif res.status == "failed":
                any_failed = True
            elif res.status == "cancelled":
                any_cancelled = True
        if cancelled or self._cancel_requested:
            status = "cancelled"
        elif any_failed:
            status = "failed"
        elif any_cancelled:
            status = "cancelled"
        else:
            status = "succeeded"
        output = None
        if self.pipeline.output is not None:
            try:
                output = self._resolve(self.pipeline.output)
            except Exception:
                output = None
            if _contains_missing(output):
                output = None
        return RunResult(self.run_id, self.pipeline.name, status, started, finished,  # type: ignore[arg-type]
                         steps, outputs, output)


def _contains_missing(value: Any) -> bool:
    if value is _MISSING:
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_contains_missing(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_missing(v) for v in value.values())
    return False


def _settings_for(settings: Mapping[str, Mapping[str, Any]], name: str, flavor: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    if flavor and flavor in settings:
        merged.update(settings[flavor])
    if name in settings:
        merged.update(settings[name])
    return merged


def _backoff(step: Any, attempt: int) -> float:
    base = min(step.retry_max_delay, step.retry_delay * step.retry_backoff ** (attempt - 1))
    if step.retry_jitter:
        base *= 1 + random.uniform(-step.retry_jitter, step.retry_jitter)
    return max(0.0, base)


def _check_picklable(step: str, value: Any) -> None:
    try:
        pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return
    except Exception:
        pass
    import cloudpickle

    try:
        cloudpickle.dumps(value)
    except Exception as exc:
        raise OutputNotPicklableError(
            f"step '{step}' returned a {type(value).__module__}.{type(value).__qualname__} that "
            f"cannot be pickled ({type(exc).__name__}: {exc}). Step outputs must be picklable so "
            "they can be stored, resumed and sent to remote operators: return plain data (or "
            "pass check_outputs=False to run() to keep unpicklable outputs in-process only)."
        ) from None


def _printable(params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        out[k] = v if type(v) in _PLAIN else repr(v)
    return out
