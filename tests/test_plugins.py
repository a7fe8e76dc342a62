"""Plugins: lazy discovery, the example `subprocess` flavor end to end, the conformance suite,
and what a broken plugin breaks (only the stacks using it).

Uses the Python API (the CLI wraps it). Needs `pip install -e examples/plugin-subprocess`
(the Makefile's env does it).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest
from stepflow_subprocess import envelope
from stepflow_subprocess.flavor import SubprocessSettings
from stepflow_subprocess.operator import SubprocessStepOperator

import stepflow
from stepflow import EventBus, NonRetryableError, PipelineDefinitionError, pipeline, run, step
from stepflow._plugins import registry
from stepflow._stack.client import Client
from stepflow.errors import ConfigError, PluginError
from stepflow.events import JobSubmitted, LogLine, RunStarted, StepCancelled, StepFailed
from stepflow.interfaces import Invocation
from stepflow.testing import capture_events, check_step_operator_flavor, temporary_home

KILL_GRACE_S = 1.0


@pytest.fixture
def client() -> Client:
    return Client()


@pytest.fixture
def subproc(client: Client) -> Client:
    """The seed: `subproc` (flavor subprocess) in `sub_stack` with `local`, made active."""
    client.register_component("step_operator", "subproc", "subprocess",
                              {"env": {"OMP_NUM_THREADS": "1"}, "kill_grace_s": KILL_GRACE_S})
    client.register_stack("sub_stack", artifact_store="default", step_operators=["subproc", "local"])
    client.set_active_stack("sub_stack")
    return client


async def run_capturing(p: Any, **kw: Any) -> tuple[stepflow.RunResult, Any]:
    bus = EventBus()
    async with capture_events(bus) as events:
        result = await run(p, event_bus=bus, **kw)
    return result, events


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --------------------------------------------------------------------------- discovery
def test_discovery_lists_flavors_without_importing_them() -> None:
    code = """if True:
        import json, sys
        from stepflow._plugins import registry
        entries = registry.entries("step_operator")
        before = sorted(m for m in sys.modules if m.startswith("stepflow_subprocess"))
        flavor = registry.load("step_operator", "subprocess")
        print(json.dumps({
            "names": sorted(entries), "dist": entries["subprocess"].distribution,
            "target": entries["subprocess"].target, "before": before,
            "after": sorted(m for m in sys.modules if m.startswith("stepflow_subprocess")),
            "settings": flavor.settings_class.__name__, "cloudpickle": "cloudpickle" in sys.modules,
        }))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    info = json.loads(out.stdout)
    assert {"local", "subprocess"} <= set(info["names"])
    assert info["dist"] == "stepflow-subprocess"
    assert info["target"] == "stepflow_subprocess.flavor:SubprocessFlavor"
    assert info["before"] == []  # listing imports nothing
    # Loading the flavor imports its light module only: not the operator, not cloudpickle.
    assert info["after"] == ["stepflow_subprocess", "stepflow_subprocess.flavor"]
    assert info["settings"] == "SubprocessSettings" and info["cloudpickle"] is False


def test_registry_refresh_and_client_listing(client: Client) -> None:
    registry.refresh()
    names = [e.name for e in client.flavor_entries("step-operator")]
    assert "subprocess" in names and "local" in names
    fl = client.flavor("step_operator", "subprocess")
    assert fl.implementation == "stepflow_subprocess.operator:SubprocessStepOperator"


def test_config_is_validated_at_registration(client: Client) -> None:
    with pytest.raises(ConfigError, match=r"unknown option 'gpus'.*--kill_grace_s"):
        client.register_component("step_operator", "x", "subprocess", {"gpus": 1})
    with pytest.raises(ConfigError, match="kill_grace_s must be >= 0"):
        client.register_component("step_operator", "x", "subprocess", {"kill_grace_s": -1})
    comp = client.register_component("step_operator", "x", "subprocess",
                                     {"env": "A=1,B=2", "inherit-env": "false", "max_concurrency": "2"})
    assert comp.config == {"env": {"A": "1", "B": "2"}, "inherit_env": False, "max_concurrency": 2}
    op = client.instantiate("step_operator", "x")
    assert isinstance(op, SubprocessStepOperator) and op.max_concurrency == 2 and op.name == "x"


# --------------------------------------------------------------------------- the seed flow
@step
def where_local() -> int:
    return os.getpid()


