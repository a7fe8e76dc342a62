"""The local Vertex AI control plane (stepflow-localcloud), wire-level: real Docker, real SDK clients.

Every call goes through the Google SDK's own GAPIC clients over plaintext gRPC: the async
``JobServiceAsyncClient`` and ``LoggingServiceV2AsyncClient`` a stepflow operator uses, and the
synchronous ``JobServiceClient``, so these tests also prove the clients parse every answer and
error. Job containers run ``stepflow-base:py3.11`` with ``python3 -c``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.api_core import exceptions as gexc
from google.cloud import aiplatform_v1 as v1
from google.cloud.aiplatform_v1.services.job_service.transports import (
    JobServiceGrpcAsyncIOTransport,
    JobServiceGrpcTransport,
)
from google.cloud.logging_v2.services.logging_service_v2 import LoggingServiceV2AsyncClient, LoggingServiceV2Client
from google.cloud.logging_v2.services.logging_service_v2.transports import (
    LoggingServiceV2GrpcAsyncIOTransport,
    LoggingServiceV2GrpcTransport,
)
from google.rpc import error_details_pb2

from tests import docker_env
from tests.conftest import ROOT
from tests.services import free_port, run_service

LOCALCLOUD = ROOT / "plugins" / "stepflow-localcloud"
try:
    from stepflow_localcloud.vertex import BackgroundLocalVertex, LocalVertex, serve_in_thread
except ImportError:  # the distribution is not installed (yet): use it from the source tree
    sys.path.insert(0, str(LOCALCLOUD))
    from stepflow_localcloud.vertex import BackgroundLocalVertex, LocalVertex, serve_in_thread

docker_test = docker_env.docker_test
PROJECT, LOCATION = "vx-test-project", "us-central1"
PARENT = f"projects/{PROJECT}/locations/{LOCATION}"
State = v1.JobState
ENDED = {State.JOB_STATE_SUCCEEDED, State.JOB_STATE_FAILED, State.JOB_STATE_CANCELLED}


# -- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend() -> Iterator[BackgroundLocalVertex]:
    """One control plane for the module, on its own loop in a thread; faults reset after each test."""
    docker_env.require_docker()
    with serve_in_thread(project=PROJECT, location=LOCATION, stop_grace=1.0, phase_delay=0.2, seed=7,
                         container_env={"FROM_THE_SERVER": "yes"}) as vertex:
        yield vertex
        assert vertex.stats()["active"] == 0, "a test left a job running"
    assert not containers(f"stepflow.local-vertex.instance={vertex.backend.instance_id}")  # type: ignore[union-attr]


@pytest.fixture
def vertex(backend: BackgroundLocalVertex) -> Iterator[BackgroundLocalVertex]:
    yield backend
    backend.configure(resource_exhausted_rate=0.0, unavailable_rate=0.0)


@pytest.fixture
async def clients(vertex: BackgroundLocalVertex) -> AsyncIterator[tuple[v1.JobServiceAsyncClient,
                                                                         LoggingServiceV2AsyncClient]]:
    """The async JobService and Logging clients over one plaintext channel, as the operator builds them."""
    channel = grpc.aio.insecure_channel(vertex.endpoint)
    jobs = v1.JobServiceAsyncClient(transport=JobServiceGrpcAsyncIOTransport(channel=channel))
    logs = LoggingServiceV2AsyncClient(transport=LoggingServiceV2GrpcAsyncIOTransport(channel=channel))
    yield jobs, logs
    await channel.close()


@pytest.fixture
def sync_jobs(vertex: BackgroundLocalVertex) -> Iterator[v1.JobServiceClient]:
    channel = grpc.insecure_channel(vertex.endpoint)
    yield v1.JobServiceClient(transport=JobServiceGrpcTransport(channel=channel))
    channel.close()


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


def custom_job(name: str, code: str = "pass", *, labels: dict[str, str] | None = None,
               env: dict[str, str] | None = None, machine: v1.MachineSpec | None = None,
               timeout: dt.timedelta | None = None, image: str = docker_env.BASE_IMAGE,
               base_output: str | None = None) -> v1.CustomJob:
    """A valid CustomJob running ``python3 -u -c code``."""
    container = v1.ContainerSpec(image_uri=image, command=["python3", "-u", "-c", code],
                                 env=[v1.EnvVar(name=k, value=v) for k, v in (env or {}).items()])
    spec = v1.CustomJobSpec(worker_pool_specs=[v1.WorkerPoolSpec(
        replica_count=1, container_spec=container,
        machine_spec=machine or v1.MachineSpec(machine_type="n1-standard-4"))])
    if timeout is not None:
        spec.scheduling = v1.Scheduling(timeout=timeout)
    if base_output is not None:
        spec.base_output_directory = v1.GcsDestination(output_uri_prefix=base_output)
    return v1.CustomJob(display_name=name, job_spec=spec, labels=labels or {})


async def wait_state(jobs: v1.JobServiceAsyncClient, name: str, wanted: set[Any] = ENDED,
                     timeout: float = 60.0) -> v1.CustomJob:
    deadline = time.monotonic() + timeout
    while True:
        job = await jobs.get_custom_job(name=name)
        if job.state in wanted:
            return job
        assert time.monotonic() < deadline, f"{name} still {job.state.name}"
        await asyncio.sleep(0.05)


def wait_state_sync(jobs: v1.JobServiceClient, name: str, wanted: set[Any] = ENDED,
                    timeout: float = 60.0) -> v1.CustomJob:
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.get_custom_job(name=name)
        if job.state in wanted:
            return job
        assert time.monotonic() < deadline, f"{name} still {job.state.name}"
        time.sleep(0.05)


def job_id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


async def entries(logs: LoggingServiceV2AsyncClient, jid: str, extra: str = "", **kw: Any) -> list[Any]:
    """Every entry of the job, through the pager (all pages)."""
    query = f'resource.type="ml_job" AND resource.labels.job_id="{jid}"' + (f" AND {extra}" if extra else "")
    pager = await logs.list_log_entries(request={"resource_names": [f"projects/{PROJECT}"], "filter": query, **kw})
    return [e async for e in pager]


def containers(label: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"], capture_output=True, text=True,
                         timeout=30, check=True)
    return out.stdout.split()


def job_containers(name: str) -> list[str]:
    return containers(f"stepflow.local-vertex.job={job_id(name)}")


def hook(vertex: BackgroundLocalVertex, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{vertex.http_url}/_fake/{path}", data=data)
    with urllib.request.urlopen(request, timeout=10) as r:
        return dict(json.loads(r.read()))


# -- the job lifecycle -----------------------------------------------------------------------
TRAIN = """
import os, sys, time
e = os.environ
print("JOB=" + e["CLOUD_ML_JOB_ID"] + " PROJECT=" + e["CLOUD_ML_PROJECT_ID"] + " REGION=" + e["CLOUD_ML_REGION"])
print("MODEL=" + e["AIP_MODEL_DIR"] + " CKPT=" + e["AIP_CHECKPOINT_DIR"] + " TB=" + e["AIP_TENSORBOARD_LOG_DIR"])
print("LR=" + e["LR"] + " SERVER=" + e["FROM_THE_SERVER"] + " CLUSTER=" + e["CLUSTER_SPEC"])
time.sleep(0.05)  # stdout and stderr are separate pipes: pauses keep their lines in this order
print("warming up", file=sys.stderr)
time.sleep(0.05)
for i in range(8):
    print(f"epoch {i}")
    time.sleep(0.3)
