"""The run store's event sink: every event persisted, in batches, off the event loop."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio

from stepflow._store.runs import RunStore
from stepflow.events import Event
from stepflow.interfaces.sink import EventSink


class RunStoreSink(EventSink):
    """Buffers events and writes them to SQLite from a worker thread.

    A batch goes out when 500 events are pending or 0.2 s after the first pending one, and on
    ``flush`` (end of run). Batches are written in order, one at a time; nothing is dropped.
    """

    name = "run-store"

    def __init__(self, runs: RunStore, *, max_pending: int = 500, max_delay: float = 0.2) -> None:
        self.runs = runs
        self._pending: list[Event] = []
        self._max_pending = max_pending
        self._max_delay = max_delay
        self._timer: Any = None
        self._writer: asyncio.Task[None] | None = None
        self._lock: anyio.Lock | None = None

    def emit(self, event: Event) -> None:
        self._pending.append(event)
        if len(self._pending) >= self._max_pending:
            self._schedule()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._max_delay, self._schedule)

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        previous = self._writer
        self._writer = asyncio.get_running_loop().create_task(self._write(batch, previous))

    async def _write(self, batch: list[Event], previous: asyncio.Task[None] | None) -> None:
        if previous is not None:  # keep batches in order
            await asyncio.shield(previous)
        await anyio.to_thread.run_sync(self.runs.write_events, batch)

    async def flush(self) -> None:
        self._schedule()
        if self._writer is not None:
            await self._writer
