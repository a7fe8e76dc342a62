"""Helpers for testing stepflow plugins and pipelines.

- :func:`capture_events` / :class:`EventCapture`: record every event a run publishes.
- :func:`temporary_home`: point ``STEPFLOW_HOME`` at a throw-away directory.
- :func:`check_step_operator_flavor` (and the async :func:`acheck_step_operator_flavor`): a
  conformance suite a step-operator flavor's own tests call, e.g.
  ``check_step_operator_flavor("subprocess", {"kill_grace_s": 2}, settings={"nice": 1})``.
- :class:`FakeJobBackend` (over a :class:`FakeJobService`): an in-process
  :class:`~stepflow.remote.JobBackend` double that simulates :func:`job_command` jobs on the
  event loop clock, with throttling, faults, lost answers and call counts (:class:`FakeStats`).
- :func:`check_job_backend` (and the async :func:`acheck_job_backend`): the conformance suite a
  JobBackend author runs against the real service, returning a :class:`JobBackendReport`.

Importing this package is cheap: the client, the scheduler, anyio and the remote path are
imported only when a helper runs or one of the names above is first used.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from stepflow.events import Event, StepEvent
from stepflow.interfaces.sink import EventSink

if TYPE_CHECKING:
    from stepflow._bus.bus import EventBus
    from stepflow._engine.result import RunResult
    from stepflow.testing._fake_backend import FakeJobBackend, FakeJobService, FakeStats, job_command
    from stepflow.testing._job_backend_check import JobBackendReport, acheck_job_backend, check_job_backend

__all__ = [
    "ConformanceReport",
    "EventCapture",
    "FakeJobBackend",
    "FakeJobService",
    "FakeStats",
    "JobBackendReport",
    "acheck_job_backend",
    "acheck_step_operator_flavor",
    "capture_events",
    "check_job_backend",
    "check_step_operator_flavor",
    "job_command",
    "temporary_home",
]

# The JobBackend helpers import the remote path: loaded on first use, so this package stays light.
_LAZY = {
    "FakeJobBackend": "_fake_backend",
    "FakeJobService": "_fake_backend",
    "FakeStats": "_fake_backend",
    "job_command": "_fake_backend",
    "JobBackendReport": "_job_backend_check",
    "acheck_job_backend": "_job_backend_check",
    "check_job_backend": "_job_backend_check",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stepflow.testing' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"stepflow.testing.{module}"), name)
    globals()[name] = value
    return value

E = TypeVar("E", bound=Event)


# --------------------------------------------------------------------------- events
class EventCapture(EventSink):
    """Every event published on a bus while attached, in publication order.

    It is attached as a sink rather than a subscription because sinks are lossless: a
    subscription's bounded buffer could drop events in a large run, and a test must see all.
    """

    name = "stepflow.testing.EventCapture"

    def __init__(self) -> None:
        #: The captured events, oldest first.
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        """Record one event (called by the bus)."""
        self.events.append(event)

    def of_type(self, cls: type[E] | tuple[type[E], ...]) -> list[E]:
        """The events that are instances of ``cls`` (a class or a tuple of classes)."""
        return [e for e in self.events if isinstance(e, cls)]

    def for_step(self, step: str) -> list[StepEvent]:
        """The events about step ``step``."""
        return [e for e in self.events if isinstance(e, StepEvent) and e.step == step]

    def kinds(self) -> list[str]:
        """The class name of every event, in order (handy in assertion messages)."""
        return [type(e).__name__ for e in self.events]

    def clear(self) -> None:
        """Forget what was captured so far."""
        self.events.clear()

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[Event]:
        return iter(list(self.events))


@contextlib.asynccontextmanager
async def capture_events(bus: EventBus) -> AsyncIterator[EventCapture]:
    """Collect every event published on ``bus`` inside the ``async with`` block.

    ``async with capture_events(bus) as events: await run(p, event_bus=bus)`` then
    ``events.of_type(StepFailed)``, ``events.for_step("train")`` or ``events.kinds()``.
    """
    capture = EventCapture()
    bus.add_sink(capture)
    try:
        yield capture
    finally:
        if capture in bus.sinks:
            bus.remove_sink(capture)


# --------------------------------------------------------------------------- home
@contextlib.contextmanager
def temporary_home(path: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Point ``STEPFLOW_HOME`` at a fresh temporary directory (or ``path``) for the block.

    The previous value is restored afterwards, and a directory this function created is
    removed. Components, stacks and runs registered inside never touch the user's home.
    """
    old = os.environ.get("STEPFLOW_HOME")
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="stepflow-home-", ignore_cleanup_errors=True)
        home = Path(tmp.name)
    else:
        home = Path(path).expanduser()
        home.mkdir(parents=True, exist_ok=True)
    os.environ["STEPFLOW_HOME"] = str(home)
    try:
        yield home
    finally:
        if old is None:
            os.environ.pop("STEPFLOW_HOME", None)
        else:
            os.environ["STEPFLOW_HOME"] = old
        if tmp is not None:
            tmp.cleanup()


