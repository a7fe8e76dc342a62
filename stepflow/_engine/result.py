"""What a run returns: per-step status, timing, errors and outputs."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from stepflow.errors import StepFailedError

StepStatus = Literal["pending", "queued", "running", "succeeded", "failed", "skipped", "cancelled"]
RunStatus = Literal["succeeded", "failed", "cancelled"]


@attrs.frozen(slots=True)
class StepError:
    """Why a step failed: exception type, message and full traceback text."""

    type: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


@attrs.define(slots=True)
class StepResult:
    """The outcome of one step in a run."""

    name: str
    status: StepStatus = "pending"
    operator: str = "in-process"
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: StepError | None = None
    reason: str | None = None

    @property
    def duration(self) -> float | None:
        """Seconds from the first attempt's start to the end (None if it never started)."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@attrs.define(slots=True)
class RunResult:
    """The outcome of a run: ``status``, ``steps[name]``, ``outputs[name]`` and ``output``.

    ``output`` is what the pipeline function returned, with step outputs filled in (None when
    a step it refers to did not succeed).
    """

    run_id: str
    pipeline: str
    status: RunStatus
    started_at: float
    finished_at: float
    steps: dict[str, StepResult]
    outputs: dict[str, Any]
    output: Any = None

    @property
    def duration(self) -> float:
        """Wall-clock seconds the run took."""
        return self.finished_at - self.started_at

    def __repr__(self) -> str:
        # Compact on purpose: outputs can be huge, and asyncio.run may repr a task's result.
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))
        return (f"<RunResult {self.run_id} {self.pipeline}: {self.status} in {self.duration:.2f}s "
                f"({counts or 'no steps'})>")

    @property
    def succeeded(self) -> bool:
        """True when every step succeeded."""
        return self.status == "succeeded"

    def counts(self) -> dict[str, int]:
        """Number of steps per status."""
        out: dict[str, int] = {}
        for s in self.steps.values():
            out[s.status] = out.get(s.status, 0) + 1
        return out

    def failed_steps(self) -> list[StepResult]:
        """Steps that failed, in run order."""
        return [s for s in self.steps.values() if s.status == "failed"]

    def raise_for_status(self) -> RunResult:
        """Raise :class:`~stepflow.errors.StepFailedError` unless the run succeeded."""
        if self.status != "succeeded":
            failed = self.failed_steps()
            detail = "; ".join(f"{s.name}: {s.error}" for s in failed[:5]) or self.status
            raise StepFailedError(f"run {self.run_id} of '{self.pipeline}' {self.status}: {detail}")
        return self
