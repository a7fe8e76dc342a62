"""The local SageMaker control plane (stepflow-localcloud), wire-level: real Docker, a real moto
server, real AWS clients.

Every call goes through botocore (boto3) or aiobotocore against the backend's ``endpoint_url``,
so these tests also prove both clients parse every answer. Job containers run
``stepflow-base:py3.11`` with ``python3 -c``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests import docker_env
from tests.conftest import ROOT
from tests.services import aws_env, free_port, moto_server, run_service  # noqa: F401 (moto_server is a fixture)

LOCALCLOUD = ROOT / "plugins" / "stepflow-localcloud"
try:
    from stepflow_localcloud.sagemaker import BackgroundLocalSageMaker, LocalSageMaker, RoleCredentials, serve_in_thread
except ImportError:  # the distribution is not installed (yet): use it from the source tree
    sys.path.insert(0, str(LOCALCLOUD))
    from stepflow_localcloud.sagemaker import BackgroundLocalSageMaker, LocalSageMaker, RoleCredentials, serve_in_thread

docker_test = docker_env.docker_test
REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
GROUP = "/aws/sagemaker/TrainingJobs"
CREDS = {"region_name": REGION, "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
TERMINAL = {"Completed", "Failed", "Stopped"}
BUCKET = "stepflow-test"
#: What the module's backend serves as every job role's credentials (distinct from the test keys).
ROLE_KEYS = RoleCredentials("AKIALOCALROLE0000001", "local-role-secret", "local-role-session-token")


# -- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend(moto_server: str) -> Iterator[BackgroundLocalSageMaker]:  # noqa: F811
    """One backend for the module, on its own loop in a thread; faults reset after each test."""
    docker_env.require_docker()
    with contextlib.suppress(ClientError):  # the jobs' S3OutputPath bucket
        boto3.client("s3", endpoint_url=moto_server, **CREDS).create_bucket(Bucket=BUCKET)
    with serve_in_thread(logs_endpoint=moto_server, stop_grace=1.0, seed=7, role_credentials=ROLE_KEYS) as sm:
        yield sm
        assert sm.stats()["active"] == 0, "a test left a job running"
    assert not _containers(f"stepflow.fake-sagemaker.instance={sm.backend.instance_id}")  # type: ignore[union-attr]


@pytest.fixture
def sm(backend: BackgroundLocalSageMaker) -> Iterator[Any]:
    """A boto3 SageMaker client of the backend."""
    yield boto3.client("sagemaker", endpoint_url=backend.url, **CREDS)
    backend.configure(throttle_rate=0.0, error_rate=0.0)


@pytest.fixture
def logs(moto_server: str) -> Any:  # noqa: F811
    return boto3.client("logs", endpoint_url=moto_server, **CREDS)


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


def request(name: str, code: str = "pass", **overrides: Any) -> dict[str, Any]:
    """A valid CreateTrainingJob request running ``python3 -c code``.

    Entrypoint items are limited to 256 characters: longer code goes through the environment.
    """
    inline = len(code) <= 256
    env = {} if inline else {"JOB_CODE": code}
    env.update(overrides.pop("Environment", {}))
    req: dict[str, Any] = {
        "TrainingJobName": name, "RoleArn": ROLE,
        "AlgorithmSpecification": {"TrainingImage": docker_env.BASE_IMAGE, "TrainingInputMode": "File",
                                   "ContainerEntrypoint": ["python3", "-u", "-c", code if inline else
                                                           "import os; exec(os.environ['JOB_CODE'])"]},
        "OutputDataConfig": {"S3OutputPath": "s3://stepflow-test/out"},
        "ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 5},
        "StoppingCondition": {"MaxRuntimeInSeconds": 120},
    }
    if env:
        req["Environment"] = env
    req.update(overrides)
    return req


def wait_status(sm: Any, name: str, wanted: set[str] = TERMINAL, timeout: float = 30.0,
                secondary: str | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        d = sm.describe_training_job(TrainingJobName=name)
        if d["TrainingJobStatus"] in wanted and (secondary is None or d["SecondaryStatus"] == secondary):
            return d
        assert time.monotonic() < deadline, f"{name} still {d['TrainingJobStatus']}/{d['SecondaryStatus']}"
        time.sleep(0.1)


def _containers(label: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"], capture_output=True, text=True,
                         timeout=30, check=True)
    return out.stdout.split()


def job_containers(name: str) -> list[str]:
    return _containers(f"stepflow.fake-sagemaker={name}")


def log_lines(logs: Any, name: str) -> list[str]:
    streams = logs.describe_log_streams(logGroupName=GROUP, logStreamNamePrefix=f"{name}/")["logStreams"]
    lines = []
    for stream in streams:
        events = logs.get_log_events(logGroupName=GROUP, logStreamName=stream["logStreamName"],
                                     startFromHead=True)["events"]
        lines += [e["message"] for e in events]
    return lines


def code_of(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


# -- the job lifecycle -----------------------------------------------------------------------
TRAIN = """
import json, os, time
e = os.environ
print("NAME=" + e["TRAINING_JOB_NAME"])
print("ARN=" + e["TRAINING_JOB_ARN"])
print("ENDPOINT=" + e["AWS_ENDPOINT_URL"] + " KEY=" + e.get("AWS_ACCESS_KEY_ID", "none"))
print("REGION=" + e["AWS_REGION"] + " HOST=" + e["SM_CURRENT_HOST"] + " LR=" + e["LR"])
print("HPS=" + json.dumps(json.load(open("/opt/ml/input/config/hyperparameters.json"))))
for i in range(8):
    print(f"epoch {i}")
    time.sleep(0.4)
