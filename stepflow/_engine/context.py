"""The step context: which run, step and attempt the current code belongs to."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import attrs

# Holds a plain tuple: building the attrs object only when asked keeps the per-attempt cost low.
_CTX: contextvars.ContextVar[tuple[str, str, int, str] | None] = contextvars.ContextVar(
    "stepflow_step_context", default=None
)


@attrs.frozen(slots=True)
class StepContext:
    """Identifies the running step attempt; see :func:`current_step`."""

    run_id: str
    step: str
    attempt: int
    pipeline: str


def current_step() -> StepContext | None:
    """The step attempt running in this context (also in a sync step's thread), else None."""
    raw = _CTX.get()
    return None if raw is None else StepContext(*raw)


@contextlib.contextmanager
def running_step(run_id: str, step: str, attempt: int, pipeline: str = "") -> Iterator[StepContext]:
    """Make :func:`current_step` answer for a step attempt running outside the runner (in a job).

    For plugin entrypoints: ``with running_step(run_id, step, attempt): result = fn(...)``.
    """
    token = _CTX.set((run_id, step, attempt, pipeline))
    try:
        yield StepContext(run_id, step, attempt, pipeline)
    finally:
        _CTX.reset(token)
