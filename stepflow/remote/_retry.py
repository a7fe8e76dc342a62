"""One retry policy for every backend call the remote path makes.

Backends never retry on their own: they classify errors (``TransientBackendError``, their
``is_transient``) and the policy decides. So one job submission sends at most ``attempts``
calls, whatever the backend, and a backend's ``Retry-After`` is honoured.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import attrs

from stepflow.errors import TransientBackendError

T = TypeVar("T")


def transient(exc: BaseException, classify: Callable[[BaseException], bool] | None = None) -> bool:
    """Whether ``exc`` is worth retrying: a TransientBackendError, or what ``classify`` says."""
    if isinstance(exc, TransientBackendError):
        return True
    if classify is None:
        return False
    try:
        return bool(classify(exc))
    except Exception:  # a broken classifier must not hide the original error
        return False


@attrs.frozen
class RetryPolicy:
    """Full-jitter exponential backoff: try ``attempts`` times, waiting up to ``base * 2**n`` (capped)."""

    attempts: int = 6
    base: float = 0.5
    cap: float = 20.0

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the first retry)."""
        if retry_after is not None and retry_after >= 0:
            return min(float(retry_after), self.cap * 3) * random.uniform(1.0, 1.2)
        return random.uniform(0, min(self.cap, self.base * 2 ** retry))

    async def call(self, fn: Callable[[], Awaitable[T]], *,
                   classify: Callable[[BaseException], bool] | None = None,
                   on_retry: Callable[[int, BaseException], None] | None = None) -> T:
        """Await ``fn()``; retry transient failures; re-raise the last one (or any fatal one)."""
        for attempt in range(1, self.attempts + 1):
            try:
                return await fn()
            except Exception as exc:
                if attempt >= self.attempts or not transient(exc, classify):
                    raise
                if on_retry is not None:
                    on_retry(attempt, exc)
                await anyio.sleep(self.delay(attempt, getattr(exc, "retry_after", None)))
        raise AssertionError("unreachable")
