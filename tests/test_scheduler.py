"""Running pipelines: concurrency, limits, retries, timeouts, failure policy, cancellation."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

import stepflow
from stepflow import (
    EventBus,
    Invocation,
    NonRetryableError,
    PipelineDefinitionError,
    StepOperator,
    UnknownOperatorError,
    pipeline,
    run,
    run_sync,
    step,
)
from stepflow.events import (
    RunFinished,
    StepCancelled,
    StepFailed,
    StepRetrying,
    StepSkipped,
    StepStarted,
    StepSucceeded,
)


async def run_collect(p: Any, **kw: Any) -> tuple[stepflow.RunResult, list[Any]]:
    bus = EventBus()
    async with bus.subscribe() as events:
        result = await run(p, event_bus=bus, **kw)
        return result, events.pending()


# --------------------------------------------------------------------------- the shape
@step
def load() -> list[int]:
    return [1, 2, 3]


@step(retries=2, timeout=60)
async def train(data: list[int], lr: float = 0.1) -> float:
    return sum(data) * lr


@pipeline
def training(lr: float = 0.1):
    return train(load(), lr=lr)


async def test_public_usage_shape() -> None:
    bus = stepflow.EventBus()
    seen: list[Any] = []
    async with bus.subscribe() as events, anyio.create_task_group() as tg:
        async def consume() -> None:
            async for ev in events:
                seen.append(ev)

        tg.start_soon(consume)
        result = await run(training(lr=0.2), event_bus=bus)
        events.close()
    assert result.status == "succeeded"
    assert result.outputs["train"] == pytest.approx(1.2)
    assert result.steps["train"].status == "succeeded"
    assert result.output == pytest.approx(1.2)
    kinds = [type(e).__name__ for e in seen]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"
    assert kinds.count("StepSucceeded") == 2
    seqs = [e.seq for e in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert {e.run_id for e in seen} == {result.run_id}


def test_run_sync_for_plain_callers() -> None:
    result = run_sync(training(lr=1.0))
    assert result.succeeded and result.outputs["train"] == 6.0


# --------------------------------------------------------------------------- concurrency
async def test_independent_steps_run_at_once() -> None:
    @step
    async def nap(i: int) -> int:
        await anyio.sleep(0.3)
        return i

    @step
    def block(i: int) -> int:
        time.sleep(0.3)
        return i

    @step
    def total(xs: list[int]) -> int:
        return sum(xs)

    @pipeline
    def wide():
        return total([nap(i) for i in range(50)] + [block(i) for i in range(20)])

    t0 = time.perf_counter()
    result = await run(wide())
    elapsed = time.perf_counter() - t0
    assert result.output == sum(range(50)) + sum(range(20))
    assert elapsed < 1.2, f"70 steps of 0.3 s took {elapsed:.2f}s: they did not overlap"


async def test_sync_steps_run_in_threads_async_on_the_loop() -> None:
    loop_thread = threading.get_ident()

    @step
    def sync_step() -> int:
        return threading.get_ident()

    @step
    async def async_step() -> int:
        return threading.get_ident()

    @pipeline
    def p():
        sync_step()
        async_step()

    result = await run(p())
    assert result.outputs["sync_step"] != loop_thread
    assert result.outputs["async_step"] == loop_thread


async def test_step_context_is_visible_in_threads() -> None:
    @step
    def who() -> tuple[str, int]:
        ctx = stepflow.current_step()
        assert ctx is not None
        return ctx.step, ctx.attempt

    @pipeline
    def p():
        who()

    result = await run(p())
    assert result.outputs["who"] == ("who", 1)


class Peak:
    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def hold(self, seconds: float) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        await anyio.sleep(seconds)
        self.now -= 1


async def test_global_concurrency_limit() -> None:
    peak = Peak()

    @step
    async def work(i: int) -> int:
        await peak.hold(0.02)
        return i

    @pipeline
    def p():
        for i in range(30):
            work(i)

    result = await run(p(), max_concurrency=4)
    assert result.succeeded and peak.peak == 4


class CountingOperator(StepOperator):
    """A real operator implementation: runs steps in-process and records what it saw."""

    flavor = "counting"

    def __init__(self, max_concurrency: int | None = None) -> None:
        self.max_concurrency = max_concurrency
        self.invocations: list[Invocation] = []
        self.peak = Peak()

    async def launch(self, invocation: Invocation) -> Any:
        self.invocations.append(invocation)
        await self.peak.hold(0.02)
        if invocation.is_async:
            return await invocation.fn(*invocation.args, **invocation.kwargs)
        return invocation.fn(*invocation.args, **invocation.kwargs)

    def validate_settings(self, settings: Any) -> list[str]:
        bad = set(settings) - {"cpus", "image"}
        return [f"unknown setting '{k}' (valid: cpus, image)" for k in sorted(bad)]


async def test_per_operator_concurrency_and_settings() -> None:
    op = CountingOperator(max_concurrency=2)

    @step(step_operator="remote", settings={"counting": {"cpus": 2}, "remote": {"image": "x"}})
    def remote_work(i: int) -> int:
        return i * 10

    @step
    async def local_work(i: int) -> int:
        await anyio.sleep(0.02)
        return i

    @pipeline
    def p():
        for i in range(10):
            remote_work(i)
            local_work(i)

    result = await run(p(), operators={"remote": op})
    assert result.succeeded
    assert op.peak.peak == 2
    assert len(op.invocations) == 10
    inv = op.invocations[0]
    assert inv.settings == {"cpus": 2, "image": "x"} and inv.attempt == 1 and inv.run_id == result.run_id
    assert result.steps["remote_work"].operator == "remote"
    assert result.outputs["remote_work_4"] == 30

    result = await run(p(), operators={"remote": CountingOperator()}, operator_concurrency={"remote": 3})
    assert result.succeeded


async def test_bad_operator_settings_are_reported_before_running() -> None:
    @step(step_operator="remote", settings={"remote": {"gpus": 1, "colour": "red"}})
    def job() -> int:
        return 1

    @pipeline
    def p():
        job()

    with pytest.raises(PipelineDefinitionError) as err:
        await run(p(), operators={"remote": CountingOperator()})
    assert "unknown setting 'colour'" in str(err.value) and "unknown setting 'gpus'" in str(err.value)


async def test_unknown_operator_lists_the_known_ones() -> None:
    @step(custom_step_operator="sagemaker")
    def fit() -> int:
        return 1

    @pipeline
    def p():
        fit()
        fit()

    with pytest.raises(UnknownOperatorError) as err:
        await run(p(), operators={"remote": CountingOperator()})
    msg = str(err.value)
    assert "steps 'fit', 'fit_2' use step_operator 'sagemaker', which is not available" in msg
    assert "known step operators: local, remote" in msg


async def test_explicit_local_operator() -> None:
    @step(step_operator="local")
    def here() -> str:
        return "ok"

    @pipeline
    def p():
        here()

    result = await run(p())
    assert result.outputs["here"] == "ok" and result.steps["here"].operator == "local"


class PicklingOperator(CountingOperator):
    requires_pickling = True


async def test_unpicklable_parameters_for_remote_operators() -> None:
    @step(step_operator="remote")
    def use(lock: Any, n: int) -> int:
        return n

    @pipeline
    def p():
        use(threading.Lock(), n=1)

    with pytest.raises(PipelineDefinitionError, match=r"argument 0 \(lock\) cannot be pickled to send it to operator 'remote'"):
        await run(p(), operators={"remote": PicklingOperator()})


# --------------------------------------------------------------------------- retries and timeouts
async def test_retries_with_backoff_then_success() -> None:
    attempts: list[float] = []

    @step(retries=3, retry_delay=0.05, retry_backoff=2.0, retry_jitter=0)
    def flaky() -> str:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError(f"boom {len(attempts)}")
        return "done"

    @pipeline
    def p():
        flaky()

    result, events = await run_collect(p())
    assert result.succeeded and result.steps["flaky"].attempts == 3
    retrying = [e for e in events if isinstance(e, StepRetrying)]
    assert [(e.attempt, e.delay) for e in retrying] == [(1, 0.05), (2, 0.1)]
    assert "ConnectionError: boom 1" in retrying[0].error
    assert attempts[1] - attempts[0] >= 0.045 and attempts[2] - attempts[1] >= 0.095
    assert [e.attempt for e in events if isinstance(e, StepStarted)] == [1, 2, 3]


async def test_retry_on_and_non_retryable() -> None:
    count = {"a": 0, "b": 0}

    @step(retries=5, retry_delay=0, retry_on=(ConnectionError,))
    def wrong_kind() -> None:
        count["a"] += 1
        raise ValueError("not transient")

    @step(retries=5, retry_delay=0)
    def fatal() -> None:
        count["b"] += 1
        raise NonRetryableError("give up now")

    @pipeline
    def p():
        wrong_kind()
        fatal()

    result = await run(p())
    assert result.status == "failed" and count == {"a": 1, "b": 1}


async def test_timeouts_fail_async_and_sync_steps_and_are_retried() -> None:
    @step(timeout=0.1, retries=1, retry_delay=0)
    async def slow_async() -> None:
        await anyio.sleep(5)

    @step(timeout=0.1)
    def slow_sync() -> None:
        time.sleep(0.5)

    @pipeline
    def p():
        slow_async()
        slow_sync()

    t0 = time.perf_counter()
    result, events = await run_collect(p())
    assert time.perf_counter() - t0 < 1.0
    a, s = result.steps["slow_async"], result.steps["slow_sync"]
    assert a.status == "failed" and a.attempts == 2 and a.error is not None
    assert a.error.type == "StepTimeoutError"
    assert "step 'slow_async' timed out after 0.1 s (attempt 2 of 2)" in a.error.message
    assert s.status == "failed" and "timed out after 0.1 s" in str(s.error)


# --------------------------------------------------------------------------- failure policy
@step
def ok(x: int = 0) -> int:
    return x + 1


@step
def boom(x: int = 0) -> int:
    raise RuntimeError("exploded on purpose")


@step
async def slow(x: int = 0) -> int:
    await anyio.sleep(0.3)
    return x


@pipeline
def branching():
    bad = boom(ok())
    ok.with_options(name="after_bad")(ok.with_options(name="child_of_bad")(bad))
    ok.with_options(name="independent")(slow())


async def test_failure_skips_descendants_and_independent_branches_finish() -> None:
    result, events = await run_collect(branching())
    assert result.status == "failed"
    st = {k: v.status for k, v in result.steps.items()}
    assert st == {"ok": "succeeded", "boom": "failed", "child_of_bad": "skipped",
                  "after_bad": "skipped", "slow": "succeeded", "independent": "succeeded"}
    err = result.steps["boom"].error
    assert err is not None and err.type == "RuntimeError" and err.message == "exploded on purpose"
    assert 'raise RuntimeError("exploded on purpose")' in err.traceback
    failed = [e for e in events if isinstance(e, StepFailed)]
    assert failed[0].step == "boom" and "exploded on purpose" in failed[0].traceback
    skipped = {e.step: e.reason for e in events if isinstance(e, StepSkipped)}
    assert skipped == {"child_of_bad": "upstream step 'boom' failed",
                       "after_bad": "upstream step 'boom' failed"}
    assert "independent" in result.outputs and "boom" not in result.outputs
    with pytest.raises(stepflow.errors.StepFailedError, match="boom: RuntimeError: exploded on purpose"):
        result.raise_for_status()


async def test_fail_fast_cancels_the_rest() -> None:
    t0 = time.perf_counter()
    result, events = await run_collect(branching(), fail_fast=True)
    assert time.perf_counter() - t0 < 0.25
    st = {k: v.status for k, v in result.steps.items()}
    assert st["boom"] == "failed" and st["slow"] == "cancelled"
    assert st["independent"] == "skipped" and st["child_of_bad"] == "skipped"
    cancelled = [e for e in events if isinstance(e, StepCancelled)]
    assert cancelled[0].step == "slow" and "fail_fast" in cancelled[0].reason


async def test_unpicklable_output_names_the_step() -> None:
    @step
    def make_lock() -> Any:
        return threading.Lock()

    @pipeline
    def p():
        ok(make_lock())

    result = await run(p())
    err = result.steps["make_lock"].error
    assert result.status == "failed" and err is not None
    assert err.type == "OutputNotPicklableError"
    assert "step 'make_lock' returned a _thread.lock that cannot be pickled" in err.message
    assert result.steps["ok"].status == "skipped"

    unchecked = await run(p(), check_outputs=False)
    assert unchecked.status == "failed"  # ok(lock) does lock + 1, a genuine TypeError
    assert unchecked.steps["make_lock"].status == "succeeded"


# --------------------------------------------------------------------------- cancellation
async def test_cancelling_the_caller_cancels_running_steps_and_reports_them() -> None:
    started = anyio.Event()

    @step
    async def forever() -> None:
        started.set()
        await anyio.sleep(60)

    @step
    def sync_forever() -> None:
        time.sleep(1)

    @pipeline
    def p():
        x = forever()
        ok(x)
        sync_forever()

    bus = EventBus()
    async with bus.subscribe() as events:
        t0 = time.perf_counter()
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: run(p(), event_bus=bus))
                await started.wait()
                scope.cancel()
        assert time.perf_counter() - t0 < 0.5
        got = events.pending()
    assert scope.cancelled_caught
    cancelled = {e.step for e in got if isinstance(e, StepCancelled)}
    assert cancelled == {"forever", "ok", "sync_forever"}
    finished = [e for e in got if isinstance(e, RunFinished)]
    assert finished and finished[0].status == "cancelled"


async def test_runner_cancel_returns_a_cancelled_result() -> None:
    from stepflow._engine.run import prepare_runner

    @pipeline
    def p():
        slow(ok())
        slow.with_options(name="slow_b")()

    runner = prepare_runner(p())
    async with anyio.create_task_group() as tg:
        async def stop_soon() -> None:
            await anyio.sleep(0.05)
            runner.cancel()

        tg.start_soon(stop_soon)
        result = await runner.execute()
    assert result.status == "cancelled"
    assert {s.status for s in result.steps.values()} <= {"succeeded", "cancelled"}
    assert result.steps["slow_b"].status == "cancelled"


# --------------------------------------------------------------------------- data flow
async def test_outputs_flow_through_containers_and_multiple_outputs() -> None:
    @step(outputs=2)
    def split(xs: list[int]) -> tuple[list[int], list[int]]:
        return xs[:1], xs[1:]

    @step
    async def mean(xs: list[int]) -> float:
        return sum(xs) / len(xs)

    @step
    def report(stats: dict[str, Any], parts: tuple[Any, ...]) -> str:
        return f"{stats['a']:.1f}/{stats['b']:.1f}/{len(parts)}"

    @pipeline
    def p():
        a, b = split(load())
        return {"report": report({"a": mean(a), "b": mean(b)}, (a, b)), "b": b}

    result = await run(p())
    assert result.output == {"report": "1.0/2.5/2", "b": [2, 3]}
    assert result.outputs["split"] == ([1], [2, 3])


async def test_steps_without_data_dependencies_respect_after() -> None:
    order: list[str] = []

    @step
    async def mark(label: str, delay: float) -> None:
        await anyio.sleep(delay)
        order.append(label)

    @pipeline
    def p():
        first = mark("first", 0.1)
        mark("second", 0, after=first)

    await run(p())
    assert order == ["first", "second"]


async def test_a_pipeline_def_without_params_can_be_run_directly() -> None:
    @pipeline
    def p():
        ok(41)

    result = await run(p)
    assert result.outputs["ok"] == 42


async def test_event_durations_and_step_timing() -> None:
    result, events = await run_collect(training())
    succ = [e for e in events if isinstance(e, StepSucceeded)]
    assert all(e.duration >= 0 for e in succ)
    for s in result.steps.values():
        assert s.started_at is not None and s.finished_at is not None and s.duration is not None
        assert s.started_at <= s.finished_at
