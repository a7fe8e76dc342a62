"""``@step``: the unit of work, and the placeholder its call returns inside a pipeline."""

from __future__ import annotations

import contextvars
import functools
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, ParamSpec, TypeVar, overload

from stepflow.errors import StepOutputUsageError
from stepflow.resources import Resources

P = ParamSpec("P")
R = TypeVar("R")

#: The pipeline recorder active in this context (set by ``PipelineDef.__call__``).
_RECORDER: contextvars.ContextVar[Any] = contextvars.ContextVar("stepflow_recorder", default=None)


class StepOutput:
    """Placeholder for a step's output while a pipeline is being recorded.

    It can be passed to other steps (directly or inside lists, tuples, dicts), unpacked when the
    step declares several outputs, and nothing else: the value exists only when the run executes.
    """

    __slots__ = ("_index", "_node", "_recorder")

    def __init__(self, recorder: Any, node: int, index: int | None = None) -> None:
        self._recorder = recorder
        self._node = node
        self._index = index

    @property
    def step_name(self) -> str:
        """Name of the step producing this output."""
        return str(self._recorder.nodes[self._node].name)

    def _describe(self) -> str:
        suffix = "" if self._index is None else f"[{self._index}]"
        return f"{self.step_name}(){suffix}"

    def __repr__(self) -> str:
        return f"<StepOutput of {self._describe()}>"

    def _misuse(self, what: str, hint: str = "") -> StepOutputUsageError:
        return StepOutputUsageError(
            f"{what} on the output of step '{self.step_name}' inside pipeline "
            f"'{self._recorder.pipeline}': inside a @pipeline function steps are recorded, not "
            f"run, so `{self._describe()}` is a placeholder with no value yet. Pass it to another "
            "@step and use the value inside that step." + (f" {hint}" if hint else "")
        )

    def _outputs(self) -> int | None:
        node = self._recorder.nodes[self._node]
        return None if self._index is not None else node.step.outputs_count

    def __iter__(self) -> typing.Iterator[StepOutput]:
        count = self._outputs()
        if count is None:
            raise self._misuse(
                "iteration/unpacking",
                "To unpack several outputs declare them: @step(outputs=2) or "
                "@step(outputs=('train', 'test')) or annotate the return as tuple[A, B]."
            )
        return iter([StepOutput(self._recorder, self._node, i) for i in range(count)])

    def __getitem__(self, key: int | str) -> StepOutput:
        node = self._recorder.nodes[self._node]
        names = node.step.output_names
        count = self._outputs()
        if count is None:
            raise self._misuse(
                f"indexing with [{key!r}]",
                "Only steps that declare several outputs can be indexed in a pipeline."
            )
        if isinstance(key, str):
            if key not in names:
                raise StepOutputUsageError(
                    f"step '{node.name}' has no output named {key!r}; its outputs: {', '.join(names)}"
                )
            return StepOutput(self._recorder, self._node, names.index(key))
        if not isinstance(key, int) or not -count <= key < count:
            raise StepOutputUsageError(
                f"step '{node.name}' declares {count} outputs; index {key!r} is out of range"
            )
        return StepOutput(self._recorder, self._node, key % count)

    def __len__(self) -> int:
        count = self._outputs()
        if count is None:
            raise self._misuse("len()")
        return count

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise self._misuse(f"attribute access `.{name}`")

    def __bool__(self) -> bool:
        raise self._misuse("truth test (if/while/and/or)")

    def __format__(self, spec: str) -> str:
        raise self._misuse("string formatting")

    def __float__(self) -> float:
        raise self._misuse("float()")

    def __int__(self) -> int:
        raise self._misuse("int()")

    def __index__(self) -> int:
        raise self._misuse("use as an index")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._misuse("calling")

    __hash__ = object.__hash__


def _binop(name: str) -> Callable[..., Any]:
    def op(self: StepOutput, *_: Any) -> Any:
        raise self._misuse(f"operator `{name}`")

    return op


for _op, _sym in {
    "__add__": "+", "__radd__": "+", "__sub__": "-", "__rsub__": "-", "__mul__": "*",
    "__rmul__": "*", "__truediv__": "/", "__rtruediv__": "/", "__floordiv__": "//",
    "__mod__": "%", "__pow__": "**", "__matmul__": "@", "__neg__": "-", "__abs__": "abs",
    "__lt__": "<", "__le__": "<=", "__gt__": ">", "__ge__": ">=", "__contains__": "in",
    "__and__": "&", "__or__": "|",
}.items():
    setattr(StepOutput, _op, _binop(_sym))


