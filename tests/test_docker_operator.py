"""The docker step operator end to end on the real daemon and registry of this machine.

build -> push -> submit -> the container runs the step -> output back -> pipeline continues.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from stepflow import EventBus, run
from stepflow._stack.client import Client
from stepflow.errors import BackendError, ConfigError
from stepflow.events import (
    ImageBuildFinished,
    ImagePushed,
    JobStatusChanged,
    JobSubmitted,
    LogLine,
    StepCancelled,
)
from tests.docker_env import (
    REGISTRY,
    docker_test,
    register_docker_stack,
    remove_local_images,
    run_with_events,
    shared_pipes,
)

PIPES = shared_pipes("docker") + textwrap.dedent(
    '''
    @step
    def load(n: int = 5) -> list[int]:
        return list(range(n))


    @step(step_operator="docker")
    def train(data: list[int], lr: float = 0.5) -> dict:
        print(f"training on {len(data)} rows in a container, lr={lr}")
        return {"score": sum(data) * lr, "pid": os.getpid(), "in_container": os.path.exists("/.dockerenv")}


    @step
    def evaluate(model: dict) -> float:
        return model["score"] + 1


    @pipeline
    def three(lr: float = 0.5):
        return evaluate(train(load(), lr=lr))


    @step(step_operator="docker", settings={"docker": {"memory": "48m"}})
    def hog() -> int:
        blocks = [bytearray(16 * 1024 * 1024) for _ in range(40)]
        return len(blocks)


    @pipeline
    def oom():
        hog()
    '''
)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project dir with the pipeline module, importable here and copied into the image."""
    proj = tmp_path / "proj"
    proj.mkdir()
    module = f"dpipes_{uuid.uuid4().hex[:8]}"
    (proj / f"{module}.py").write_text(PIPES)
    monkeypatch.syspath_prepend(str(proj))
    monkeypatch.chdir(proj)
    return proj


def module_of(project: Path) -> Any:
    import importlib

    name = next(p.stem for p in project.glob("dpipes_*.py"))
    return importlib.import_module(name)


@pytest.fixture
def docker_stack(project: Path) -> Iterator[str]:
    """Registry (own prefix), docker image builder, docker step operator, stack: active."""
    prefix = register_docker_stack(project)
    yield prefix
    remove_local_images(f"{REGISTRY}/{prefix}/")


def containers_for(run_id: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-a", "--filter", f"label=stepflow.run={run_id}", "--format",
                          "{{.Names}} {{.Status}}"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


@docker_test
async def test_three_step_pipeline_with_the_middle_step_in_a_container(project: Path, docker_stack: str) -> None:
    mod = module_of(project)
    result, events = await run_with_events(mod.three(lr=2.0))
    assert result.status == "succeeded", {k: v.error for k, v in result.steps.items()}
    model = result.outputs["train"]
    assert model["score"] == 20.0 and model["in_container"] is True and model["pid"] != os.getpid()
    assert result.output == 21.0
    assert result.steps["train"].operator == "docker" and result.steps["load"].operator == "in-process"
    builds = [e for e in events if isinstance(e, ImageBuildFinished)]
    assert [b.cached for b in builds] == [False]
    assert len([e for e in events if isinstance(e, ImagePushed)]) == 1
    assert any(isinstance(e, JobSubmitted) and e.step == "train" for e in events)
    assert any(isinstance(e, JobStatusChanged) for e in events)
    logs = [e.line for e in events if isinstance(e, LogLine) and e.step == "train"]
    assert any("training on 5 rows in a container, lr=2.0" in line for line in logs), logs
    assert containers_for(result.run_id) == []  # removed after the step

    again, events = await run_with_events(mod.three(lr=2.0))
    assert again.status == "succeeded"
    assert [b.cached for b in events if isinstance(b, ImageBuildFinished)] == [True]
    assert not [e for e in events if isinstance(e, ImagePushed)]


@docker_test
async def test_eight_parallel_docker_steps_share_one_build(project: Path, docker_stack: str) -> None:
    mod = module_of(project)
    result, events = await run_with_events(mod.many(8))
    assert result.status == "succeeded"
    assert result.output == [i * i for i in range(8)]
    finished = [e for e in events if isinstance(e, ImageBuildFinished)]
    assert sum(1 for e in finished if not e.cached) == 1
    assert len([e for e in events if isinstance(e, ImagePushed)]) == 1
    assert len({e.job_id for e in events if isinstance(e, JobSubmitted)}) == 8


@docker_test
async def test_cancelling_a_run_stops_its_containers_quickly(project: Path, docker_stack: str) -> None:
    mod = module_of(project)
    bus = EventBus()
    run_ids: list[str] = []
    async with bus.subscribe() as events:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: run(mod.sleepy(60), event_bus=bus))
                while True:  # wait until the container is running
                    got = [e for e in events.pending() if isinstance(e, JobStatusChanged) and e.status == "running"]
                    if got:
                        run_ids.append(got[0].run_id)
                        break
                    await anyio.sleep(0.1)
                t0 = time.monotonic()
                scope.cancel()
        stopped_in = time.monotonic() - t0
        rest = events.pending()
    assert stopped_in < 5.0, f"the run took {stopped_in:.1f}s to stop"
    assert any(isinstance(e, StepCancelled) and e.step == "nap" for e in rest)
    assert containers_for(run_ids[0]) == []


