"""The step operator interface: how a step's attempt is executed."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs

from stepflow.events import Event
from stepflow.interfaces.artifact_store import ArtifactStore
from stepflow.interfaces.container_registry import ContainerRegistry
from stepflow.interfaces.image_builder import ImageBuilder
from stepflow.resources import Resources


@attrs.frozen
class RunResources:
    """What a run hands its operators: the stack's live components, the run store, the keys.

    ``emit(EventClass, **fields)`` publishes a run-level event. ``derive_key(purpose)`` returns a
    32-byte key derived from the home's master key for that purpose only. ``resumed`` is true
    when the run continues an interrupted one (jobs may already exist on their backends).
    """

    run_id: str
    stack: str | None
    artifact_store: ArtifactStore | None
    container_registry: ContainerRegistry | None
    image_builder: ImageBuilder | None
    run_store: Any
    emit: Callable[..., None]
    cache_dir: Path
    home: Path
    derive_key: Callable[[str], bytes]
    resumed: bool = False


@attrs.frozen(slots=True)
class Invocation:
    """One attempt of one step, handed to a :class:`StepOperator`.

    ``args``/``kwargs`` are the resolved inputs (upstream outputs already substituted).
    ``settings`` are the step's settings for this operator (by operator name, then flavor).
    ``emit(EventClass, **fields)`` publishes a step event (``run_id``, ``seq``, ``ts`` and
    ``step`` are filled in), e.g. ``emit(LogLine, line="...")``.
    """

    run_id: str
    step: str
    attempt: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    settings: Mapping[str, Any]
    timeout: float | None
    is_async: bool
    emit: Callable[..., None]
    pipeline: str = ""
    resources: Resources | None = None


class StepOperator(abc.ABC):
    """Runs step attempts somewhere: in-process, in a container, on a cloud backend.

    The scheduler handles retries, timeouts and events around :meth:`launch`; an operator only
    runs one attempt and returns the step's output or raises its error. Cancellation arrives as
    the usual cancellation exception inside ``launch``; remote operators stop their backend job
    before re-raising.
    """

    #: The flavor name this class registers as (e.g. "local", "docker", "sagemaker").
    flavor: ClassVar[str] = ""
    #: True when steps must be serialized to reach the operator (inputs and function are then
    #: checked for picklability before the run starts).
    requires_pickling: ClassVar[bool] = False

    #: The registered component name (e.g. "sagemaker"); set by whoever creates the operator.
    name: str = ""
    #: Upper bound on concurrent attempts on this operator; None for no bound.
    max_concurrency: int | None = None

    @abc.abstractmethod
    async def launch(self, invocation: Invocation) -> Any:
        """Run one attempt of a step and return its output."""

    async def attach(self, resources: RunResources) -> None:  # noqa: B027 - optional hook
        """Receive the run's resources once, before :meth:`prepare` and any launch."""

    async def prepare(self) -> None:  # noqa: B027 - optional hook
        """Check, once per run and before any step starts, that this operator can work.

        Raise :class:`stepflow.errors.ConfigError` (or another StepflowError) naming what is
        wrong and how to fix it: the run then does not start, and the CLI exits with status 2.
        """

    def validate_settings(self, settings: Mapping[str, Any], resources: Resources | None = None) -> list[str]:
        """Problems with one step's ``settings`` and ``resources`` for this operator (empty when valid)."""
        return []

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources at the end of a run."""


EventEmitter = Callable[..., None]
__all__ = ["Event", "EventEmitter", "Invocation", "RunResources", "StepOperator"]
