"""The step context: which run, step and attempt the current code belongs to."""

from __future__ import annotations

import contextvars

import attrs

_CTX: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
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
    return _CTX.get()


def _set_context(ctx: StepContext | None, token: contextvars.Token[StepContext | None] | None = None
                 ) -> contextvars.Token[StepContext | None] | None:
    if token is not None:
        _CTX.reset(token)
        return None
    return _CTX.set(ctx)
