"""A runner SIGKILLed at every phase of a docker step, then `stepflow resume`: nothing lost, nothing twice.

Each test runs the CLI with a failpoint (``STEPFLOW_FAILPOINTS``) that kills the runner exactly at
one phase (or, for "running", kills it from outside while the container runs). Then:

- `stepflow runs list` shows the run interrupted and says how to resume it;
- `stepflow resume RUN` finishes it with exit status 0;
- the daemon created exactly one container for the docker step over both processes;
- every step's output is the right one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepflow._store import keys
from stepflow._store.outputs import load_outputs
from stepflow._store.runs import RunStore
from stepflow.remote._io import read_uri
from stepflow.remote._keys import stored_value_key
from tests.docker_env import (
    REGISTRY,
    cli_environ,
    containers_created,
    docker_test,
    register_docker_stack,
    remove_local_images,
    stepflow_cli,
    write_project,
)

PIPES = textwrap.dedent(
    '''
    import time

    from stepflow import pipeline, step


    @step
    def prep(n: int = 4) -> list[int]:
        return list(range(n))


    @step(step_operator="docker")
    def nap(data: list[int], seconds: float = 3.0) -> int:
        print("napping", flush=True)
        time.sleep(seconds)
        return sum(data) * 10


    @step
    def after(total: int) -> str:
        return f"total {total}"


    @pipeline
    def sleepy(seconds: float = 3.0):
        return after(nap(prep(), seconds=seconds))
    '''
)


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "proj"
    module = write_project(root, PIPES)
    prefix = register_docker_stack(root)
    yield root, module
    remove_local_images(f"{REGISTRY}/{prefix}/")


def outputs(run_id: str) -> dict[str, object]:
    runs = RunStore()
    home = runs.store.home

    def derive(purpose: str) -> bytes:
        return keys.derive(keys.master_key(home), purpose)

    return load_outputs(runs, run_id, stored_value_key(derive), read_uri)


def running_container(run_id: str) -> bool:
    out = subprocess.run(["docker", "ps", "--filter", f"label=stepflow.run={run_id}", "--filter", "status=running",
                          "--format", "{{.ID}}"], capture_output=True, text=True, timeout=30)
    return bool(out.stdout.strip())


PHASES = ["image.build", "image.push", "job.recorded", "docker.created", "running", "job.finished"]


@docker_test
@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_every_phase_then_resume(phase: str, project: tuple[Path, str], cli_env: dict[str, str]) -> None:
    root, module = project
    run_id = f"crash-{phase.replace('.', '-')}-{uuid.uuid4().hex[:6]}"
    since = str(int(time.time()) - 1)
    env = cli_environ(root, cli_env)
    if phase != "running":
        env["STEPFLOW_FAILPOINTS"] = phase
    runner = subprocess.Popen([sys.executable, "-m", "stepflow", "run", f"{module}:sleepy", "--run-id", run_id,
                               "--no-progress"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    if phase == "running":  # from outside, as an OOM killer or a closed laptop would
        deadline = time.monotonic() + 240
        while not running_container(run_id):
            assert runner.poll() is None, runner.stdout.read() if runner.stdout else ""
            assert time.monotonic() < deadline, "the container never ran"
            time.sleep(0.1)
        runner.send_signal(signal.SIGKILL)
    code = runner.wait(timeout=240)
    out = runner.stdout.read() if runner.stdout else ""
    assert code == -signal.SIGKILL, f"the runner was not killed at {phase} (exit {code}):\n{out}"

    listed = stepflow_cli(["runs", "list"], root, cli_environ(root, cli_env))
    assert listed.returncode == 0
    assert "interrupted" in listed.stdout and f"stepflow resume {run_id}" in listed.stdout

    resumed = stepflow_cli(["resume", run_id, "--no-progress"], root, cli_environ(root, cli_env))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    record = RunStore().get_run(run_id)
    assert record.status == "succeeded" and not record.interrupted
    assert containers_created(run_id, since) == ["nap"], f"phase {phase}: containers created"
    assert outputs(run_id) == {"prep": [0, 1, 2, 3], "nap": 60, "after": "total 60"}
    left = subprocess.run(["docker", "ps", "-a", "--filter", f"label=stepflow.run={run_id}", "--format", "{{.ID}}"],
                          capture_output=True, text=True, timeout=30)
    assert left.stdout.strip() == ""  # removed once collected


@docker_test
def test_jobs_left_by_a_dead_runner_are_listed_and_stopped(project: tuple[Path, str],
                                                           cli_env: dict[str, str]) -> None:
    root, module = project
    run_id = f"left-{uuid.uuid4().hex[:6]}"
    env = cli_environ(root, cli_env)
    runner = subprocess.Popen([sys.executable, "-m", "stepflow", "run", f"{module}:sleepy", "-p", "seconds=120",
                               "--run-id", run_id, "--no-progress"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not running_container(run_id):
        assert runner.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(runner.pid, signal.SIGKILL)  # a second Ctrl-C leaves the same state: jobs run on, nobody watches
    runner.wait(timeout=30)
    shown = stepflow_cli(["runs", "show", run_id], root, env)
    assert "the runner of this run died" in shown.stdout and "runs stop" in shown.stdout and "nap" in shown.stdout
    stopped = stepflow_cli(["runs", "stop", run_id], root, env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stop requested" in stopped.stdout
    deadline = time.monotonic() + 30
    while running_container(run_id):
        assert time.monotonic() < deadline, "the container kept running after `stepflow runs stop`"
        time.sleep(0.2)
    assert RunStore().get_run(run_id).status == "cancelled"