# --------------------------------------------------------------------------- conformance
@attrs.frozen
class ConformanceReport:
    """What :func:`check_step_operator_flavor` verified.

    ``passed`` names every check that passed (all of them, or the suite would have raised),
    ``skipped`` those that did not apply (e.g. settings when none were given), ``durations``
    the seconds each check took.
    """

    flavor: str
    component: str
    passed: tuple[str, ...]
    skipped: tuple[str, ...]
    durations: dict[str, float]


#: Component and stack names the suite registers in its temporary home.
COMPONENT = "operator-under-test"
STACK = "conformance"

# The steps of the suite are plain module-level functions so an operator that ships steps to
# another process can import them by reference (``stepflow.testing`` is light to import).


def _conf_source() -> int:
    return 3


def _conf_add(a: int, b: int) -> int:
    return a + b


async def _conf_async_mul(a: int, b: int) -> int:
    import asyncio

    await asyncio.sleep(0)  # really suspends: the operator must drive a coroutine
    return a * b


def _conf_collect(*values: Any) -> list[Any]:
    return list(values)


def _conf_fail(token: str) -> None:
    raise ValueError(f"conformance check failure {token}")


def _conf_flaky(counter: str) -> int:
    # A file, not a global: each attempt may run in a fresh process.
    path = Path(counter)
    attempt = int(path.read_text() or "0") + 1 if path.exists() else 1
    path.write_text(str(attempt))
    if attempt == 1:
        raise RuntimeError("conformance: the first attempt fails on purpose")
    return attempt


def _conf_marker(marker: str) -> str:
    Path(marker).write_text(str(os.getpid()))
    return "ran"


async def _conf_sleep(marker: str, seconds: float) -> None:
    import asyncio

    Path(marker).write_text(str(os.getpid()))
    await asyncio.sleep(seconds)