class Step(Generic[P, R]):
    """A function decorated with :func:`step`.

    Called inside a ``@pipeline`` function it records a node and returns a :class:`StepOutput`;
    called anywhere else it simply runs the function (handy in unit tests).
    """

    __slots__ = (
        "__dict__",
        "_accepts_after",
        "_max_positional",
        "_param_names",
        "_required",
        "_required_kwonly",
        "_required_positional",
        "_signature",
        "_varargs",
        "_varkw",
        "explicit_name",
        "fn",
        "is_async",
        "name",
        "output_names",
        "outputs_count",
        "resources",
        "retries",
        "retry_backoff",
        "retry_delay",
        "retry_jitter",
        "retry_max_delay",
        "retry_on",
        "settings",
        "step_operator",
        "timeout",
    )

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        step_operator: str | None = None,
        retries: int = 0,
        retry_delay: float = 1.0,
        retry_backoff: float = 2.0,
        retry_jitter: float = 0.2,
        retry_max_delay: float = 60.0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        timeout: float | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        outputs: int | Sequence[str] | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@step needs a function, got {fn!r}")
        _check_options(fn, retries, retry_delay, retry_backoff, retry_jitter, timeout, settings)
        self.fn = fn
        self.explicit_name = name is not None
        self.name: str = name or str(getattr(fn, "__name__", "step"))
        self.step_operator = step_operator
        self.retries = retries
        self.retry_delay = retry_delay
        self.retry_backoff = retry_backoff
        self.retry_jitter = retry_jitter
        self.retry_max_delay = retry_max_delay
        self.retry_on = retry_on
        self.timeout = timeout
        self.settings: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (settings or {}).items()}
        try:
            self.resources = Resources.coerce(dict(resources) if isinstance(resources, Mapping) else resources)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"@step {getattr(fn, '__name__', fn)!r}: {exc}") from None
        self.is_async = inspect.iscoroutinefunction(fn)
        self.output_names, self.outputs_count = _declared_outputs(fn, outputs)
        sig = inspect.signature(fn)
        self._signature = sig
        params = list(sig.parameters.values())
        kinds = inspect.Parameter
        self._param_names = frozenset(
            p.name for p in params if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
            and p.kind is not kinds.POSITIONAL_ONLY
        )
        self._varargs = any(p.kind is kinds.VAR_POSITIONAL for p in params)
        self._varkw = any(p.kind is kinds.VAR_KEYWORD for p in params)
        self._max_positional = sum(
            p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD) for p in params
        )
        self._required = tuple(
            (i if p.kind is not kinds.KEYWORD_ONLY else -1, p.name)
            for i, p in enumerate(params)
            if p.default is p.empty and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
        )
        self._accepts_after = "after" in sig.parameters
        # Required positional parameters always come first, so "enough positional arguments"
        # is one comparison; keyword-only required parameters force the slower check.
        self._required_positional = sum(1 for pos, _ in self._required if pos >= 0)
        self._required_kwonly = any(pos < 0 for pos, _ in self._required)
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<step {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        recorder = _RECORDER.get()
        if recorder is None:
            return self.fn(*args, **kwargs)
        after: Any = None
        if not self._accepts_after and "after" in kwargs:
            after = kwargs.pop("after")
        return recorder.record(self, args, kwargs, after)  # type: ignore[return-value]

    def with_options(self, **changes: Any) -> Step[P, R]:
        """Return a copy of this step with some options changed (same keywords as ``@step``)."""
        opts: dict[str, Any] = {
            "name": self.name if self.explicit_name else None,
            "step_operator": self.step_operator,
            "retries": self.retries,
            "retry_delay": self.retry_delay,
            "retry_backoff": self.retry_backoff,
            "retry_jitter": self.retry_jitter,
            "retry_max_delay": self.retry_max_delay,
            "retry_on": self.retry_on,
            "timeout": self.timeout,
            "settings": self.settings,
            "outputs": self.output_names if self.outputs_count else None,
            "resources": self.resources,
        }
        if "custom_step_operator" in changes:
            changes["step_operator"] = changes.pop("custom_step_operator")
        unknown = set(changes) - set(opts)
        if unknown:
            raise TypeError(
                f"unknown step option(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(opts))}"
            )
        opts.update(changes)
        return Step(self.fn, **opts)

    def check_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
        """Return why ``args``/``kwargs`` do not fit the signature, or None when they do."""
        n = len(args)
        ok = self._varargs or n <= self._max_positional
        if ok and kwargs:
            if not self._varkw:
                names = self._param_names
                for k in kwargs:
                    if k not in names:
                        ok = False
                        break
            if ok:
                for pos, pname in self._required:
                    if not (0 <= pos < n) and pname not in kwargs:
                        ok = False
                        break
        elif ok:
            ok = n >= self._required_positional and not self._required_kwonly
        if ok:
            return None
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            return str(exc)
        return None


def _check_options(fn: Any, retries: Any, delay: Any, backoff: Any, jitter: Any, timeout: Any,
                   settings: Any) -> None:
    label = getattr(fn, "__name__", repr(fn))
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"@step {label}: retries must be an integer >= 0, got {retries!r}")
    if delay < 0 or backoff < 1 or not 0 <= jitter <= 1:
        raise ValueError(
            f"@step {label}: need retry_delay >= 0, retry_backoff >= 1, 0 <= retry_jitter <= 1"
        )
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"@step {label}: timeout must be a number of seconds > 0, got {timeout!r}")
    if settings is not None and (
        not isinstance(settings, Mapping) or not all(isinstance(v, Mapping) for v in settings.values())
    ):
        raise ValueError(
            f"@step {label}: settings must map an operator name or flavor to a dict of options, "
            f'e.g. settings={{"sagemaker": {{"instance_type": "ml.m5.large"}}}}'
        )


