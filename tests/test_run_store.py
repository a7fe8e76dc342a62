"""The run store under load and after crashes: outputs recorded for every step, runs shown interrupted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from stepflow._store.runs import RunStore, process_identity, runner_alive
from stepflow._store.sqlite import Store
from tests.docker_env import cli_environ, write_project

MANY = textwrap.dedent(
    '''
    from stepflow import pipeline, step


    @step
    def noop(i: int) -> int:
        return i


    @pipeline
    def many(n: int = 2001):
        return [noop(i) for i in range(n)]
    '''
)


def test_concurrent_persisted_runs_record_every_output(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Four CLI runs of 2,001 steps at once on one store: every succeeded step has its output."""
    root = tmp_path / "proj"
    module = write_project(root, MANY, "manypipes")
    env = cli_environ(root, cli_env)
    procs = [subprocess.Popen([sys.executable, "-m", "stepflow", "run", f"{module}:many", "--no-progress"], cwd=root,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    runs = RunStore(Store(Path(env["STEPFLOW_HOME"])))
    recorded = runs.list_runs(10)
    assert len(recorded) == 4
    for run in recorded:
        steps = runs.steps(run.run_id)
        assert run.status == "succeeded" and len(steps) == 2001
        assert all(s.status == "succeeded" for s in steps)
        assert len(runs.outputs(run.run_id)) == 2001, run.run_id


def test_a_run_whose_runner_is_gone_is_interrupted(tmp_path: Path) -> None:
    runs = RunStore(Store(tmp_path / "home"))
    runs.start_run("alive", "p", None, {}, None, 1)
    assert runs.get_run("alive").status == "running"  # this very process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = process_identity(int(dead.stdout))  # a pid whose process has exited
    with runs.store.write() as db:
        db.execute("UPDATE runs SET process = ? WHERE run_id = 'alive'", (gone,))
    record = runs.get_run("alive")
    assert record.status == "interrupted" and record.interrupted
    # another machine's runner: judged by its heartbeat
    assert runner_alive("other-host|123|456", heartbeat=__import__("time").time())
    assert not runner_alive("other-host|123|456", heartbeat=1.0)
    assert runner_alive(process_identity(), None)
    assert os.getpid() == int(process_identity().split("|")[1])
