"""Event bus: handlers, subscriptions, overflow policy, isolation of bad subscribers and sinks, sinks."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepflow
from stepflow import ConsoleSink, EventBus, EventSink, JsonlSink, pipeline, read_jsonl, run, run_sync, step
from stepflow.events import (
    EVENT_TYPES,
    Event,
    RunFinished,
    RunStarted,
    SinkFailed,
    StepCancelled,
    StepEvent,
    StepFailed,
    StepStarted,
    StepSucceeded,
    SubscriberFailed,
    event_from_dict,
    event_to_dict,
)

README = Path(__file__).resolve().parent.parent / "README.md"


@step
async def noop(i: int) -> int:
    return i


@pipeline
def many(n: int = 200):
    for i in range(n):
        noop(i)


def ev(seq: int) -> StepStarted:
    return StepStarted("r1", seq, 0.0, f"s{seq}", 1, "in-process")


async def test_filters_by_type_predicate_and_run() -> None:
    bus = EventBus()
    async with bus.subscribe(StepStarted) as by_type, \
            bus.subscribe(lambda e: e.seq % 2 == 0) as by_pred, \
            bus.subscribe(run_id="other") as by_run:
        for i in range(1, 5):
            bus.publish(ev(i))
        bus.publish(RunFinished("r1", 5, 0.0, "succeeded", 1.0))
        assert [e.seq for e in by_type.pending()] == [1, 2, 3, 4]
        assert [e.seq for e in by_pred.pending()] == [2, 4]
        assert by_run.pending() == []


async def test_overflow_drop_oldest_and_drop_newest() -> None:
    bus = EventBus()
    async with bus.subscribe(buffer=3) as oldest, \
            bus.subscribe(buffer=3, overflow="drop_newest") as newest:
        for i in range(10):
            bus.publish(ev(i))
        assert [e.seq for e in oldest.pending()] == [7, 8, 9] and oldest.dropped == 7
        assert [e.seq for e in newest.pending()] == [0, 1, 2] and newest.dropped == 7


def test_bad_subscription_options() -> None:
    bus = EventBus()
    with pytest.raises(ValueError, match="overflow must be"):
        bus.open_subscription(overflow="block")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="buffer must be >= 1"):
        bus.open_subscription(buffer=0)


async def test_iteration_ends_when_closed_after_draining() -> None:
    bus = EventBus()
    got: list[int] = []
    async with bus.subscribe() as sub, anyio.create_task_group() as tg:
        async def consume() -> None:
            async for e in sub:
                got.append(e.seq)

        tg.start_soon(consume)
        for i in range(5):
            bus.publish(ev(i))
            await anyio.sleep(0)
        bus.publish(ev(5))
        sub.close()
    assert got == [0, 1, 2, 3, 4, 5]
    with pytest.raises(EOFError):
        await sub.receive()


async def test_a_stalled_subscriber_never_stalls_the_run() -> None:
    bus = EventBus()
    async with bus.subscribe(buffer=10) as never_read:
        t0 = time.perf_counter()
        result = await run(many(2000), event_bus=bus)
        assert time.perf_counter() - t0 < 5
        assert result.succeeded
        assert never_read.dropped > 0 and len(never_read.pending()) == 10


async def test_a_raising_subscriber_filter_is_detached_and_the_run_goes_on() -> None:
    bus = EventBus()

    def bad_filter(e: Event) -> bool:
        raise ZeroDivisionError("bug in subscriber")

    async with bus.subscribe(bad_filter) as bad, bus.subscribe(StepSucceeded) as good:
        result = await run(many(10), event_bus=bus)
        assert result.succeeded
        assert len(good.pending()) == 10
        assert bad.pending() == []
        with pytest.raises(EOFError):
            await bad.receive()


async def test_a_consumer_task_that_crashes_does_not_fail_the_run() -> None:
    bus = EventBus()
    crashed = []
    async with bus.subscribe() as sub:
        async def consumer() -> None:
            try:
                async for _ in sub:
                    raise RuntimeError("dashboard crashed")
            except RuntimeError as exc:
                crashed.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer)
            result = await run(many(50), event_bus=bus)
            sub.close()
    assert result.succeeded and crashed


class ExplodingSink(EventSink):
    name = "exploding"

    def __init__(self) -> None:
        self.seen = 0

    def emit(self, event: Event) -> None:
        self.seen += 1
        if self.seen == 3:
            raise OSError("disk full")


async def test_a_failing_sink_is_detached_and_reported() -> None:
    sink = ExplodingSink()
    bus = EventBus([sink])
    async with bus.subscribe(SinkFailed) as failures:
        result = await run(many(20), event_bus=bus)
        assert result.succeeded
        reports = failures.pending()
    assert sink.seen == 3
    assert len(reports) == 1 and reports[0].sink == "exploding" and "disk full" in reports[0].error
    assert sink not in bus.sinks


async def test_jsonl_sink_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "events" / "run.jsonl"
    sink = JsonlSink(path)
    bus = EventBus([sink])
    result = await run(many(3000), event_bus=bus)
    await bus.aclose()
    events = read_jsonl(path)
    assert len(events) == 2 + 3 * 3000
    assert isinstance(events[0], RunStarted) and isinstance(events[-1], RunFinished)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert {e.run_id for e in events} == {result.run_id}
    first = json.loads(path.read_text().splitlines()[0])
    assert first["type"] == "RunStarted" and first["params"] == {"n": 3000}


def test_every_event_type_round_trips() -> None:
    assert {"RunStarted", "StepFailed", "LogLine", "JobSubmitted", "ImagePushed"} <= set(EVENT_TYPES)
    sample: dict[str, Any] = {"run_id": "r", "seq": 1, "ts": 1.0}
    e = StepSucceeded(**sample, step="a", attempt=1, duration=0.5)
    assert event_from_dict(event_to_dict(e)) == e
    assert isinstance(e, StepEvent)
    with pytest.raises(ValueError, match="unknown event type"):
        event_from_dict({"type": "Nope"})
    with pytest.raises(AttributeError):
        e.step = "b"  # type: ignore[misc]


async def test_console_sink_logs_through_structlog(capsys: pytest.CaptureFixture[str]) -> None:
    bus = EventBus([ConsoleSink()])
    await run(many(2), event_bus=bus)
    out = capsys.readouterr().out
    assert "StepSucceeded" in out and "RunFinished" in out


# -- handlers: the README's pattern ------------------------------------------------------


@step
async def nap(i: int) -> int:
    await anyio.sleep(0.3)
    return i


@step
async def broken() -> None:
    raise ValueError("bad input")


@pipeline
def one_fails(n: int = 200):
    broken()
    for i in range(n - 1):
        nap(i)


def readme_blocks(section: str) -> list[str]:
    """The fenced python blocks of a README section, as written."""
    text = README.read_text(encoding="utf-8")
    heading = f"### {section}\n"
    start = text.index(heading) + len(heading)
    following = re.search(r"^#{2,3} ", text[start:], re.M)
    body = text[start:start + following.start()] if following else text[start:]
    return re.findall(r"```python\n(.*?)```", body, re.S)


async def exec_readme(source: str, namespace: dict[str, Any]) -> None:
    """Run a README block the way it reads: top-level ``await`` / ``async with`` allowed."""
    code = compile(source, str(README), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    coro = eval(code, namespace)
    if coro is not None:
        await coro


class FirstCallRaises:
    """Stands in for ``print``: the first call raises, as a broken alerting backend would."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(args)
        if len(self.calls) == 1:
            raise RuntimeError("alerting backend down")


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    """Every event published on any bus during the test."""
    seen: list[Event] = []
    original = EventBus.publish

    def spy(self: EventBus, event: Event) -> None:
        seen.append(event)
        original(self, event)

    monkeypatch.setattr(EventBus, "publish", spy)
    return seen


