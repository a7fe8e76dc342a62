"""The official SageMaker Python SDK drives the local control plane (stepflow-localcloud).

An ``Estimator`` with a bring-your-own-container image (tests/byoc) and nothing but
``AWS_ENDPOINT_URL_SAGEMAKER`` pointing at the control plane: an input channel, hyperparameters
and environment go in, the container's output streams back through CloudWatch, and
``model.tar.gz`` comes back downloadable. A failing container's ``/opt/ml/output/failure`` is
the FailureReason; its stderr is not. The SDK lives in its own virtualenv (its pins are wide).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from tests import docker_env
from tests.conftest import ROOT
from tests.services import ServiceUnavailable, aws_env, moto_server, sdk_python  # noqa: F401 (fixture)

try:
    from stepflow_localcloud.sagemaker import BackgroundLocalSageMaker, serve_in_thread
except ImportError:  # the distribution is not installed (yet): use it from the source tree
    sys.path.insert(0, str(ROOT / "plugins" / "stepflow-localcloud"))
    from stepflow_localcloud.sagemaker import BackgroundLocalSageMaker, serve_in_thread

SDK = "sagemaker==2.257.*"
FIT = Path(__file__).parent / "sdk" / "sagemaker_fit.py"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
BUCKET = "stepflow-sdk"


@pytest.fixture(scope="module")
def sdk() -> str:
    try:
        return sdk_python("sagemaker-2.257", SDK)
    except ServiceUnavailable as exc:
        if os.environ.get("STEPFLOW_REQUIRE_SERVICES", "") not in ("", "0"):
            pytest.fail(f"the SageMaker SDK cannot be installed: {exc}")
        pytest.skip(f"SERVICE UNAVAILABLE, the SageMaker SDK cannot be installed: {exc}")


@pytest.fixture(scope="module")
def control_plane(moto_server: str) -> Iterator[BackgroundLocalSageMaker]:  # noqa: F811
    docker_env.require_docker()
    s3 = boto3.client("s3", endpoint_url=moto_server, **_creds())
    with contextlib.suppress(ClientError):
        s3.create_bucket(Bucket=BUCKET)
    for key, body in (("data/train/part-0.csv", "1,2\n3,4\n"), ("data/train/more/part-1.csv", "5,6\n")):
        s3.put_object(Bucket=BUCKET, Key=key, Body=body.encode())
    with serve_in_thread(logs_endpoint=moto_server, stop_grace=1.0) as sm:
        yield sm


def _creds() -> dict[str, str]:
    return {"region_name": "us-east-1", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def fit(sdk: str, control_plane: BackgroundLocalSageMaker, moto: str, job: str,
        **hyperparameters: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STEPFLOW_"))}
    env.update(aws_env(moto), AWS_ENDPOINT_URL_SAGEMAKER=control_plane.url)
    config = {"image": docker_env.build_byoc_image(), "role": ROLE, "bucket": BUCKET, "job": job,
              "hyperparameters": hyperparameters}
    return subprocess.run([sdk, str(FIT), json.dumps(config)], capture_output=True, text=True, env=env, timeout=240)


@docker_env.docker_test
def test_an_estimator_fits_a_byoc_image_and_its_model_comes_back(sdk: str, control_plane: BackgroundLocalSageMaker,
                                                                 moto_server: str) -> None:  # noqa: F811
    job = f"sdk-{uuid.uuid4().hex[:8]}"
    done = fit(sdk, control_plane, moto_server, job, epochs=3, lr=0.1)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # The container's output, streamed back by the SDK from CloudWatch while it waited.
    assert f"program=train args=[] channels=['train'] rows=3 team=ml job={job}" in out
    assert "training done" in out
    model_uri = f"s3://{BUCKET}/models/{job}/output/model.tar.gz"
    assert f"MODEL={model_uri}" in out
    s3 = boto3.client("s3", endpoint_url=moto_server, **_creds())
    raw = s3.get_object(Bucket=BUCKET, Key=f"models/{job}/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        model = json.loads(tar.extractfile("model.json").read())  # type: ignore[union-attr]
    assert model["rows"] == 3
    assert {k: str(v).strip('"') for k, v in model["hyperparameters"].items()} == {"epochs": "3", "lr": "0.1"}
    assert control_plane.stats()["created"] == {job: 1}


@docker_env.docker_test
def test_a_failing_containers_failure_file_is_what_the_sdk_reports(sdk: str, control_plane: BackgroundLocalSageMaker,
                                                                   moto_server: str) -> None:  # noqa: F811
    job = f"sdk-{uuid.uuid4().hex[:8]}"
    done = fit(sdk, control_plane, moto_server, job, fail="bad row 7")
    out = done.stdout + done.stderr
    assert done.returncode == 3, out
    assert "FIT-ERROR=UnexpectedStatusException" in out and "ValueError: bad row 7" in out
    sm = boto3.client("sagemaker", endpoint_url=control_plane.url, **_creds())
    described = sm.describe_training_job(TrainingJobName=job)
    assert described["FailureReason"] == "AlgorithmError: ValueError: bad row 7, exit code: 1"
    assert "Traceback" not in described["FailureReason"]  # stderr is in the logs only
    assert "details only in the logs" in out  # ... which the SDK streamed
