"""Built-in event sinks: JSON Lines file and structlog console."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Any

import anyio

from stepflow.events import (
    Event,
    LogLine,
    RunFinished,
    StepFailed,
    event_to_dict,
)
from stepflow.interfaces.sink import EventSink


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


class JsonlSink(EventSink):
    """Appends every event as one JSON object per line to ``path``.

    ``{run_id}`` in the path is replaced by the id of the first run it sees. Lines are buffered
    and written when 256 events are pending, at most 0.5 s after an event
    arrives, and on every ``flush`` (end of run): a crash loses at most that window, and a
    reader tailing the file sees events within half a second.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str], *, max_pending: int = 256,
                 max_delay: float = 0.5) -> None:
        self.path = Path(path)
        self._pending: list[str] = []
        self._file: IO[str] | None = None
        self._last_write = time.monotonic()
        self._max_pending = max_pending
        self._max_delay = max_delay
        self._timer: Any = None
        self._run_id: str | None = None

    def emit(self, event: Event) -> None:
        if self._run_id is None:
            self._run_id = event.run_id
        self._pending.append(json.dumps(event_to_dict(event), default=_json_default))
        if (len(self._pending) >= self._max_pending
                or time.monotonic() - self._last_write >= self._max_delay):
            self._write()
        elif self._timer is None:
            # A quiet period must not strand buffered events: write them after max_delay.
            try:
                import asyncio

                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._write()
            else:
                self._timer = loop.call_later(self._max_delay, self._timed_write)

    def _timed_write(self) -> None:
        self._timer = None
        if self._pending:
            self._write()

    def _write(self) -> None:
        if self._file is None:
            path = self.path
            if "{run_id}" in str(path) and self._run_id:  # one file per run
                path = Path(str(path).replace("{run_id}", self._run_id))
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")
        if self._pending:
            self._file.write("\n".join(self._pending) + "\n")
            self._pending.clear()
        self._file.flush()
        self._last_write = time.monotonic()

    async def flush(self) -> None:
        if self._pending:
            await anyio.to_thread.run_sync(self._write)

    async def aclose(self) -> None:
        await self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path: str | os.PathLike[str]) -> list[Event]:
    """Read events back from a file written by :class:`JsonlSink`."""
    from stepflow.events import event_from_dict

    with open(path, encoding="utf-8") as fh:
        return [event_from_dict(json.loads(line)) for line in fh if line.strip()]


class ConsoleSink(EventSink):
    """Logs each event as one structured line through structlog (imported on first use)."""

    name = "console"

    def __init__(self, *, show_logs: bool = True) -> None:
        self._logger: Any = None
        self._show_logs = show_logs

    def emit(self, event: Event) -> None:
        if self._logger is None:
            import structlog

            self._logger = structlog.get_logger("stepflow")
        if isinstance(event, LogLine) and not self._show_logs:
            return
        fields = event_to_dict(event)
        kind = fields.pop("type")
        fields.pop("ts", None)
        fields.pop("seq", None)
        if isinstance(event, StepFailed):
            self._logger.error(kind, **fields)
        elif isinstance(event, RunFinished) and event.status != "succeeded":
            self._logger.warning(kind, **fields)
        else:
            self._logger.info(kind, **fields)