@step(custom_step_operator="subproc")
def where_remote(x: int) -> dict[str, Any]:
    print(f"hello from the subprocess {os.getpid()}")
    print("a line on stderr", file=sys.stderr)
    ctx = stepflow.current_step()
    return {"pid": os.getpid(), "omp": os.environ.get("OMP_NUM_THREADS"), "x": x * 2,
            "key_visible": envelope.KEY_ENV in os.environ, "step": ctx and ctx.step, "argv": sys.argv}


@step
def combine(local_pid: int, remote: dict[str, Any]) -> tuple[int, int]:
    return local_pid, remote["pid"]


@pipeline
def seed():
    return combine(where_local(), where_remote(21))


async def test_seed_flow_runs_one_step_in_another_process(subproc: Client) -> None:
    result, events = await run_capturing(seed())
    assert result.status == "succeeded", result.steps
    remote = result.outputs["where_remote"]
    assert result.outputs["where_local"] == os.getpid()
    assert remote["pid"] != os.getpid()
    assert result.output == (os.getpid(), remote["pid"])
    assert remote["x"] == 42 and remote["omp"] == "1"
    assert remote["key_visible"] is False  # the signing key is popped before the step runs
    assert remote["step"] == "where_remote"  # current_step() works in the child too
    assert result.steps["where_remote"].operator == "subproc"
    assert result.steps["where_local"].operator == "in-process"
    # print() output arrives as LogLine events, per stream, while the step runs.
    logs = [(e.stream, e.line) for e in events.of_type(LogLine) if e.step == "where_remote"]
    assert ("stdout", f"hello from the subprocess {remote['pid']}") in logs
    assert ("stderr", "a line on stderr") in logs
    assert [e.job_id for e in events.of_type(JobSubmitted)] == [str(remote["pid"])]
    # The payload's temporary directory is gone.
    payload = Path(remote["argv"][remote["argv"].index("--payload") + 1])
    assert not payload.parent.exists()


# --------------------------------------------------------------------------- conformance
def test_conformance_suite_passes_for_subprocess() -> None:
    report = check_step_operator_flavor("subprocess", {"kill_grace_s": 2},
                                        settings={"env": {"X": "1"}, "nice": 1})
    assert report.flavor == "subprocess" and report.skipped == ()
    assert len(report.passed) == 10 and "cancelling the run cancels a running step" in report.passed
    assert os.environ["STEPFLOW_HOME"].endswith("stepflow-home")  # restored afterwards


def test_conformance_suite_passes_for_local() -> None:
    report = check_step_operator_flavor("local")
    assert "a failed attempt is retried" in report.passed
    assert set(report.skipped) == {"settings are accepted", "unknown settings are refused before running"}


# --------------------------------------------------------------------------- failures
@step(custom_step_operator="subproc", retries=2, retry_delay=0.0)
def explode(n: int) -> int:
    raise ValueError(f"bad input {n} from the child")


@step(custom_step_operator="subproc", retries=2, retry_delay=0.0)
def give_up() -> None:
    raise NonRetryableError("do not retry me")


@pipeline
def failing():
    explode(7)
    give_up()


async def test_remote_failure_carries_the_remote_traceback(subproc: Client) -> None:
    result, events = await run_capturing(failing())
    err = result.steps["explode"].error
    assert err is not None
    assert err.type == "RemoteStepError" and err.message == "ValueError: bad input 7 from the child"
    assert err.traceback.startswith("Traceback (most recent call last):")
    assert f'File "{Path(__file__).resolve()}"' in err.traceback  # the child imported this module
    assert "in explode" in err.traceback
    assert 'raise ValueError(f"bad input {n} from the child")' in err.traceback
    assert "entrypoint.py" not in err.traceback  # the runner's own frames are stripped
    assert result.steps["explode"].attempts == 3  # retried like any step
    failed = [e for e in events.of_type(StepFailed) if e.step == "explode"]
    assert failed and failed[0].traceback == err.traceback
    # A NonRetryableError raised in the child stays non-retryable.
    assert result.steps["give_up"].attempts == 1
    assert str(result.steps["give_up"].error) == "RemoteNonRetryableError: NonRetryableError: do not retry me"


@step(custom_step_operator="subproc")
def exit_hard() -> None:
    print("about to exit hard", file=sys.stderr, flush=True)
    os._exit(7)


