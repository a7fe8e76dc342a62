"""The vertex step operator and the gcp registry end to end, on real parts only.

- Vertex AI: the local control plane of ``stepflow-localcloud`` (``stepflow_localcloud.vertex``), a
  ``grpc.aio`` server speaking the real JobService and LoggingServiceV2 protocols (the operator's
  own GAPIC clients reach it over plain gRPC) that *runs* each custom job's image on the local
  Docker daemon and keeps its output as log entries; it injects RESOURCE_EXHAUSTED on demand.
- Cloud Storage: the GCS emulator; images: the real daemon and the registry on 127.0.0.1:5000.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from stepflow import EventBus, run
from stepflow._stack.client import Client
from stepflow.errors import ConfigError, PipelineDefinitionError
from stepflow.events import ImageBuildFinished, ImagePushed, JobStatusChanged, JobSubmitted, LogLine, StepCancelled
from tests.docker_env import (
    REGISTRY,
    cancel_once_running,
    docker_test,
    remove_local_images,
    require_docker,
    run_with_events,
    seconds_until,
    shared_pipes,
    sigkill_after_submit_then_resume,
    sigkill_at_failpoint_then_resume,
)
from tests.services import gcs_emulator

__all__ = ["gcs_emulator"]

PROJECT, REGION = "my-project", "us-central1"
MODULE = f"vxpipes_{uuid.uuid4().hex[:8]}"
PIPES = shared_pipes("vertex") + textwrap.dedent(
    '''
    @step
    def load(n: int = 4) -> list[int]:
        return list(range(n))


    @step(custom_step_operator="vertex")
    def train(data: list[int], lr: float = 0.5) -> dict:
        print(f"training on {len(data)} rows, lr={lr}", flush=True)
        time.sleep(2)
        print("training done", flush=True)
        return {"score": sum(data) * lr, "job": os.environ.get("CLOUD_ML_JOB_ID"),
                "in_container": os.path.exists("/.dockerenv")}


    @pipeline
    def walkthrough(lr: float = 0.5):
        return train(load(), lr=lr)


    @step(custom_step_operator="vertex", settings={"vertex": {"machine_type": "n1-standard-4",
                                                              "accelerator_type": "NVIDIA_L4",
                                                              "accelerator_count": 1}})
    def mismatched() -> int:
        return 1


    @pipeline
    def bad_accelerator():
        mismatched()
    '''
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("vertex")
    project = root / "proj"
    project.mkdir()
    (project / f"{MODULE}.py").write_text(PIPES)
    cache = root / "cache"
    cache.mkdir()
    prefix = f"t-vx-{uuid.uuid4().hex[:8]}"
    yield {"project": project, "cache": cache, "prefix": prefix, "root": root}
    remove_local_images(f"{REGISTRY}/{prefix}/")


@pytest.fixture(scope="module")
def vertex() -> Iterator[Any]:
    """The local Vertex AI control plane (jobs run on Docker)."""
    require_docker()
    from stepflow_localcloud.vertex import serve_in_thread

    with serve_in_thread(project=PROJECT, location=REGION, phase_delay=0.2) as control_plane:
        yield control_plane


@pytest.fixture(scope="module")
def bucket(gcs_emulator: str) -> str:
    from gcsfs.core import GCSFileSystem

    name = f"vx-{uuid.uuid4().hex[:10]}"
    GCSFileSystem(endpoint_url=gcs_emulator, token="anon", project="test").mkdir(name)
    return name


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, shared: dict[str, Any], _isolated_home: Path) -> dict[str, str]:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    _isolated_home.mkdir(parents=True, exist_ok=True)
    (_isolated_home / "cache").symlink_to(shared["cache"], target_is_directory=True)
    monkeypatch.syspath_prepend(str(shared["project"]))
    monkeypatch.chdir(shared["project"])
    return dict(os.environ)


def register_stack(*, gcs: str, vertex: Any, bucket: str, project: Path, prefix: str, **operator: Any) -> None:
    c = Client()
    c.register_component("artifact_store", "gcs-store", "gcs",
                         {"path": f"gs://{bucket}/stepflow", "endpoint_url": gcs, "token": "anon", "project": "test"})
    c.register_component("container_registry", "gar", "gcp", {"uri": f"{REGISTRY}/{prefix}"})
    c.register_component("step_operator", "vertex", "vertex",
                         {"project": PROJECT, "region": REGION, "machine_type": "n1-standard-4",
                          "api_endpoint": f"http://{vertex.endpoint}", "project_root": str(project), **operator})
    c.register_stack("vertex_stack", artifact_store="gcs-store", container_registry="gar", step_operators=["vertex"])
    c.set_active_stack("vertex_stack")


@pytest.fixture
def vx_stack(env: dict[str, str], vertex: Any, bucket: str, shared: dict[str, Any],
             gcs_emulator: str) -> dict[str, Any]:
    register_stack(gcs=gcs_emulator, vertex=vertex, bucket=bucket, project=shared["project"],
                   prefix=shared["prefix"])
    return {"vertex": vertex, "bucket": bucket, "gcs": gcs_emulator, **shared}


def pipes() -> Any:
    return importlib.import_module(MODULE)


def cli(args: list[str], cwd: Path, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]), "COLUMNS": "160", **extra}
    return subprocess.run([sys.executable, "-m", "stepflow", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def creates(vertex: Any) -> int:
    return int(vertex.stats()["calls"].get("CreateCustomJob", 0))


# ------------------------------------------------------------------------------ the walkthrough
@docker_test
async def test_the_walkthrough_end_to_end(env: dict[str, str], vertex: Any, bucket: str, shared: dict[str, Any],
                                          gcs_emulator: str) -> None:
    """The issue's commands, then a pipeline whose trainer runs as a Vertex AI custom job."""
    project = shared["project"]
    prefix = f"t-vxwalk-{uuid.uuid4().hex[:8]}"
    commands = [
        ["artifact-store", "register", "gcs-store", "--type=gcs", f"--path=gs://{bucket}/stepflow",
         f"--endpoint_url={gcs_emulator}", "--token=anon", "--project=test"],
        ["container-registry", "register", "gar", "--type=gcp", f"--uri={REGISTRY}/{prefix}"],
        ["step-operator", "register", "vertex", "--type=vertex", f"--project={PROJECT}", f"--region={REGION}",
         "--machine_type=n1-standard-4", f"--service_account=trainer@{PROJECT}.iam.gserviceaccount.com",
         f"--api_endpoint=http://{vertex.endpoint}", f"--project_root={project}"],
        ["stack", "register", "vertex_stack", "-c", "gar", "-a", "gcs-store", "-s", "vertex"],
        ["stack", "set", "vertex_stack"],
    ]
    for args in commands:
        done = cli(args, project, timeout=60)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    try:
        before = creates(vertex)
        result, events = await run_with_events(pipes().walkthrough(lr=2.0))
        assert result.status == "succeeded", {k: s.error for k, s in result.steps.items()}
        model = result.output
        assert model["score"] == 12.0 and model["in_container"] is True and model["job"]
        assert [e.cached for e in events if isinstance(e, ImageBuildFinished)].count(False) == 1
        assert len([e for e in events if isinstance(e, ImagePushed)]) == 1
        submitted = [e for e in events if isinstance(e, JobSubmitted)]
        assert len(submitted) == 1 and submitted[0].job_id.endswith(f"/customJobs/{model['job']}")
        assert submitted[0].job_id.startswith(f"projects/{PROJECT}/locations/{REGION}/customJobs/")
        assert creates(vertex) - before == 1
        statuses = [e.status for e in events if isinstance(e, JobStatusChanged)]
        assert "RUNNING" in statuses and statuses[-1] == "SUCCEEDED", statuses
        lines = [e.line for e in events if isinstance(e, LogLine) and e.step == "train"]
        assert lines.index("training on 4 rows, lr=2.0") < lines.index("training done")
        logs = cli(["logs", result.run_id, "train"], project, timeout=60)
        assert logs.returncode == 0 and "training done" in logs.stdout
    finally:
        remove_local_images(f"{REGISTRY}/{prefix}/")


