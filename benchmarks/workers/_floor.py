"""The raw-asyncio floor: what an asyncio runner cannot go below, shared by the benchmarks.

A hand-written executor with the same per-step bookkeeping stepflow does (status, start and end
timestamps, the output kept by name), on plain coroutines with ``asyncio.gather``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class Floor:
    """Hand-written executor with the same per-step bookkeeping as stepflow."""

    def __init__(self) -> None:
        self.status: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.outputs: dict[str, Any] = {}

    async def one(self, name: str, fn: Any, *args: Any) -> Any:
        self.status[name] = "running"
        self.started[name] = time.time()
        out = await fn(*args)
        self.finished[name] = time.time()
        self.status[name] = "succeeded"
        self.outputs[name] = out
        return out


async def src() -> int:
    return 1


async def noop(x: int) -> int:
    return x


async def nap(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


async def fanout(n: int) -> None:
    f = Floor()
    root = await f.one("source", src)
    await asyncio.gather(*(f.one(f"noop_{i}", noop, root) for i in range(n)))


async def chain(n: int) -> None:
    f = Floor()
    prev = await f.one("source", src)
    for i in range(n):
        prev = await asyncio.create_task(f.one(f"noop_{i}", noop, prev))


async def sleep(n: int, seconds: float) -> None:
    f = Floor()
    await asyncio.gather(*(f.one(f"nap_{i}", nap, seconds) for i in range(n)))
