"""Typed events: everything that happens during a run is published as one of these.

Events are frozen attrs classes. Each carries ``run_id`` (the run it belongs to), ``seq`` (a
per-run counter, strictly increasing in publication order) and ``ts`` (wall-clock seconds since
the epoch). Use :func:`event_to_dict` / :func:`event_from_dict` for a JSON-friendly form.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

__all__ = [
    "EVENT_TYPES",
    "ArtifactStored",
    "Event",
    "ImageBuildFinished",
    "ImageBuildStarted",
    "ImagePushed",
    "JobStatusChanged",
    "JobSubmitted",
    "LogLine",
    "RunFinished",
    "RunStarted",
    "SinkFailed",
    "StepCancelled",
    "StepEvent",
    "StepFailed",
    "StepQueued",
    "StepRetrying",
    "StepSkipped",
    "StepStarted",
    "StepSucceeded",
    "SubscriberFailed",
    "event_from_dict",
    "event_to_dict",
]

EVENT_TYPES: dict[str, type[Event]] = {}


@attrs.frozen(slots=True)
class Event:
    """Base of every event."""

    run_id: str
    seq: int
    ts: float

    kind: ClassVar[str] = "event"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        EVENT_TYPES[cls.__name__] = cls


@attrs.frozen(slots=True)
class RunStarted(Event):
    """A run began. ``step_count`` is the number of steps in its DAG."""

    pipeline: str
    step_count: int
    params: dict[str, Any] = attrs.field(factory=dict)
    stack: str | None = None


@attrs.frozen(slots=True)
class RunFinished(Event):
    """A run ended with ``status`` "succeeded", "failed" or "cancelled"."""

    status: str
    duration: float
    counts: dict[str, int] = attrs.field(factory=dict)


@attrs.frozen(slots=True)
class StepEvent(Event):
    """Base of events about one step."""

    step: str


@attrs.frozen(slots=True)
class StepQueued(StepEvent):
    """Every upstream step finished; the step waits for a free slot."""

    operator: str


@attrs.frozen(slots=True)
class StepStarted(StepEvent):
    """An attempt of the step started (attempts count from 1)."""

    attempt: int
    operator: str


@attrs.frozen(slots=True)
class StepRetrying(StepEvent):
    """An attempt failed; another starts after ``delay`` seconds."""

    attempt: int
    delay: float
    error: str


@attrs.frozen(slots=True)
class StepSucceeded(StepEvent):
    """The step finished and its output is available."""

    attempt: int
    duration: float


@attrs.frozen(slots=True)
class StepFailed(StepEvent):
    """The step failed for good. ``traceback`` is the full formatted traceback text."""

    attempt: int
    error_type: str
    message: str
    traceback: str


@attrs.frozen(slots=True)
class StepSkipped(StepEvent):
    """The step did not run because an upstream step failed or was skipped."""

    reason: str


@attrs.frozen(slots=True)
class StepCancelled(StepEvent):
    """The step was cancelled (run cancelled, fail-fast, or stopped on its backend)."""

    reason: str


@attrs.frozen(slots=True)
class ImageBuildStarted(Event):
    """A container image build started (or its cache lookup did)."""

    image: str
    step: str | None = None


@attrs.frozen(slots=True)
class ImageBuildFinished(Event):
    """A container image is available; ``cached`` tells whether a build was skipped."""

    image: str
    cached: bool
    duration: float
    step: str | None = None


@attrs.frozen(slots=True)
class ImagePushed(Event):
    """A container image was pushed to its registry."""

    image: str
    duration: float


@attrs.frozen(slots=True)
class JobSubmitted(StepEvent):
    """A remote job was submitted to a compute backend."""

    operator: str
    job_id: str
    attempt: int = 1


@attrs.frozen(slots=True)
class JobStatusChanged(StepEvent):
    """A remote job's backend status changed (``detail`` holds e.g. a secondary status)."""

    job_id: str
    status: str
    detail: str = ""


@attrs.frozen(slots=True)
class LogLine(StepEvent):
    """One line of output from a step (remote job logs, or captured local output)."""

    line: str
    stream: str = "stdout"


@attrs.frozen(slots=True)
class ArtifactStored(StepEvent):
    """A step's output or payload was written to the artifact store."""

    uri: str
    size: int


@attrs.frozen(slots=True)
class SinkFailed(Event):
    """An event sink raised and was detached; the run goes on without it."""

    sink: str
    error: str


@attrs.frozen(slots=True)
class SubscriberFailed(Event):
    """An event handler (or a subscription's filter) raised and was detached; the run goes on.

    The bus reports this outside the run's own sequence, so ``seq`` is 0; ``event`` and
    ``event_seq`` name the event being handled when ``subscriber`` raised.
    """

    subscriber: str
    error: str
    event: str = ""
    event_seq: int = 0
    traceback: str = ""


_FIELDS: dict[type[Event], tuple[str, ...]] = {}


def _fields_of(cls: type[Event]) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = tuple(f.name for f in attrs.fields(cls))
        _FIELDS[cls] = names
    return names


def event_to_dict(event: Event) -> dict[str, Any]:
    """Return a JSON-friendly dict of ``event`` with its class name under ``"type"``."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for name in _fields_of(type(event)):
        out[name] = getattr(event, name)
    return out


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event from :func:`event_to_dict` output (unknown keys are ignored)."""
    data = dict(data)
    cls = EVENT_TYPES.get(data.pop("type", ""))
    if cls is None:
        raise ValueError(f"unknown event type in {data!r}; known: {', '.join(sorted(EVENT_TYPES))}")
    names = set(_fields_of(cls))
    return cls(**{k: v for k, v in data.items() if k in names})
