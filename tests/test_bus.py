"""Event bus: subscriptions, overflow policy, isolation of bad subscribers and sinks, sinks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from stepflow import ConsoleSink, EventBus, EventSink, JsonlSink, pipeline, read_jsonl, run, step
from stepflow.events import (
    EVENT_TYPES,
    Event,
    RunFinished,
    RunStarted,
    SinkFailed,
    StepEvent,
    StepStarted,
    StepSucceeded,
    event_from_dict,
    event_to_dict,
)


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