class _Suite:
    """State shared by the checks of one conformance run."""

    def __init__(self, flavor: str, settings: Mapping[str, Any] | None, scratch: Path,
                 timeout: float, cancel_within: float) -> None:
        self.flavor = flavor
        self.settings = settings
        self.scratch = scratch
        self.timeout = timeout
        self.cancel_within = cancel_within
        self.passed: list[str] = []
        self.skipped: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self.durations: dict[str, float] = {}
        self._values: tuple[RunResult, EventCapture] | None = None

    # -- plumbing ------------------------------------------------------------------------
    async def check(self, name: str, fn: Callable[[], Awaitable[bool | None]]) -> None:
        """Run one check; record it as passed, skipped (``fn`` returned False) or failed."""
        started = time.monotonic()
        try:
            outcome = await fn()
        except AssertionError as exc:
            self.failures.append((name, str(exc)))
        except Exception as exc:
            self.failures.append((name, f"raised {type(exc).__name__}: {exc}"))
        else:
            (self.skipped if outcome is False else self.passed).append(name)
        self.durations[name] = round(time.monotonic() - started, 3)

    def step(self, fn: Callable[..., Any], name: str, *, on_operator: bool = True, **options: Any) -> Any:
        from stepflow._dsl.step import step

        return step(name=name, step_operator=COMPONENT if on_operator else None, **options)(fn)

    async def run(self, pipeline: Any) -> tuple[RunResult, EventCapture]:
        import anyio

        from stepflow._bus.bus import EventBus
        from stepflow._engine.run import run

        bus = EventBus()
        async with capture_events(bus) as events:
            with anyio.fail_after(self.timeout):
                result = await run(pipeline, event_bus=bus, stack=STACK)
        return result, events

    @staticmethod
    def explain(result: RunResult) -> str:
        errors = [f"{s.name}: {s.error.type}: {s.error.message}" for s in result.steps.values() if s.error]
        return f"run {result.status}" + (f" ({'; '.join(errors)})" if errors else "")

    # -- checks ----------------------------------------------------------------------------
    async def values(self) -> tuple[RunResult, EventCapture]:
        """One run feeding a local output through a sync and an async step to a local step."""
        if self._values is None:
            from stepflow._dsl.pipeline import pipeline

            source = self.step(_conf_source, "source", on_operator=False)
            sync_step = self.step(_conf_add, "sync_step")
            async_step = self.step(_conf_async_mul, "async_step")
            downstream = self.step(_conf_collect, "downstream", on_operator=False)

            @pipeline
            def conformance_values() -> Any:
                s = sync_step(source(), 4)
                return downstream(s, async_step(s, 2))

            self._values = await self.run(conformance_values())
        return self._values

    async def output_of(self, name: str, expected: Any) -> None:
        result, _ = await self.values()
        got = result.outputs.get(name, "<no output>")
        assert result.steps[name].status == "succeeded" and got == expected, (
            f"step '{name}' should return {expected!r}, got {got!r}; {self.explain(result)}")

    async def sync_step(self) -> None:
        await self.output_of("sync_step", 7)

    async def async_step(self) -> None:
        await self.output_of("async_step", 14)

    async def downstream(self) -> None:
        await self.output_of("downstream", [7, 14])

    async def operator_in_events(self) -> None:
        from stepflow.events import StepQueued, StepStarted, StepSucceeded

        result, events = await self.values()
        for name in ("sync_step", "async_step"):
            started = [e for e in events.of_type(StepStarted) if e.step == name]
            queued = [e for e in events.of_type(StepQueued) if e.step == name]
            assert started and all(e.operator == COMPONENT for e in started + queued), (
                f"StepQueued/StepStarted of '{name}' should name operator '{COMPONENT}', got "
                f"{[e.operator for e in queued + started]}")
            assert [e for e in events.of_type(StepSucceeded) if e.step == name], (
                f"no StepSucceeded for '{name}'; events: {events.kinds()}")
            assert result.steps[name].operator == COMPONENT, (
                f"RunResult.steps['{name}'].operator is {result.steps[name].operator!r}, not '{COMPONENT}'")

    async def failure(self) -> None:
        import inspect
        import uuid

        from stepflow._dsl.pipeline import pipeline

        token = uuid.uuid4().hex[:8]
        failing = self.step(_conf_fail, "failing_step")
        after = self.step(_conf_collect, "after_failure", on_operator=False)

        @pipeline
        def conformance_failure() -> Any:
            return after(failing(token))

        result, _ = await self.run(conformance_failure())
        res = result.steps["failing_step"]
        assert result.status == "failed" and res.status == "failed" and res.error is not None, (
            f"a step raising ValueError should fail the run; {self.explain(result)}")
        text = f"{res.error.type}: {res.error.message}"
        assert "ValueError" in text and f"conformance check failure {token}" in text, (
            f"the error should carry the original type and message (ValueError: conformance check "
            f"failure {token}), got {text!r}")
        lines, first = inspect.getsourcelines(_conf_fail)
        raise_line = first + next(i for i, line in enumerate(lines) if "raise ValueError" in line)
        assert "_conf_fail" in res.error.traceback and f"line {raise_line}" in res.error.traceback, (
            f"the traceback should point at the raising line (_conf_fail, line {raise_line}), got:\n"
            f"{res.error.traceback}")
        assert result.steps["after_failure"].status == "skipped", (
            f"the failed step's downstream should be skipped, is {result.steps['after_failure'].status}")

    async def retries(self) -> None:
        from stepflow._dsl.pipeline import pipeline
        from stepflow.events import StepRetrying, StepStarted

        counter = self.scratch / "attempts.txt"
        flaky = self.step(_conf_flaky, "flaky_step", retries=1, retry_delay=0.0, retry_jitter=0.0)

        @pipeline
        def conformance_retries() -> Any:
            return flaky(str(counter))

        result, events = await self.run(conformance_retries())
        assert result.status == "succeeded" and result.outputs.get("flaky_step") == 2, (
            f"a step failing on attempt 1 should succeed on attempt 2 (retries=1); "
            f"{self.explain(result)}; attempts counted: {counter.read_text() if counter.exists() else 0}")
        attempts = [e.attempt for e in events.of_type(StepStarted) if e.step == "flaky_step"]
        assert attempts == [1, 2] and events.of_type(StepRetrying), (
            f"expected StepStarted for attempts [1, 2] and a StepRetrying, got {attempts} "
            f"and {len(events.of_type(StepRetrying))} StepRetrying")

    async def settings_accepted(self) -> bool | None:
        if self.settings is None:
            return False
        from stepflow._dsl.pipeline import pipeline

        marker = self.scratch / "settings-ran.txt"
        configured = self.step(_conf_marker, "with_settings", settings={COMPONENT: dict(self.settings)})

        @pipeline
        def conformance_settings() -> Any:
            return configured(str(marker))

        result, _ = await self.run(conformance_settings())
        assert result.status == "succeeded" and result.outputs.get("with_settings") == "ran", (
            f"a step with settings {dict(self.settings)!r} should run; {self.explain(result)}")
        return None

    async def settings_refused(self) -> bool | None:
        from stepflow._dsl.pipeline import pipeline
        from stepflow._stack.client import Client
        from stepflow.errors import PipelineDefinitionError

        if Client().flavor("step_operator", self.flavor).settings_class is None:
            return False  # no settings class: nothing declares which keys are valid
        marker = self.scratch / "bogus-settings-ran.txt"
        bogus = self.step(_conf_marker, "bogus_settings",
                          settings={COMPONENT: {"no_such_setting_xyz": 1}})

        @pipeline
        def conformance_bogus_settings() -> Any:
            return bogus(str(marker))

        try:
            await self.run(conformance_bogus_settings())
        except PipelineDefinitionError as exc:
            assert "no_such_setting_xyz" in str(exc), f"the error should name the bad key: {exc}"
        else:
            raise AssertionError("an unknown settings key should raise PipelineDefinitionError before running")
        assert not marker.exists(), "the step ran although its settings were invalid"
        return None

    async def cancellation(self) -> None:
        import anyio

        from stepflow._bus.bus import EventBus
        from stepflow._dsl.pipeline import pipeline
        from stepflow._engine.run import run
        from stepflow.events import RunFinished, StepCancelled

        marker = self.scratch / "sleeping.txt"
        sleeper = self.step(_conf_sleep, "sleeping_step")

        @pipeline
        def conformance_cancel() -> Any:
            return sleeper(str(marker), 600.0)

        bus = EventBus()
        finished = anyio.Event()

        async def go() -> None:
            try:
                await run(conformance_cancel(), event_bus=bus, stack=STACK)
            finally:
                finished.set()

        async with capture_events(bus) as events:
            with anyio.move_on_after(self.timeout):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(go)
                    with anyio.move_on_after(self.timeout / 2):
                        while not marker.exists() and not finished.is_set():
                            await anyio.sleep(0.05)
                    assert marker.exists(), (
                        f"the sleeping step did not start within {self.timeout / 2:g} s; events: "
                        f"{events.kinds()}")
                    cancelled_at = time.monotonic()
                    tg.cancel_scope.cancel()
            took = time.monotonic() - cancelled_at
        cancelled = [e for e in events.of_type(StepCancelled) if e.step == "sleeping_step"]
        assert cancelled, f"cancelling the run should report StepCancelled; events: {events.kinds()}"
        assert took <= self.cancel_within, (
            f"the run took {took:.1f} s to stop after being cancelled (limit {self.cancel_within:g} s)")
        statuses = [e.status for e in events.of_type(RunFinished)]
        assert statuses == ["cancelled"], f"RunFinished should say cancelled, got {statuses}"