@step(custom_step_operator="subproc")
def killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@step(custom_step_operator="subproc")
def unpicklable_output() -> Any:
    return threading.Lock()


@pipeline
def dying():
    exit_hard()
    killed()
    unpicklable_output()


async def test_a_process_dying_without_a_result_is_explained(subproc: Client) -> None:
    result, _ = await run_capturing(dying())
    hard = result.steps["exit_hard"].error
    assert hard is not None and hard.type == "ChildProcessDiedError"
    assert "exited with code 7 without writing a result" in hard.message
    assert "last stderr lines:\n  about to exit hard" in hard.message
    sig = result.steps["killed"].error
    assert sig is not None and "was killed by SIGKILL (exit code -9)" in sig.message
    assert "nothing on stderr" in sig.message
    lock = result.steps["unpicklable_output"].error
    assert lock is not None and "returned a _thread.lock that cannot be pickled" in lock.message


async def test_bad_interpreter_fails_clearly_and_is_not_retried(client: Client) -> None:
    client.register_component("step_operator", "subproc", "subprocess", {"python": "/nonexistent/python3"})
    client.register_stack("s", artifact_store="default", step_operators=["subproc"])
    result, _ = await run_capturing(seed(), stack="s")
    err = result.steps["where_remote"].error
    assert err is not None and err.type == "SubprocessStartError"
    assert "could not start the step's interpreter '/nonexistent/python3'" in err.message


# --------------------------------------------------------------------------- signed payloads
def touch(path: str) -> str:
    Path(path).write_text("ran")
    return "ran"


def _write_payload(path: Path, key: bytes, fn: Any, *args: Any) -> None:
    inv = Invocation("run-1", "touch", 1, fn, args, {}, {}, None, False, lambda *a, **k: None, "p")
    SubprocessStepOperator()._prepare(inv, SubprocessSettings(), key, path)


def _entrypoint(payload: Path, result: Path, key: bytes) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, envelope.KEY_ENV: key.hex(), "PYTHONPATH": os.pathsep.join(p or "." for p in sys.path)}
    return subprocess.run([sys.executable, "-m", "stepflow_subprocess.entrypoint", "--payload", str(payload),
                           "--result", str(result)], env=env, capture_output=True, text=True, timeout=60)


def test_entrypoint_runs_a_good_payload_and_refuses_a_tampered_one(tmp_path: Path) -> None:
    key = envelope.new_key()
    good, marker = tmp_path / "good.bin", tmp_path / "good-ran"
    _write_payload(good, key, touch, str(marker))
    out = _entrypoint(good, tmp_path / "good-result.bin", key)
    assert out.returncode == 0, out.stderr
    assert marker.read_text() == "ran"  # the control: an intact payload does run
    assert envelope.read(tmp_path / "good-result.bin", envelope.RESULT, key)["status"] == "ok"

    bad, marker = tmp_path / "bad.bin", tmp_path / "bad-ran"
    _write_payload(bad, key, touch, str(marker))
    blob = bytearray(bad.read_bytes())
    blob[-20] ^= 0x01  # one bit inside the pickled body
    bad.write_bytes(bytes(blob))
    out = _entrypoint(bad, tmp_path / "bad-result.bin", key)
    assert out.returncode == 3
    assert "tampered payload refused" in out.stderr and "nothing was unpickled" in out.stderr
    assert not marker.exists()  # the step function never ran
    refused = envelope.read(tmp_path / "bad-result.bin", envelope.RESULT, key)
    assert refused["status"] == "refused" and refused["reason"] == "tampered"

    # Signed with another key: refused the same way.
    other, marker = tmp_path / "other.bin", tmp_path / "other-ran"
    _write_payload(other, envelope.new_key(), touch, str(marker))
    out = _entrypoint(other, tmp_path / "other-result.bin", key)
    assert out.returncode == 3 and "tampered payload refused" in out.stderr and not marker.exists()