async def test_readme_handler_pattern_as_written_survives_a_handler_that_raises(
        published: list[Event], caplog: pytest.LogCaptureFixture) -> None:
    block = readme_blocks("Events")[0]
    assert "@bus.on(" in block and "async with" not in block
    boom = FirstCallRaises()
    ns: dict[str, Any] = {"__name__": "readme", "training": many, "print": boom}
    with caplog.at_level(logging.WARNING, logger="stepflow.bus"):
        await exec_readme(block, ns)
    result = ns["result"]
    assert result.succeeded
    assert sum(s.status == "succeeded" for s in result.steps.values()) == 200
    [failure] = [e for e in published if isinstance(e, SubscriberFailed)]
    assert failure.subscriber == "progress" and failure.event == "StepSucceeded"
    assert "alerting backend down" in failure.error and "RuntimeError" in failure.traceback
    assert failure.run_id == result.run_id
    assert len(boom.calls) == 1  # detached: never called again
    assert [h.name for h in ns["bus"].handlers] == ["alert"]
    assert any("progress" in r.getMessage() for r in caplog.records)


async def test_old_readme_pattern_a_raising_async_for_body_still_cancels_the_run(published: list[Event]) -> None:
    """The previous README pattern: the consumer's own loop body raises in the caller's task group.

    The bus cannot catch an exception raised by the caller's code, so the task group cancels
    ``run()`` and an ExceptionGroup escapes; the README now says so and shows handlers instead.
    """
    old_pattern = (
        "bus = stepflow.EventBus()\n"
        "async with bus.subscribe(StepFailed) as failures:      # a class, a tuple of classes, or a predicate\n"
        "    async with anyio.create_task_group() as tg:\n"
        "        async def alert():\n"
        "            async for ev in failures:\n"
        "                print(\"ALERT\", ev.step, ev.message)\n"
        "        tg.start_soon(alert)\n"
        "        result = await run(training(), event_bus=bus)\n"
        "        failures.close()                               # iteration ends after the buffer drains\n"
    )
    boom = FirstCallRaises()
    ns: dict[str, Any] = {"stepflow": stepflow, "anyio": anyio, "run": run, "StepFailed": StepFailed,
                          "training": one_fails, "print": boom}
    with pytest.raises(ExceptionGroup) as info:
        await exec_readme(old_pattern, ns)
    assert info.group_contains(RuntimeError, match="alerting backend down")
    assert "result" not in ns
    [finished] = [e for e in published if isinstance(e, RunFinished)]
    assert finished.status == "cancelled"
    assert not any(isinstance(e, StepSucceeded) for e in published)
    assert sum(isinstance(e, StepCancelled) for e in published) == 199