def _declared_outputs(fn: Any, outputs: int | Sequence[str] | None) -> tuple[tuple[str, ...], int | None]:
    if outputs is not None:
        if isinstance(outputs, int):
            if outputs < 1:
                raise ValueError(f"@step {fn.__name__}: outputs must be >= 1, got {outputs}")
            names = tuple(f"output_{i}" for i in range(outputs))
        else:
            names = tuple(outputs)
        return names, (len(names) if len(names) > 1 or not isinstance(outputs, int) else None)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return (), None
    ret = hints.get("return")
    if typing.get_origin(ret) is tuple:
        args = typing.get_args(ret)
        if args and args[-1] is not Ellipsis and args != ((),):
            return tuple(f"output_{i}" for i in range(len(args))), len(args)
    return (), None


@overload
def step(fn: Callable[P, R], /) -> Step[P, R]: ...


@overload
def step(
    *,
    name: str | None = None,
    step_operator: str | None = None,
    custom_step_operator: str | None = None,
    retries: int = 0,
    retry_delay: float = 1.0,
    retry_backoff: float = 2.0,
    retry_jitter: float = 0.2,
    retry_max_delay: float = 60.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    timeout: float | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    outputs: int | Sequence[str] | None = None,
    resources: Resources | Mapping[str, Any] | None = None,
) -> Callable[[Callable[P, R]], Step[P, R]]: ...


def step(fn: Any = None, /, **options: Any) -> Any:
    """Declare a pipeline step (sync or async), bare or with options.

    Options: ``name``; ``step_operator`` (alias ``custom_step_operator``) naming the operator
    that runs it, in-process when omitted; ``retries`` with exponential backoff
    (``retry_delay`` seconds, times ``retry_backoff`` per attempt, capped at
    ``retry_max_delay``, +/- ``retry_jitter`` fraction of random jitter) for exceptions in
    ``retry_on``; ``timeout`` seconds per attempt; ``settings`` per operator name or flavor;
    ``outputs`` (a count or names) so a tuple return can be unpacked in the pipeline;
    ``resources`` (:class:`stepflow.Resources`: cpu, memory, gpu, gpu_type, disk) that every
    operator honours.
    """
    if "custom_step_operator" in options:
        alias = options.pop("custom_step_operator")
        if options.get("step_operator") not in (None, alias):
            raise ValueError("give step_operator or custom_step_operator, not two different names")
        options["step_operator"] = alias
    if fn is not None:
        return Step(fn, **options)
    return lambda f: Step(f, **options)
