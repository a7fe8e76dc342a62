"""The azureml step operator and the azure (ACR) registry end to end, on real parts only.

- Azure ML: the local control plane of ``stepflow-localcloud`` (``stepflow_localcloud.azureml``),
  an HTTPS server speaking the REST calls of the real ``MLClient`` (the operator's own SDK
  reaches it as a custom cloud with a static token) that *runs* each command job's image on the
  local Docker daemon and serves its user logs; it injects 429 (with Retry-After) and 503.
- Blob storage: Azurite; the jobs reach it with what the control plane gives their containers
  (standing in for the compute's managed identity). Images: the real daemon and the registry
  on 127.0.0.1:5000.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from stepflow import EventBus, run
from stepflow._stack.client import Client
from stepflow.errors import ConfigError, PipelineDefinitionError, StepflowError
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
from tests.services import AZURITE_ACCOUNT, AZURITE_KEY, azurite, azurite_connection_string

__all__ = ["azurite"]

SUB = "11111111-2222-3333-4444-555555555555"
RG, WS = "ml-rg", "ml-ws"
MODULE = f"azpipes_{uuid.uuid4().hex[:8]}"
PIPES = shared_pipes("azureml") + textwrap.dedent(
    '''
    @step
    def load(n: int = 4) -> list[int]:
        return list(range(n))


    @step(custom_step_operator="azureml")
    def train(data: list[int], lr: float = 0.5) -> dict:
        print(f"training on {len(data)} rows, lr={lr}", flush=True)
        time.sleep(2)
        print("training done", flush=True)
        return {"score": sum(data) * lr, "run": os.environ.get("AZUREML_RUN_ID"),
                "in_container": os.path.exists("/.dockerenv")}


    @pipeline
    def walkthrough(lr: float = 0.5):
        return train(load(), lr=lr)


    @step(custom_step_operator="azureml", settings={"azureml": {"compute": "gpu-cluster"}})
    def elsewhere() -> int:
        return 1


    @pipeline
    def unknown_compute():
        elsewhere()
    '''
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("azureml")
    project = root / "proj"
    project.mkdir()
    (project / f"{MODULE}.py").write_text(PIPES)
    cache = root / "cache"
    cache.mkdir()
    prefix = f"t-az-{uuid.uuid4().hex[:8]}"
    yield {"project": project, "cache": cache, "prefix": prefix, "root": root}
    remove_local_images(f"{REGISTRY}/{prefix}/")


class RemoteAzureML:
    """The local Azure ML control plane in its own process, as a cloud is: its test hooks over HTTPS.

    In-process, its server thread would compete with the runner for the GIL and blur what the
    event-loop probe measures.
    """

    def __init__(self, proc: subprocess.Popen[str], url: str, certificate_file: str) -> None:
        self.proc, self.url, self.certificate_file = proc, url, certificate_file

    def _hook(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import ssl

        import httpx

        verify = ssl.create_default_context(cafile=self.certificate_file)
        response = httpx.request(method, f"{self.url}/_fake/{path}", json=body, verify=verify, timeout=30)
        response.raise_for_status()
        return dict(response.json())

    def stats(self) -> dict[str, Any]:
        """Calls per operation, creates per job name, injected faults."""
        return self._hook("GET", "stats")

    def configure(self, **faults: Any) -> None:
        """Change the fault injection (throttle_rate, error_rate, seed)."""
        self._hook("POST", "config", faults)


@pytest.fixture(scope="module")
def aml(azurite: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteAzureML]:
    """The local Azure ML control plane (jobs run on Docker and reach Azurite), a separate process."""
    require_docker()
    cert = tmp_path_factory.mktemp("aml") / "aml.pem"
    argv = [sys.executable, "-m", "stepflow_localcloud.azureml", "--port", "0", "--subscription-id", SUB,
            "--resource-group", RG, "--workspace-name", WS, "--compute", "cpu-cluster", "--phase-delay", "0.2",
            "--certificate-file", str(cert), "--log-level", "WARNING",
            "--env", f"AZURE_STORAGE_CONNECTION_STRING={azurite_connection_string(azurite)}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        url = ""
        deadline = time.monotonic() + 60
        while not url and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                pytest.fail("the local Azure ML control plane exited before listening")
            if "listening on " in line:
                url = line.split("listening on ", 1)[1].strip()
        assert url, "the local Azure ML control plane did not start within 60 s"
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
        yield RemoteAzureML(proc, url, str(cert))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def container(azurite: str) -> str:
    from azure.storage.blob import BlobServiceClient

    name = f"az-{uuid.uuid4().hex[:10]}"
    BlobServiceClient.from_connection_string(azurite_connection_string(azurite)).create_container(name)
    return name


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, shared: dict[str, Any], _isolated_home: Path) -> dict[str, str]:
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_STORAGE_CONNECTION_STRING"):
        monkeypatch.delenv(name, raising=False)
    _isolated_home.mkdir(parents=True, exist_ok=True)
    (_isolated_home / "cache").symlink_to(shared["cache"], target_is_directory=True)
    monkeypatch.syspath_prepend(str(shared["project"]))
    monkeypatch.chdir(shared["project"])
    return dict(os.environ)


def store_options(azurite: str, container: str) -> dict[str, Any]:
    return {"path": f"az://{container}/stepflow", "account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY,
            "endpoint_url": azurite}


def operator_options(aml: Any, project: Path) -> dict[str, Any]:
    return {"subscription_id": SUB, "resource_group": RG, "workspace_name": WS, "compute": "serverless",
            "instance_type": "Standard_DS3_v2", "endpoint": aml.url, "ca_bundle": aml.certificate_file,
            "project_root": str(project)}


def register_stack(*, azurite: str, aml: Any, container: str, project: Path, prefix: str, **operator: Any) -> None:
    c = Client()
    c.register_component("artifact_store", "az-store", "azure", store_options(azurite, container))
    c.register_component("container_registry", "acr", "azure", {"uri": f"{REGISTRY}/{prefix}"})
    c.register_component("step_operator", "azureml", "azureml", {**operator_options(aml, project), **operator})
    c.register_stack("azure_stack", artifact_store="az-store", container_registry="acr", step_operators=["azureml"])
    c.set_active_stack("azure_stack")


@pytest.fixture
def az_stack(env: dict[str, str], aml: Any, container: str, shared: dict[str, Any], azurite: str
             ) -> dict[str, Any]:
    register_stack(azurite=azurite, aml=aml, container=container, project=shared["project"], prefix=shared["prefix"])
    return {"aml": aml, "container": container, "azurite": azurite, **shared}


def pipes() -> Any:
    return importlib.import_module(MODULE)


def cli(args: list[str], cwd: Path, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]), "COLUMNS": "160", **extra}
    return subprocess.run([sys.executable, "-m", "stepflow", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def creates(aml: Any) -> int:
    return int(aml.stats()["calls"].get("CreateOrUpdateJob", 0))


def ml_client(aml: Any) -> Any:
    from stepflow_azureml import azure
    from stepflow_azureml.config import AzureMLOperatorConfig

    return azure.ml_client(AzureMLOperatorConfig(subscription_id=SUB, resource_group=RG, workspace_name=WS,
                                                 endpoint=aml.url, ca_bundle=aml.certificate_file))


class LoopLag:
    """A 10 ms sleeper on the event loop: how late it wakes, and how much of that the loop spent running code.

    ``worst`` (wall) also counts time the loop thread waited for a CPU or the GIL while job
    containers, the control plane and the SDK's worker threads ran; ``worst_busy`` counts only the
    loop thread's own CPU time in the gap: a callback that blocks the loop shows there.
    """

    def __init__(self) -> None:
        self.worst = self.worst_busy = 0.0

    async def probe(self) -> None:
        while True:
            t0, c0 = time.perf_counter(), time.thread_time()
            await anyio.sleep(0.01)
            self.worst = max(self.worst, time.perf_counter() - t0 - 0.01)
            self.worst_busy = max(self.worst_busy, time.thread_time() - c0)


# ------------------------------------------------------------------------------ the walkthrough
@docker_test
async def test_the_walkthrough_end_to_end(env: dict[str, str], aml: Any, container: str, shared: dict[str, Any],
                                          azurite: str) -> None:
    """The issue's commands (plus where the local control plane is), then a trainer as an Azure ML job."""
    project = shared["project"]
    prefix = f"t-azwalk-{uuid.uuid4().hex[:8]}"
    store = store_options(azurite, container)
    commands = [
        ["artifact-store", "register", "az-store", "--type=azure", f"--path={store['path']}",
         f"--account_name={AZURITE_ACCOUNT}", f"--account_key={AZURITE_KEY}", f"--endpoint_url={azurite}"],
        ["container-registry", "register", "acr", "--type=azure", f"--uri={REGISTRY}/{prefix}"],
        ["step-operator", "register", "azureml", "--type=azureml", f"--subscription_id={SUB}",
         f"--resource_group={RG}", f"--workspace_name={WS}", "--compute=serverless",
         "--instance_type=Standard_DS3_v2", f"--endpoint={aml.url}", f"--ca_bundle={aml.certificate_file}",
         f"--project_root={project}"],
        ["stack", "register", "azure_stack", "-c", "acr", "-a", "az-store", "-s", "azureml"],
        ["stack", "set", "azure_stack"],
    ]
    for args in commands:
        done = cli(args, project, timeout=60)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    try:
        before = creates(aml)
        result, events = await run_with_events(pipes().walkthrough(lr=2.0))
        assert result.status == "succeeded", {k: s.error for k, s in result.steps.items()}
        model = result.output
        assert model["score"] == 12.0 and model["in_container"] is True
        submitted = [e for e in events if isinstance(e, JobSubmitted)]
        assert len(submitted) == 1 and model["run"] == submitted[0].job_id
        assert [e.cached for e in events if isinstance(e, ImageBuildFinished)].count(False) == 1
        assert len([e for e in events if isinstance(e, ImagePushed)]) == 1
        assert creates(aml) - before == 1
        statuses = [e.status for e in events if isinstance(e, JobStatusChanged)]
        assert "Running" in statuses and statuses[-1] == "Completed", statuses
        lines = [e.line for e in events if isinstance(e, LogLine) and e.step == "train"]
        assert lines.index("training on 4 rows, lr=2.0") < lines.index("training done")
        logs = cli(["logs", result.run_id, "train"], project, timeout=60)
        assert logs.returncode == 0 and "training done" in logs.stdout
        job = ml_client(aml).jobs.get(submitted[0].job_id)
        assert job.tags["stepflow.step"] == "train" and job.resources.instance_type == "Standard_DS3_v2"
    finally:
        remove_local_images(f"{REGISTRY}/{prefix}/")