def test_entrypoint_help_and_missing_key(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "stepflow_subprocess.entrypoint", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--payload" in out.stdout and envelope.KEY_ENV in out.stdout
    env = {k: v for k, v in os.environ.items() if k != envelope.KEY_ENV}
    out = subprocess.run([sys.executable, "-m", "stepflow_subprocess.entrypoint", "--payload", "p",
                          "--result", str(tmp_path / "r")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no signing key" in out.stderr and not (tmp_path / "r").exists()


@pytest.mark.parametrize(("field", "value", "ours"), [
    ("python", "2.7.18", platform.python_version()),
    ("cloudpickle", "0.0.1", cloudpickle.__version__),
])
def test_entrypoint_refuses_a_payload_from_other_versions(tmp_path: Path, field: str, value: str,
                                                          ours: str) -> None:
    key = envelope.new_key()
    path, marker = tmp_path / "payload.bin", tmp_path / "ran"
    _write_payload(path, key, touch, str(marker))
    data = envelope.read(path, envelope.PAYLOAD, key)
    data[field] = value
    envelope.write(path, envelope.PAYLOAD, data, key)  # re-signed: only the version differs
    out = _entrypoint(path, tmp_path / "result.bin", key)
    assert out.returncode == 3
    assert "version mismatch" in out.stderr and value in out.stderr and ours in out.stderr
    assert not marker.exists()


def test_envelope_refuses_classes_even_when_signed() -> None:
    key = envelope.new_key()
    blob = envelope.PAYLOAD + b"\0" * 32 + b"junk"
    with pytest.raises(envelope.TamperedError, match="does not verify"):
        envelope.unseal(envelope.PAYLOAD, blob, key)
    with pytest.raises(envelope.TamperedError, match="not a stepflow-subprocess result"):
        envelope.unseal(envelope.RESULT, envelope.seal(envelope.PAYLOAD, {}, key), key)
    # Even a correctly signed body may hold plain data only: no class is ever resolved.
    import pickle

    body = pickle.dumps({"x": Path("/")})
    sealed = envelope.PAYLOAD + envelope._mac(key, envelope.PAYLOAD, body) + body
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        envelope.unseal(envelope.PAYLOAD, sealed, key)


@step(custom_step_operator="subproc", retries=2, retry_delay=0.0)
def touch_step(path: str) -> str:
    return touch(path)


@pipeline
def touching(path: str):
    return touch_step(path)


async def test_operator_reports_tampering_and_version_mismatch(subproc: Client, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    original = SubprocessStepOperator._write_payload

    def tamper(self: SubprocessStepOperator, path: Path, data: dict[str, Any], key: bytes) -> None:
        original(self, path, data, key)
        blob = bytearray(path.read_bytes())
        blob[-20] ^= 0x01  # changed between writing and the child starting
        path.write_bytes(bytes(blob))

    monkeypatch.setattr(SubprocessStepOperator, "_write_payload", tamper)
    marker = tmp_path / "ran"
    result, _ = await run_capturing(touching(str(marker)))
    err = result.steps["touch_step"].error
    assert err is not None and err.type == "PayloadRefusedError"
    assert err.message.startswith("tampered payload refused")
    assert result.steps["touch_step"].attempts == 1 and not marker.exists()
    monkeypatch.setattr(SubprocessStepOperator, "_write_payload", original)

    real = envelope.runtime_versions()
    monkeypatch.setattr(envelope, "runtime_versions", lambda: {**real, "cloudpickle": "0.0.1"})
    result, _ = await run_capturing(touching(str(marker)))
    err = result.steps["touch_step"].error
    assert err is not None and err.type == "PayloadRefusedError" and "version mismatch" in err.message
    assert "cloudpickle 0.0.1" in err.message and f"cloudpickle {real['cloudpickle']}" in err.message
    assert not marker.exists()


# --------------------------------------------------------------------------- settings
@step(custom_step_operator="subproc", settings={"subproc": {"gpus": 2, "nice": "high"}})
def badly_configured(path: str) -> str:
    return touch(path)


@step(custom_step_operator="subproc", settings={"subprocess": {"nice": 40}})
def too_nice(path: str) -> str:
    return touch(path)


@step(custom_step_operator="subproc",
      settings={"subprocess": {"env": {"WHO": "flavor"}, "nice": 3}, "subproc": {"env": {"WHO": "component"}}})
def configured() -> dict[str, Any]:
    return {"who": os.environ.get("WHO"), "omp": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0)}


async def test_settings_are_validated_before_anything_runs(subproc: Client, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    @pipeline
    def bad():
        badly_configured(str(marker))
        too_nice(str(marker))

    bus = EventBus()
    async with capture_events(bus) as events:
        with pytest.raises(PipelineDefinitionError) as info:
            await run(bad(), event_bus=bus)
    msg = str(info.value)
    assert "step 'badly_configured': settings for 'subproc'" in msg
    assert "unknown option 'gpus'" in msg and "option 'nice' expects int, got 'high'" in msg
    assert "Valid options: --env (dict[str, str]), --nice (int)" in msg
    assert "step 'too_nice'" in msg and "nice must be between 0 and 19, got 40" in msg
    assert not marker.exists() and not events.of_type(RunStarted)

    @pipeline
    def good():
        return configured()

    result, _ = await run_capturing(good())
    assert result.status == "succeeded", result.steps
    # Settings keyed by component name win over the flavor's; both add to the operator's env.
    assert result.output == {"who": "component", "omp": "1", "nice": os.nice(0) + 3}


@step(custom_step_operator="bare")
def environment() -> list[str]:
    return sorted(os.environ)


async def test_inherit_env_false_starts_from_an_empty_environment(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONLY_IN_THE_RUNNER", "1")
    client.register_component("step_operator", "bare", "subprocess",
                              {"inherit_env": False, "env": {"ONLY_IN_CONFIG": "1"}})
    client.register_stack("bare_stack", artifact_store="default", step_operators=["bare"])

    @pipeline
    def p():
        return environment()

    result, _ = await run_capturing(p(), stack="bare_stack")
    assert result.status == "succeeded", result.steps
    names = set(result.output)
    assert "ONLY_IN_CONFIG" in names and "PYTHONPATH" in names
    assert "ONLY_IN_THE_RUNNER" not in names and "PATH" not in names


# --------------------------------------------------------------------------- cancellation
@step(custom_step_operator="subproc")
def sleeper(info_path: str, ignore_term: bool) -> None:
    if ignore_term:  # makes the operator escalate to SIGKILL after kill_grace_s
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(info_path + ".part").write_text(json.dumps({"pid": os.getpid(), "argv": sys.argv}))
    os.replace(info_path + ".part", info_path)  # the test never reads a half-written file
    time.sleep(600)


@pytest.mark.anyio  # explicit: the conftest's late marking does not combine with parametrize
@pytest.mark.parametrize("ignore_term", [False, True], ids=["sigterm", "sigkill-after-grace"])
async def test_cancelling_the_run_kills_the_child(subproc: Client, tmp_path: Path, ignore_term: bool) -> None:
    info_path = tmp_path / "child.json"

    @pipeline
    def p():
        sleeper(str(info_path), ignore_term)

    bus = EventBus()
    async with capture_events(bus) as events:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(run, p(), event_bus=bus))
                while not info_path.exists():
                    await anyio.sleep(0.05)
                info = json.loads(info_path.read_text())
                started = time.monotonic()
                tg.cancel_scope.cancel()
    pid = info["pid"]
    deadline = started + KILL_GRACE_S + 2
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid), f"child {pid} still alive {KILL_GRACE_S + 2} s after cancelling"
    assert [e.step for e in events.of_type(StepCancelled)] == ["sleeper"]
    payload_dir = Path(info["argv"][info["argv"].index("--payload") + 1]).parent
    assert not payload_dir.exists()


@step(custom_step_operator="subproc", timeout=1.0)
def slow(info_path: str) -> None:
    Path(info_path).write_text(str(os.getpid()))
    time.sleep(600)


async def test_a_step_timeout_kills_the_child(subproc: Client, tmp_path: Path) -> None:
    info_path = tmp_path / "pid"

    @pipeline
    def p():
        slow(str(info_path))

    with anyio.fail_after(60):
        result, _ = await run_capturing(p())
    err = result.steps["slow"].error
    assert err is not None and err.type == "StepTimeoutError"
    assert _gone(int(info_path.read_text()))


# --------------------------------------------------------------------------- broken plugins
WORKING_PLUGIN = '''
from stepflow.interfaces import Flavor as _Base


class Flavor(_Base):
    kind = "step_operator"
    name = "broken"
    description = "works until its dependency goes away"

    def create(self, name, config):
        from stepflow._operators.local import LocalStepOperator

        return LocalStepOperator(name)
'''

BROKEN_PLUGIN = 'raise ImportError("missing dependency xyz")\n'

SLOPPY_PLUGIN = '''
from stepflow.interfaces import Flavor as _Base, StepOperator


class SloppyOperator(StepOperator):
    """Swallows errors and corrupts integer outputs: the conformance suite must notice."""

    flavor = "sloppy"

    def __init__(self, name):
        self.name = name

    async def launch(self, inv):
        try:
            value = await inv.fn(*inv.args, **inv.kwargs) if inv.is_async else inv.fn(*inv.args, **inv.kwargs)
        except Exception:
            return None
        return value + 1 if isinstance(value, int) else value


class Flavor(_Base):
    kind = "step_operator"
    name = "sloppy"

    def create(self, name, config):
        return SloppyOperator(name)
'''


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A directory on sys.path for fake plugin distributions; forgotten again afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # rewritten modules must be re-read
    yield root
    for name in ("brokenplug_mod", "sloppyplug_mod"):
        sys.modules.pop(name, None)
    registry.refresh()  # other tests must not see the fake plugins


def _install_fake(root: Path, dist: str, entry: str, module: str, source: str) -> None:
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[stepflow.step_operators]\n{entry} = {module}:Flavor\n")
    (root / f"{module}.py").write_text(source)
    sys.modules.pop(module, None)
    importlib.invalidate_caches()
    registry.refresh()


@step
def plain() -> str:
    return "fine"


@step(custom_step_operator="flaky_op")
def on_broken() -> str:
    return "never"


async def test_a_broken_plugin_only_breaks_the_stacks_using_it(client: Client, plugin_dir: Path) -> None:
    # It worked when the component and its stack were registered ...
    _install_fake(plugin_dir, "brokenplug", "broken", "brokenplug_mod", WORKING_PLUGIN)
    client.register_component("step_operator", "flaky_op", "broken")
    client.register_stack("broken_stack", artifact_store="default", step_operators=["flaky_op", "local"])
    # ... then its dependency went away.
    _install_fake(plugin_dir, "brokenplug", "broken", "brokenplug_mod", BROKEN_PLUGIN)

    entries = registry.entries("step_operator")  # listing imports nothing, so it still works
    assert entries["broken"].distribution == "brokenplug"
    assert {"broken", "local", "subprocess"} <= {e.name for e in client.flavor_entries("step_operator")}

    with pytest.raises(PluginError) as info:
        registry.load("step_operator", "broken")
    msg = str(info.value)
    assert "plugin distribution 'brokenplug'" in msg and "ImportError: missing dependency xyz" in msg
    with pytest.raises(PluginError, match=r"'brokenplug'.*missing dependency xyz"):
        client.register_component("step_operator", "another", "broken")
    described = client.describe_component("step_operator", "flaky_op")
    assert "missing dependency xyz" in described["error"]

    @pipeline
    def unaffected():
        return plain()

    # The default stack does not use it: runs fine.
    result, _ = await run_capturing(unaffected())
    assert result.status == "succeeded" and result.output == "fine"

    @pipeline
    def affected():
        plain()
        return on_broken()

    client.set_active_stack("broken_stack")
    with pytest.raises(PluginError) as info:
        await run(affected())
    assert "'brokenplug'" in str(info.value) and "missing dependency xyz" in str(info.value)


def test_conformance_suite_names_each_failing_check(plugin_dir: Path) -> None:
    _install_fake(plugin_dir, "sloppyplug", "sloppy", "sloppyplug_mod", SLOPPY_PLUGIN)
    with pytest.raises(AssertionError) as info:
        check_step_operator_flavor("sloppy")
    msg = str(info.value)
    assert msg.startswith("step-operator flavor 'sloppy' failed 5 conformance checks:")
    assert "check 'sync step returns its value': step 'sync_step' should return 7, got 8" in msg
    assert "check 'a raising step fails with its type, message and traceback'" in msg
    assert "check 'a failed attempt is retried'" in msg
    assert "passed: step events name the operator, cancelling the run cancels a running step" in msg


def test_conformance_registration_failure_is_named() -> None:
    with pytest.raises(AssertionError, match=r"failed conformance check 'register'.*unknown option 'colour'"):
        check_step_operator_flavor("subprocess", {"colour": "red"})


def test_temporary_home_restores_the_previous_value(tmp_path: Path) -> None:
    before = os.environ["STEPFLOW_HOME"]
    with temporary_home() as home:
        assert os.environ["STEPFLOW_HOME"] == str(home) and home.is_dir()
    assert os.environ["STEPFLOW_HOME"] == before and not home.exists()
    with temporary_home(tmp_path / "mine") as home:
        assert home == tmp_path / "mine"
    assert home.exists() and os.environ["STEPFLOW_HOME"] == before