async def test_readme_streaming_pattern_with_consume_contains_the_error(published: list[Event]) -> None:
    block = readme_blocks("Events")[1]
    assert "failures.consume" in block
    seen: list[Event] = []

    async def send_to_dashboard(ev: Event) -> None:
        seen.append(ev)
        raise ConnectionError("dashboard down")

    ns: dict[str, Any] = {"anyio": anyio, "run": run, "StepFailed": StepFailed, "training": one_fails,
                          "bus": EventBus(), "send_to_dashboard": send_to_dashboard}
    await exec_readme(block, ns)
    result = ns["result"]
    assert result.status == "failed"  # the `broken` step, not the consumer
    assert sum(s.status == "succeeded" for s in result.steps.values()) == 199
    assert len(seen) == 1 and isinstance(seen[0], StepFailed)
    [failure] = [e for e in published if isinstance(e, SubscriberFailed)]
    assert failure.subscriber.endswith("send_to_dashboard") and "dashboard down" in failure.error


async def test_consume_returns_none_after_a_normal_end() -> None:
    bus = EventBus()
    got: list[int] = []
    sub = bus.open_subscription()
    for i in range(3):
        bus.publish(ev(i))
    sub.close()
    assert await sub.consume(lambda e: got.append(e.seq)) is None
    assert got == [0, 1, 2]


# -- handlers: behaviour -----------------------------------------------------------------


async def test_handlers_see_events_in_order_sync_and_async_outside_the_publisher() -> None:
    bus = EventBus()
    sync_seen: list[int] = []
    async_seen: list[int] = []
    tasks: set[asyncio.Task[Any] | None] = set()

    @bus.on(StepStarted)
    def on_sync(e: Event) -> None:
        tasks.add(asyncio.current_task())
        sync_seen.append(e.seq)

    @bus.on(lambda e: e.seq % 2 == 0)
    async def on_async(e: Event) -> None:
        await anyio.sleep(0)  # interleaves with publishing; order must still hold
        async_seen.append(e.seq)

    for i in range(500):
        bus.publish(ev(i))
        if i % 50 == 0:
            await anyio.sleep(0)
    bus.publish(RunFinished("r1", 500, 0.0, "succeeded", 1.0))
    assert len(sync_seen) < 500  # publish only buffers
    await bus.flush()
    assert sync_seen == list(range(500))
    assert async_seen == list(range(0, 501, 2))
    assert asyncio.current_task() not in tasks and len(tasks) == 1
    assert [h.handled for h in bus.handlers] == [500, 251]


async def test_handler_overflow_is_counted() -> None:
    bus = EventBus()
    oldest: list[int] = []
    newest: list[int] = []
    h_old = bus.add_handler(lambda e: oldest.append(e.seq), buffer=3)
    h_new = bus.add_handler(lambda e: newest.append(e.seq), buffer=3, overflow="drop_newest")
    for i in range(10):  # no await: nothing is handled meanwhile
        bus.publish(ev(i))
    await bus.flush()
    assert oldest == [7, 8, 9] and h_old.dropped == 7
    assert newest == [0, 1, 2] and h_new.dropped == 7
    with pytest.raises(ValueError, match="buffer must be >= 1"):
        bus.add_handler(print, buffer=0)
    with pytest.raises(ValueError, match="overflow must be"):
        bus.add_handler(print, overflow="block")  # type: ignore[arg-type]