@docker_test
async def test_twenty_parallel_steps_under_twenty_percent_429s_never_block_the_loop(az_stack: dict[str, Any]) -> None:
    aml = az_stack["aml"]
    ml_client(aml)  # the SDK imported once, outside the measurement (a run imports it in a worker thread too)
    lag = LoopLag()
    aml.configure(throttle_rate=0.2, seed=11)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lag.probe)
            result, events = await run_with_events(pipes().many(20))
            tg.cancel_scope.cancel()
    finally:
        aml.configure(throttle_rate=0.0)
    assert result.status == "succeeded", {k: s.error for k, s in result.steps.items() if s.error}
    assert result.output == [i * i for i in range(20)]
    stats = aml.stats()
    assert len({e.job_id for e in events if isinstance(e, JobSubmitted)}) == 20
    assert stats["throttled"] > 0, stats
    assert all(n == 1 for n in stats["created"].values()), stats["created"]  # never a job twice
    print(f"\n20 Azure ML steps under 20% 429s: {stats['throttled']} throttled answers; the event loop ran code for "
          f"at most {lag.worst_busy * 1000:.1f} ms at a time (a 10 ms sleeper woke at worst {lag.worst * 1000:.1f} ms "
          "late: CPU and GIL shared with 20 containers and the SDK's threads on this machine)")
    assert lag.worst_busy <= 0.05, f"the event loop was blocked for {lag.worst_busy * 1000:.0f} ms"


