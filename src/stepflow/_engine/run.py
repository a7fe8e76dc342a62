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
        elif op == "local":
            resolved[op] = LocalStepOperator()
        else:
            missing[op] = [node.name]
    if missing:
        known = sorted({*given, *stack_ops, "local"})
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
        for problem in op.validate_settings(merged):
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
    return Runner(
        p, bus=event_bus or EventBus(), operators=ops, run_id=run_id,
        max_concurrency=max_concurrency, operator_concurrency=operator_concurrency,
        fail_fast=fail_fast, max_threads=max_threads, check_outputs=check_outputs,
        stack=model.name, sinks=sinks,
    )


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
) -> RunResult:
    """Run a pipeline and return its :class:`RunResult`.

    Every step whose inputs are ready starts at once, bounded by ``max_concurrency`` (all
    steps) and ``operator_concurrency`` (per operator name). A failed step's descendants are
    skipped while independent branches finish; ``fail_fast=True`` cancels the rest instead.
    Events go to ``event_bus`` and to the stack's event sinks. Step operator names resolve
    against ``operators`` (live objects by name), then the step operators of ``stack`` (default:
    the active stack), then the built-in ``local``. Sync steps run in at most ``max_threads``
    worker threads. Step outputs must be picklable unless ``check_outputs=False``. If the
    caller cancels, running steps are cancelled (remote jobs stopped), reported as cancelled,
    and the cancellation propagates.
    """
    runner = prepare_runner(
        pipeline, event_bus=event_bus, operators=operators, run_id=run_id,
        max_concurrency=max_concurrency, operator_concurrency=operator_concurrency,
        fail_fast=fail_fast, max_threads=max_threads, check_outputs=check_outputs, stack=stack,
    )
    result: RunResult = await runner.execute()
    return result


def run_sync(pipeline: Pipeline | PipelineDef[Any], **options: Any) -> RunResult:
    """Blocking :func:`run` for code without an event loop (same options)."""
    return anyio.run(functools.partial(run, pipeline, **options))