@docker_test
async def test_twenty_parallel_steps_under_twenty_percent_quota_errors(vx_stack: dict[str, Any]) -> None:
    vertex = vx_stack["vertex"]
    vertex.configure(resource_exhausted_rate=0.2)
    try:
        result, events = await run_with_events(pipes().many(20))
    finally:
        vertex.configure(resource_exhausted_rate=0.0)
    assert result.status == "succeeded", {k: s.error for k, s in result.steps.items() if s.error}
    assert result.output == [i * i for i in range(20)]
    stats = vertex.stats()
    names = {e.job_id for e in events if isinstance(e, JobSubmitted)}
    assert len(names) == 20
    assert stats["refused"].get("RESOURCE_EXHAUSTED", 0) > 0, stats
    assert all(n == 1 for n in stats["created"].values()), stats["created"]  # never a job twice


@docker_test
async def test_cancelling_the_run_cancels_every_custom_job(vx_stack: dict[str, Any]) -> None:
    import grpc
    from google.cloud.aiplatform_v1 import JobServiceClient
    from google.cloud.aiplatform_v1.services.job_service.transports import JobServiceGrpcTransport

    jobs, t0, seen = await cancel_once_running(pipes().naps(4, 120), lambda e: e.status == "RUNNING")
    channel = grpc.insecure_channel(vx_stack["vertex"].endpoint)
    client = JobServiceClient(transport=JobServiceGrpcTransport(channel=channel))
    took = seconds_until(lambda: all(client.get_custom_job(name=j).state.name == "JOB_STATE_CANCELLED"
                                     for j in jobs), t0)
    assert took <= 5.0, f"{took:.1f} s"
    print(f"\n4 in-flight custom jobs reached CANCELLED {took:.1f} s after the run was cancelled")
    assert len([e for e in seen if isinstance(e, StepCancelled)]) == 4