async def acheck_step_operator_flavor(
    flavor: str,
    config: Mapping[str, Any] | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
    home: str | os.PathLike[str] | None = None,
    timeout: float = 120.0,
    cancel_within: float = 10.0,
) -> ConformanceReport:
    """Async :func:`check_step_operator_flavor` (same arguments), for tests on an event loop."""
    from stepflow._stack.client import Client

    with temporary_home(home) as where, tempfile.TemporaryDirectory(prefix="stepflow-conformance-") as tmp:
        client = Client(where)
        try:
            client.register_component("step_operator", COMPONENT, flavor, dict(config or {}))
            client.register_stack(STACK, artifact_store="default", step_operators=[COMPONENT, "local"])
            client.set_active_stack(STACK)
            client.instantiate("step_operator", COMPONENT)
        except Exception as exc:
            raise AssertionError(
                f"step-operator flavor '{flavor}' failed conformance check 'register': cannot register "
                f"and create a component with config {dict(config or {})!r}: {type(exc).__name__}: {exc}"
            ) from exc
        suite = _Suite(flavor, settings, Path(tmp), timeout, cancel_within)
        for name, check in (
            ("sync step returns its value", suite.sync_step),
            ("async step returns its value", suite.async_step),
            ("outputs flow to a downstream local step", suite.downstream),
            ("step events name the operator", suite.operator_in_events),
            ("a raising step fails with its type, message and traceback", suite.failure),
            ("a failed attempt is retried", suite.retries),
            ("settings are accepted", suite.settings_accepted),
            ("unknown settings are refused before running", suite.settings_refused),
            ("cancelling the run cancels a running step", suite.cancellation),
        ):
            await suite.check(name, check)
    if suite.failures:
        details = "\n".join(f"  - check '{name}': {why}" for name, why in suite.failures)
        raise AssertionError(
            f"step-operator flavor '{flavor}' failed {len(suite.failures)} conformance check"
            f"{'s' if len(suite.failures) > 1 else ''}:\n{details}\n"
            f"passed: {', '.join(suite.passed) or 'none'}"
        )
    return ConformanceReport(flavor, COMPONENT, ("register", *suite.passed), tuple(suite.skipped),
                             suite.durations)


