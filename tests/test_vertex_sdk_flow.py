"""The high-level Vertex AI SDK against the local control plane: ``aiplatform.CustomJob(...).run(sync=True)``.

The SDK (``google.cloud.aiplatform``) opens only secure gRPC channels, so the control plane also
listens with TLS under a self-signed certificate made at start-up, which the SDK trusts through
``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``. That variable replaces the whole process's roots, so the SDK
runs in a subprocess of its own. The jobs really run on the local Docker daemon; the container of
the successful job writes its "model" to ``AIP_MODEL_DIR`` in the GCS emulator, and the test reads
it back from there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.cloud.logging_v2.services.logging_service_v2 import LoggingServiceV2Client
from google.cloud.logging_v2.services.logging_service_v2.transports import LoggingServiceV2GrpcTransport

from tests import docker_env
from tests.docker_env import docker_test
from tests.services import gcs_emulator

__all__ = ["gcs_emulator"]

PROJECT, LOCATION = "sdk-flow-project", "us-central1"
PARENT = f"projects/{PROJECT}/locations/{LOCATION}"

#: Runs in a subprocess: the SDK's own flow, from a JSON request on argv, answering JSON on stdout.
SDK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from google.api_core import exceptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform
    from google.cloud.aiplatform import jobs

    jobs._JOB_WAIT_TIME = 0.2  # the SDK polls every 5 s otherwise
    request = json.loads(sys.argv[1])
    aiplatform.init(project=request["project"], location=request["location"], api_endpoint=request["endpoint"],
                    credentials=AnonymousCredentials())

    def outcome(call):
        try:
            job = call()
        except exceptions.GoogleAPICallError as exc:
            return {"raised": type(exc).__name__, "grpc_code": exc.grpc_status_code.name, "message": exc.message}
        except Exception as exc:
            return {"raised": type(exc).__name__, "message": str(exc)}
        return {"name": job.resource_name, "state": job.state.name}

    def run(spec):
        job = aiplatform.CustomJob(staging_bucket="gs://sdk-flow-staging/jobs", **spec)
        job.run(sync=True)
        return job

    answers = {key: outcome(lambda: run(spec)) for key, spec in request.get("jobs", {}).items()}
    for key, name in request.get("get", {}).items():
        answers[key] = outcome(lambda: aiplatform.CustomJob.get(name))
    print(json.dumps(answers))
    """
)


@pytest.fixture(scope="module")
def vertex(gcs_emulator: str) -> Iterator[Any]:
    """The control plane with its TLS port; job containers reach the GCS emulator."""
    docker_env.require_docker()
    from stepflow_localcloud.vertex import serve_in_thread

    with serve_in_thread(project=PROJECT, location=LOCATION, tls_port=0, http_port=None,
                         gcs_endpoint=gcs_emulator) as control_plane:
        yield control_plane
        assert control_plane.stats()["active"] == 0, "a job was left running"