async def test_a_raising_handler_is_detached_reported_and_publish_never_raises() -> None:
    bus = EventBus()
    reports: list[SubscriberFailed] = []
    calls = 0

    def bad(e: Event) -> None:
        nonlocal calls
        calls += 1
        raise KeyError("bug in handler")

    handle = bus.add_handler(bad, StepStarted, name="bad-handler")
    bus.add_handler(reports.append, SubscriberFailed)
    bus.publish(ev(1))  # returns: the handler has not even run
    bus.publish(ev(2))
    await bus.flush()
    assert calls == 1 and not handle.active and isinstance(handle.error, KeyError)
    assert handle not in bus.handlers
    [report] = reports
    assert report.subscriber == "bad-handler" and report.event_seq == 1 and report.seq == 0


async def test_a_handler_raising_cancelled_error_itself_is_detached() -> None:
    bus = EventBus()

    async def cancels(e: Event) -> None:
        raise asyncio.CancelledError

    handle = bus.add_handler(cancels)
    bus.publish(ev(1))
    await bus.flush()
    assert not handle.active and isinstance(handle.error, asyncio.CancelledError)


async def test_a_raising_subscription_filter_is_reported() -> None:
    bus = EventBus()
    reports: list[Event] = []
    bus.add_handler(reports.append, SubscriberFailed)

    def bad_filter(e: Event) -> bool:
        raise ZeroDivisionError("bug in filter")

    sub = bus.open_subscription(bad_filter)
    bus.publish(ev(1))
    await bus.flush()
    assert len(reports) == 1 and isinstance(reports[0], SubscriberFailed)
    assert reports[0].subscriber == "subscription(test_a_raising_subscription_filter_is_reported.<locals>.bad_filter)"
    with pytest.raises(EOFError):
        await sub.receive()


async def test_removing_handlers() -> None:
    bus = EventBus()
    got: list[int] = []

    @bus.on()
    def decorated(e: Event) -> None:
        got.append(e.seq)

    handle = bus.add_handler(lambda e: got.append(-e.seq))
    assert bus.active and len(bus.handlers) == 2
    bus.publish(ev(1))
    await bus.flush()
    assert got == [1, -1]
    bus.publish(ev(2))  # buffered, then discarded by the removal
    handle.remove()
    bus.remove_handler(decorated)
    await bus.flush()
    bus.publish(ev(3))
    await bus.flush()
    assert got == [1, -1]
    assert bus.handlers == () and not bus.active
    assert not handle.active and handle.error is None


async def test_flush_drains_handlers_within_the_drain_timeout() -> None:
    bus = EventBus(drain_timeout=0.2)
    got: list[int] = []

    @bus.on()
    async def slow(e: Event) -> None:
        await anyio.sleep(0.01)
        got.append(e.seq)

    for i in range(10):
        bus.publish(ev(i))
    await bus.flush(timeout=float("inf"))
    assert got == list(range(10))

    for i in range(10, 1000):
        bus.publish(ev(i))
    t0 = time.perf_counter()
    await bus.flush()  # gives up after drain_timeout; the rest goes on in the background
    assert time.perf_counter() - t0 < 1
    assert 10 < len(got) < 1000
    handler = bus.handlers[0]
    await bus.aclose()  # drains for drain_timeout again, then cancels
    assert bus.handlers == () and not handler.active
    done = len(got)
    await anyio.sleep(0.05)
    assert len(got) == done


async def test_a_slow_handler_does_not_slow_the_run() -> None:
    t0 = time.perf_counter()
    baseline_result = await run(many(200), event_bus=EventBus())
    baseline = time.perf_counter() - t0
    assert baseline_result.succeeded

    bus = EventBus()

    @bus.on(buffer=5)
    async def sluggish(e: Event) -> None:
        await anyio.sleep(0.02)

    t0 = time.perf_counter()
    result = await run(many(200), event_bus=bus)
    elapsed = time.perf_counter() - t0
    assert result.succeeded
    assert elapsed < baseline + 0.5
    [handler] = bus.handlers
    assert handler.dropped > 0 and handler.handled + handler.dropped == 2 + 3 * 200


async def test_handlers_outlive_the_callers_task_group() -> None:
    bus = EventBus()
    got: list[int] = []

    with anyio.CancelScope() as scope:
        @bus.on()
        async def keep(e: Event) -> None:
            await anyio.sleep(0.01)
            got.append(e.seq)

        bus.publish(ev(1))
        scope.cancel()
        await anyio.sleep(1)
    bus.publish(ev(2))
    await bus.flush()
    assert got == [1, 2]


def test_a_handler_keeps_working_across_event_loops() -> None:
    bus = EventBus()
    finished: list[str] = []
    bus.add_handler(lambda e: finished.append(e.status), RunFinished)
    bus.publish(ev(0))  # outside any loop: buffered until one runs
    run_sync(many(5), event_bus=bus)
    run_sync(many(5), event_bus=bus)
    assert finished == ["succeeded", "succeeded"]
