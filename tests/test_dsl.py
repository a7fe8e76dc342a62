"""Recording pipelines: naming, handles, multiple outputs, and definition errors."""

from __future__ import annotations

import pytest

from stepflow import (
    Pipeline,
    PipelineDefinitionError,
    StepOutputUsageError,
    pipeline,
    step,
)


@step
def load() -> list[int]:
    return [1, 2, 3]


@step
def train(data: list[int], lr: float = 0.1) -> float:
    return sum(data) * lr


@step(outputs=("train", "test"))
def split(data: list[int]) -> tuple[list[int], list[int]]:
    return data[:2], data[2:]


@step
def pair(xs: list[int]) -> tuple[int, int]:
    return xs[0], xs[1]


@step
def combine(parts: dict[str, list[float]], extra: tuple[float, ...] = ()) -> float:
    return sum(sum(v) for v in parts.values()) + sum(extra)


def test_step_called_outside_a_pipeline_runs_the_function() -> None:
    assert train([1, 2], lr=1.0) == 3.0
    assert load() == [1, 2, 3]


def test_bare_and_configured_decorators_and_alias() -> None:
    @step(name="fit", custom_step_operator="gpu", retries=3, timeout=5, settings={"gpu": {"x": 1}})
    async def fit(x: int) -> int:
        return x

    assert fit.name == "fit" and fit.step_operator == "gpu" and fit.retries == 3
    assert fit.timeout == 5 and fit.settings == {"gpu": {"x": 1}} and fit.is_async
    assert not train.is_async and train.step_operator is None


def test_bad_step_options_are_rejected_with_guidance() -> None:
    with pytest.raises(ValueError, match="retries must be an integer >= 0"):
        step(retries=-1)(lambda: None)
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        step(timeout=0)(lambda: None)
    with pytest.raises(ValueError, match="settings must map an operator name"):
        step(settings={"sagemaker": 3})(lambda: None)
    with pytest.raises(ValueError, match="not two different names"):
        step(step_operator="a", custom_step_operator="b")(lambda: None)
    with pytest.raises(TypeError, match="unknown step option"):
        train.with_options(retires=2)


def test_recording_builds_a_dag_without_running() -> None:
    calls = []

    @step
    def side_effect() -> int:
        calls.append(1)
        return 1

    @pipeline
    def p(lr: float = 0.1):
        data = load()
        side_effect()
        return train(data, lr=lr)

    built = p(lr=0.5)
    assert isinstance(built, Pipeline)
    assert calls == []
    assert built.step_names == ["load", "side_effect", "train"]
    assert built.upstream("train") == ["load"]
    assert built.params == {"lr": 0.5}


def test_repeated_steps_get_unique_names_and_explicit_names_are_kept() -> None:
    @pipeline
    def p():
        data = load()
        train(data, lr=0.1)
        train(data, lr=0.2)
        train.with_options(name="train_fast")(data, lr=0.9)
        train(data, lr=0.3)

    assert p().step_names == ["load", "train", "train_2", "train_fast", "train_3"]


def test_handles_inside_containers_become_dependencies() -> None:
    @pipeline
    def p():
        a, b = split(load())
        return combine({"a": a, "b": [train(b)]}, extra=(train(a),))

    built = p()
    assert set(built.upstream("combine")) == {"split", "train", "train_2"}


def test_multiple_outputs_by_declaration_annotation_and_name() -> None:
    @pipeline
    def p():
        parts = split(load())
        first, second = pair(parts["train"])
        return train([first, second])

    built = p()
    assert built.upstream("pair") == ["split"]
    assert built.upstream("train") == ["pair"]


def test_after_orders_steps_without_data() -> None:
    @pipeline
    def p():
        first = load()
        load(after=first)
        load(after="load_2")

    built = p()
    assert built.upstream("load_2") == ["load"]
    assert built.upstream("load_3") == ["load_2"]


def test_every_definition_problem_is_reported_at_once() -> None:
    @step(name="dup")
    def a() -> int:
        return 1

    @step(name="dup")
    def b() -> int:
        return 2

    @pipeline
    def broken():
        a()
        b()
        train()  # missing data
        train([1], lr=0.1, momentum=0.9)  # unknown keyword
        load(after="nope")

    with pytest.raises(PipelineDefinitionError) as err:
        broken()
    msg = str(err.value)
    assert "pipeline 'broken' is invalid (4 problems)" in msg
    assert "duplicate step name 'dup'" in msg
    assert "step 'train': missing a required argument: 'data'" in msg
    assert "momentum" in msg
    assert "after='nope' names no step" in msg
    assert len(err.value.problems) == 4


def test_cycle_is_reported_with_its_path() -> None:
    @step
    def stage(x: int | None = None) -> int:
        return 1

    @pipeline
    def loop():
        a = stage.with_options(name="a")(after="c")
        b = stage.with_options(name="b")(a)
        stage.with_options(name="c")(b)

    with pytest.raises(PipelineDefinitionError, match=r"dependency cycle: (a -> b -> c -> a|b -> c -> a -> b|c -> a -> b -> c)"):
        loop()


def test_pipeline_that_records_nothing() -> None:
    @pipeline
    def empty():
        return 42

    with pytest.raises(PipelineDefinitionError, match="recorded no steps"):
        empty()


def test_bad_pipeline_parameters() -> None:
    @pipeline
    def p(lr: float):
        train(load(), lr=lr)

    with pytest.raises(PipelineDefinitionError, match="bad pipeline parameters: missing a required argument: 'lr'"):
        p()


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (lambda out: bool(out), "truth test"),
        (lambda out: out + 1, "operator `+`"),
        (lambda out: out > 0.5, "operator `>`"),
        (lambda out: out.mean(), "attribute access `.mean`"),
        (lambda out: f"{out:.2f}", "string formatting"),
        (lambda out: float(out), "float()"),
        (lambda out: list(out), "iteration/unpacking"),
        (lambda out: out[0], "indexing"),
    ],
)
def test_using_a_handle_as_a_value_fails_clearly(body, what) -> None:
    @pipeline
    def p():
        score = train(load())
        body(score)

    with pytest.raises(StepOutputUsageError) as err:
        p()
    msg = str(err.value)
    assert what in msg and "step 'train'" in msg and "placeholder" in msg and "pipeline 'p'" in msg


def test_unpack_hint_names_how_to_declare_outputs() -> None:
    @pipeline
    def p():
        a, b = train(load())

    with pytest.raises(StepOutputUsageError, match=r"@step\(outputs=2\)"):
        p()


def test_outputs_cannot_cross_pipelines() -> None:
    leaked = []

    @pipeline
    def first():
        leaked.append(load())

    first()

    @pipeline
    def second():
        train(leaked[0])

    with pytest.raises(PipelineDefinitionError, match="recorded in another pipeline"):
        second()


def test_named_output_errors() -> None:
    @pipeline
    def p():
        split(load())["validation"]

    with pytest.raises(StepOutputUsageError, match="no output named 'validation'; its outputs: train, test"):
        p()