print("done", end="")
"""


@docker_test
async def test_aiobotocore_runs_a_job_through_every_status_with_logs_in_cloudwatch(
        backend: BackgroundLocalSageMaker, logs: Any, moto_server: str, uid: str) -> None:  # noqa: F811
    from aiobotocore.session import get_session

    name = f"t-{uid}-ok"
    async with get_session().create_client("sagemaker", endpoint_url=backend.url, **CREDS) as client:
        created = await client.create_training_job(**request(
            name, TRAIN, Environment={"LR": "0.1"}, HyperParameters={"epochs": "8"},
            Tags=[{"Key": "team", "Value": "ml"}]))
        arn = created["TrainingJobArn"]
        assert arn == f"arn:aws:sagemaker:{REGION}:123456789012:training-job/{name}"
        seen: set[tuple[str, str]] = set()
        lines_while_running: list[str] = []
        while True:
            d = await client.describe_training_job(TrainingJobName=name)
            seen.add((d["TrainingJobStatus"], d["SecondaryStatus"]))
            if d["SecondaryStatus"] == "Training" and not lines_while_running:
                lines_while_running = await asyncio.to_thread(log_lines, logs, name)
            if d["TrainingJobStatus"] in TERMINAL:
                break
            await asyncio.sleep(0.15)
        assert ("InProgress", "Training") in seen
        assert lines_while_running, "no output reached CloudWatch while the job ran"
        assert d["TrainingJobStatus"] == "Completed", d.get("FailureReason")
        assert [t["Status"] for t in d["SecondaryStatusTransitions"]] == [
            "Starting", "Downloading", "Training", "Uploading", "Completed"]
        assert all(t["StartTime"] <= t["EndTime"] for t in d["SecondaryStatusTransitions"])
        assert d["CreationTime"] <= d["TrainingStartTime"] < d["TrainingEndTime"]
        assert d["TrainingTimeInSeconds"] >= 3
        # The request's configuration is echoed back.
        assert d["Environment"] == {"JOB_CODE": TRAIN, "LR": "0.1"} and d["HyperParameters"] == {"epochs": "8"}
        assert d["ResourceConfig"]["InstanceType"] == "ml.m5.large" and d["RoleArn"] == ROLE
        assert d["ModelArtifacts"]["S3ModelArtifacts"] == f"s3://stepflow-test/out/{name}/output/model.tar.gz"

        listed = await client.list_training_jobs(NameContains=uid)
        assert [s["TrainingJobName"] for s in listed["TrainingJobSummaries"]] == [name]
        assert listed["TrainingJobSummaries"][0]["TrainingJobStatus"] == "Completed"
        await client.add_tags(ResourceArn=arn, Tags=[{"Key": "run", "Value": "r1"}])
        tags = (await client.list_tags(ResourceArn=arn))["Tags"]
        assert {t["Key"]: t["Value"] for t in tags} == {"team": "ml", "run": "r1"}
        with pytest.raises(ClientError) as stop_done:
            await client.stop_training_job(TrainingJobName=name)
        assert "in status Completed" in str(stop_done.value)
        with pytest.raises(ClientError) as missing:
            await client.describe_training_job(TrainingJobName=f"t-{uid}-missing")
        assert code_of(missing) == "ValidationException"  # as the real service answers
        assert "Requested resource not found" in str(missing.value)

    lines = log_lines(logs, name)
    stream = logs.describe_log_streams(logGroupName=GROUP, logStreamNamePrefix=f"{name}/")["logStreams"]
    assert re.fullmatch(rf"{name}/algo-1-\d{{10}}", stream[0]["logStreamName"])
    assert lines[-9:] == [*(f"epoch {i}" for i in range(8)), "done"]  # even a last line without newline
    assert f"NAME={name}" in lines and f"ARN={arn}" in lines
    assert f"ENDPOINT={moto_server} KEY=none" in lines  # no keys: the role comes from the credentials endpoint
    assert f"REGION={REGION} HOST=algo-1 LR=0.1" in lines
    assert 'HPS={"epochs": "8"}' in lines
    assert not job_containers(name), "the finished job's container was not removed"


@docker_test
def test_a_failing_containers_failure_file_is_its_failure_reason_and_its_stderr_is_not(sm: Any, logs: Any,
                                                                                       uid: str) -> None:
    name = f"t-{uid}-fail"
    code = ("import sys\nprint('loading data')\nprint('warming up', file=sys.stderr)\n"
            "print('Traceback: secret detail', file=sys.stderr)\n"
            "open('/opt/ml/output/failure', 'w').write('ValueError: the loss is NaN')\nsys.exit(3)")
    sm.create_training_job(**request(name, code))
    d = wait_status(sm, name)
    assert (d["TrainingJobStatus"], d["SecondaryStatus"]) == ("Failed", "Failed")
    assert d["FailureReason"] == "AlgorithmError: ValueError: the loss is NaN, exit code: 3"
    assert d["SecondaryStatusTransitions"][-1]["StatusMessage"].startswith("Training job failed.")
    assert "loading data" in log_lines(logs, name) and "Traceback: secret detail" in log_lines(logs, name)
    assert "ModelArtifacts" not in d
    assert not job_containers(name)


@docker_test
def test_without_a_failure_file_the_reason_points_at_the_logs_and_a_long_one_is_truncated(sm: Any, uid: str) -> None:
    bare, long = f"t-{uid}-bare", f"t-{uid}-long"
    sm.create_training_job(**request(bare, "import sys\nprint('ValueError: in stderr only', file=sys.stderr)\n"
                                           "sys.exit(1)"))
    sm.create_training_job(**request(long, "import sys\nopen('/opt/ml/output/failure', 'w').write("
                                           "'E: ' + 'x' * 5000)\nsys.exit(2)"))
    reason = wait_status(sm, bare)["FailureReason"]
    assert reason == "AlgorithmError: See job logs for more information, exit code: 1"
    reason = wait_status(sm, long)["FailureReason"]
    assert len(reason) == 1024 and reason.startswith("AlgorithmError: E: xxx") and reason.endswith(", exit code: 2")


@docker_test
def test_channels_and_checkpoints_come_from_s3_and_model_output_and_checkpoints_go_back(
        sm: Any, logs: Any, moto_server: str, uid: str) -> None:  # noqa: F811
    import io
    import tarfile

    image = docker_env.build_byoc_image()
    s3 = boto3.client("s3", endpoint_url=moto_server, **CREDS)
    s3.put_object(Bucket=BUCKET, Key=f"{uid}/data/train/a.csv", Body=b"1,2")
    s3.put_object(Bucket=BUCKET, Key=f"{uid}/data/train/sub/b.csv", Body=b"3,4")
    s3.put_object(Bucket=BUCKET, Key=f"{uid}/ckpt/epoch-1.ckpt", Body=b"weights-1")
    name = f"t-{uid}-data"
    channel = {"ChannelName": "train", "DataSource": {"S3DataSource": {
        "S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/{uid}/data/train", "S3DataDistributionType": "FullyReplicated"}}}
    sm.create_training_job(**request(name, AlgorithmSpecification={"TrainingImage": image, "TrainingInputMode": "File"},
                                     InputDataConfig=[channel], CheckpointConfig={"S3Uri": f"s3://{BUCKET}/{uid}/ckpt"}))
    d = wait_status(sm, name, timeout=60)
    lines = log_lines(logs, name)
    assert d["TrainingJobStatus"] == "Completed", (d.get("FailureReason"), lines)
    assert "files=train/a.csv:1,2,train/sub/b.csv:3,4" in lines and "resumed=['epoch-1.ckpt']" in lines
    assert 'inputdataconfig={"train": {"RecordWrapperType": "None", "TrainingInputMode": "File"}}' in lines
    assert [(t["Status"], t["StatusMessage"]) for t in d["SecondaryStatusTransitions"]] == [
        ("Starting", "Preparing the instances for training"), ("Downloading", "Downloading input data"),
        ("Training", "Training image download completed. Training in progress."),
        ("Uploading", "Uploading generated training model"), ("Completed", "Training job completed")]

    def members(uri: str) -> dict[str, bytes]:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        raw = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]

    model_uri = d["ModelArtifacts"]["S3ModelArtifacts"]
    assert set(members(model_uri)) == {"model.json", "extra/vocab.txt"}
    assert members(model_uri.replace("model.tar.gz", "output.tar.gz")) == {"metrics.json": b'{"rows": 2}'}
    assert s3.get_object(Bucket=BUCKET, Key=f"{uid}/ckpt/epoch-2.ckpt")["Body"].read() == b"weights-2"


@docker_test
def test_an_empty_input_channel_or_a_missing_output_bucket_fails_the_job_naming_the_uri(sm: Any, uid: str) -> None:
    empty, nobucket = f"t-{uid}-empty", f"t-{uid}-nobucket"
    uri = f"s3://{BUCKET}/{uid}/nothing-here"
    sm.create_training_job(**request(empty, InputDataConfig=[{"ChannelName": "train", "DataSource": {
        "S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri}}}]))
    sm.create_training_job(**request(nobucket, OutputDataConfig={"S3OutputPath": f"s3://no-such-bucket-{uid}/out"}))
    sm.create_training_job(**request(f"{nobucket}-ckpt", CheckpointConfig={"S3Uri": f"s3://no-ckpt-{uid}/c"}))
    d = wait_status(sm, empty)
    assert d["TrainingJobStatus"] == "Failed"
    assert d["FailureReason"].startswith(f'ClientError: No S3 objects found under S3 URL "{uri}"')
    d = wait_status(sm, nobucket)
    assert d["TrainingJobStatus"] == "Failed"
    assert d["FailureReason"].startswith(f"ClientError: OutputDataConfig.S3OutputPath s3://no-such-bucket-{uid}/out")
    assert "does not exist" in d["FailureReason"]
    d = wait_status(sm, f"{nobucket}-ckpt")
    assert d["FailureReason"].startswith(f"ClientError: CheckpointConfig.S3Uri s3://no-ckpt-{uid}/c: the bucket")
    assert not job_containers(empty) and not job_containers(nobucket)


@docker_test
def test_without_an_entrypoint_the_image_runs_with_the_argument_train(sm: Any, logs: Any, uid: str) -> None:
    image = docker_env.build_byoc_image()
    name = f"t-{uid}-argv"
    sm.create_training_job(**request(name, AlgorithmSpecification={"TrainingImage": image, "TrainingInputMode": "File"},
                                     Environment={"TEAM": "ml"}))
    d = wait_status(sm, name)
    lines = log_lines(logs, name)
    assert d["TrainingJobStatus"] == "Completed", (d.get("FailureReason"), lines)
    assert f"program=train args=[] channels=[] rows=0 team=ml job={name}" in lines


@docker_test
def test_stop_reaches_stopped_within_5s_and_removes_the_container(sm: Any, uid: str) -> None:
    name = f"t-{uid}-stop"
    sm.create_training_job(**request(name, "import time\nprint('ready')\ntime.sleep(120)"))
    wait_status(sm, name, {"InProgress"}, secondary="Training")
    assert job_containers(name)
    t0 = time.monotonic()
    sm.stop_training_job(TrainingJobName=name)
    assert sm.describe_training_job(TrainingJobName=name)["TrainingJobStatus"] in ("Stopping", "Stopped")
    d = wait_status(sm, name, timeout=5.0)
    assert time.monotonic() - t0 < 5.0
    assert (d["TrainingJobStatus"], d["SecondaryStatus"]) == ("Stopped", "Stopped")
    assert [t["Status"] for t in d["SecondaryStatusTransitions"]][-2:] == ["Stopping", "Stopped"]
    assert "FailureReason" not in d
    assert not job_containers(name)
    with pytest.raises(ClientError) as again:
        sm.stop_training_job(TrainingJobName=name)
    assert code_of(again) == "ValidationException"


GRACEFUL = """
import pathlib, signal, sys, time
def save(*_):
    pathlib.Path("/opt/ml/checkpoints/last.ckpt").write_text("saved on SIGTERM")
    pathlib.Path("/opt/ml/model/partial.bin").write_text("partial")
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
print("ready", flush=True)
time.sleep(120)
"""


@docker_test
def test_a_stopped_job_gets_sigterm_and_its_checkpoints_and_model_still_reach_s3(
        sm: Any, logs: Any, moto_server: str, uid: str) -> None:  # noqa: F811
    name = f"t-{uid}-graceful"
    sm.create_training_job(**request(name, GRACEFUL, CheckpointConfig={"S3Uri": f"s3://{BUCKET}/{uid}/ckpt/"}))
    wait_status(sm, name, {"InProgress"}, secondary="Training")
    deadline = time.monotonic() + 20
    while "ready" not in log_lines(logs, name):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    sm.stop_training_job(TrainingJobName=name)
    d = wait_status(sm, name, timeout=10)
    assert (d["TrainingJobStatus"], d["SecondaryStatus"]) == ("Stopped", "Stopped")
    s3 = boto3.client("s3", endpoint_url=moto_server, **CREDS)
    assert s3.get_object(Bucket=BUCKET, Key=f"{uid}/ckpt/last.ckpt")["Body"].read() == b"saved on SIGTERM"
    model = d["ModelArtifacts"]["S3ModelArtifacts"]
    assert s3.head_object(Bucket=BUCKET, Key=model.removeprefix(f"s3://{BUCKET}/"))["ContentLength"] > 0


@docker_test
def test_max_runtime_exceeded_stops_the_job(sm: Any, uid: str) -> None:
    name = f"t-{uid}-slow"
    sm.create_training_job(**request(name, "import time\ntime.sleep(120)",
                                     StoppingCondition={"MaxRuntimeInSeconds": 2}))
    d = wait_status(sm, name, timeout=15.0)
    assert (d["TrainingJobStatus"], d["SecondaryStatus"]) == ("Stopped", "MaxRuntimeExceeded")
    assert "Training" in [t["Status"] for t in d["SecondaryStatusTransitions"]]
    assert not job_containers(name)


@docker_test
def test_an_image_missing_locally_is_pulled_and_an_unknown_one_fails_the_job(sm: Any, uid: str) -> None:
    pushed = f"{docker_env.REGISTRY}/t-{uid}-sm/base:py3.11"
    try:
        for cmd in (["tag", docker_env.BASE_IMAGE, pushed], ["push", pushed], ["rmi", pushed]):
            subprocess.run(["docker", *cmd], capture_output=True, timeout=120, check=True)
        sm.create_training_job(**request(f"t-{uid}-pull",
                                         AlgorithmSpecification={"TrainingImage": pushed, "TrainingInputMode": "File",
                                                                 "ContainerEntrypoint": ["python3", "-c", "pass"]}))
        missing = f"{docker_env.REGISTRY}/t-{uid}-sm/nothing:1"
        sm.create_training_job(**request(f"t-{uid}-nopull", AlgorithmSpecification={
            "TrainingImage": missing, "TrainingInputMode": "File"}))
        assert wait_status(sm, f"t-{uid}-pull", timeout=60)["TrainingJobStatus"] == "Completed"
        failed = wait_status(sm, f"t-{uid}-nopull", timeout=60)
        assert failed["TrainingJobStatus"] == "Failed"
        assert failed["FailureReason"].startswith(f"ClientError: Unable to pull the training image '{missing}'")
    finally:
        docker_env.remove_local_images(f"{docker_env.REGISTRY}/t-{uid}-sm/")


@docker_test
def test_a_duplicate_name_is_resource_in_use_and_creates_nothing(sm: Any, backend: BackgroundLocalSageMaker,
                                                                 uid: str) -> None:
    name = f"t-{uid}-dup"
    arn = sm.create_training_job(**request(name))["TrainingJobArn"]
    with pytest.raises(ClientError) as dup:
        sm.create_training_job(**request(name.upper()))  # names are unique regardless of case
    assert code_of(dup) == "ResourceInUse"
    assert "Training job names must be unique within an AWS account and region" in str(dup.value)
    assert arn in str(dup.value)
    assert backend.stats()["created"][name] == 1
    wait_status(sm, name)


BIG = "x" * 513
INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "bad name": ({"TrainingJobName": "bad_name!"}, "trainingJobName"),
    "name too long": ({"TrainingJobName": "a" * 64}, "trainingJobName"),
    "missing RoleArn": ({"RoleArn": None}, "roleArn"),
    "RoleArn not an ARN": ({"RoleArn": "SageMakerRole-is-not-an-arn"}, "roleArn"),
    "bad instance type": ({"ResourceConfig": {"InstanceType": "ml.fake.huge", "InstanceCount": 1,
                                              "VolumeSizeInGB": 5}}, "resourceConfig.instanceType"),
    "no instances": ({"ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 0,
                                         "VolumeSizeInGB": 5}}, "resourceConfig.instanceCount"),
    "spot without MaxWait": ({"EnableManagedSpotTraining": True}, "MaxWaitTimeInSeconds"),
    "spot MaxWait < MaxRuntime": ({"EnableManagedSpotTraining": True, "StoppingCondition": {
        "MaxRuntimeInSeconds": 600, "MaxWaitTimeInSeconds": 60}}, "MaxWaitTimeInSeconds"),
    "env value over 512": ({"Environment": {"BIG": BIG}}, "environment.BIG"),
    "101 env entries": ({"Environment": {f"K{i}": "v" for i in range(101)}}, "environment"),
    "no image": ({"AlgorithmSpecification": {"TrainingInputMode": "File"}}, "TrainingImage"),
    "bad input mode": ({"AlgorithmSpecification": {"TrainingImage": "img", "TrainingInputMode": "Stream"}},
                       "algorithmSpecification.trainingInputMode"),
    "output not s3": ({"OutputDataConfig": {"S3OutputPath": "/tmp/out"}}, "outputDataConfig.s3OutputPath"),
}


@docker_test
@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_requests_are_validation_exceptions_naming_the_field(
        case: str, backend: BackgroundLocalSageMaker, uid: str) -> None:
    overrides, field = INVALID[case]
    # Client-side validation off, so the server's own checks answer (as for a client that skips them).
    sm = boto3.client("sagemaker", endpoint_url=backend.url, config=Config(parameter_validation=False), **CREDS)
    req = request(f"t-{uid}-invalid", **overrides)
    req = {k: v for k, v in req.items() if v is not None}
    with pytest.raises(ClientError) as err:
        sm.create_training_job(**req)
    assert code_of(err) == "ValidationException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert field in err.value.response["Error"]["Message"], err.value.response["Error"]["Message"]
    assert not any(uid in n for n in backend.stats()["created"])


@docker_test
def test_list_training_jobs_filters_sorts_and_paginates(sm: Any, uid: str) -> None:
    names = [f"t-{uid}-list-{i}" for i in range(5)]
    for name in names:
        sm.create_training_job(**request(name))
        time.sleep(0.01)  # distinct creation times
    sm.create_training_job(**request(f"t-{uid}-other"))
    pages = list(sm.get_paginator("list_training_jobs").paginate(NameContains=f"{uid}-list",
                                                                 PaginationConfig={"PageSize": 2}))
    assert [len(p["TrainingJobSummaries"]) for p in pages] == [2, 2, 1]
    listed = [s["TrainingJobName"] for p in pages for s in p["TrainingJobSummaries"]]
    assert listed == names[::-1]  # newest first by default
    by_name = sm.list_training_jobs(NameContains=uid, SortBy="Name", SortOrder="Ascending", MaxResults=100)
    assert [s["TrainingJobName"] for s in by_name["TrainingJobSummaries"]] == sorted([*names, f"t-{uid}-other"])
    assert "NextToken" not in by_name
    first = sm.describe_training_job(TrainingJobName=names[0])["CreationTime"]
    window = sm.list_training_jobs(NameContains=f"{uid}-list", CreationTimeAfter=first - dt.timedelta(minutes=1),
                                   CreationTimeBefore=first + dt.timedelta(minutes=1))["TrainingJobSummaries"]
    assert sorted(s["TrainingJobName"] for s in window) == names
    assert sm.list_training_jobs(NameContains=uid, CreationTimeAfter=first + dt.timedelta(minutes=1)
                                 )["TrainingJobSummaries"] == []
    for name in [*names, f"t-{uid}-other"]:
        wait_status(sm, name)
    done = sm.list_training_jobs(NameContains=uid, StatusEquals="Completed", MaxResults=100)
    assert len(done["TrainingJobSummaries"]) == 6
    assert sm.list_training_jobs(NameContains=uid, StatusEquals="Failed")["TrainingJobSummaries"] == []


# -- fault injection and load ------------------------------------------------------------------
def _fake(backend: BackgroundLocalSageMaker, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{backend.url}/_fake/{path}", data=data), timeout=10) as r:
        return dict(json.loads(r.read()))


@docker_test
def test_throttling_everything_reaches_the_client_and_creates_nothing(sm: Any, backend: BackgroundLocalSageMaker,
                                                                       uid: str) -> None:
    name = f"t-{uid}-throttled"
    before = _fake(backend, "stats")
    assert _fake(backend, "config", {"throttle_rate": 1.0})["throttle_rate"] == 1.0
    client = boto3.client("sagemaker", endpoint_url=backend.url,
                          config=Config(retries={"mode": "standard", "total_max_attempts": 3}), **CREDS)
    with pytest.raises(ClientError) as err:
        client.create_training_job(**request(name))
    assert code_of(err) == "ThrottlingException" and "Rate exceeded" in str(err.value)
    assert err.value.response["ResponseMetadata"]["RetryAttempts"] == 2  # the client did retry
    stats = _fake(backend, "stats")
    assert stats["throttled"] - before["throttled"] == 3
    assert stats["calls"]["CreateTrainingJob"] - before["calls"].get("CreateTrainingJob", 0) == 3
    assert name not in stats["created"]
    backend.configure(throttle_rate=0.0)
    with pytest.raises(ClientError) as missing:
        sm.describe_training_job(TrainingJobName=name)
    assert "Requested resource not found" in str(missing.value)


@docker_test
async def test_twenty_jobs_at_once_complete_under_throttling_and_5xx_each_created_once(
        backend: BackgroundLocalSageMaker, uid: str) -> None:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    backend.configure(throttle_rate=0.15, error_rate=0.1, seed=11)
    names = [f"t-{uid}-load-{i}" for i in range(20)]
    config = AioConfig(retries={"mode": "standard", "total_max_attempts": 12}, max_pool_connections=30)
    try:
        async with get_session().create_client("sagemaker", endpoint_url=backend.url, config=config,
                                               **CREDS) as client:
            async def one(name: str) -> dict[str, Any]:
                await client.create_training_job(**request(name, "import time\nprint('hi')\ntime.sleep(1)"))
                while True:
                    d = await client.describe_training_job(TrainingJobName=name)
                    if d["TrainingJobStatus"] in TERMINAL:
                        return dict(d)
                    await asyncio.sleep(0.5)

            t0 = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*(one(n) for n in names)), 60)
            elapsed = time.monotonic() - t0
    finally:
        stats = backend.stats()
        backend.configure(throttle_rate=0.0, error_rate=0.0)
    assert [r["TrainingJobStatus"] for r in results] == ["Completed"] * 20, [r.get("FailureReason") for r in results]
    assert all(stats["created"][n] == 1 for n in names)  # retried creates never made a second job
    assert stats["throttled"] > 0 and stats["errors"] > 0
    assert elapsed < 45, f"20 one-second jobs took {elapsed:.1f} s: they did not run concurrently"


# -- the job role's credentials ----------------------------------------------------------------
#: A container fetching its role's credentials as the SDKs' container provider does (urllib: the
#: base image has no AWS SDK), printing what it got and the AWS variables of its environment.
FETCH_CREDENTIALS = """
import json, os, urllib.request as u
e = os.environ
uri = e["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
r = u.Request(uri, headers={"Authorization": e["AWS_CONTAINER_AUTHORIZATION_TOKEN"]})
c = json.load(u.urlopen(r, timeout=10))
print("ACCESS_KEY_ID=" + c["AccessKeyId"])
print("GOT", *(c[k] for k in ("SecretAccessKey", "Token", "RoleArn", "AccountId", "Expiration")))
print("AT=" + uri.split("/")[2], e["AWS_REGION"], e["AWS_DEFAULT_REGION"])
print("AWS_ENV=" + " ".join(k for k in e if k[:4] == "AWS_"))
"""
#: A container showing its credentials URL and token, then running until stopped.
HOLD_CREDENTIALS = """
import os, time
print("URI=" + os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"])
print("TOKEN=" + os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"])
time.sleep(120)
"""


def line_value(lines: list[str], prefix: str) -> str:
    found = [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]
    assert found, f"no line {prefix}... in {lines}"
    return found[-1]


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@docker_test
def test_the_container_gets_the_role_credentials_from_the_endpoint_not_from_its_environment(
        sm: Any, logs: Any, backend: BackgroundLocalSageMaker, uid: str) -> None:
    name = f"t-{uid}-role"
    before = backend.stats()["credentials"]
    sm.create_training_job(**request(name, FETCH_CREDENTIALS, Environment={"LR": "0.1"}))
    d = wait_status(sm, name)
    lines = log_lines(logs, name)
    assert d["TrainingJobStatus"] == "Completed", (d.get("FailureReason"), lines)
    assert "ACCESS_KEY_ID=AKIALOCALROLE0000001" in lines
    secret, token, role, account, expiration = line_value(lines, "GOT ").split()
    assert (secret, token, role, account) == ("local-role-secret", "local-role-session-token", ROLE, "123456789012")
    expires = dt.datetime.fromisoformat(expiration)
    assert dt.timedelta(minutes=50) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)
    port = backend.backend.credentials.port  # type: ignore[union-attr]
    assert f"AT=127.0.0.1:{port} {REGION} {REGION}" in lines  # and the region, as SageMaker sets it
    # No keys in the environment: the SDKs fall through to the container provider.
    assert sorted(line_value(lines, "AWS_ENV=").split()) == [
        "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_DEFAULT_REGION",
        "AWS_EC2_METADATA_DISABLED", "AWS_ENDPOINT_URL", "AWS_REGION"]
    # As on SageMaker, the credentials variables are the container's, not the job's configuration:
    # Environment is exactly the request's, and nothing in the answer shows the URL or the keys.
    assert d["Environment"] == {"JOB_CODE": FETCH_CREDENTIALS, "LR": "0.1"}
    shown = json.dumps(d, default=str)
    for secret in ("AKIALOCALROLE0000001", "local-role-secret", "local-role-session-token", f"127.0.0.1:{port}",
                   "/v1/credentials/"):
        assert secret not in shown
    after = backend.stats()["credentials"]
    assert after["served"] == before["served"] + 1 and after["open"] == before["open"]  # revoked at the end


@docker_test
def test_a_credentials_url_needs_its_token_and_closes_when_the_job_ends(
        sm: Any, logs: Any, backend: BackgroundLocalSageMaker, uid: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    import botocore.session

    name = f"t-{uid}-hold"
    sm.create_training_job(**request(name, HOLD_CREDENTIALS))
    try:
        deadline = time.monotonic() + 30
        lines = log_lines(logs, name)
        while not any(line.startswith("TOKEN=") for line in lines):
            assert time.monotonic() < deadline, f"the job did not print its credentials URL: {lines}"
            time.sleep(0.2)
            lines = log_lines(logs, name)
        uri, token = line_value(lines, "URI="), line_value(lines, "TOKEN=")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1/credentials/[\w-]{40,}", uri), uri
        refused = backend.stats()["credentials"]["refused"]
        assert http_status(uri) == 401
        assert http_status(uri, {"Authorization": token[:-1]}) == 403
        assert http_status(uri, {"Authorization": f"Bearer {token}"}) == 403
        assert http_status(uri[:-1], {"Authorization": token}) == 404  # another path is no job's URL
        assert backend.stats()["credentials"]["refused"] == refused + 4

        # botocore's own credential chain, given only what the container has, resolves the role.
        empty = tmp_path / "empty"
        empty.write_text("")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri)
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", token)
        session = botocore.session.get_session()
        creds = session.get_credentials()
        assert creds is not None and creds.method == "container-role"
        frozen = creds.get_frozen_credentials()
        assert (frozen.access_key, frozen.secret_key, frozen.token) == (
            ROLE_KEYS.access_key_id, ROLE_KEYS.secret_access_key, ROLE_KEYS.session_token)
        # ... and signs real calls with it (moto accepts any key).
        client = session.create_client("logs", endpoint_url=logs.meta.endpoint_url, region_name=REGION)
        assert client.describe_log_streams(logGroupName=GROUP, logStreamNamePrefix=f"{name}/")["logStreams"]
        # So does aiobotocore's (s3fs in a job uses it).
        aio_method, aio_key = asyncio.run(_aiobotocore_credentials())
        assert (aio_method, aio_key) == ("container-role", ROLE_KEYS.access_key_id)
    finally:
        sm.stop_training_job(TrainingJobName=name)
    assert wait_status(sm, name)["TrainingJobStatus"] == "Stopped"
    assert http_status(uri, {"Authorization": token}) == 404  # the role's credentials outlive no job


async def _aiobotocore_credentials() -> tuple[str, str]:
    from aiobotocore.session import get_session

    creds = await get_session().get_credentials()
    assert creds is not None
    return creds.method, (await creds.get_frozen_credentials()).access_key


def test_the_role_credentials_default_to_the_control_planes_own() -> None:
    env = {"AWS_ACCESS_KEY_ID": "AKIAOWN", "AWS_SECRET_ACCESS_KEY": "own-secret", "AWS_SESSION_TOKEN": "own-token"}
    assert RoleCredentials.from_environment(env) == RoleCredentials("AKIAOWN", "own-secret", "own-token")
    assert RoleCredentials.from_environment({**env, "AWS_SESSION_TOKEN": ""}).session_token is None
    assert RoleCredentials.from_environment({}) == RoleCredentials("testing", "testing")  # moto's test keys
    assert "own-secret" not in repr(RoleCredentials.from_environment(env))


# -- the server's own lifecycle ---------------------------------------------------------------
@docker_test
async def test_closing_the_server_stops_and_removes_every_container(moto_server: str, uid: str) -> None:  # noqa: F811
    from aiobotocore.session import get_session

    async with LocalSageMaker(logs_endpoint=moto_server, stop_grace=1.0) as server:
        async with get_session().create_client("sagemaker", endpoint_url=server.url, **CREDS) as client:
            for i in range(2):
                await client.create_training_job(**request(f"t-{uid}-bye-{i}", "import time\ntime.sleep(120)"))
            while not all(j.secondary == "Training" for j in server.jobs.values()):
                await asyncio.sleep(0.1)
        label = f"stepflow.fake-sagemaker.instance={server.instance_id}"
        assert len(await asyncio.to_thread(_containers, label)) == 2
    assert await asyncio.to_thread(_containers, label) == []
    assert {j.status for j in server.jobs.values()} == {"Stopped"}
    assert server.credentials.active == 0


@docker_test
def test_the_command_line_serves_the_api(moto_server: str, backend: BackgroundLocalSageMaker,  # noqa: F811
                                         logs: Any, uid: str) -> None:
    env = {**os.environ, **aws_env(moto_server), "PYTHONPATH": str(LOCALCLOUD)}
    creds_port = free_port()
    argv = lambda port: [sys.executable, "-m", "stepflow_localcloud.sagemaker", "--port", str(port),  # noqa: E731
                         "--logs-endpoint", moto_server, "--throttle-rate", "0.5", "--seed", "1",
                         "--role-access-key-id", "AKIACOMMANDLINEROLE1", "--role-secret-access-key", "cli-secret",
                         "--credentials-port", str(creds_port)]
    with run_service("local-sagemaker", argv, url=lambda port: f"http://127.0.0.1:{port}", env=env) as service:
        client = boto3.client("sagemaker", endpoint_url=service.url, **CREDS)
        assert client.list_training_jobs()["TrainingJobSummaries"] == []  # retried through the throttling
        with urllib.request.urlopen(f"{service.url}/_fake/stats", timeout=10) as r:
            stats = json.loads(r.read())
        assert stats["throttle_rate"] == 0.5 and stats["calls"]["ListTrainingJobs"] >= 1
        set_faults = urllib.request.Request(f"{service.url}/_fake/config", data=b'{"throttle_rate": 0}')
        with urllib.request.urlopen(set_faults, timeout=10) as r:  # the job's polling needs no retries
            assert json.loads(r.read())["throttle_rate"] == 0
        name = f"t-{uid}-cli"
        client.create_training_job(**request(name, FETCH_CREDENTIALS))
        d = wait_status(client, name)
        lines = log_lines(logs, name)
        assert d["TrainingJobStatus"] == "Completed", (d.get("FailureReason"), lines)
        assert "ACCESS_KEY_ID=AKIACOMMANDLINEROLE1" in lines
        # No session token given: an empty one, which botocore does not send.
        assert line_value(lines, "GOT ").split()[:2] == ["cli-secret", ROLE]
        assert f"AT=127.0.0.1:{creds_port} {REGION} {REGION}" in lines
        out = service.log.read_text()
        assert "local SageMaker listening on" in out
        assert f"job role credentials served on http://127.0.0.1:{creds_port}" in out