@docker_test
async def test_cancelling_the_run_cancels_every_job_within_5s(az_stack: dict[str, Any]) -> None:
    jobs, t0, seen = await cancel_once_running(pipes().naps(4, 120), lambda e: e.status == "Running")
    client = ml_client(az_stack["aml"])
    took = seconds_until(lambda: all(getattr(client.jobs.get(j).status, "value", None) == "Canceled"
                                     for j in jobs), t0)
    assert took <= 5.0, f"{took:.1f} s"
    print(f"\n4 in-flight Azure ML jobs reached Canceled {took:.1f} s after the run was cancelled")
    assert len([e for e in seen if isinstance(e, StepCancelled)]) == 4


@docker_test
def test_sigkill_then_resume_creates_no_job_twice(az_stack: dict[str, Any]) -> None:
    aml = az_stack["aml"]
    job = sigkill_after_submit_then_resume(az_stack["project"], MODULE, lambda: creates(aml))
    assert aml.stats()["created"][job.job_name] == 1


@docker_test
@pytest.mark.parametrize("phase", ["job.recorded", "job.submitted"])
def test_sigkill_at_submit_time_then_resume_creates_each_job_once(phase: str, az_stack: dict[str, Any]) -> None:
    job = sigkill_at_failpoint_then_resume(az_stack["project"], MODULE, phase)
    assert az_stack["aml"].stats()["created"][job.job_name] == 1