print("done", end="")
"""


@docker_test
async def test_a_job_goes_through_every_state_and_its_lines_come_back_in_order_while_it_runs(
        clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient], uid: str) -> None:
    jobs, logs = clients
    created = await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(
        f"t-{uid}-ok", TRAIN, labels={"run": uid, "team": "ml"}, env={"LR": "0.1"},
        base_output=f"gs://bucket/{uid}/"))
    jid = job_id(created.name)
    assert jid.isdigit() and len(jid) == 19
    assert created.name == f"{PARENT}/customJobs/{jid}"
    assert created.state == State.JOB_STATE_QUEUED and created.create_time and not created.start_time
    assert dict(created.labels) == {"run": uid, "team": "ml"}
    states: list[Any] = []
    seen_running: list[str] = []
    while True:
        job = await jobs.get_custom_job(name=created.name)
        if not states or states[-1] != job.state:
            states.append(job.state)
        if job.state == State.JOB_STATE_RUNNING and not seen_running:
            lines = [e.text_payload for e in await entries(logs, jid)]
            if lines and (await jobs.get_custom_job(name=created.name)).state == State.JOB_STATE_RUNNING:
                seen_running = lines
        if job.state in ENDED:
            break
        await asyncio.sleep(0.05)
    assert states == [State.JOB_STATE_QUEUED, State.JOB_STATE_PENDING, State.JOB_STATE_RUNNING,
                      State.JOB_STATE_SUCCEEDED], [s.name for s in states]
    assert seen_running, "no output came back while the job ran"
    assert job.create_time <= job.start_time < job.end_time and job.update_time == job.end_time
    assert job.end_time - job.start_time >= dt.timedelta(seconds=2)
    assert not job.error.code and job.display_name == f"t-{uid}-ok"
    # The request is echoed back.
    pool = job.job_spec.worker_pool_specs[0]
    assert pool.machine_spec.machine_type == "n1-standard-4" and pool.container_spec.image_uri == "stepflow-base:py3.11"
    assert job.job_spec.base_output_directory.output_uri_prefix == f"gs://bucket/{uid}/"

    found = await entries(logs, jid, order_by="timestamp asc")
    texts = [e.text_payload for e in found]
    assert texts[-9:] == [*(f"epoch {i}" for i in range(8)), "done"]  # even a last line without newline
    assert texts[0] == f"JOB={jid} PROJECT={PROJECT} REGION={LOCATION}"
    assert texts[1] == f"MODEL=gs://bucket/{uid}/model/ CKPT=gs://bucket/{uid}/checkpoints/ TB=gs://bucket/{uid}/logs/"
    cluster = json.loads(texts[2].split(" CLUSTER=", 1)[1])
    assert texts[2].startswith("LR=0.1 SERVER=yes ") and cluster["task"] == {"type": "workerpool0", "index": 0}
    assert seen_running == texts[:len(seen_running)]
    ids = [e.insert_id for e in found]
    stamps = [e.timestamp for e in found]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert all(a < b for a, b in itertools.pairwise(stamps))
    by_text = {e.text_payload: e for e in found}
    assert by_text["warming up"].severity == 500 and by_text["epoch 0"].severity == 200  # ERROR / INFO
    first = found[0]
    assert first.log_name == f"projects/{PROJECT}/logs/workerpool0-0"
    assert first.resource.type == "ml_job"
    assert dict(first.resource.labels) == {"job_id": jid, "project_id": PROJECT, "task_name": "workerpool0-0"}
    # Tailing: entries after a seen one, and newest first.
    after = await entries(logs, jid, f'timestamp>"{found[3].timestamp.rfc3339()}"')
    assert [e.insert_id for e in after] == ids[4:]
    assert texts[3] == "warming up"
    since = await entries(logs, jid, f'timestamp>="{found[3].timestamp.rfc3339()}" severity>=ERROR')
    assert [e.text_payload for e in since] == ["warming up"]
    assert [e.insert_id for e in await entries(logs, jid, order_by="timestamp desc")] == ids[::-1]
    assert not job_containers(created.name), "the ended job's container was not removed"


@docker_test
async def test_a_job_exiting_3_fails_with_the_exit_code_and_its_stderr_only_in_the_logs(
        clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient], uid: str) -> None:
    jobs, logs = clients
    code = ("import sys, time\nprint('loading data')\ntime.sleep(0.05)\nprint('warming up', file=sys.stderr)\n"
            "print('ValueError: the loss is NaN', file=sys.stderr)\nsys.exit(3)")
    created = await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(f"t-{uid}-fail", code))
    job = await wait_state(jobs, created.name)
    assert job.state == State.JOB_STATE_FAILED
    assert job.error.code == 3  # what Vertex AI reports for a replica's non-zero exit
    message = job.error.message
    jid = job_id(created.name)
    assert message.startswith("The replica workerpool0-0 exited with a non-zero status of 3. Termination reason: "
                              "Error. To find out more about why your job exited please check the logs: "
                              "https://console.cloud.google.com/logs/viewer?"), message
    assert f"resource=ml_job%2Fjob_id%2F{jid}" in message
    assert "NaN" not in message and "warming up" not in message  # the service never quotes the container
    assert job.end_time >= job.start_time
    lines = [(e.text_payload, e.severity) for e in await entries(logs, job_id(created.name))]
    assert lines == [("loading data", 200), ("warming up", 500), ("ValueError: the loss is NaN", 500)]
    assert not job_containers(created.name)


@docker_test
async def test_cancel_reaches_cancelled_within_5s_and_removes_the_container(
        clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient], uid: str) -> None:
    jobs, logs = clients
    created = await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(
        f"t-{uid}-cancel", "import time\nprint('ready')\ntime.sleep(120)"))
    await wait_state(jobs, created.name, {State.JOB_STATE_RUNNING})
    assert job_containers(created.name)
    t0 = time.monotonic()
    await jobs.cancel_custom_job(name=created.name)
    assert (await jobs.get_custom_job(name=created.name)).state in (State.JOB_STATE_CANCELLING,
                                                                   State.JOB_STATE_CANCELLED)
    await jobs.cancel_custom_job(name=created.name)  # again while cancelling: accepted
    job = await wait_state(jobs, created.name, timeout=5.0)
    took = time.monotonic() - t0
    assert job.state == State.JOB_STATE_CANCELLED and took < 5.0, (job.state.name, took)
    assert (job.error.code, job.error.message) == (1, "CANCELED")  # google.rpc.Code.CANCELLED
    assert not job_containers(created.name)
    with pytest.raises(gexc.FailedPrecondition) as again:
        await jobs.cancel_custom_job(name=created.name)
    assert "JOB_STATE_CANCELLED" in again.value.message


@docker_test
async def test_cancel_while_queued_never_starts_a_container(
        clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient], uid: str) -> None:
    jobs, logs = clients
    created = await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(f"t-{uid}-early", "print('no')"))
    await jobs.cancel_custom_job(name=created.name)
    job = await wait_state(jobs, created.name, timeout=5.0)
    assert job.state == State.JOB_STATE_CANCELLED and not job.start_time
    assert await entries(logs, job_id(created.name)) == []


@docker_test
async def test_scheduling_timeout_fails_the_job_with_a_deadline_error(
        clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient], uid: str) -> None:
    jobs, _ = clients
    created = await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(
        f"t-{uid}-slow", "import time\nprint('ready')\ntime.sleep(120)", timeout=dt.timedelta(seconds=2)))
    job = await wait_state(jobs, created.name, timeout=20.0)
    assert job.state == State.JOB_STATE_FAILED
    assert job.error.code == 4 and "maximum running time of 2s (scheduling.timeout)" in job.error.message
    assert job.end_time - job.start_time < dt.timedelta(seconds=10)
    assert not job_containers(created.name)


@docker_test
async def test_an_image_missing_locally_is_pulled_and_an_unknown_one_fails_the_job(
        clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient], uid: str) -> None:
    jobs, _ = clients
    pushed = f"{docker_env.REGISTRY}/t-{uid}-vx/base:py3.11"
    missing = f"{docker_env.REGISTRY}/t-{uid}-vx/nothing:1"
    try:
        for cmd in (["tag", docker_env.BASE_IMAGE, pushed], ["push", pushed], ["rmi", pushed]):
            await asyncio.to_thread(subprocess.run, ["docker", *cmd], capture_output=True, timeout=120, check=True)
        pulled = await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(f"t-{uid}-pull", image=pushed))
        unknown = await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(f"t-{uid}-nopull", image=missing))
        assert (await wait_state(jobs, pulled.name)).state == State.JOB_STATE_SUCCEEDED
        failed = await wait_state(jobs, unknown.name)
        assert failed.state == State.JOB_STATE_FAILED and not failed.start_time
        assert f"could not pull the image {missing}" in failed.error.message
    finally:
        docker_env.remove_local_images(f"{docker_env.REGISTRY}/t-{uid}-vx/")


# -- listing -------------------------------------------------------------------------------
@docker_test
def test_the_sync_client_lists_with_filters_and_pages(sync_jobs: v1.JobServiceClient, uid: str) -> None:
    names = []
    for i in range(5):
        labels = {"run": uid, "idx": str(i), **({"special": ""} if i == 2 else {})}
        names.append(sync_jobs.create_custom_job(parent=PARENT, custom_job=custom_job(
            f"t-{uid}-list-{i}", labels=labels)).name)
    other = sync_jobs.create_custom_job(parent=PARENT, custom_job=custom_job(f"t-{uid}-other",
                                                                            labels={"run": f"{uid}-x"})).name

    def listed(filter_: str) -> list[str]:
        return [j.name for j in sync_jobs.list_custom_jobs(request={"parent": PARENT, "filter": filter_})]

    assert listed(f'labels.run="{uid}"') == names[::-1]  # newest first
    assert listed(f"labels.run={uid} AND labels.special:*") == [names[2]]
    assert listed(f'labels.run="{uid}" labels.idx="3"') == [names[3]]  # juxtaposition is AND
    assert listed(f'display_name="t-{uid}-other"') == [other]
    assert listed(f'display_name:"t-{uid}-list-*"') == names[::-1]
    assert listed(f'labels.run="{uid}" AND (labels.idx="0" OR labels.idx="4")') == [names[4], names[0]]
    assert listed(f'labels.run="{uid}" AND NOT labels.idx="0"') == names[:0:-1]
    pages = list(sync_jobs.list_custom_jobs(request={"parent": PARENT, "filter": f'labels.run="{uid}"',
                                                     "page_size": 2}).pages)
    assert [len(p.custom_jobs) for p in pages] == [2, 2, 1]
    assert [j.name for p in pages for j in p.custom_jobs] == names[::-1]
    assert pages[-1].next_page_token == ""
    first = sync_jobs.get_custom_job(name=names[0]).create_time
    assert listed(f'labels.run="{uid}" AND create_time>"{first.rfc3339()}"') == names[:0:-1]
    for name in [*names, other]:
        wait_state_sync(sync_jobs, name)
    assert listed(f'labels.run="{uid}" AND state="JOB_STATE_SUCCEEDED"') == names[::-1]
    assert listed(f'labels.run="{uid}" AND state!="JOB_STATE_SUCCEEDED"') == []
    with pytest.raises(gexc.InvalidArgument) as bad:
        listed('labels.run="x" AND colour="blue"')
    assert 'Unsupported filter field "colour"' in bad.value.message
    with pytest.raises(gexc.InvalidArgument):
        listed('state="JOB_STATE_NAPPING"')
    with pytest.raises(gexc.InvalidArgument):
        sync_jobs.list_custom_jobs(request={"parent": PARENT, "page_token": "not-a-token"})


@docker_test
async def test_log_entries_come_in_pages(clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient],
                                         vertex: BackgroundLocalVertex, uid: str) -> None:
    jobs, logs = clients
    created = await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(
        f"t-{uid}-many", "for i in range(25): print(f'line {i}')"))
    await wait_state(jobs, created.name)
    jid = job_id(created.name)
    query = f'resource.type="ml_job" AND resource.labels.job_id="{jid}"'
    pager = await logs.list_log_entries(request={"resource_names": [f"projects/{PROJECT}"], "filter": query,
                                                 "page_size": 10})
    pages = [page async for page in pager.pages]
    assert [len(p.entries) for p in pages] == [10, 10, 5]
    assert [e.text_payload for p in pages for e in p.entries] == [f"line {i}" for i in range(25)]
    # The sync client reads the same entries; another project has none.
    channel = grpc.insecure_channel(vertex.endpoint)
    try:
        sync_logs = LoggingServiceV2Client(transport=LoggingServiceV2GrpcTransport(channel=channel))
        listed = await asyncio.to_thread(lambda: list(sync_logs.list_log_entries(
            request={"resource_names": [f"projects/{PROJECT}"], "filter": query, "page_size": 7})))
        assert [e.text_payload for e in listed] == [f"line {i}" for i in range(25)]
        assert await asyncio.to_thread(lambda: list(sync_logs.list_log_entries(
            resource_names=["projects/someone-else"], filter=query))) == []
    finally:
        channel.close()
    for bad in ({"filter": 'resource.labels.job_id="1" AND timestamp>="yesterday"'}, {"order_by": "severity"},
                {"page_size": 5000}, {"filter": 'resource.type="ml_job" AND ('}):
        with pytest.raises(gexc.InvalidArgument):
            await logs.list_log_entries(request={"resource_names": [f"projects/{PROJECT}"], **bad}, retry=None)
    with pytest.raises(gexc.InvalidArgument):
        await logs.list_log_entries(request={"resource_names": []}, retry=None)


# -- validation and errors -----------------------------------------------------------------
def _machine(machine_type: str, accelerator: str = "ACCELERATOR_TYPE_UNSPECIFIED", count: int = 0) -> v1.MachineSpec:
    return v1.MachineSpec(machine_type=machine_type, accelerator_type=v1.AcceleratorType[accelerator],
                          accelerator_count=count)


def _without_image(job: v1.CustomJob) -> v1.CustomJob:
    job.job_spec.worker_pool_specs[0].container_spec.image_uri = ""
    return job


def _without_pools(job: v1.CustomJob) -> v1.CustomJob:
    del job.job_spec.worker_pool_specs[:]
    return job


def _without_name(job: v1.CustomJob) -> v1.CustomJob:
    job.display_name = ""
    return job


INVALID: dict[str, tuple[Any, str, str]] = {
    "bad machine type": (lambda j: _machine_set(j, _machine("n1-fake-huge")), "machine_spec.machine_type",
                         'Machine type "n1-fake-huge" is not supported'),
    "no machine type": (lambda j: _machine_set(j, _machine("")), "machine_spec.machine_type", "Required field"),
    "T4 x3": (lambda j: _machine_set(j, _machine("n1-standard-4", "NVIDIA_TESLA_T4", 3)),
              "machine_spec.accelerator_count", "Accelerator count 3 is not supported for NVIDIA_TESLA_T4"),
    "V100 x1 on 16 vCPUs": (lambda j: _machine_set(j, _machine("n1-standard-16", "NVIDIA_TESLA_V100", 1)),
                            "machine_spec.machine_type", "supports at most 12"),
    "a2 without its A100": (lambda j: _machine_set(j, _machine("a2-highgpu-1g")), "machine_spec.accelerator_type",
                            "requires accelerator type NVIDIA_TESLA_A100 with count 1"),
    "count without type": (lambda j: _machine_set(j, _machine("n1-standard-4", count=1)),
                           "machine_spec.accelerator_type",
                           "Both `accelerator_type` and `accelerator_count` should be specified or none."),
    "type without count": (lambda j: _machine_set(j, _machine("n1-standard-4", "NVIDIA_TESLA_T4")),
                           "job_spec.worker_pool_specs[0].machine_spec.accelerator_type",
                           "Both `accelerator_type` and `accelerator_count` should be specified or none."),
    "uppercase label key": (lambda j: _labels(j, {"Team": "ml"}), "labels['", 'Invalid label key "Team"'),
    "label key starting with a digit": (lambda j: _labels(j, {"1team": "ml"}), "labels['",
                                        'Invalid label key "1team"'),
    "label value with a dot": (lambda j: _labels(j, {"team": "m.l"}), "labels['",
                               'Invalid label value "m.l"'),
    "label value over 63": (lambda j: _labels(j, {"team": "x" * 64}), "labels['", "Invalid label value"),
    "missing image": (_without_image, "container_spec.image_uri", "Required field is not set."),
    "no worker pool": (_without_pools, "job_spec.worker_pool_specs", "Required field is not set"),
    "missing display name": (_without_name, "display_name", "Required field is not set."),
    "two replicas in pool 0": (lambda j: _replicas(j, 2), "worker_pool_specs[0].replica_count", "exactly 1 replica"),
    "base output not gs": (lambda j: _base(j, "out/models"), "base_output_directory", "not a Cloud Storage URI"),
}


def _machine_set(job: v1.CustomJob, machine: v1.MachineSpec) -> v1.CustomJob:
    job.job_spec.worker_pool_specs[0].machine_spec = machine
    return job


def _labels(job: v1.CustomJob, labels: dict[str, str]) -> v1.CustomJob:
    job.labels = labels
    return job


def _replicas(job: v1.CustomJob, n: int) -> v1.CustomJob:
    job.job_spec.worker_pool_specs[0].replica_count = n
    return job


def _base(job: v1.CustomJob, uri: str) -> v1.CustomJob:
    job.job_spec.base_output_directory = v1.GcsDestination(output_uri_prefix=uri)
    return job


@docker_test
@pytest.mark.anyio  # explicit: the conftest's late marking does not combine with parametrize
@pytest.mark.parametrize("case", list(INVALID))
async def test_invalid_jobs_are_invalid_argument_naming_the_field(
        case: str, clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient],
        vertex: BackgroundLocalVertex, uid: str) -> None:
    jobs, _ = clients
    change, field, text = INVALID[case]
    name = f"t-{uid}-invalid"
    with pytest.raises(gexc.InvalidArgument) as err:
        await jobs.create_custom_job(parent=PARENT, custom_job=change(custom_job(name)))
    message = err.value.message
    assert message.startswith("List of found errors:\t1.Field: ") and field in message and text in message, message
    violations = [d for d in err.value.details if isinstance(d, error_details_pb2.BadRequest)]
    assert violations and field in violations[0].field_violations[0].field  # the rich status detail
    # Paths are relative to the CustomJob, as the service writes them.
    assert violations[0].field_violations[0].field.startswith(("display_name", "labels[", "job_spec."))
    assert name not in vertex.stats()["created"]


@docker_test
@pytest.mark.anyio
@pytest.mark.parametrize("machine, accelerator", [("n1-standard-4", "NVIDIA_L4"), ("e2-standard-4", "NVIDIA_TESLA_T4")])
async def test_an_accelerator_the_machine_cannot_carry_is_refused_with_the_services_sentence(
        machine: str, accelerator: str, clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient],
        uid: str) -> None:
    jobs, _ = clients
    job = _machine_set(custom_job(f"t-{uid}-gpu"), _machine(machine, accelerator, 1))
    with pytest.raises(gexc.InvalidArgument) as err:
        await jobs.create_custom_job(parent=PARENT, custom_job=job)
    assert err.value.message == f'Accelerator "{accelerator}" is not supported for machine type "{machine}"'


@docker_test
async def test_several_violations_are_reported_together(
        clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient]) -> None:
    jobs, _ = clients
    job = _labels(_machine_set(custom_job(""), _machine("x1-nothing")), {"Bad": "ok"})
    with pytest.raises(gexc.InvalidArgument) as err:
        await jobs.create_custom_job(parent=PARENT, custom_job=job)
    message = err.value.message
    assert "1.Field: display_name;" in message and "2.Field: labels['Bad']" in message
    assert "3.Field: job_spec.worker_pool_specs[0].machine_spec.machine_type" in message


@docker_test
async def test_names_outside_this_project_and_location_are_invalid_and_unknown_jobs_not_found(
        clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient]) -> None:
    jobs, _ = clients
    for parent in (f"projects/{PROJECT}/locations/europe-west4", f"projects/other/locations/{LOCATION}",
                   f"projects/{PROJECT}", "nonsense"):
        with pytest.raises(gexc.InvalidArgument) as err:
            await jobs.create_custom_job(parent=parent, custom_job=custom_job("t-parent"))
        assert err.value.message.startswith("List of found errors:\t1.Field: parent; ")
    with pytest.raises(gexc.InvalidArgument) as wrong_region:
        await jobs.list_custom_jobs(parent=f"projects/{PROJECT}/locations/europe-west4")
    assert 'Location "europe-west4"' in wrong_region.value.message
    missing = f"{PARENT}/customJobs/1234567890123456789"
    for call in (jobs.get_custom_job, jobs.cancel_custom_job, jobs.delete_custom_job):
        with pytest.raises(gexc.NotFound) as err:
            await call(name=missing)
        assert missing in err.value.message
    with pytest.raises(gexc.InvalidArgument):
        await jobs.get_custom_job(name=f"{PARENT}/customJobs/not-a-number")
    with pytest.raises(gexc.InvalidArgument):
        await jobs.get_custom_job(name="customJobs/1")


@docker_test
async def test_delete_needs_an_ended_job_and_answers_a_done_operation(
        clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient], uid: str) -> None:
    jobs, logs = clients
    created = await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(
        f"t-{uid}-del", "import time\nprint('bye')\ntime.sleep(1)"))
    with pytest.raises(gexc.FailedPrecondition):
        await jobs.delete_custom_job(name=created.name)
    await wait_state(jobs, created.name)
    operation = await jobs.delete_custom_job(name=created.name)
    assert await operation.done()
    await operation.result()
    assert isinstance(operation.metadata, v1.DeleteOperationMetadata)
    with pytest.raises(gexc.NotFound):
        await jobs.get_custom_job(name=created.name)
    assert [e.text_payload for e in await entries(logs, job_id(created.name))] == ["bye"]  # logs outlive the job


@docker_test
async def test_other_methods_are_unimplemented(
        clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient], vertex: BackgroundLocalVertex) -> None:
    jobs, logs = clients
    with pytest.raises(gexc.MethodNotImplemented) as err:
        await jobs.get_hyperparameter_tuning_job(name=f"{PARENT}/hyperparameterTuningJobs/1")
    assert "GetHyperparameterTuningJob is not implemented" in err.value.message
    with pytest.raises(gexc.MethodNotImplemented):
        await logs.write_log_entries(entries=[], retry=None)
    assert vertex.stats()["calls"]["GetHyperparameterTuningJob"] >= 1


# -- fault injection -------------------------------------------------------------------------
@docker_test
async def test_resource_exhausted_and_unavailable_are_injected_and_counted(
        clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient], vertex: BackgroundLocalVertex,
        uid: str) -> None:
    jobs, logs = clients
    name = f"t-{uid}-quota"
    before = vertex.stats()
    vertex.configure(resource_exhausted_rate=1.0)
    with pytest.raises(gexc.ResourceExhausted) as quota:
        await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(name))
    assert quota.value.message.startswith("Quota exceeded for quota metric")
    assert any(isinstance(d, error_details_pb2.ErrorInfo) and d.reason == "RATE_LIMIT_EXCEEDED"
               for d in quota.value.details)
    await jobs.list_custom_jobs(parent=PARENT)  # only creates run out of quota
    stats = vertex.stats()
    assert stats["calls"]["CreateCustomJob"] - before["calls"].get("CreateCustomJob", 0) == 1
    assert stats["resource_exhausted"] - before["resource_exhausted"] == 1
    assert stats["refused"]["RESOURCE_EXHAUSTED"] - before["refused"].get("RESOURCE_EXHAUSTED", 0) == 1
    assert name not in stats["created"]

    # Through the HTTP hooks, as another process would.
    assert hook(vertex, "config", {"resource_exhausted_rate": 0, "unavailable_rate": 1})["unavailable_rate"] == 1
    for call in (lambda: jobs.create_custom_job(parent=PARENT, custom_job=custom_job(name)),
                 lambda: jobs.get_custom_job(name=f"{PARENT}/customJobs/1"),
                 lambda: logs.list_log_entries(resource_names=[f"projects/{PROJECT}"], retry=None)):
        with pytest.raises(gexc.ServiceUnavailable) as down:
            await call()
        assert down.value.message == "The service is currently unavailable."
    stats = hook(vertex, "stats")
    assert stats["unavailable"] - before["unavailable"] == 3
    assert stats["calls"]["ListLogEntries"] - before["calls"].get("ListLogEntries", 0) == 1
    assert name not in stats["created"]

    # The Logging client retries UNAVAILABLE by default: half the calls faulted still get an answer.
    vertex.configure(unavailable_rate=0.5, seed=3)
    calls = vertex.stats()["calls"]["ListLogEntries"]
    for _ in range(4):
        await logs.list_log_entries(resource_names=[f"projects/{PROJECT}"], filter='resource.labels.job_id="1"')
    assert vertex.stats()["calls"]["ListLogEntries"] - calls > 4

    vertex.configure(unavailable_rate=0.0)
    created = await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(name))
    assert vertex.stats()["created"][name] == 1
    await wait_state(jobs, created.name)


@docker_test
def test_configure_rejects_rates_outside_0_1(vertex: BackgroundLocalVertex) -> None:
    with pytest.raises(ValueError):
        vertex.configure(unavailable_rate=1.5)
    request = urllib.request.Request(f"{vertex.http_url}/_fake/config", data=b'{"resource_exhausted_rate": -1}')
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400


# -- the server as a whole -------------------------------------------------------------------
@docker_test
async def test_twenty_jobs_at_once_run_concurrently_and_each_is_created_once(
        clients: tuple[v1.JobServiceAsyncClient, LoggingServiceV2AsyncClient], vertex: BackgroundLocalVertex,
        uid: str) -> None:
    jobs, logs = clients
    names = [f"t-{uid}-load-{i}" for i in range(20)]
    t0 = time.monotonic()
    created = await asyncio.gather(*(jobs.create_custom_job(parent=PARENT, custom_job=custom_job(
        name, f"import time\nprint('hi from {name}')\ntime.sleep(1.5)")) for name in names))
    ended = await asyncio.wait_for(asyncio.gather(*(wait_state(jobs, c.name) for c in created)), 90)
    elapsed = time.monotonic() - t0
    assert [j.state for j in ended] == [State.JOB_STATE_SUCCEEDED] * 20, [j.error.message for j in ended]
    for name, job in zip(names, created, strict=True):
        assert [e.text_payload for e in await entries(logs, job_id(job.name))] == [f"hi from {name}"]
    assert all(vertex.stats()["created"][n] == 1 for n in names)
    assert elapsed < 45, f"20 jobs of 1.5 s took {elapsed:.1f} s: they did not run concurrently"


@docker_test
async def test_keep_containers_leaves_the_ended_jobs_containers(uid: str) -> None:
    async with LocalVertex(project=PROJECT, location=LOCATION, keep_containers=True, http_port=None) as server:
        channel = grpc.aio.insecure_channel(server.endpoint)
        jobs = v1.JobServiceAsyncClient(transport=JobServiceGrpcAsyncIOTransport(channel=channel))
        created = await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(f"t-{uid}-keep", "print(1)"))
        assert (await wait_state(jobs, created.name)).state == State.JOB_STATE_SUCCEEDED
        await channel.close()
    kept = await asyncio.to_thread(job_containers, created.name)
    try:
        assert len(kept) == 1, "the ended job's container was removed"
    finally:
        if kept:
            subprocess.run(["docker", "rm", "-f", *kept], capture_output=True, timeout=60)


@docker_test
async def test_closing_the_server_cancels_jobs_and_removes_every_container(uid: str) -> None:
    async with LocalVertex(project=PROJECT, location=LOCATION, stop_grace=1.0, http_port=None) as server:
        channel = grpc.aio.insecure_channel(server.endpoint)
        jobs = v1.JobServiceAsyncClient(transport=JobServiceGrpcAsyncIOTransport(channel=channel))
        names = [(await jobs.create_custom_job(parent=PARENT, custom_job=custom_job(
            f"t-{uid}-bye-{i}", "import time\ntime.sleep(120)"))).name for i in range(2)]
        for name in names:
            await wait_state(jobs, name, {State.JOB_STATE_RUNNING})
        await channel.close()
        label = f"stepflow.local-vertex.instance={server.instance_id}"
        assert len(await asyncio.to_thread(containers, label)) == 2
    assert await asyncio.to_thread(containers, label) == []
    assert {j.state for j in server.jobs.values()} == {State.JOB_STATE_CANCELLED}


@docker_test
def test_the_command_line_serves_both_services(uid: str, tmp_path: Any) -> None:
    grpc_port, tls_port = free_port(), free_port()
    certificate = tmp_path / "local-vertex.pem"
    env = {**os.environ, "PYTHONPATH": str(LOCALCLOUD)}
    argv = lambda port: [sys.executable, "-m", "stepflow_localcloud.vertex", "--port", str(grpc_port),  # noqa: E731
                         "--http-port", str(port), "--project", "cli-project", "--location", "europe-west4",
                         "--unavailable-rate", "0", "--stop-grace", "1", "--env", "GREETING=hello",
                         "--tls-port", str(tls_port), "--certificate-file", str(certificate)]
    with run_service("local-vertex", argv, url=lambda port: f"http://127.0.0.1:{port}", env=env) as service:
        with urllib.request.urlopen(f"{service.url}/", timeout=10) as r:
            assert json.loads(r.read())["endpoint"] == f"127.0.0.1:{grpc_port}"
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        try:
            client = v1.JobServiceClient(transport=JobServiceGrpcTransport(channel=channel))
            parent = "projects/cli-project/locations/europe-west4"
            created = client.create_custom_job(parent=parent, custom_job=custom_job(
                f"t-{uid}-cli", "import os\nprint(os.environ['GREETING'], os.environ['CLOUD_ML_REGION'])"))
            job = wait_state_sync(client, created.name)
            assert job.state == State.JOB_STATE_SUCCEEDED, job.error
            logs = LoggingServiceV2Client(transport=LoggingServiceV2GrpcTransport(channel=channel))
            lines = [e.text_payload for e in logs.list_log_entries(
                resource_names=["projects/cli-project"], filter=f'resource.labels.job_id="{job_id(created.name)}"')]
            assert lines == ["hello europe-west4"]
        finally:
            channel.close()
        with urllib.request.urlopen(f"{service.url}/_fake/stats", timeout=10) as r:
            stats = json.loads(r.read())
        assert stats["created"] == {f"t-{uid}-cli": 1} and stats["calls"]["CreateCustomJob"] == 1
        # The same services with TLS, trusted through the certificate the server wrote.
        secure = grpc.secure_channel(f"localhost:{tls_port}", grpc.ssl_channel_credentials(certificate.read_bytes()))
        try:
            client = v1.JobServiceClient(transport=JobServiceGrpcTransport(channel=secure))
            assert [j.name for j in client.list_custom_jobs(parent=parent)] == [created.name]
        finally:
            secure.close()
        printed = service.log.read_text()
        assert f"local Vertex AI listening on 127.0.0.1:{grpc_port}" in printed
        assert f"TLS on 127.0.0.1:{tls_port}, certificate in {certificate}" in printed
