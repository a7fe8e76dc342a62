"""The command line, exercised as a user types it (real subprocesses)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from textwrap import dedent

import pytest

from stepflow import __version__, read_jsonl
from stepflow.events import RunFinished, StepCancelled

PIPES = dedent(
    '''
    import time
    import anyio
    from stepflow import pipeline, step

    @step
    def load(n: int) -> list[int]:
        return list(range(n))

    @step
    def train(data: list[int], lr: float, tags: list[str], verbose: bool) -> float:
        return sum(data) * lr

    @pipeline
    def good(n: int = 4, lr: float = 0.5, tags: list[str] = [], verbose: bool = False):
        return train(load(n), lr=lr, tags=tags, verbose=verbose)

    @step
    def explode(x: list[int]) -> int:
        raise ValueError("bad batch 7")

    @pipeline
    def bad():
        explode(load(3))

    @step
    async def sleepy(seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds

    @pipeline
    def slow():
        sleepy(30)
        sleepy(30)

    built = good(n=2)
    not_a_pipeline = 3
    '''
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "mypipes.py").write_text(PIPES)
    return tmp_path


def sf(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stepflow", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_version_and_help(project: Path, cli_env: dict[str, str]) -> None:
    out = sf(["--version"], project, cli_env)
    assert out.returncode == 0 and __version__ in out.stdout
    out = sf(["run", "--help"], project, cli_env)
    assert out.returncode == 0
    for text in ("MODULE:PIPELINE", "--param", "--events", "--fail-fast", "--max-concurrency", "130"):
        assert text in out.stdout
    assert "stepflow run MODULE:PIPELINE" in sf(["--help"], project, cli_env).stdout


def test_run_succeeds_with_typed_params_and_events(project: Path, cli_env: dict[str, str]) -> None:
    events = project / "events.jsonl"
    out = sf(["run", "mypipes:good", "--param", "n=5", "-p", "lr=0.1", "-p", 'tags=["a","b"]',
              "-p", "verbose=yes", "--events", str(events)], project, cli_env)
    assert out.returncode == 0, out.stderr
    assert "succeeded" in out.stdout and "train" in out.stdout
    evs = read_jsonl(events)
    assert evs[0].params == {"n": 5, "lr": 0.1, "tags": "['a', 'b']", "verbose": True}
    assert isinstance(evs[-1], RunFinished) and evs[-1].status == "succeeded"


def test_run_accepts_a_built_pipeline_and_a_file_path(project: Path, cli_env: dict[str, str]) -> None:
    assert sf(["run", "mypipes:built"], project, cli_env).returncode == 0
    assert sf(["run", str(project / "mypipes.py") + ":good"], project.parent, cli_env).returncode == 0


def test_failed_run_exits_1_and_shows_the_error(project: Path, cli_env: dict[str, str]) -> None:
    out = sf(["run", "mypipes:bad"], project, cli_env)
    assert out.returncode == 1
    assert "explode failed: ValueError: bad batch 7" in out.stdout
    assert 'raise ValueError("bad batch 7")' in out.stdout
    assert "failed" in out.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "mypipes:good", "-p", "lr=fast"], "parameter 'lr' expects float, got 'fast'"),
        (["run", "mypipes:good", "-p", "epochs=3"], "unknown parameter 'epochs' for pipeline 'good'; its parameters: n (int, default 4), lr (float, default 0.5)"),
        (["run", "mypipes:good", "-p", "lr"], "--param 'lr' is not KEY=VALUE"),
        (["run", "mypipes:good", "-p", "verbose=maybe"], "parameter 'verbose' expects bool"),
        (["run", "nosuchmod:good"], "could not import module 'nosuchmod' (from 'nosuchmod:good'): ModuleNotFoundError"),
        (["run", "mypipes:missing"], "module 'mypipes' has no attribute 'missing'; pipelines in it: bad, built, good, slow"),
        (["run", "mypipes:not_a_pipeline"], "'mypipes:not_a_pipeline' is a int, not a @pipeline function"),
        (["run", "mypipes"], "'mypipes' is not a pipeline reference: use MODULE:PIPELINE"),
        (["run", "mypipes:built", "-p", "n=1"], "already-built pipeline; it takes no --param"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(project: Path, cli_env: dict[str, str],
                                                args: list[str], message: str) -> None:
    out = sf(args, project, cli_env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_ctrl_c_cancels_running_steps_and_exits_130(project: Path, cli_env: dict[str, str]) -> None:
    events = project / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "stepflow", "run", "mypipes:slow", "--events",
                             str(events)], cwd=project, env=cli_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if events.exists() and events.read_text().count("StepStarted") >= 2:
            break
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, out + err
    assert time.monotonic() - t0 < 5
    assert "interrupted: cancelling running steps" in out
    evs = read_jsonl(events)
    assert {e.step for e in evs if isinstance(e, StepCancelled)} == {"sleepy", "sleepy_2"}
    assert isinstance(evs[-1], RunFinished) and evs[-1].status == "cancelled"
