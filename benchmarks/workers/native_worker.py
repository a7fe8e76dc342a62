"""stepflow and the raw-asyncio floor, one workload per process (run by ``python -m benchmarks``).

    python benchmarks/workers/native_worker.py fanout --n 10000 --reps 5 --contender stepflow

Both use async steps (stepflow's idiom; the floor is plain coroutines). The floor keeps the
same per-step bookkeeping stepflow does (status, start/end timestamps, output kept by name)
with ``asyncio.gather``: the physical lower bound of an asyncio runner.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

import _floor
import _harness as h

import stepflow
from stepflow import pipeline, step

# ---------------------------------------------------------------- stepflow


@step
async def source() -> int:
    return 1


@step
async def noop(x: int) -> int:
    return x


@step
async def nap(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@step
async def payload() -> bytes:
    return bytes(h.PAYLOAD_BYTES)


@step
async def transform(data: bytes) -> bytes:
    return h.rotate(data)


@step
async def join(parts: list[bytes]) -> int:
    return h.join_sizes(parts)


@pipeline
def fanout(n: int) -> None:
    root = source()
    for _ in range(n):
        noop(root)


@pipeline
def chain(n: int) -> None:
    prev = source()
    for _ in range(n):
        prev = noop(prev)


@pipeline
def sleepers(n: int) -> None:
    for _ in range(n):
        nap(h.SLEEP_SECONDS)


@pipeline
def diamond(n: int) -> int:
    src = payload()
    return join([transform(src) for _ in range(n)])


SF = {"fanout": fanout, "chain": chain, "sleep": sleepers, "diamond": diamond, "memory": fanout}


async def _sf_main(workload: str, n: int) -> None:
    result = await stepflow.run(SF[workload](n))  # build (record + validate) and run
    assert result.status == "succeeded", result.status
    if workload == "diamond":
        assert result.output == n * h.PAYLOAD_BYTES


def sf_once(workload: str, n: int) -> None:
    """Like the floor, the main coroutine returns nothing big (see sf_result_once)."""
    asyncio.run(_sf_main(workload, n))


def sf_result_once(workload: str, n: int) -> None:
    """The RunResult as the main task's result, as ``asyncio.run(stepflow.run(p))`` (or ``anyio.run``,
    ``run_sync``) leave it. On CPython 3.11, asyncio.run's SIGINT-handler restore (signal.getsignal ->
    enum ValueError message) repr()s the main task, and with it the whole RunResult, outputs included.
    """
    result = asyncio.run(stepflow.run(SF[workload](n)))
    assert result.status == "succeeded", result.status


# ---------------------------------------------------------------- raw asyncio floor
Floor = _floor.Floor


async def _payload() -> bytes:
    return bytes(h.PAYLOAD_BYTES)


async def _transform(data: bytes) -> bytes:
    return h.rotate(data)


async def _join(parts: list[bytes]) -> int:
    return h.join_sizes(parts)


async def floor_sleep(n: int) -> None:
    await _floor.sleep(n, h.SLEEP_SECONDS)


async def floor_diamond(n: int) -> None:
    f = Floor()
    src = await f.one("payload", _payload)
    parts = await asyncio.gather(*(f.one(f"transform_{i}", _transform, src) for i in range(n)))
    assert await f.one("join", _join, parts) == n * h.PAYLOAD_BYTES


FL = {"fanout": _floor.fanout, "chain": _floor.chain, "sleep": floor_sleep, "diamond": floor_diamond,
      "memory": _floor.fanout}


def floor_once(workload: str, n: int) -> None:
    asyncio.run(FL[workload](n))


# ---------------------------------------------------------------- memory


def memory(once: Any, workload_n: int) -> dict[str, Any]:
    """Bytes per step at n steps: RSS growth, then tracemalloc peak (fan-out and chain)."""
    steps = workload_n + 1
    gc.collect()
    base = h.rss_now()
    once("fanout", workload_n)
    rss_per_step = (h.peak_rss() - base) / steps
    out: dict[str, Any] = {"rss_bytes_per_step": rss_per_step}
    for shape in ("fanout", "chain"):
        gc.collect()
        tracemalloc.start()
        once(shape, workload_n)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out[f"tracemalloc_{shape}_bytes_per_step"] = peak / steps
    return out


def main() -> None:
    a = h.args(("stepflow", "floor", "stepflow-result"))
    once = {"stepflow": sf_once, "floor": floor_once, "stepflow-result": sf_result_once}[a.contender]
    if a.workload == "memory":
        once("fanout", 10)  # warm-up: imports, first-run caches
        mem = memory(once, a.n)
        h.emit({"times": [], "cpu": [], "n": a.n, "steps": a.n + 1, "ideal": 0.0, "memory": mem,
                "peak_rss": h.peak_rss(), "stepflow": stepflow.__version__})
        return
    res = h.measure(lambda n: once(a.workload, n), a)
    res["stepflow"] = stepflow.__version__
    h.emit(res)


if __name__ == "__main__":
    main()