@docker_test
async def test_a_step_failing_in_the_container_shows_the_remote_traceback(project: Path, docker_stack: str) -> None:
    mod = module_of(project)
    result = await run(mod.failing())
    err = result.steps["broken"].error
    assert result.status == "failed" and err is not None
    assert err.type == "RemoteStepError" and "KeyError: 'missing'" in err.message
    assert 'return values["missing"] + x' in err.traceback and "Traceback" in err.traceback


@docker_test
async def test_an_oom_killed_container_says_so(project: Path, docker_stack: str) -> None:
    mod = module_of(project)
    result = await run(mod.oom())
    err = result.steps["hog"].error
    assert result.status == "failed" and err is not None
    assert "out-of-memory" in err.message and "48 MiB" in err.message


@docker_test
def test_sigkill_then_resume_submits_no_job_twice(project: Path, docker_stack: str, cli_env: dict[str, str]) -> None:
    name = next(p.stem for p in project.glob("dpipes_*.py"))
    env = {**cli_env, "PYTHONPATH": os.pathsep.join([str(project), cli_env["PYTHONPATH"]]),
           "STEPFLOW_HOME": os.environ["STEPFLOW_HOME"]}
    since = str(int(time.time()) - 1)
    runner = subprocess.Popen([sys.executable, "-m", "stepflow", "run", f"{name}:sleepy", "-p", "seconds=8",
                               "--no-progress"], cwd=project, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    from stepflow._store.runs import RunStore

    store = RunStore()
    deadline = time.monotonic() + 240
    run_id = None
    while time.monotonic() < deadline:
        runs = store.list_runs(1)
        if runs and store.jobs(runs[0].run_id):
            run_id = runs[0].run_id
            break
        if runner.poll() is not None:
            pytest.fail(f"runner exited early: {runner.stdout.read() if runner.stdout else ''}")
        time.sleep(0.2)
    assert run_id is not None, "the runner never recorded the docker job"
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=10)
    assert len(containers_for(run_id)) == 1  # the job outlives its runner

    resumed = subprocess.run([sys.executable, "-m", "stepflow", "resume", run_id, "--no-progress"], cwd=project,
                             env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "succeeded" in resumed.stdout.splitlines()[-1]
    record = store.get_run(run_id)
    assert record.status == "succeeded"
    steps = {s.step: s for s in store.steps(run_id)}
    assert steps["nap"].status == "succeeded" and steps["after_nap"].status == "succeeded"
    created = subprocess.run(["docker", "events", "--since", since, "--until", str(int(time.time()) + 1),
                              "--filter", "event=create", "--filter", f"label=stepflow.run={run_id}",
                              "--format", "{{json .Actor.Attributes}}"],
                             capture_output=True, text=True, timeout=60, check=True)
    attrs = [json.loads(line) for line in created.stdout.splitlines() if line.strip()]
    assert [a["stepflow.step"] for a in attrs] == ["nap"], attrs
    assert containers_for(run_id) == []


# ------------------------------------------------------------------ bad input, end to end
def operator(cls: type, project: Path, **config: Any) -> Any:
    """A docker operator around a (test-altered) DockerBackend class."""
    from stepflow_docker.operator_config import DockerOperatorConfig, DockerOperatorSettings

    from stepflow.remote import JobOperator

    return JobOperator(cls("docker", DockerOperatorConfig(project_root=str(project), **config)),
                       settings_class=DockerOperatorSettings)


def payload_path(job: Any) -> Path:
    return Path(job.command[job.command.index("--payload") + 1])


@docker_test
async def test_a_payload_changed_in_the_store_is_refused_and_nothing_runs(project: Path, docker_stack: str,
                                                                          tmp_path: Path) -> None:
    from stepflow_docker.operator import DockerBackend

    class Tampering(DockerBackend):
        async def submit(self, job: Any) -> str:
            path = payload_path(job)
            data = bytearray(path.read_bytes())
            data[-3] ^= 0xFF  # someone with write access to the store changes the pickled body
            path.write_bytes(bytes(data))
            return await super().submit(job)

    mod = module_of(project)
    result, events = await run_with_events(mod.three(), operators={"docker": operator(Tampering, project)})
    err = result.steps["train"].error
    assert result.status == "failed" and err is not None
    assert "exit code 2" in err.message and "wrote no output" in err.message
    logs = "\n".join(e.line for e in events if isinstance(e, LogLine))
    assert "does not match the sha256 its job was started with" in logs and "nothing was executed" in logs
    assert result.steps["evaluate"].status == "skipped"


@docker_test
async def test_output_missing_after_the_job_claims_success(project: Path, docker_stack: str) -> None:
    from stepflow_docker.operator import DockerBackend

    class WrongCommand(DockerBackend):
        async def submit(self, job: Any) -> str:
            import attrs

            return await super().submit(attrs.evolve(job, command=("python3", "-c", "print('did nothing')")))

    mod = module_of(project)
    result = await run(mod.three(), operators={"docker": operator(WrongCommand, project)})
    err = result.steps["train"].error
    assert err is not None and "reported success but wrote no output" in err.message


@docker_test
async def test_an_unreachable_daemon_fails_the_run_before_it_starts(project: Path, docker_stack: str) -> None:
    from stepflow_docker.operator import DockerBackend

    mod = module_of(project)
    with pytest.raises(BackendError, match=r"cannot reach the Docker daemon at unix:///tmp/no-such-docker\.sock.*"
                                           r"Start it"):
        await run(mod.three(), operators={
            "docker": operator(DockerBackend, project, docker_host="unix:///tmp/no-such-docker.sock")})


@docker_test
async def test_an_unreachable_registry_fails_the_run_before_it_starts(project: Path, docker_stack: str) -> None:
    c = Client()
    c.register_component("container_registry", "dead", "default", {"uri": "127.0.0.1:1/x"})
    c.update_stack("docker_stack", container_registry="dead")
    mod = module_of(project)
    with pytest.raises(ConfigError, match=r"cannot push step images: container registry 127\.0\.0\.1:1/x"):
        await run(mod.three())


@docker_test
async def test_a_missing_base_image_fails_the_run_before_it_starts(project: Path, docker_stack: str) -> None:
    Client().update_component("step_operator", "docker", {"base_image": "stepflow-nope:0.0"})
    mod = module_of(project)
    with pytest.raises(ConfigError, match=r"base image 'stepflow-nope:0\.0' is not on the image builder's Docker "
                                          r"daemon"):
        await run(mod.three())


@docker_test
def test_config_errors_exit_2_with_one_clear_line(project: Path, docker_stack: str, cli_env: dict[str, str]) -> None:
    Client().update_component("step_operator", "docker", {"base_image": "stepflow-nope:0.0"})
    name = next(p.stem for p in project.glob("dpipes_*.py"))
    env = {**cli_env, "PYTHONPATH": os.pathsep.join([str(project), cli_env["PYTHONPATH"]]),
           "STEPFLOW_HOME": os.environ["STEPFLOW_HOME"]}
    out = subprocess.run([sys.executable, "-m", "stepflow", "run", f"{name}:three", "--no-progress"], cwd=project,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "base image 'stepflow-nope:0.0'" in out.stderr and "Traceback" not in out.stdout + out.stderr
    assert out.stderr.count("error:") == 1 and out.stderr.count("is not on the image builder") == 1


@docker_test
async def test_resources_become_container_limits_and_impossible_ones_fail_early(project: Path,
                                                                                docker_stack: str) -> None:
    from stepflow import Resources, pipeline, step
    from stepflow.errors import PipelineDefinitionError

    @step(step_operator="docker", resources=Resources(cpu=1, memory="256MiB"))
    def limits() -> dict:
        import pathlib

        mem = pathlib.Path("/sys/fs/cgroup/memory.max")
        legacy = pathlib.Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        cpu = pathlib.Path("/sys/fs/cgroup/cpu.max")
        return {"memory": (mem if mem.exists() else legacy).read_text().strip(),
                "cpu": cpu.read_text().strip() if cpu.exists() else "", "uid": __import__("os").getuid()}

    @pipeline
    def limited():
        limits()

    result = await run(limited())
    assert result.status == "succeeded", result.steps["limits"].error
    out = result.outputs["limits"]
    assert out["memory"] == str(256 * 1024 * 1024)
    assert out["uid"] == 65534  # not root
    if out["cpu"]:
        assert out["cpu"].split()[0] == "100000"

    @step(step_operator="docker", resources=Resources(cpu=4096, gpu=1))
    def impossible() -> None: ...

    @pipeline
    def too_big():
        impossible()

    with pytest.raises(PipelineDefinitionError, match=r"cpu=4096, but this Docker host has \d+ CPUs"):
        await run(too_big())
