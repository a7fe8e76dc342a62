"""The sagemaker step operator and the ecr registry end to end, on real parts only.

- SageMaker: the local control plane of ``stepflow-localcloud`` (``stepflow_localcloud.sagemaker``), which
  speaks the AWS JSON protocol and *runs* each training job's image on the local Docker daemon,
  ships its output to CloudWatch Logs, stops it on StopTrainingJob and injects throttling.
- S3, ECR (GetAuthorizationToken, repositories), STS and CloudWatch Logs: moto's server.
- Images: built by the real Docker daemon and pushed to the real registry on 127.0.0.1:5000 (the
  ecr flavor with ``endpoint_url`` = moto: login and repositories go to moto, image bytes to the
  local registry).

Image builds are shared: every test's ``$STEPFLOW_HOME/cache`` (wheels) is one directory, and
the tests but the walkthrough push under one registry prefix, so one image serves them all.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from stepflow import EventBus, run
from stepflow._stack.client import Client
from stepflow.errors import ConfigError, PipelineDefinitionError, StepflowError
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
from tests.services import AWS_TEST_REGION, aws_env, moto_server

__all__ = ["moto_server"]

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
MODULE = f"smpipes_{uuid.uuid4().hex[:8]}"

PIPES = shared_pipes("sagemaker") + textwrap.dedent(
    '''
    @step
    def load(n: int = 4) -> list[int]:
        return list(range(n))


    @step(custom_step_operator="sagemaker")
    def train(data: list[int], lr: float = 0.5) -> dict:
        print(f"training on {len(data)} rows, lr={lr}", flush=True)
        time.sleep(3)
        print("training done", flush=True)
        return {"score": sum(data) * lr, "job": os.environ.get("TRAINING_JOB_NAME"),
                "instance": os.environ.get("SM_CURRENT_INSTANCE_TYPE"), "in_container": os.path.exists("/.dockerenv")}


    @step(custom_step_operator="sagemaker", settings={"sagemaker": {"cpu": 4, "memory": "8g"}})
    def evaluate(model: dict) -> dict:
        return {"score": model["score"] + 1, "instance": os.environ.get("SM_CURRENT_INSTANCE_TYPE")}


    @pipeline
    def walkthrough(lr: float = 0.5):
        return evaluate(train(load(), lr=lr))


    @step(custom_step_operator="sagemaker", settings={"sagemaker": {"environment": {"BIG": "x" * 600}}})
    def loud() -> int:
        return 1


    @pipeline
    def too_big_env():
        loud()


    @step(custom_step_operator="sagemaker", settings={"sagemaker": {"gpu": 64}})
    def greedy() -> int:
        return 1


    @pipeline
    def impossible():
        greedy()


    @step(custom_step_operator="sagemaker", settings={"sagemaker": {"instance_type": "ml.m5.huge"}})
    def odd() -> int:
        return 1


    @pipeline
    def odd_instance():
        odd()
    '''
)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Per module: the project, a wheel cache, a registry prefix (images shared by the tests)."""
    root = tmp_path_factory.mktemp("sagemaker")
    project = root / "proj"
    project.mkdir()
    (project / f"{MODULE}.py").write_text(PIPES)
    cache = root / "cache"
    cache.mkdir()
    prefix = f"t-sm-{uuid.uuid4().hex[:8]}"
    yield {"project": project, "cache": cache, "prefix": prefix, "root": root}
    remove_local_images(f"{REGISTRY}/{prefix}/")


@pytest.fixture(scope="module")
def sagemaker(moto_server: str) -> Iterator[Any]:
    """The local SageMaker control plane (jobs run on Docker, logs to moto's CloudWatch Logs)."""
    require_docker()
    from stepflow_localcloud.sagemaker import serve_in_thread

    with serve_in_thread(logs_endpoint=moto_server, phase_delay=0.3) as backend:
        yield backend


