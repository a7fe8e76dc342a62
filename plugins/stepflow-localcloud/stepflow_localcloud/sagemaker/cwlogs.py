"""A training job's output into CloudWatch Logs (moto), batched while the job runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
#: PutLogEvents limits are 10,000 events and 1 MiB (message bytes + 26 per event); stay well under.
MAX_BATCH_EVENTS = 1000
MAX_BATCH_BYTES = 512 * 1024
MAX_EVENT_BYTES = 256 * 1024 - 26


class LogShipper:
    """Ships the lines of one log stream with PutLogEvents every ``interval`` seconds.

    Lines are stamped when they arrive, so a client polling GetLogEvents sees output while the
    job runs. Failures of the logs endpoint are logged and the lines dropped: logging must never
    fail a training job.
    """

    def __init__(self, client: Any, stream: str, *, group: str = LOG_GROUP, interval: float = 0.3,
                 ensure_group: Callable[[bool], Awaitable[None]] | None = None) -> None:
        self.client = client
        self.group = group
        self.stream = stream
        self.interval = interval
        self._ensure_group = ensure_group
        self._pending: list[dict[str, Any]] = []
        self._last_ts = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.shipped = 0

    async def start(self) -> None:
        """Create the stream (and the group when needed), then start shipping."""
        await self._create_stream()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def put(self, line: str) -> None:
        """Queue one line (without its newline); empty lines are skipped like the service does."""
        if not line.strip():
            return
        ts = max(int(time.time() * 1000), self._last_ts)  # a batch must be in chronological order
        self._last_ts = ts
        data = line.encode()
        if len(data) > MAX_EVENT_BYTES:
            line = data[:MAX_EVENT_BYTES].decode(errors="ignore")
        self._pending.append({"timestamp": ts, "message": line})
        if len(self._pending) >= MAX_BATCH_EVENTS:
            self._wake.set()

    async def close(self) -> None:
        """Ship what is left and stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task

    async def _create_stream(self) -> None:
        if self._ensure_group is not None:
            await self._ensure_group(False)
        for attempt in range(2):
            try:
                await self.client.create_log_stream(logGroupName=self.group, logStreamName=self.stream)
                return
            except self.client.exceptions.ResourceAlreadyExistsException:
                return
            except self.client.exceptions.ResourceNotFoundException:
                if attempt or self._ensure_group is None:
                    raise
                await self._ensure_group(True)  # the group is gone (moto was reset): make it again

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await self._flush()
            if self._closing and not self._pending:
                return

    async def _flush(self) -> None:
        while self._pending:
            batch: list[dict[str, Any]] = []
            size = 0
            for event in self._pending:
                cost = len(event["message"].encode()) + 26
                if batch and (len(batch) >= MAX_BATCH_EVENTS or size + cost > MAX_BATCH_BYTES):
                    break
                batch.append(event)
                size += cost
            del self._pending[:len(batch)]
            try:
                await self._put(batch)
            except Exception as exc:
                log.warning("dropping %d log lines of %s: %s", len(batch), self.stream, exc)

    async def _put(self, batch: list[dict[str, Any]]) -> None:
        try:
            await self.client.put_log_events(logGroupName=self.group, logStreamName=self.stream, logEvents=batch)
        except self.client.exceptions.ResourceNotFoundException:
            await self._create_stream()  # the logs service was reset under us: recreate and retry once
            await self.client.put_log_events(logGroupName=self.group, logStreamName=self.stream, logEvents=batch)
        self.shipped += len(batch)
