"""The in-process step operator."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import anyio

from stepflow.interfaces.operator import Invocation, StepOperator


class LocalStepOperator(StepOperator):
    """Runs steps in the runner's own process.

    Async steps run on the event loop, sync steps in worker threads (at most ``max_threads``
    at once).
    """

    flavor: ClassVar[str] = "local"

    def __init__(self, name: str = "local", *, max_threads: int = 128,
                 max_concurrency: int | None = None) -> None:
        self.name = name
        self.max_concurrency = max_concurrency
        self._max_threads = max_threads
        self._limiter: anyio.CapacityLimiter | None = None

    async def launch(self, invocation: Invocation) -> Any:
        if invocation.is_async:
            return await invocation.fn(*invocation.args, **invocation.kwargs)
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._max_threads)
        call = functools.partial(invocation.fn, *invocation.args, **invocation.kwargs)
        return await anyio.to_thread.run_sync(call, limiter=self._limiter, abandon_on_cancel=True)