@pytest.fixture(scope="module")
def bucket(gcs_emulator: str) -> str:
    name = f"sdk-flow-{uuid.uuid4().hex[:8]}"
    request = urllib.request.Request(f"{gcs_emulator}/storage/v1/b?project=test", data=json.dumps({"name": name})
                                     .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass
    return name


def sdk(vertex: Any, request: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """Run the SDK script against ``vertex``'s TLS port; its JSON answer."""
    request = {"project": PROJECT, "location": LOCATION, "endpoint": vertex.tls_endpoint, **request}
    env = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": vertex.certificate_file}
    done = subprocess.run([sys.executable, "-c", SDK_SCRIPT, json.dumps(request)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def pool(code: str = "pass", machine: dict[str, Any] | None = None, image: str = docker_env.BASE_IMAGE
         ) -> dict[str, Any]:
    """One worker pool as a user of the SDK writes it, running ``python3 -u -c code``."""
    return {"machine_spec": machine or {"machine_type": "n1-standard-4"}, "replica_count": 1,
            "container_spec": {"image_uri": image, "command": ["python3", "-u", "-c", code]}}


def log_lines(vertex: Any, name: str) -> list[str]:
    """The job's Cloud Logging lines, read from the plaintext port."""
    channel = grpc.insecure_channel(vertex.endpoint)
    try:
        logs = LoggingServiceV2Client(transport=LoggingServiceV2GrpcTransport(channel=channel))
        query = f'resource.type="ml_job" AND resource.labels.job_id="{name.rsplit("/", 1)[-1]}"'
        return [e.text_payload for e in logs.list_log_entries(resource_names=[f"projects/{PROJECT}"], filter=query)]
    finally:
        channel.close()


def job_logs(vertex: Any, display_name: str) -> list[str]:
    """The log lines of the job(s) called ``display_name`` (to explain a failure)."""
    names = vertex.call(lambda b: [j.name for j in b.jobs.values() if j.display_name == display_name])
    return [line for name in names for line in log_lines(vertex, name)]


# The container uploads to AIP_MODEL_DIR through the GCS JSON API (STORAGE_EMULATOR_HOST), with no library.
TRAIN = textwrap.dedent(
    """
    import json, os, urllib.parse, urllib.request
    env = {k: v for k, v in os.environ.items() if k.startswith(("AIP_", "CLOUD_ML_")) or k == "CLUSTER_SPEC"}
    for key in sorted(env):
        print(key + "=" + env[key])
    bucket, _, prefix = os.environ["AIP_MODEL_DIR"].removeprefix("gs://").partition("/")
    url = (os.environ["STORAGE_EMULATOR_HOST"] + "/upload/storage/v1/b/" + bucket + "/o?uploadType=media&name="
           + urllib.parse.quote(prefix + "model.json", safe=""))
    urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(env).encode(), method="POST",
                                                  headers={"Content-Type": "application/octet-stream"}), timeout=30)
    print("model saved")
    """
)


@docker_test
def test_run_sync_completes_and_the_container_writes_its_model_to_AIP_MODEL_DIR(
        vertex: Any, gcs_emulator: str, bucket: str) -> None:
    base = f"gs://{bucket}/runs/{uuid.uuid4().hex[:6]}"
    answer = sdk(vertex, {"jobs": {"train": {"display_name": "sdk-flow-train", "worker_pool_specs": [pool(TRAIN)],
                                             "base_output_dir": base, "labels": {"team": "ml"}}}})["train"]
    assert answer.get("state") == "JOB_STATE_SUCCEEDED", (answer, job_logs(vertex, "sdk-flow-train"))
    job_id = answer["name"].rsplit("/", 1)[-1]
    assert answer["name"] == f"{PARENT}/customJobs/{job_id}"

    # The model file, as the container wrote it, read back from the bucket.
    name = urllib.parse.quote(f"{base.removeprefix(f'gs://{bucket}/')}/model/model.json", safe="")
    with urllib.request.urlopen(f"{gcs_emulator}/storage/v1/b/{bucket}/o/{name}?alt=media", timeout=10) as r:
        seen = json.loads(r.read())
    assert seen["AIP_MODEL_DIR"] == f"{base}/model/"
    assert seen["AIP_CHECKPOINT_DIR"] == f"{base}/checkpoints/"
    assert seen["AIP_TENSORBOARD_LOG_DIR"] == f"{base}/logs/"
    assert (seen["CLOUD_ML_JOB_ID"], seen["CLOUD_ML_PROJECT_ID"], seen["CLOUD_ML_REGION"]) == (job_id, PROJECT,
                                                                                               LOCATION)
    assert json.loads(seen["CLUSTER_SPEC"])["task"] == {"type": "workerpool0", "index": 0}

    # And the same through the job's Cloud Logging entries.
    lines = log_lines(vertex, answer["name"])
    assert f"AIP_MODEL_DIR={base}/model/" in lines and lines[-1] == "model saved", lines


@docker_test
def test_a_failing_container_makes_run_raise_with_vertexs_message_and_its_stderr_stays_in_the_logs(
        vertex: Any) -> None:
    code = "import sys\nprint('loading')\nprint('ValueError: the loss is NaN', file=sys.stderr)\nsys.exit(2)"
    answer = sdk(vertex, {"jobs": {"fail": {"display_name": "sdk-flow-fail", "worker_pool_specs": [pool(code)]}}})
    failed = answer["fail"]
    assert failed["raised"] == "RuntimeError", failed
    message = failed["message"]
    # The SDK's own wording around the job's google.rpc.Status.
    assert message.startswith("Job failed with:\ncode: 3\nmessage: \"The replica workerpool0-0 exited with a "
                              "non-zero status of 2. Termination reason: Error. To find out more about why your "
                              "job exited please check the logs: https://console.cloud.google.com/logs/viewer?"
                              f"project={PROJECT}&resource=ml_job%2Fjob_id%2F"), message
    assert "NaN" not in message
    # stdout and stderr are separate pipes: their relative order is not kept.
    assert sorted(job_logs(vertex, "sdk-flow-fail")) == ["ValueError: the loss is NaN", "loading"]


# What the SDK sends for each mistake, and what the service answers (status, then words of the message).
FIELD_ERRORS = "List of found errors:\t1.Field: "
INVALID: dict[str, tuple[dict[str, Any], str, str]] = {
    "no worker pool": ({"worker_pool_specs": []}, "INVALID_ARGUMENT",
                       f"{FIELD_ERRORS}job_spec.worker_pool_specs; Message: Required field is not set"),
    "missing image_uri": ({"worker_pool_specs": [pool(image="")]}, "INVALID_ARGUMENT",
                          f"{FIELD_ERRORS}job_spec.worker_pool_specs[0].container_spec.image_uri; Message: Required "
                          "field is not set."),
    "unknown machine type": ({"worker_pool_specs": [pool(machine={"machine_type": "n1-standard-5"})]},
                             "INVALID_ARGUMENT", f"{FIELD_ERRORS}job_spec.worker_pool_specs[0].machine_spec."
                                                 'machine_type; Message: Machine type "n1-standard-5" is not supported.'),
    "display name over 128": ({"display_name": "x" * 129, "worker_pool_specs": [pool()]}, "INVALID_ARGUMENT",
                              f"{FIELD_ERRORS}display_name; Message: Display name must be at most 128 characters"),
    "accelerator without count": (
        {"worker_pool_specs": [pool(machine={"machine_type": "n1-standard-4", "accelerator_type": "NVIDIA_TESLA_T4"})]},
        "INVALID_ARGUMENT", f"{FIELD_ERRORS}job_spec.worker_pool_specs[0].machine_spec.accelerator_type; Message: "
                            "Both `accelerator_type` and `accelerator_count` should be specified or none."),
    "accelerator the machine cannot carry": (
        {"worker_pool_specs": [pool(machine={"machine_type": "n1-standard-4", "accelerator_type": "NVIDIA_L4",
                                             "accelerator_count": 1})]},
        "INVALID_ARGUMENT", 'Accelerator "NVIDIA_L4" is not supported for machine type "n1-standard-4"'),
    "uppercase label key": ({"worker_pool_specs": [pool()], "labels": {"Team": "ml"}}, "INVALID_ARGUMENT",
                            f"{FIELD_ERRORS}labels['Team']; Message: Invalid label key \"Team\""),
    "base output dir outside Cloud Storage": ({"worker_pool_specs": [pool()], "base_output_dir": "models/out"},
                                              "INVALID_ARGUMENT", f"{FIELD_ERRORS}job_spec.base_output_directory."
                                                                  'output_uri_prefix; Message: Output URI prefix'),
}
UNKNOWN_JOB = f"{PARENT}/customJobs/1234567890123456789"


@pytest.fixture(scope="module")
def refused(vertex: Any) -> dict[str, Any]:
    """Every invalid request of the table through one SDK process (each import of the SDK costs seconds)."""
    jobs = {case: {"display_name": f"sdk-flow-bad-{i}", **spec} for i, (case, (spec, _, _)) in enumerate(INVALID.items())}
    before = vertex.stats()["created"]
    answers = sdk(vertex, {"jobs": jobs, "get": {"unknown job": UNKNOWN_JOB}})
    assert vertex.stats()["created"] == before, "an invalid request created a job"
    return answers


@docker_test
@pytest.mark.parametrize("case", list(INVALID))
def test_each_invalid_request_is_refused_with_vertexs_status_and_words(case: str, refused: dict[str, Any]) -> None:
    _, code, text = INVALID[case]
    answer = refused[case]
    assert (answer.get("raised"), answer.get("grpc_code")) == ("InvalidArgument", code), answer
    assert answer["message"].startswith(text), answer["message"]


@docker_test
def test_getting_an_unknown_job_is_not_found(refused: dict[str, Any]) -> None:
    answer = refused["unknown job"]
    assert (answer.get("raised"), answer.get("grpc_code")) == ("NotFound", "NOT_FOUND"), answer
    assert answer["message"] == f'The CustomJob "{UNKNOWN_JOB}" does not exist.'