# ------------------------------------------------------------------------------ failures, bad input
@docker_test
async def test_a_failing_step_shows_azures_error_and_the_remote_traceback(az_stack: dict[str, Any]) -> None:
    result, events = await run_with_events(pipes().failing())
    err = result.steps["broken"].error
    assert result.status == "failed" and err is not None and err.type == "RemoteStepError"
    assert "KeyError: 'missing'" in err.message
    assert 'return values["missing"] + x' in err.traceback
    failed = [e for e in events if isinstance(e, JobStatusChanged) and e.status == "Failed"]
    assert failed and failed[0].detail, "Azure's error of the failed job"


@docker_test
async def test_a_job_cancelled_outside_stepflow_cancels_its_step(az_stack: dict[str, Any]) -> None:
    aml = az_stack["aml"]
    bus = EventBus()
    async with bus.subscribe() as events, anyio.create_task_group() as tg:
        outcome: dict[str, Any] = {}

        async def go() -> None:
            outcome["result"] = await run(pipes().sleepy(60), event_bus=bus)

        tg.start_soon(go)
        seen: list[Any] = []
        with anyio.fail_after(120):
            while not any(isinstance(e, JobStatusChanged) and e.status == "Running" for e in seen):
                seen += events.pending()
                await anyio.sleep(0.1)
        job_id = next(e.job_id for e in seen if isinstance(e, JobSubmitted))
        await anyio.to_thread.run_sync(lambda: ml_client(aml).jobs.begin_cancel(job_id).result())
    result = outcome["result"]
    assert result.steps["nap"].status == "cancelled" and result.steps["after_nap"].status == "skipped"


def test_bad_options_are_refused_at_registration(env: dict[str, str]) -> None:
    c = Client()
    base = {"subscription_id": SUB, "resource_group": RG, "workspace_name": WS}
    for missing in base:
        with pytest.raises(ConfigError, match=f"missing required option '{missing}'"):
            c.register_component("step_operator", "az", "azureml", {k: v for k, v in base.items() if k != missing})
    with pytest.raises(ConfigError, match=r"unknown Azure ML VM size 'Standard_DS3_v3': did you mean Standard_DS3_v2"):
        c.register_component("step_operator", "az", "azureml", {**base, "instance_type": "Standard_DS3_v3"})
    with pytest.raises(ConfigError, match="is not a subscription id"):
        c.register_component("step_operator", "az", "azureml", {**base, "subscription_id": "my-sub"})
    with pytest.raises(ConfigError, match="client_id and client_secret go together"):
        c.register_component("step_operator", "az", "azureml", {**base, "client_id": "abc", "tenant_id": "t"})
    with pytest.raises(ConfigError, match="job_tier applies to serverless compute"):
        c.register_component("step_operator", "az", "azureml", {**base, "compute": "cpu-cluster", "job_tier": "Spot"})
    with pytest.raises(ConfigError, match="refuses bearer tokens over plain http"):
        c.register_component("step_operator", "az", "azureml", {**base, "endpoint": "http://127.0.0.1:1"})


@pytest.mark.parametrize(("field", "bad", "expected"), [
    ("workspace_name", "no-such-ws", f"workspace no-such-ws does not exist in resource group {RG}"),
    ("resource_group", "no-such-rg", f"resource group no-such-rg does not exist in subscription {SUB}"),
    ("subscription_id", "99999999-9999-9999-9999-999999999999",
     "subscription 99999999-9999-9999-9999-999999999999 does not exist"),
    ("compute", "gpu-cluster", "compute 'gpu-cluster' does not exist in workspace ml-ws; existing: cpu-cluster"),
], ids=["workspace", "resource-group", "subscription", "compute"])
@docker_test
def test_a_missing_workspace_part_or_compute_is_named_before_anything_runs(
        az_stack: dict[str, Any], field: str, bad: str, expected: str) -> None:
    before = creates(az_stack["aml"])
    Client().update_component("step_operator", "azureml", {field: bad})
    with pytest.raises(StepflowError, match=expected):
        anyio.run(run, pipes().failing())
    assert creates(az_stack["aml"]) == before


