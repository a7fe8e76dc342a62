"""Small pieces every control plane uses: its command line's value types, and interruptible waits."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable
from typing import Any


def env_pair(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of a repeatable ``--env`` option."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def rate(text: str) -> float:
    """A fault-injection rate, between 0 and 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a rate is between 0 and 1, got {text}")
    return value


async def unless_set(event: asyncio.Event, work: Awaitable[Any], interrupted: type[Exception]) -> Any:
    """Await ``work`` unless ``event`` is set first (a job asked to stop): then raise ``interrupted``."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if not task.done():
        task.cancel()
        raise interrupted
    if event.is_set():
        raise interrupted
    return task.result()
