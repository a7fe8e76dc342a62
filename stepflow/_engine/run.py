"""``run()``: validate a pipeline against the available operators, then execute it."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import anyio

from stepflow._bus.bus import EventBus
from stepflow._dsl.pipeline import Pipeline, PipelineDef
from stepflow._engine.result import RunResult
from stepflow._operators.local import LocalStepOperator
from stepflow.errors import PipelineDefinitionError, UnknownOperatorError
from stepflow.interfaces.operator import StepOperator


def _as_pipeline(target: Pipeline | PipelineDef[Any]) -> Pipeline:
    if isinstance(target, Pipeline):
        return target
    if isinstance(target, PipelineDef):
        return target()
    raise TypeError(
        f"run() needs a pipeline: call your @pipeline function with its parameters, e.g. "
        f"run(training(lr=0.1)); got {type(target).__name__}"
    )


def resolve_operators(
    pipeline: Pipeline, given: Mapping[str, StepOperator] | None, stack: Any = None,
    client: Any = None,
) -> dict[str, StepOperator]:
    """Return the operators the pipeline needs, raising one error for every unknown name.

    Names come from ``given`` first, then from ``stack`` (a StackModel, its step operators
    instantiated through their flavors via ``client``), then the built-in ``local``.
    """
    given = dict(given or {})
    needed = pipeline.operators()
    resolved: dict[str, StepOperator] = {}
    missing: dict[str, list[str]] = {}
    stack_ops = set(stack.step_operators) if stack is not None else set()
    aliases = stack.aliases if stack is not None else {}
    for node in pipeline.nodes:
        op = node.step.step_operator
        if op is None or op in resolved or op in missing:
            if op in missing:
                missing[op].append(node.name)
            continue
        if op in given:
            resolved[op] = given[op]
        elif op in stack_ops:
            resolved[op] = client.instantiate("step_operator", op)
        elif op in aliases:  # the stack says which of its operators the name means here
            resolved[op] = client.instantiate("step_operator", aliases[op])
        elif op == "local":
            resolved[op] = LocalStepOperator()
        else:
            missing[op] = [node.name]
    if missing:
        known = sorted({*given, *stack_ops, *aliases, "local"})
        where = f" in stack '{stack.name}'" if stack is not None else ""
        lines = [
            f"step{'s' if len(steps) > 1 else ''} {', '.join(repr(s) for s in steps[:5])}"
            f"{' ...' if len(steps) > 5 else ''} use step_operator '{op}', which is not available{where}"
            for op, steps in missing.items()
        ]
        if stack is not None:
            wanted = " -s ".join([*stack.step_operators, *missing])
            hint = f"add it with `stepflow stack update {stack.name} -s {wanted}`"
        else:
            hint = "pass operators={...} to run()"
        raise UnknownOperatorError(
            "\n".join(lines) + f"\nknown step operators: {', '.join(known)}. Register one with "
            f"`stepflow step-operator register NAME --type=FLAVOR`, then {hint}."
        )
    for name, operator in resolved.items():
        if not operator.name:
            operator.name = name
    assert set(resolved) == needed
    return resolved


def validate_for_operators(pipeline: Pipeline, operators: Mapping[str, StepOperator]) -> None:
    """Check settings and picklability of steps bound to operators; raise listing every problem."""
    problems: list[str] = []
    for node in pipeline.nodes:
        name = node.step.step_operator
        if name is None:
            continue
        op = operators[name]
        settings = node.step.settings
        merged = {**settings.get(op.flavor, {}), **settings.get(name, {})}
        settings_class = getattr(op, "settings_class", None)
        if settings_class is not None and merged:
            from stepflow._config import options
            from stepflow.errors import ConfigError

            try:
                options.build(settings_class, merged, what="")
            except ConfigError as exc:
                problems.append(f"step '{node.name}': settings for '{name}'{exc}")
        resources = node.step.resources  # passed only when set: operators written before it take one argument
        found = op.validate_settings(merged, resources) if resources is not None else op.validate_settings(merged)
        for problem in found:
            problems.append(f"step '{node.name}': settings for '{name}': {problem}")
        if op.requires_pickling:
            problems.extend(_pickling_problems(node))
    if problems:
        raise PipelineDefinitionError(pipeline.name, problems)


def _pickling_problems(node: Any) -> list[str]:
    import cloudpickle

    from stepflow._dsl.step import StepOutput

    def strip(value: Any) -> Any:
        if type(value) is StepOutput:
            return None
        if isinstance(value, (list, tuple, set, frozenset)):
            return [strip(v) for v in value]
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        return value

    out = []
    try:
        cloudpickle.dumps(node.step.fn)
    except Exception as exc:
        out.append(f"step '{node.name}': its function cannot be pickled for a remote operator: {exc}")
    items = [*((f"argument {i}", a) for i, a in enumerate(node.args)),
             *((f"parameter '{k}'", v) for k, v in (node.kwargs or {}).items())]
    for label, value in items:
        try:
            cloudpickle.dumps(strip(value))
        except Exception as exc:
            out.append(
                f"step '{node.name}': {label} ({type(value).__name__}) cannot be pickled to send "
                f"it to operator '{node.step.step_operator}': {exc}"
            )
    return out


def prepare_runner(
    pipeline: Pipeline | PipelineDef[Any],
    *,
    event_bus: EventBus | None = None,
    operators: Mapping[str, StepOperator] | None = None,
    run_id: str | None = None,
    max_concurrency: int | None = None,
    operator_concurrency: Mapping[str, int] | None = None,
    fail_fast: bool = False,
    max_threads: int = 128,
    check_outputs: bool = True,
    stack: str | None = None,
    persist: bool | None = None,
    target: str | None = None,
    preloaded: Mapping[str, Any] | None = None,
) -> Any:
    """Validate everything a run needs and return a ready, not yet started, runner."""
    from stepflow._engine.scheduler import Runner  # deferred: asyncio is heavy to import
    from stepflow._stack.client import Client

    p = _as_pipeline(pipeline)
    client = Client()
    model = client.get_stack(stack or client.active_stack_name())
    ops = resolve_operators(p, operators, model, client)
    validate_for_operators(p, ops)
    sinks = [client.instantiate("event_sink", name) for name in model.event_sinks]
    remote = any(op.requires_pickling for op in ops.values())
    components: dict[str, Any] = {"artifact_store": client.instantiate("artifact_store", model.artifact_store)}
    if remote and model.container_registry:
        components["container_registry"] = client.instantiate("container_registry", model.container_registry)
    if remote and model.image_builder:
        components["image_builder"] = client.instantiate("image_builder", model.image_builder)
    if persist is None:
        persist = remote  # remote job handles must survive a crash of this process
    run_store = None
    if persist:
        from stepflow._store.runs import RunStore

        run_store = RunStore(client.store)
    return Runner(
        p, bus=event_bus or EventBus(), operators=ops, run_id=run_id,
        max_concurrency=max_concurrency, operator_concurrency=operator_concurrency,
        fail_fast=fail_fast, max_threads=max_threads, check_outputs=check_outputs,
        stack=model.name, sinks=sinks, components=components, run_store=run_store,
        target=target if target is not None else _resumable_target(p), preloaded=preloaded,
        cache_dir=client.store.home / "cache", home=client.store.home, resumed=preloaded is not None,
    )


def _resumable_target(p: Pipeline) -> str | None:
    import json

    target = p.target()
    if target is None:
        return None
    try:
        json.dumps(p.params)
    except (TypeError, ValueError):
        return None  # parameters that cannot be stored cannot be replayed
    return target


async def run(
    pipeline: Pipeline | PipelineDef[Any],
    *,
    event_bus: EventBus | None = None,
    operators: Mapping[str, StepOperator] | None = None,
    run_id: str | None = None,
    max_concurrency: int | None = None,
    operator_concurrency: Mapping[str, int] | None = None,
    fail_fast: bool = False,
    max_threads: int = 128,
    check_outputs: bool = True,
    stack: str | None = None,
    persist: bool | None = None,
) -> RunResult:
    """Run a pipeline and return its :class:`RunResult`.

    Every step whose inputs are ready starts at once, bounded by ``max_concurrency`` (all
    steps) and ``operator_concurrency`` (per operator name). A failed step's descendants are
    skipped while independent branches finish; ``fail_fast=True`` cancels the rest instead.
    Events go to ``event_bus`` and to the stack's event sinks. Step operator names resolve
    against ``operators`` (live objects by name), then the step operators of ``stack`` (default:
    the active stack), then the built-in ``local``. Sync steps run in at most ``max_threads``
    worker threads. Step outputs must be picklable unless ``check_outputs=False``.
    ``persist`` records the run, its events, remote job handles and step outputs in the run
    store so ``stepflow resume`` can finish it after a crash (default: on when any step runs
    on a remote operator; the CLI always persists). If the
    caller cancels, running steps are cancelled (remote jobs stopped), reported as cancelled,
    and the cancellation propagates.
    """
    runner = prepare_runner(
        pipeline, event_bus=event_bus, operators=operators, run_id=run_id,
        max_concurrency=max_concurrency, operator_concurrency=operator_concurrency,
        fail_fast=fail_fast, max_threads=max_threads, check_outputs=check_outputs, stack=stack,
        persist=persist,
    )
    result: RunResult = await runner.execute()
    return result


def run_sync(pipeline: Pipeline | PipelineDef[Any], **options: Any) -> RunResult:
    """Blocking :func:`run` for code without an event loop (same options)."""
    return anyio.run(functools.partial(run, pipeline, **options))


async def resume(run_id: str, *, event_bus: EventBus | None = None, **options: Any) -> RunResult:
    """Finish an interrupted run: reuse stored outputs, re-attach to recorded remote jobs.

    Steps whose outputs were stored are not run again; a remote step whose job was recorded
    is re-attached (its output read, or the job awaited) instead of being submitted again.
    """
    runner = prepare_resume(run_id, event_bus=event_bus, **options)
    result: RunResult = await runner.execute()
    return result


def prepare_resume(run_id: str, *, event_bus: EventBus | None = None, **options: Any) -> Any:
    """Validate that ``run_id`` can be resumed and return a ready runner."""
    import os
    import socket

    from stepflow._engine.loader import load_target
    from stepflow._store.runs import RunStore
    from stepflow._store.sqlite import Store
    from stepflow.errors import StepflowError
    from stepflow.remote._io import read_uri

    runs = RunStore(Store())
    record = runs.get_run(run_id)
    if record.status == "succeeded":
        raise StepflowError(f"run {run_id} already succeeded; nothing to resume")
    if record.status == "running" and record.pid != os.getpid():
        where = f"process {record.pid}" + (f" on {record.host}" if record.host != socket.gethostname() else "")
        raise StepflowError(f"run {run_id} is still running in {where}; stop it first (Ctrl-C there) or wait")
    if not record.target:
        raise StepflowError(f"run {run_id} was started from code stepflow cannot import again (a pipeline "
                            "defined in __main__ or in a function, or parameters that are not JSON); it "
                            "cannot be resumed")
    loaded = load_target(record.target)
    pipeline = loaded(**record.params) if isinstance(loaded, PipelineDef) else loaded
    stored = runs.steps(run_id)
    unknown = [s.step for s in stored if s.step not in pipeline.by_name]
    if unknown:
        raise StepflowError(f"run {run_id}: the pipeline changed since the run started (steps "
                            f"{', '.join(unknown[:5])} no longer exist); start a new run instead")
    from stepflow._store import keys
    from stepflow._store.outputs import load_outputs
    from stepflow.remote._keys import stored_value_key

    home = runs.store.home

    def derive(purpose: str) -> bytes:
        return keys.derive(keys.master_key(home), purpose)

    preloaded = load_outputs(runs, run_id, stored_value_key(derive), read_uri)
    return prepare_runner(pipeline, event_bus=event_bus, run_id=run_id, stack=record.stack, persist=True,
                          target=record.target, preloaded=preloaded, **options)
