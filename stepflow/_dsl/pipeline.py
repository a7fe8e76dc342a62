"""``@pipeline``: record a DAG by calling steps; validate it before anything runs."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, Generic, ParamSpec, overload

from stepflow._dsl.step import _RECORDER, Step, StepOutput
from stepflow.errors import PipelineDefinitionError

P = ParamSpec("P")

_SCALARS = frozenset({int, float, str, bool, type(None), bytes, complex})
_CONTAINERS = (list, tuple, dict, set, frozenset)


def current_recorder() -> _Recorder | None:
    """The pipeline being recorded in this context, if any."""
    recorder: _Recorder | None = _RECORDER.get()
    return recorder


class StepNode:
    """One invocation of a step inside a pipeline (immutable once the pipeline is built)."""

    __slots__ = ("after", "args", "deps", "index", "kwargs", "name", "resolve", "step")

    def __init__(self, index: int, name: str, step: Step[Any, Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any] | None, deps: tuple[int, ...], resolve: bool,
                 after: tuple[str, ...]) -> None:
        self.index = index
        self.name = name
        self.step = step
        self.args = args
        self.kwargs = kwargs
        self.deps = deps
        self.resolve = resolve
        self.after = after

    @property
    def operator(self) -> str | None:
        """Name of the step operator that runs this node (None: in-process)."""
        return self.step.step_operator

    def __repr__(self) -> str:
        return f"<StepNode {self.name} deps={list(self.deps)}>"


def _scan(value: Any, recorder: _Recorder, deps: list[int], problems: list[str], where: str) -> bool:
    """Collect the step outputs referenced by ``value``; True when it holds any."""
    cls = type(value)
    if cls in _SCALARS:
        return False
    if cls is StepOutput:
        if value._recorder is not recorder:
            problems.append(
                f"{where} receives the output of step '{value.step_name}' recorded in another "
                f"pipeline ('{value._recorder.pipeline}'); outputs cannot cross pipelines"
            )
            return False
        deps.append(value._node)
        return True
    if isinstance(value, _CONTAINERS):
        found = False
        items = value.values() if isinstance(value, dict) else value
        for item in items:
            found = _scan(item, recorder, deps, problems, where) or found
        if isinstance(value, dict):
            for key in value:
                if type(key) is StepOutput:
                    problems.append(f"{where} uses a step output as a dict key; use it as a value")
        return found
    return False


class _Recorder:
    """Collects step invocations while a pipeline function runs."""

    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline
        self.nodes: list[StepNode] = []
        self.names: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self.explicit: set[str] = set()
        self.problems: list[str] = []

    def _after(self, after: Any, deps: list[int], where: str) -> tuple[str, ...]:
        names: list[str] = []
        for item in _as_list(after):
            if isinstance(item, StepOutput):
                if item._recorder is not self:
                    self.problems.append(f"{where}: after= names a step of another pipeline")
                else:
                    deps.append(item._node)
            elif isinstance(item, Step):
                names.append(item.name)
            elif isinstance(item, str):
                names.append(item)
            else:
                self.problems.append(
                    f"{where}: after= takes step outputs or step names, got {type(item).__name__}"
                )
        return tuple(names)

    def _name_for(self, step: Step[Any, Any]) -> str:
        base = step.name
        if step.explicit_name:
            if base in self.names:
                self.problems.append(
                    f"duplicate step name '{base}': explicit names must be unique in a pipeline; "
                    f"pass a different name with {step.fn.__name__}.with_options(name=...)"
                )
            self.explicit.add(base)
            return base
        n = self.counters.get(base, 0)
        name = base if n == 0 else f"{base}_{n + 1}"
        while name in self.names:
            n += 1
            name = f"{base}_{n + 1}"
        self.counters[base] = n + 1
        return name

    def record(self, step: Step[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any],
               after: Any) -> StepOutput:
        # Hot path when building big DAGs: keep the common case (scalars and plain handles,
        # no after=) free of extra calls and allocations.
        index = len(self.nodes)
        name = self._name_for(step)
        problem = step.check_call(args, kwargs)
        if problem is not None:
            self.problems.append(f"step '{name}': {problem}")
        deps: list[int] = []
        resolve = False
        for a in (*args, *kwargs.values()) if kwargs else args:
            cls = type(a)
            if cls in _SCALARS:
                continue
            if cls is StepOutput and a._recorder is self:
                deps.append(a._node)
                resolve = True
            elif _scan(a, self, deps, self.problems, f"step '{name}'"):
                resolve = True
        after_names: tuple[str, ...] = ()
        if after is not None:
            after_names = self._after(after, deps, f"step '{name}'")
        node = StepNode(index, name, step, args, kwargs or None,
                        tuple(sorted(set(deps))) if len(deps) > 1 else tuple(deps),
                        resolve, after_names)
        self.nodes.append(node)
        self.names.setdefault(name, index)
        return StepOutput(self, index)


def _as_list(after: Any) -> Iterable[Any]:
    if after is None:
        return ()
    if isinstance(after, (list, tuple, set, frozenset)):
        return after
    return (after,)


class Pipeline:
    """A recorded, validated, immutable DAG of steps, ready to be run."""

    __slots__ = ("_recorder", "by_name", "children", "definition", "name", "nodes", "output", "params")

    def __init__(self, name: str, params: dict[str, Any], recorder: _Recorder, output: Any) -> None:
        self.name = name
        self.params = params
        self.nodes: tuple[StepNode, ...] = tuple(recorder.nodes)
        self.by_name: dict[str, int] = recorder.names
        self.output = output
        self._recorder = recorder
        #: The @pipeline function this was recorded from (used to re-create it on resume).
        self.definition: PipelineDef[Any] | None = None
        children: list[list[int]] = [[] for _ in self.nodes]
        for node in self.nodes:
            for d in node.deps:
                children[d].append(node.index)
        self.children = children

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return f"<Pipeline {self.name}: {len(self.nodes)} steps>"

    @property
    def step_names(self) -> list[str]:
        """Step names in recording order."""
        return [n.name for n in self.nodes]

    def target(self) -> str | None:
        """``module:attribute`` that re-creates this pipeline in another process, if any."""
        fn = getattr(self.definition, "fn", None)
        if fn is None or fn.__module__ == "__main__" or "<locals>" in fn.__qualname__:
            return None
        return f"{fn.__module__}:{fn.__name__}"

    def operators(self) -> set[str]:
        """Names of every step operator the pipeline's steps ask for."""
        return {n.step.step_operator for n in self.nodes if n.step.step_operator is not None}

    def upstream(self, name: str) -> list[str]:
        """Names of the steps ``name`` depends on directly."""
        return [self.nodes[d].name for d in self.nodes[self.by_name[name]].deps]