@docker_test
def test_sigkill_then_resume_creates_no_custom_job_twice(vx_stack: dict[str, Any]) -> None:
    vertex = vx_stack["vertex"]
    job = sigkill_after_submit_then_resume(vx_stack["project"], MODULE, lambda: creates(vertex))
    assert vertex.stats()["created"][job.job_name] == 1


@docker_test
@pytest.mark.parametrize("phase", ["job.recorded", "job.submitted"])
def test_sigkill_at_submit_time_then_resume_creates_each_job_once(phase: str, vx_stack: dict[str, Any]) -> None:
    job = sigkill_at_failpoint_then_resume(vx_stack["project"], MODULE, phase)
    assert vx_stack["vertex"].stats()["created"][job.job_name] == 1


# ------------------------------------------------------------------------------ failures, bad input
@docker_test
async def test_a_failing_step_shows_vertex_error_and_remote_traceback(vx_stack: dict[str, Any]) -> None:
    result, events = await run_with_events(pipes().failing())
    err = result.steps["broken"].error
    assert result.status == "failed" and err is not None and err.type == "RemoteStepError"
    assert "KeyError: 'missing'" in err.message and "non-zero status" in err.message
    assert 'return values["missing"] + x' in err.traceback
    assert any(isinstance(e, JobStatusChanged) and e.status == "FAILED" for e in events)


def test_missing_project_or_region_and_bad_machines_are_refused(env: dict[str, str]) -> None:
    c = Client()
    with pytest.raises(ConfigError, match="missing required option 'project'"):
        c.register_component("step_operator", "vx", "vertex", {"region": REGION})
    with pytest.raises(ConfigError, match="missing required option 'region'"):
        c.register_component("step_operator", "vx", "vertex", {"project": PROJECT})
    with pytest.raises(ConfigError, match=r"unknown Vertex AI machine type 'n1-standard-5': did you mean"):
        c.register_component("step_operator", "vx", "vertex", {"project": PROJECT, "region": REGION,
                                                               "machine_type": "n1-standard-5"})
    with pytest.raises(ConfigError, match=r"NVIDIA_TESLA_T4 on n1-standard-4: accelerator_count must be one of 1, 2, 4"):
        c.register_component("step_operator", "vx", "vertex", {"project": PROJECT, "region": REGION,
                                                               "accelerator_type": "NVIDIA_TESLA_T4",
                                                               "accelerator_count": 3})


@docker_test
async def test_bad_step_settings_and_resources_fail_before_anything_runs(vx_stack: dict[str, Any]) -> None:
    from stepflow import Resources, pipeline, step

    with pytest.raises(PipelineDefinitionError, match="NVIDIA_L4 cannot attach to n1-standard-4"):
        await run(pipes().bad_accelerator())

    @step(step_operator="vertex", resources=Resources(cpu=500))
    def huge() -> None: ...

    @pipeline
    def too_big():
        huge()

    with pytest.raises(PipelineDefinitionError, match="no Vertex AI machine offers cpu=500"):
        await run(too_big())


def test_resources_pick_the_cheapest_machine() -> None:
    from stepflow_vertex.machines import pick

    assert pick(4, None, None, None).machine_type == "e2-standard-4"
    assert pick(8, 60, None, None).machine_type == "n2-highmem-8"  # n1-highmem-8 has 52 GiB
    assert pick(None, None, 1, "T4").describe().endswith("+ 1 x NVIDIA_TESLA_T4")
    assert pick(None, None, 1, "A100").machine_type == "a2-highgpu-1g"
    assert pick(None, None, 1, "L4").machine_type == "g2-standard-4"
    with pytest.raises(ConfigError, match="GPU types: "):
        pick(None, None, 1, "RTX9090")


@docker_test
async def test_a_missing_bucket_is_named_as_the_run_starts(vx_stack: dict[str, Any]) -> None:
    from stepflow.errors import StepflowError

    c = Client()
    c.register_component("artifact_store", "nowhere", "gcs", {"path": "gs://no-such-vx-bucket/x", "token": "anon",
                                                              "endpoint_url": vx_stack["gcs"], "project": "test"})
    c.update_stack("vertex_stack", artifact_store="nowhere")
    with pytest.raises(StepflowError, match="no-such-vx-bucket"):
        await run(pipes().failing())


