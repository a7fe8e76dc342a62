"""The seed's promise: the same pipeline code runs its trainer on Docker, SageMaker, Vertex AI and Azure ML.

Only the active stack changes. Each stack maps the operator name the step uses (``trainer``)
to its own step operator (``-s trainer=docker`` / ``sagemaker`` / ``vertex`` / ``azureml``).
SageMaker, Vertex AI and Azure ML are the local control planes of stepflow-localcloud, running
the jobs on Docker; S3 is moto, Cloud Storage the GCS emulator, Blob Storage Azurite.
"""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stepflow._stack.client import Client
from stepflow.events import JobSubmitted
from tests.docker_env import REGISTRY, docker_test, remove_local_images, require_docker, run_with_events, write_project
from tests.services import (
    AWS_TEST_REGION,
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    aws_env,
    azurite,
    azurite_connection_string,
    gcs_emulator,
    moto_server,
)

__all__ = ["azurite", "gcs_emulator", "moto_server"]

PIPES = textwrap.dedent(
    '''
    import os

    from stepflow import pipeline, step


    @step
    def load(n: int = 5) -> list[int]:
        return list(range(n))


    @step(step_operator="trainer")
    def train(data: list[int], lr: float = 0.5) -> dict:
        where = ("sagemaker" if "TRAINING_JOB_NAME" in os.environ
                 else "vertex" if "CLOUD_ML_JOB_ID" in os.environ
                 else "azureml" if "AZUREML_RUN_ID" in os.environ else "docker")
        return {"score": sum(data) * lr, "ran_on": where, "in_container": os.path.exists("/.dockerenv")}


    @pipeline
    def training(lr: float = 0.5):
        return train(load(), lr=lr)
    '''
)


@pytest.fixture
def clouds(tmp_path: Path, moto_server: str, gcs_emulator: str, azurite: str,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    require_docker()
    import boto3
    from azure.storage.blob import BlobServiceClient
    from gcsfs.core import GCSFileSystem
    from stepflow_localcloud.azureml import serve_in_thread as azureml
    from stepflow_localcloud.sagemaker import serve_in_thread as sagemaker
    from stepflow_localcloud.vertex import serve_in_thread as vertex

    for key, value in aws_env(moto_server).items():
        monkeypatch.setenv(key, value)
    project = tmp_path / "proj"
    module = write_project(project, PIPES, "anywhere")
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.chdir(project)
    bucket = f"three-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, region_name=AWS_TEST_REGION).create_bucket(Bucket=bucket)
    GCSFileSystem(endpoint_url=gcs_emulator, token="anon", project="test").mkdir(bucket)
    connection = azurite_connection_string(azurite)
    BlobServiceClient.from_connection_string(connection).create_container(bucket)
    prefix = f"t-three-{uuid.uuid4().hex[:8]}"
    with sagemaker(logs_endpoint=moto_server, phase_delay=0.1) as sm, \
            vertex(project="my-project", location="us-central1", phase_delay=0.1) as vx, \
            azureml(phase_delay=0.1, container_env={"AZURE_STORAGE_CONNECTION_STRING": connection}) as aml:
        c = Client()
        c.register_component("image_builder", "builder", "docker", {})
        # Docker
        c.register_component("container_registry", "reg", "default", {"uri": f"{REGISTRY}/{prefix}"})
        c.register_component("step_operator", "docker", "docker", {"project_root": str(project)})
        c.register_stack("docker_stack", artifact_store="default", container_registry="reg",
                         image_builder="builder", step_operators=["trainer=docker"])
        # SageMaker
        c.register_component("artifact_store", "s3-store", "s3", {"path": f"s3://{bucket}/sf",
                                                                  "endpoint_url": moto_server})
        c.register_component("container_registry", "ecr", "ecr", {"uri": f"{REGISTRY}/{prefix}",
                                                                 "endpoint_url": moto_server})
        c.register_component("step_operator", "sagemaker", "sagemaker", {
            "role": "arn:aws:iam::123456789012:role/SageMakerRole", "endpoint_url": sm.url,
            "project_root": str(project)})
        c.register_stack("sagemaker_stack", artifact_store="s3-store", container_registry="ecr",
                         image_builder="builder", step_operators=["trainer=sagemaker"])
        # Vertex AI
        c.register_component("artifact_store", "gcs-store", "gcs", {
            "path": f"gs://{bucket}/sf", "endpoint_url": gcs_emulator, "token": "anon", "project": "test"})
        c.register_component("container_registry", "gar", "gcp", {"uri": f"{REGISTRY}/{prefix}"})
        c.register_component("step_operator", "vertex", "vertex", {
            "project": "my-project", "region": "us-central1", "api_endpoint": f"http://{vx.endpoint}",
            "project_root": str(project)})
        c.register_stack("vertex_stack", artifact_store="gcs-store", container_registry="gar",
                         image_builder="builder", step_operators=["trainer=vertex"])
        # Azure ML
        ws = aml.backend
        assert ws is not None
        c.register_component("artifact_store", "az-store", "azure", {
            "path": f"az://{bucket}/sf", "account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY,
            "endpoint_url": azurite})
        c.register_component("container_registry", "acr", "azure", {"uri": f"{REGISTRY}/{prefix}"})
        c.register_component("step_operator", "azureml", "azureml", {
            "subscription_id": ws.subscription_id, "resource_group": ws.resource_group,
            "workspace_name": ws.workspace_name, "endpoint": aml.url, "ca_bundle": aml.certificate_file,
            "project_root": str(project)})
        c.register_stack("azure_stack", artifact_store="az-store", container_registry="acr",
                         image_builder="builder", step_operators=["trainer=azureml"])
        yield module
    remove_local_images(f"{REGISTRY}/{prefix}/")


@docker_test
async def test_one_pipeline_four_backends_by_changing_only_the_active_stack(clouds: str) -> None:
    import importlib

    pipes = importlib.import_module(clouds)
    seen: dict[str, Any] = {}
    for stack, backend in (("docker_stack", "docker"), ("sagemaker_stack", "sagemaker"), ("vertex_stack", "vertex"),
                           ("azure_stack", "azureml")):
        Client().set_active_stack(stack)
        result, events = await run_with_events(pipes.training(lr=2.0))  # the same code every time
        assert result.status == "succeeded", (stack, {k: s.error for k, s in result.steps.items()})
        assert result.output == {"score": 20.0, "ran_on": backend, "in_container": True}, stack
        job = next(e.job_id for e in events if isinstance(e, JobSubmitted))
        seen[backend] = job
    assert seen["sagemaker"].startswith("sf-")
    assert seen["vertex"].startswith("projects/my-project/locations/us-central1/customJobs/")
    assert seen["azureml"].startswith("sf-")  # Azure ML takes the client's deterministic name
    assert len(seen["docker"]) == 64  # a container id