def _resolve_after(recorder: _Recorder) -> None:
    for node in recorder.nodes:
        if not node.after:
            continue
        extra = []
        for target in node.after:
            idx = recorder.names.get(target)
            if idx is None:
                recorder.problems.append(
                    f"step '{node.name}': after='{target}' names no step of this pipeline "
                    f"(steps: {_some(recorder.names)})"
                )
            elif idx == node.index:
                recorder.problems.append(f"step '{node.name}' cannot run after itself")
            else:
                extra.append(idx)
        node.deps = tuple(sorted(set(node.deps) | set(extra)))


def _some(names: Iterable[str], limit: int = 10) -> str:
    items = list(names)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def find_cycle(nodes: tuple[StepNode, ...] | list[StepNode]) -> list[str] | None:
    """Return one dependency cycle as a list of step names (first name repeated last), or None."""
    indegree = [len(n.deps) for n in nodes]
    children: list[list[int]] = [[] for _ in nodes]
    for n in nodes:
        for d in n.deps:
            children[d].append(n.index)
    ready = [i for i, c in enumerate(indegree) if c == 0]
    seen = 0
    while ready:
        i = ready.pop()
        seen += 1
        for c in children[i]:
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    if seen == len(nodes):
        return None
    # Every node left has a dependency that is also left: walk deps until one repeats.
    left = {i for i, c in enumerate(indegree) if c > 0}
    start = min(left)
    path: list[int] = []
    pos: dict[int, int] = {}
    cur = start
    while cur not in pos:
        pos[cur] = len(path)
        path.append(cur)
        cur = next(d for d in nodes[cur].deps if d in left)
    cycle = path[pos[cur]:]
    cycle.reverse()  # deps point upstream; show the direction data flows
    return [nodes[i].name for i in [*cycle, cycle[0]]]


class PipelineDef(Generic[P]):
    """A function decorated with :func:`pipeline`; call it to record a :class:`Pipeline`."""

    def __init__(self, fn: Callable[P, Any], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        self.signature = inspect.signature(fn)
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<pipeline {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Pipeline:
        if current_recorder() is not None:
            raise PipelineDefinitionError(self.name, [
                "pipelines cannot be called inside another pipeline; call its steps directly"
            ])
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise PipelineDefinitionError(self.name, [f"bad pipeline parameters: {exc}"]) from None
        bound.apply_defaults()
        recorder = _Recorder(self.name)
        token = _RECORDER.set(recorder)
        try:
            output = self.fn(*bound.args, **bound.kwargs)
        finally:
            _RECORDER.reset(token)
        built = build_pipeline(self.name, dict(bound.arguments), recorder, output)
        built.definition = self
        return built


def build_pipeline(name: str, params: dict[str, Any], recorder: _Recorder, output: Any) -> Pipeline:
    """Validate what ``recorder`` collected and freeze it; raise listing every problem."""
    if not recorder.nodes:
        recorder.problems.append(
            "it recorded no steps: call at least one @step function inside the @pipeline "
            "function (is a helper missing @step, or does the function return early?)"
        )
    _resolve_after(recorder)
    # Data dependencies always point to earlier steps, so only after= names can close a cycle.
    forward = any(d > node.index for node in recorder.nodes if node.after for d in node.deps)
    if forward and not recorder.problems:
        cycle = find_cycle(recorder.nodes)
        if cycle:
            recorder.problems.append("dependency cycle: " + " -> ".join(cycle))
    if output is not None:
        _scan(output, recorder, [], recorder.problems, "the pipeline's return value")
    if recorder.problems:
        raise PipelineDefinitionError(name, recorder.problems)
    return Pipeline(name, params, recorder, output)


@overload
def pipeline(fn: Callable[P, Any], /) -> PipelineDef[P]: ...


@overload
def pipeline(*, name: str | None = None) -> Callable[[Callable[P, Any]], PipelineDef[P]]: ...


def pipeline(fn: Any = None, /, *, name: str | None = None) -> Any:
    """Declare a pipeline: a function whose step calls are recorded as a DAG, not executed.

    Calling the decorated function with its parameters returns a validated :class:`Pipeline`
    for :func:`stepflow.run`. Step calls return placeholders that can be passed to other steps.
    """
    if fn is not None:
        return PipelineDef(fn, name)
    return lambda f: PipelineDef(f, name)