@docker_test
async def test_no_credentials_names_the_sources_tried(vx_stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    from stepflow.errors import StepflowError

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # no metadata server either
    monkeypatch.setenv("HOME", str(tmp_path))
    Client().update_component("step_operator", "vertex", {"api_endpoint": "127.0.0.1:9"})  # a real (TLS) endpoint
    with pytest.raises(StepflowError) as bad:
        await run(pipes().failing())
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(bad.value) or "credentials" in str(bad.value).lower()


# ------------------------------------------------------------------------------ the contract
@docker_test
async def test_vertex_backend_conforms(vertex: Any, tmp_path: Path, gcs_emulator: str, bucket: str) -> None:
    from stepflow_vertex.config import VertexOperatorConfig
    from stepflow_vertex.operator import VertexBackend

    from stepflow._components.fsspec_store import GCSArtifactStore
    from stepflow.interfaces.operator import RunResources
    from stepflow.testing import acheck_job_backend
    from stepflow.testing._job_backend_check import CHECKS
    from tests.docker_env import BASE_IMAGE

    config = VertexOperatorConfig(project=PROJECT, region=REGION, api_endpoint=f"http://{vertex.endpoint}")
    store = GCSArtifactStore("gcs", path=f"gs://{bucket}/conf",
                             storage_options={"endpoint_url": gcs_emulator, "token": "anon", "project": "test"})
    resources = RunResources(run_id="conformance", stack=None, artifact_store=store, container_registry=None,
                             image_builder=None, run_store=None, emit=lambda *a, **k: None, cache_dir=tmp_path,
                             home=tmp_path, derive_key=lambda purpose: bytes(32))
    report = await acheck_job_backend(lambda: VertexBackend("vertex", config), image=BASE_IMAGE, options=config,
                                      count_jobs=lambda name: int(vertex.stats()["created"].get(name, 0)),
                                      resources=resources)
    assert set(report.passed) >= set(CHECKS) - {"a job left created but never started starts when submitted again"}, \
        report.skipped


def test_the_vertex_module_is_small_and_import_stepflow_loads_no_google_code() -> None:
    import stepflow_vertex.operator as op

    assert len(Path(op.__file__).read_text().splitlines()) <= 400
    code = ("import sys, stepflow, stepflow.remote, stepflow_vertex.flavors; print(sorted(m for m, mod in "
            "list(sys.modules.items()) if m.split('.')[0] in ('google', 'grpc') and getattr(mod, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@docker_test
async def test_quota_exhausted_at_every_try_is_a_clear_error(vx_stack: dict[str, Any]) -> None:
    vertex = vx_stack["vertex"]
    Client().update_component("step_operator", "vertex", {"submit_attempts": 2})
    vertex.configure(resource_exhausted_rate=1.0)
    try:
        result = await run(pipes().failing())
    finally:
        vertex.configure(resource_exhausted_rate=0.0)
    err = result.steps["broken"].error
    assert result.status == "failed" and err is not None
    assert "RESOURCE_EXHAUSTED" in err.message and "quota exhausted" in err.message
    assert "ask for a quota increase" in err.message


@docker_test
async def test_a_job_cancelled_outside_stepflow_cancels_its_step(vx_stack: dict[str, Any]) -> None:
    import grpc
    from google.cloud.aiplatform_v1 import JobServiceClient
    from google.cloud.aiplatform_v1.services.job_service.transports import JobServiceGrpcTransport

    vertex = vx_stack["vertex"]
    client = JobServiceClient(transport=JobServiceGrpcTransport(channel=grpc.insecure_channel(vertex.endpoint)))
    bus = EventBus()
    box: list[Any] = []
    async with bus.subscribe() as events, anyio.create_task_group() as tg:
        async def go() -> None:
            box.append(await run(pipes().sleepy(120), event_bus=bus))

        tg.start_soon(go)
        seen: list[Any] = []
        with anyio.fail_after(120):
            while not any(isinstance(e, JobStatusChanged) and e.status == "RUNNING" for e in seen):
                seen += events.pending()
                await anyio.sleep(0.1)
        job = next(e.job_id for e in seen if isinstance(e, JobSubmitted))
        await anyio.to_thread.run_sync(lambda: client.cancel_custom_job(name=job))
    nap = box[0].steps["nap"]
    assert nap.status == "cancelled" and "outside stepflow" in (nap.reason or ""), (nap.status, nap.reason)
    assert box[0].steps["after_nap"].status == "skipped"