def check_step_operator_flavor(
    flavor: str,
    config: Mapping[str, Any] | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
    home: str | os.PathLike[str] | None = None,
    timeout: float = 120.0,
    cancel_within: float = 10.0,
) -> ConformanceReport:
    """Run the step-operator conformance suite against ``flavor``; raise AssertionError on failure.

    In a temporary ``STEPFLOW_HOME`` (or ``home``) it registers a component of ``flavor`` with
    ``config`` and a stack using it, then runs pipelines through it checking that: a sync and
    an async step return their values; outputs flow to a downstream local step; StepQueued and
    StepStarted name the operator; a raising step fails the run with the original exception
    type, message and a traceback pointing at the raising line; a failed attempt is retried
    (counted in a file, since attempts may run in other processes); ``settings`` (valid
    settings for the flavor, if given) are accepted and unknown keys refused before running;
    cancelling the run reports the sleeping step ``StepCancelled`` within ``cancel_within``
    seconds. Each pipeline must finish within ``timeout`` seconds.

    Every check runs; the AssertionError lists each failing check by name. Returns a
    :class:`ConformanceReport`. It runs its own event loop: from async tests await
    :func:`acheck_step_operator_flavor` instead. A plugin installed in this process after
    stepflow listed flavors needs ``stepflow._plugins.registry.refresh()`` first.
    """
    import anyio

    return anyio.run(functools.partial(
        acheck_step_operator_flavor, flavor, config, settings=settings, home=home, timeout=timeout,
        cancel_within=cancel_within,
    ))
