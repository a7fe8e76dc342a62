"""The Python API for components and stacks, and how runs resolve operators from a stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepflow import PipelineDefinitionError, UnknownOperatorError, pipeline, read_jsonl, run, step
from stepflow._config import options
from stepflow._stack.client import Client
from stepflow.errors import ConfigError, NotFoundError, StoreError
from stepflow.events import RunFinished, RunStarted


@step(step_operator="fast")
def fast_step(x: int) -> int:
    return x * 2


@step
def src() -> int:
    return 21


@pipeline
def uses_fast():
    return fast_step(src())


def test_default_stack_exists_and_is_active() -> None:
    c = Client()
    assert c.active_stack_name() == "default"
    stack = c.get_stack("default")
    assert stack.artifact_store == "default" and stack.step_operators == ("local",)
    assert stack.is_active
    assert {(m.kind, m.name) for m in c.list_components()} == {("artifact_store", "default"),
                                                              ("step_operator", "local")}


def test_register_validate_update_delete_component() -> None:
    c = Client()
    comp = c.register_component("step-operator", "fast", "local", {"max-threads": "4"})
    assert comp.config == {"max_threads": 4}
    assert c.describe_component("step_operator", "fast")["config"] == {"max_threads": 4, "max_concurrency": None}
    with pytest.raises(ConfigError, match="a step-operator named 'fast' already exists"):
        c.register_component("step_operator", "fast", "local")
    with pytest.raises(ConfigError, match=r"option 'max_threads' expects int, got 'many' \(expected an integer\)$"):
        c.register_component("step_operator", "x", "local", {"max_threads": "many"})
    with pytest.raises(ConfigError, match=r"unknown step-operator flavor 'nonexistent'; available: (.*, )?local"):
        c.register_component("step_operator", "x", "nonexistent")
    with pytest.raises(ConfigError, match="invalid step-operator name"):
        c.register_component("step_operator", "bad name!", "local")
    updated = c.update_component("step_operator", "fast", {"max_concurrency": 2})
    assert updated.config == {"max_threads": 4, "max_concurrency": 2}
    c.delete_component("step_operator", "fast")
    with pytest.raises(NotFoundError, match="no step-operator named 'fast'; registered: local"):
        c.get_component("step_operator", "fast")


def test_secrets_are_redacted_and_env_references_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Client()
    c.register_component("container_registry", "plain", "default",
                         {"uri": "127.0.0.1:5000", "username": "me", "password": "hunter2"})
    c.register_component("container_registry", "ref", "default",
                         {"uri": "127.0.0.1:5000", "username": "me", "password": "{{env.REG_PW}}"})
    assert c.describe_component("container_registry", "plain")["config"]["password"] == options.REDACTED
    assert c.describe_component("container_registry", "ref")["config"]["password"] == "{{env.REG_PW}}"
    with pytest.raises(ConfigError, match=r"option 'password' refers to \{\{env.REG_PW\}\}, but it is not set"):
        c.instantiate("container_registry", "ref")
    monkeypatch.setenv("REG_PW", "s3cret")
    reg = c.instantiate("container_registry", "ref")
    assert reg.uri == "127.0.0.1:5000"


async def test_credentials_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Client()
    c.register_component("container_registry", "ref", "default",
                         {"uri": "127.0.0.1:5000/team", "username": "me", "password": "{{env.REG_PW}}"})
    monkeypatch.setenv("REG_PW", "s3cret")
    reg = c.instantiate("container_registry", "ref")
    assert await reg.credentials() == ("me", "s3cret")


def test_stacks_register_validate_and_protect_components() -> None:
    c = Client()
    c.register_component("step_operator", "fast", "local")
    with pytest.raises(ConfigError, match="stack 'bad' is invalid: no step-operator named 'nope'"):
        c.register_stack("bad", artifact_store="default", step_operators=["nope"])
    stack = c.register_stack("s1", artifact_store="default", step_operators=["fast", "local"])
    assert stack.step_operators == ("fast", "local")
    with pytest.raises(ConfigError, match="a stack named 's1' already exists"):
        c.register_stack("s1", artifact_store="default")
    with pytest.raises(ConfigError, match="step-operator 'fast' is used by stack 's1'"):
        c.delete_component("step_operator", "fast")
    with pytest.raises(NotFoundError, match="no stack named 'nope'; registered stacks: default, s1"):
        c.set_active_stack("nope")
    c.set_active_stack("s1")
    assert c.active_stack_name() == "s1"
    with pytest.raises(ConfigError, match="stack 's1' is active"):
        c.delete_stack("s1")
    with pytest.raises(ConfigError, match="the default stack cannot be deleted"):
        c.delete_stack("default")
    c.update_stack("s1", step_operators=["local"])
    c.delete_component("step_operator", "fast")
    c.set_active_stack("default")
    c.delete_stack("s1")
    assert [s.name for s in c.list_stacks()] == ["default"]


async def test_runs_resolve_operators_from_the_active_or_named_stack(tmp_path: Path) -> None:
    c = Client()
    with pytest.raises(UnknownOperatorError) as err:
        await run(uses_fast())
    msg = str(err.value)
    assert "step 'fast_step' use step_operator 'fast', which is not available in stack 'default'" in msg
    assert "known step operators: local" in msg and "stepflow stack update default -s local -s fast" in msg

    c.register_component("step_operator", "fast", "local", {"max_threads": 2})
    c.register_component("event_sink", "log", "jsonl", {"path": str(tmp_path / "events.jsonl")})
    c.register_stack("fast_stack", artifact_store="default", step_operators=["fast"], event_sinks=["log"])
    result = await run(uses_fast(), stack="fast_stack")
    assert result.succeeded and result.output == 42
    assert result.steps["fast_step"].operator == "fast"
    events = read_jsonl(tmp_path / "events.jsonl")
    assert isinstance(events[0], RunStarted) and events[0].stack == "fast_stack"
    assert isinstance(events[-1], RunFinished)

    c.set_active_stack("fast_stack")
    assert (await run(uses_fast())).succeeded


async def test_step_settings_are_validated_against_the_flavor(monkeypatch: pytest.MonkeyPatch) -> None:
    import attrs

    from stepflow._flavors.builtin import LocalOperatorFlavor
    from stepflow.interfaces import option

    @attrs.frozen
    class Settings:
        cpus: int = option(1, doc="CPUs")

    monkeypatch.setattr(LocalOperatorFlavor, "settings_class", Settings)
    from stepflow._plugins import registry

    registry.refresh()
    Client().register_component("step_operator", "fast", "local")
    Client().register_stack("st", artifact_store="default", step_operators=["fast"])

    @step(step_operator="fast", settings={"local": {"cpus": "two"}, "fast": {"gpus": 1}})
    def job() -> int:
        return 1

    @pipeline
    def p():
        job()

    with pytest.raises(PipelineDefinitionError) as err:
        await run(p(), stack="st")
    msg = str(err.value)
    assert "step 'job': settings for 'fast'" in msg and "unknown option 'gpus'" in msg
    assert "option 'cpus' expects int, got 'two'" in msg
    registry.refresh()


def test_corrupt_store_names_its_path(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "stepflow.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError) as err:
        Client(home).list_stacks()
    assert str(home / "stepflow.db") in str(err.value) and "corrupt" in str(err.value)
    assert "mv " in str(err.value)