@pytest.fixture
def env(moto_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: dict[str, Any],
        _isolated_home: Path) -> dict[str, str]:
    """AWS pointed at moto (no real AWS, no ~/.aws), the project importable, the wheel cache shared."""
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    values = {**aws_env(moto_server), "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)}
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    _isolated_home.mkdir(parents=True, exist_ok=True)
    (_isolated_home / "cache").symlink_to(shared["cache"], target_is_directory=True)
    monkeypatch.syspath_prepend(str(shared["project"]))
    monkeypatch.chdir(shared["project"])
    return values


@pytest.fixture(scope="module")
def bucket(moto_server: str) -> str:
    import boto3

    name = f"sm-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, region_name=AWS_TEST_REGION, aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)
    return name


def register_stack(*, moto: str, backend: Any, bucket: str, project: Path, prefix: str, operator: dict[str, Any]
                   | None = None, registry: dict[str, Any] | None = None, store: dict[str, Any] | None = None) -> None:
    c = Client()
    c.register_component("artifact_store", "s3-store", "s3",
                         {"path": f"s3://{bucket}/stepflow", "endpoint_url": moto, **(store or {})})
    c.register_component("container_registry", "ecr_registry", "ecr",
                         {"uri": f"{REGISTRY}/{prefix}", "endpoint_url": moto, **(registry or {})})
    c.register_component("step_operator", "sagemaker", "sagemaker",
                         {"role": ROLE, "instance_type": "ml.m5.large", "endpoint_url": backend.url,
                          "project_root": str(project), **(operator or {})})
    c.register_stack("sagemaker_stack", artifact_store="s3-store", container_registry="ecr_registry",
                     step_operators=["sagemaker"])
    c.set_active_stack("sagemaker_stack")


@pytest.fixture
def sm_stack(env: dict[str, str], sagemaker: Any, bucket: str, shared: dict[str, Any]) -> dict[str, Any]:
    """The stack of the walkthrough (registered through the Python API), active."""
    register_stack(moto=env["AWS_ENDPOINT_URL"], backend=sagemaker, bucket=bucket, project=shared["project"],
                   prefix=shared["prefix"])
    return {"moto": env["AWS_ENDPOINT_URL"], "backend": sagemaker, "bucket": bucket, **shared}


def pipes() -> Any:
    return importlib.import_module(MODULE)


def sm_client(backend: Any) -> Any:
    import boto3

    return boto3.client("sagemaker", endpoint_url=backend.url, region_name=AWS_TEST_REGION,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def stats(backend: Any) -> dict[str, Any]:
    with urllib.request.urlopen(f"{backend.url}/_fake/stats", timeout=10) as resp:
        return dict(json.load(resp))


def cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stepflow", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_env(project: Path) -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(project), root, env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "160"
    return env


# ------------------------------------------------------------------------------ the walkthrough
@docker_test
async def test_the_seed_walkthrough_end_to_end(env: dict[str, str], sagemaker: Any, bucket: str,
                                               shared: dict[str, Any]) -> None:
    """The seed's commands, then a pipeline whose steps run as training jobs."""
    moto, project = env["AWS_ENDPOINT_URL"], shared["project"]
    prefix = f"t-smwalk-{uuid.uuid4().hex[:8]}"  # its own prefix: this test builds and pushes
    environ = cli_env(project)
    commands = [
        ["artifact-store", "register", "s3-store", "--type=s3", f"--path=s3://{bucket}/stepflow",
         f"--endpoint_url={moto}"],
        ["container-registry", "register", "ecr_registry", "--type=ecr", f"--uri={REGISTRY}/{prefix}",
         f"--endpoint_url={moto}"],
        ["step-operator", "register", "sagemaker", "--type=sagemaker", f"--role={ROLE}",
         "--instance_type=ml.m5.large", "--base_image=stepflow-base:py3.11", f"--bucket_name={bucket}",
         "--experiment_name=walkthrough", f"--endpoint_url={sagemaker.url}", f"--project_root={project}"],
        ["stack", "register", "sagemaker_stack", "-m", "local_metadata_store", "-o", "local_orchestrator",
         "-c", "ecr_registry", "-a", "s3-store", "-s", "sagemaker"],
        ["stack", "set", "sagemaker_stack"],
    ]
    for args in commands:
        done = cli(args, environ, project, timeout=60)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    try:
        before = stats(sagemaker)["calls"].get("CreateTrainingJob", 0)
        result, events = await run_with_events(pipes().walkthrough(lr=2.0))
        assert result.status == "succeeded", {k: s.error for k, s in result.steps.items()}
        model = result.outputs["train"]
        assert model["score"] == 12.0 and model["in_container"] is True
        assert model["instance"] == "ml.m5.large"
        assert result.output == {"score": 13.0, "instance": "ml.c5.xlarge"}  # cpu=4, memory=8g -> cheapest fit
        assert result.steps["train"].operator == "sagemaker" and result.steps["load"].operator == "in-process"
        # image built and pushed once for both steps
        assert [e.cached for e in events if isinstance(e, ImageBuildFinished)].count(False) == 1
        pushed = [e for e in events if isinstance(e, ImagePushed)]
        assert len(pushed) == 1 and pushed[0].image.startswith(f"{REGISTRY}/{prefix}/stepflow-steps:")
        submitted = {e.step: e.job_id for e in events if isinstance(e, JobSubmitted)}
        assert set(submitted) == {"train", "evaluate"} and model["job"] == submitted["train"]
        assert stats(sagemaker)["calls"]["CreateTrainingJob"] - before == 2
        # secondary statuses as events; logs streamed while the job ran
        train_events = [e for e in events if getattr(e, "step", None) == "train"]
        changes = [(e.status, e.detail) for e in train_events if isinstance(e, JobStatusChanged)]
        assert ("InProgress", "Training") in changes and changes[-1][0] == "Completed", changes
        assert {d for _, d in changes} >= {"Training", "Completed"}
        completed_seq = next(e.seq for e in train_events if isinstance(e, JobStatusChanged)
                             and e.status == "Completed")
        first_line = next(e for e in train_events if isinstance(e, LogLine) and "training on 4 rows" in e.line)
        assert first_line.seq < completed_seq, "the log line arrived only after the job finished"
        lines = [e.line for e in train_events if isinstance(e, LogLine)]
        assert lines.index("training on 4 rows, lr=2.0") < lines.index("training done")
        # the request SageMaker got
        job = sm_client(sagemaker).describe_training_job(TrainingJobName=submitted["train"])
        assert job["AlgorithmSpecification"]["ContainerEntrypoint"] == ["python3"]
        assert job["AlgorithmSpecification"]["ContainerArguments"][:2] == ["-m", "stepflow.entrypoint"]
        assert job["OutputDataConfig"]["S3OutputPath"].startswith(f"s3://{bucket}/walkthrough/")
        assert job["RoleArn"] == ROLE and job["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400}
        tags = {t["Key"]: t["Value"] for t in sm_client(sagemaker).list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]}
        assert tags["stepflow.step"] == "train" and tags["stepflow.experiment"] == "walkthrough"
        # what anyone allowed to describe the job sees: no key of the store, no signing key
        described = json.dumps(job, default=str)
        assert "testing" not in described and "STEPFLOW_STORAGE_CREDENTIALS" not in described
        assert set(job["Environment"]) >= {"STEPFLOW_PAYLOAD_SHA256", "STEPFLOW_JOB_TOKEN"}
        # `stepflow logs RUN STEP` has the job's output
        logs = cli(["logs", result.run_id, "train"], environ, project, timeout=60)
        assert logs.returncode == 0 and "training on 4 rows, lr=2.0" in logs.stdout and "training done" in logs.stdout
    finally:
        remove_local_images(f"{REGISTRY}/{prefix}/")


# ------------------------------------------------------------------------------ scale, throttling
@docker_test
async def test_twenty_parallel_steps_under_twenty_percent_throttling(sm_stack: dict[str, Any]) -> None:
    backend = sm_stack["backend"]
    op = Client().instantiate("step_operator", "sagemaker")  # to read its own request counters
    before = stats(backend)
    backend.configure(throttle_rate=0.2, seed=7)
    try:
        t0 = time.monotonic()
        result, events = await run_with_events(pipes().many(20), operators={"sagemaker": op})
        wall = time.monotonic() - t0
    finally:
        backend.configure(throttle_rate=0.0)
    after = stats(backend)
    assert result.status == "succeeded", {k: s.error for k, s in result.steps.items() if s.error}
    assert result.output == [i * i for i in range(20)]
    names = sorted({e.job_id for e in events if isinstance(e, JobSubmitted)})
    assert len(names) == 20
    assert all(after["created"].get(n) == 1 for n in names), after["created"]  # no job created twice
    calls = {op: after["calls"].get(op, 0) - before["calls"].get(op, 0) for op in after["calls"]}
    throttled = after["throttled"] - before["throttled"]
    assert throttled > 0, "no throttling was injected"
    # one retry policy: each submission sends at most submit_attempts CreateTrainingJob calls (the
    # backend itself never retries); coalesced polling: one ListTrainingJobs per round, a Describe only
    # for a job whose summary lacks what is needed, never per job and round
    mine = op.backend.aws.stats.summary()
    sent = mine["calls"]
    assert sent["CreateTrainingJob"] == op.stats.submit_calls and op.stats.submits == 20
    assert 20 <= op.stats.submit_calls <= 20 * op.policy.attempts
    assert sent.get("DescribeTrainingJob", 0) <= 40, mine
    rounds = sent["ListTrainingJobs"]
    assert 1 <= rounds <= 80, mine
    assert calls["CreateTrainingJob"] == sent["CreateTrainingJob"]  # the server saw what we sent
    report = {"wall_s": round(wall, 1), "server_calls": calls, "server_throttled": throttled,
              "client": mine, "pushes": len([e for e in events if isinstance(e, ImagePushed)])}
    print(f"\n20 parallel SageMaker steps, 20% throttling: {json.dumps(report)}")
    (sm_stack["root"] / "twenty.json").write_text(json.dumps(report))


# ------------------------------------------------------------------------------ cancel, stop, resume
@docker_test
async def test_cancelling_the_run_stops_every_training_job(sm_stack: dict[str, Any]) -> None:
    backend = sm_stack["backend"]
    before = stats(backend)["calls"].get("StopTrainingJob", 0)
    # Running: every job's container is up.
    jobs, t0, seen = await cancel_once_running(pipes().naps(4, 120), lambda e: e.detail == "Training")
    client = sm_client(backend)
    stopped_in = seconds_until(lambda: all(client.describe_training_job(TrainingJobName=j)["TrainingJobStatus"]
                                           == "Stopped" for j in jobs), t0)
    assert stopped_in <= 5.0, f"the jobs took {stopped_in:.1f} s to reach Stopped"
    print(f"\n4 in-flight training jobs reached Stopped {stopped_in:.1f} s after the run was cancelled")
    assert stats(backend)["calls"]["StopTrainingJob"] - before >= 4
    assert len([e for e in seen if isinstance(e, StepCancelled)]) == 4


@docker_test
async def test_a_job_stopped_outside_stepflow_cancels_its_step(sm_stack: dict[str, Any]) -> None:
    backend = sm_stack["backend"]
    bus = EventBus()
    async with bus.subscribe() as events:
        async with anyio.create_task_group() as tg:
            box: list[Any] = []

            async def go() -> None:
                box.append(await run(pipes().sleepy(120), event_bus=bus))

            tg.start_soon(go)
            seen: list[Any] = []
            with anyio.fail_after(120):
                while not any(isinstance(e, JobStatusChanged) and e.detail == "Training" for e in seen):
                    seen += events.pending()
                    await anyio.sleep(0.1)
            job = next(e.job_id for e in seen if isinstance(e, JobSubmitted))
            await anyio.to_thread.run_sync(lambda: sm_client(backend).stop_training_job(TrainingJobName=job))
        seen += events.pending()
    result = box[0]
    nap = result.steps["nap"]
    assert nap.status == "cancelled" and "outside stepflow" in (nap.reason or ""), (nap.status, nap.reason)
    assert result.steps["after_nap"].status in ("skipped", "cancelled")
    assert any(isinstance(e, StepCancelled) and e.step == "nap" for e in seen)


@docker_test
def test_sigkill_then_resume_creates_no_training_job_twice(sm_stack: dict[str, Any]) -> None:
    backend = sm_stack["backend"]
    job = sigkill_after_submit_then_resume(sm_stack["project"], MODULE,
                                           lambda: int(stats(backend)["calls"].get("CreateTrainingJob", 0)))
    assert stats(backend)["created"][job.job_name] == 1


# ------------------------------------------------------------------------------ failures
@docker_test
async def test_a_failing_step_shows_failure_reason_and_remote_traceback(sm_stack: dict[str, Any]) -> None:
    result, events = await run_with_events(pipes().failing())
    err = result.steps["broken"].error
    assert result.status == "failed" and err is not None
    assert err.type == "RemoteStepError" and "KeyError: 'missing'" in err.message
    assert "AlgorithmError" in err.message  # SageMaker's FailureReason
    assert 'return values["missing"] + x' in err.traceback and "Traceback" in err.traceback
    failed = [e for e in events if isinstance(e, JobStatusChanged) and e.status == "Failed"]
    # The entrypoint wrote the step's failure where SageMaker reads it: its console and API explain it.
    assert failed and failed[0].detail == "AlgorithmError: KeyError: 'missing' (step broken), exit code: 1"


@docker_test
async def test_an_environment_value_over_sagemakers_limit_is_named(sm_stack: dict[str, Any]) -> None:
    result = await run(pipes().too_big_env())
    err = result.steps["loud"].error
    assert err is not None and "environment variable BIG is 600 characters long" in err.message
    assert "at most 512" in err.message


# ------------------------------------------------------------------------------ bad input
def test_missing_role_is_refused_at_registration(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="missing required option 'role'"):
        Client().register_component("step_operator", "sm", "sagemaker", {"instance_type": "ml.m5.large"})
    done = cli(["step-operator", "register", "sm", "--type=sagemaker"], cli_env(Path.cwd()), Path.cwd(), 60)
    assert done.returncode == 2 and "missing required option 'role'" in done.stderr


def test_bad_instance_types_list_valid_ones(env: dict[str, str]) -> None:
    c = Client()
    with pytest.raises(ConfigError) as bad:
        c.register_component("step_operator", "sm", "sagemaker", {"role": ROLE, "instance_type": "ml.m5.huge"})
    assert "unknown SageMaker instance type 'ml.m5.huge'" in str(bad.value)
    assert "ml.m5.large" in str(bad.value) and "ml.g4dn.xlarge" in str(bad.value)
    with pytest.raises(ConfigError, match="no SageMaker training instance type offers gpu=64"):
        c.register_component("step_operator", "sm", "sagemaker", {"role": ROLE, "gpu": 64})
    with pytest.raises(ConfigError, match=r"does not satisfy the requested gpu=1.*ml\.g4dn\.xlarge"):
        c.register_component("step_operator", "sm", "sagemaker",
                             {"role": ROLE, "instance_type": "ml.m5.large", "gpu": 1})


@docker_test
async def test_bad_step_settings_fail_before_anything_runs(sm_stack: dict[str, Any]) -> None:
    with pytest.raises(PipelineDefinitionError) as impossible:
        await run(pipes().impossible())
    assert "step 'greedy'" in str(impossible.value) and "gpu=64" in str(impossible.value)
    with pytest.raises(PipelineDefinitionError) as odd:
        await run(pipes().odd_instance())
    assert "unknown SageMaker instance type 'ml.m5.huge'" in str(odd.value)


def test_pick_instance_takes_the_cheapest_fit() -> None:
    from stepflow_sagemaker.instances import pick_instance, resolve_instance_type

    assert pick_instance(cpu=2).name == "ml.c7i.large"  # 2 vCPU, 4 GiB: the cheapest 2-vCPU type
    assert pick_instance(cpu=2, memory="8g").name == "ml.m5.large"
    assert pick_instance(cpu=4, memory="8g").name == "ml.c5.xlarge"
    assert pick_instance(memory="100g").name == "ml.r5.4xlarge"
    assert pick_instance(gpu=1).name == "ml.g4dn.xlarge"
    assert pick_instance(gpu=4).name == "ml.g4dn.12xlarge"
    assert pick_instance(gpu=8, memory="1000g").name == "ml.p4d.24xlarge"
    assert resolve_instance_type(None, None, None, None) == "ml.m5.large"
    assert resolve_instance_type("ml.p3.2xlarge", None, 1, None) == "ml.p3.2xlarge"


def test_a_local_artifact_store_is_rejected(env: dict[str, str]) -> None:
    c = Client()
    c.register_component("container_registry", "ecr_registry", "ecr", {"uri": f"{REGISTRY}/x"})
    c.register_component("step_operator", "sm", "sagemaker", {"role": ROLE})
    with pytest.raises(ConfigError, match="cannot reach the local artifact store 'default'"):
        c.register_stack("bad", artifact_store="default", container_registry="ecr_registry", step_operators=["sm"])


def test_region_mismatch_between_ecr_and_sagemaker_at_registration(env: dict[str, str], bucket: str) -> None:
    c = Client()
    c.register_component("artifact_store", "s3-store", "s3", {"path": f"s3://{bucket}/x"})
    c.register_component("container_registry", "ecr_eu", "ecr", {"uri": "123456789012.dkr.ecr.eu-west-1.amazonaws.com"})
    c.register_component("step_operator", "sm", "sagemaker", {"role": ROLE, "region": "us-east-1"})
    with pytest.raises(ConfigError) as bad:
        c.register_stack("bad", artifact_store="s3-store", container_registry="ecr_eu", step_operators=["sm"])
    assert "runs SageMaker jobs in us-east-1 but container-registry 'ecr_eu' is an ECR registry in eu-west-1" \
        in str(bad.value)
    with pytest.raises(ConfigError, match="differs from the region in the uri"):
        c.register_component("container_registry", "ecr_x", "ecr",
                             {"uri": "123456789012.dkr.ecr.eu-west-1.amazonaws.com", "region": "us-east-1"})


# Each of these fails the run as it starts (before any image, job or step), with one clear error.
@docker_test
async def test_region_mismatch_found_when_the_run_starts(sm_stack: dict[str, Any]) -> None:
    Client().update_component("container_registry", "ecr_registry", {"region": "eu-west-1"})
    with pytest.raises(StepflowError) as bad:
        await run(pipes().failing())
    assert "ECR registry in eu-west-1" in str(bad.value) and "us-east-1" in str(bad.value)


@docker_test
async def test_no_credentials_names_the_sources_tried(sm_stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(StepflowError) as bad:
        await run(pipes().failing())
    message = str(bad.value)
    assert "no AWS credentials found; tried:" in message
    for source in ("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (not set)", "profile 'default' in",
                   os.environ["AWS_SHARED_CREDENTIALS_FILE"], "container role",
                   "instance metadata role (disabled by AWS_EC2_METADATA_DISABLED)"):
        assert source in message, source


@docker_test
async def test_a_missing_bucket_is_named(sm_stack: dict[str, Any]) -> None:
    Client().update_component("step_operator", "sagemaker", {"bucket_name": "no-such-bucket-for-stepflow"})
    with pytest.raises(StepflowError, match="S3 bucket 'no-such-bucket-for-stepflow' does not exist"):
        await run(pipes().failing())


@docker_test
async def test_a_missing_artifact_store_bucket_is_named(sm_stack: dict[str, Any]) -> None:
    c = Client()
    c.register_component("artifact_store", "nowhere", "s3", {"path": "s3://no-such-store-bucket/x",
                                                             "endpoint_url": sm_stack["moto"]})
    c.update_stack("sagemaker_stack", artifact_store="nowhere")
    with pytest.raises(StepflowError, match="'no-such-store-bucket' does not exist"):
        await run(pipes().failing())


@docker_test
async def test_an_ecr_login_failure_is_explained(sm_stack: dict[str, Any]) -> None:
    Client().update_component("container_registry", "ecr_registry", {"endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(StepflowError) as bad:
        await run(pipes().failing())
    assert "ECR login failed" in str(bad.value) and "http://127.0.0.1:9" in str(bad.value)


# ------------------------------------------------------------------------------ security, crash safety
@docker_test
async def test_a_job_description_gives_nothing_to_forge_a_payload_or_output_with(sm_stack: dict[str, Any],
                                                                                 tmp_path: Path) -> None:
    """What DescribeTrainingJob shows (the job's token included) forges nothing stepflow accepts."""
    import boto3
    from stepflow_sagemaker.operator import SageMakerBackend

    from stepflow import _envelope as envelope
    from stepflow._store import keys as home_keys
    from stepflow.errors import PayloadError
    from stepflow.remote import JobOperator
    from stepflow.remote import _keys as job_keys
    from tests.test_security import Boom, candidate_keys

    marker = tmp_path / "forged-ran"
    seen: dict[str, Any] = {}
    s3 = boto3.client("s3", endpoint_url=sm_stack["moto"], region_name=AWS_TEST_REGION)

    class Attacked(SageMakerBackend):
        """Between the job's end and the runner reading its output, an attacker who may describe jobs acts."""

        async def cleanup(self, job_id: str, state: Any) -> None:
            described = sm_client(sm_stack["backend"]).describe_training_job(TrainingJobName=job_id)
            seen["job"], seen["described"] = job_id, json.dumps(described, default=str)
            args = described["AlgorithmSpecification"]["ContainerArguments"]
            bucket, _, key = args[args.index("--output") + 1].removeprefix("s3://").partition("/")
            token = bytes.fromhex(described["Environment"]["STEPFLOW_JOB_TOKEN"])  # visible: no secret channel
            header = {"run_id": described["TrainingJobName"], "step": "broken", "attempt": 1, "job": job_id}
            for guess in (token, job_keys.payload_key(token)):  # the best keys a token alone gives
                s3.put_object(Bucket=bucket, Key=key, Body=envelope.encode(
                    "output", {"ok": True, "value": Boom(str(marker))}, guess, **header))
            await super().cleanup(job_id, state)

    config = Client().instantiate("step_operator", "sagemaker").config
    op = JobOperator(Attacked("sagemaker", config), settings_class=type(config))
    result = await run(pipes().failing(), operators={"sagemaker": op})
    err = result.steps["broken"].error
    assert err is not None and err.type == "PayloadError" and "signature mismatch" in err.message, err
    assert not marker.exists()
    home = Path(os.environ["STEPFLOW_HOME"])
    output_key = job_keys.JobKeys.derive(lambda p: home_keys.derive(home_keys.master_key(home), p), seen["job"]).output_key
    for key in candidate_keys(seen["described"]):
        with pytest.raises(PayloadError):
            envelope.decode(envelope.encode("output", {"ok": True}, key, job=seen["job"]), output_key, kind="output")
    assert "testing" not in seen["described"]  # the store's keys: the job uses its role


@docker_test
@pytest.mark.parametrize("phase", ["job.recorded", "job.submitted"])
def test_sigkill_at_submit_time_then_resume_creates_each_job_once(phase: str, sm_stack: dict[str, Any]) -> None:
    job = sigkill_at_failpoint_then_resume(sm_stack["project"], MODULE, phase)
    assert stats(sm_stack["backend"])["created"][job.job_name] == 1