@docker_test
async def test_a_step_on_an_unknown_compute_fails_with_azures_answer(az_stack: dict[str, Any]) -> None:
    result = await run(pipes().unknown_compute())
    err = result.steps["elsewhere"].error
    assert result.status == "failed" and err is not None and "gpu-cluster" in err.message


@docker_test
async def test_resources_pick_a_vm_size_or_fail_naming_the_largest(az_stack: dict[str, Any]) -> None:
    from stepflow_azureml.vmsizes import pick

    from stepflow import Resources, pipeline, step

    assert pick(4, 16, None, None).name == "Standard_D4s_v3"
    assert pick(None, None, 1, "T4").name == "Standard_NC4as_T4_v3"
    assert pick(None, None, 2, "A100").name == "Standard_NC48ads_A100_v4"

    @step(step_operator="azureml", resources=Resources(cpu=500))
    def huge() -> None: ...

    @pipeline
    def too_big():
        huge()

    with pytest.raises(PipelineDefinitionError, match="no Azure ML VM size offers cpu=500 on one node"):
        await run(too_big())


@docker_test
async def test_a_missing_storage_container_is_named_as_the_run_starts(az_stack: dict[str, Any]) -> None:
    c = Client()
    c.register_component("artifact_store", "nowhere", "azure",
                         {**store_options(az_stack["azurite"], "no-such-container"),
                          "path": "az://no-such-container/x"})
    c.update_stack("azure_stack", artifact_store="nowhere")
    with pytest.raises(StepflowError, match="no-such-container"):
        await run(pipes().failing())


@docker_test
async def test_no_credentials_names_the_sources_tried(az_stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no Azure CLI login either
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9/token")  # a managed identity endpoint that is down
    monkeypatch.setenv("IDENTITY_HEADER", "x")
    Client().update_component("step_operator", "azureml", {"endpoint": None, "ca_bundle": None})
    with pytest.raises(StepflowError) as bad:
        await run(pipes().failing())
    text = str(bad.value)
    assert "no Azure credentials" in text and "EnvironmentCredential" in text and "az login" in text


# ------------------------------------------------------------------------------ the contract
@docker_test
async def test_azureml_backend_conforms(aml: Any, tmp_path: Path, azurite: str, container: str) -> None:
    from stepflow_azureml.config import AzureMLOperatorConfig
    from stepflow_azureml.operator import AzureMLBackend

    from stepflow._components.fsspec_store import AzureArtifactStore
    from stepflow.interfaces.operator import RunResources
    from stepflow.testing import acheck_job_backend
    from stepflow.testing._job_backend_check import CHECKS
    from tests.docker_env import BASE_IMAGE

    config = AzureMLOperatorConfig(subscription_id=SUB, resource_group=RG, workspace_name=WS, endpoint=aml.url,
                                   ca_bundle=aml.certificate_file)
    store = AzureArtifactStore("azure", path=f"az://{container}/conf",
                               storage_options={"connection_string": azurite_connection_string(azurite)})
    resources = RunResources(run_id="conformance", stack=None, artifact_store=store, container_registry=None,
                             image_builder=None, run_store=None, emit=lambda *a, **k: None, cache_dir=tmp_path,
                             home=tmp_path, derive_key=lambda purpose: bytes(32))
    report = await acheck_job_backend(lambda: AzureMLBackend("azureml", config), image=BASE_IMAGE, options=config,
                                      count_jobs=lambda name: int(aml.stats()["created"].get(name, 0)),
                                      resources=resources)
    assert set(report.passed) >= set(CHECKS) - {"a job left created but never started starts when submitted again"}, \
        report.skipped


def test_the_azureml_module_is_small_and_import_stepflow_loads_no_azure_code() -> None:
    import stepflow_azureml.operator as op

    lines = len(Path(op.__file__).read_text().splitlines())
    assert lines <= 400, lines
    code = ("import sys, stepflow, stepflow.remote, stepflow_azureml.flavors; print(sorted(m for m, mod in "
            "list(sys.modules.items()) if m.split('.')[0] == 'azure' and getattr(mod, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
