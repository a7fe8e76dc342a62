"""Training jobs: their record (what DescribeTrainingJob reports) and their execution on Docker.

Lifecycle, as the real service reports it::

    InProgress/Starting (buckets checked)
      -> InProgress/Downloading (input channels and checkpoints copied from S3)
      -> InProgress/Training (image pulled when missing, then the container runs `train`; its
         output is shipped to CloudWatch Logs)
      -> InProgress/Uploading (model.tar.gz, output.tar.gz, checkpoints to S3) -> Completed/Completed
      -> Failed/Failed + FailureReason        non-zero exit (/opt/ml/output/failure), OOM, no image, no data
      -> Stopping/MaxRuntimeExceeded -> Stopped/MaxRuntimeExceeded   MaxRuntimeInSeconds elapsed
    StopTrainingJob at any point: Stopping/Stopping -> Stopped/Stopped (SIGTERM, then SIGKILL after
    the grace time; the model and checkpoints are still uploaded)

Data moves as in File mode: see :mod:`.s3data`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import tarfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiodocker
from aiodocker.exceptions import DockerError

from .._common import unless_set
from .credentials import CredentialsEndpoint
from .cwlogs import LogShipper
from .s3data import DEFAULT_CHECKPOINT_PATH, FAILURE_LIMIT, DataError, S3Data, failure_text

log = logging.getLogger(__name__)

#: Label on every container this backend starts (value: the job name), and the server instance.
JOB_LABEL = "stepflow.fake-sagemaker"
INSTANCE_LABEL = "stepflow.fake-sagemaker.instance"
TERMINAL = frozenset({"Completed", "Failed", "Stopped"})
#: DescribeTrainingJob echoes these request members as given.
ECHOED = ("HyperParameters", "AlgorithmSpecification", "RoleArn", "InputDataConfig", "OutputDataConfig",
          "ResourceConfig", "VpcConfig", "StoppingCondition", "CheckpointConfig", "DebugHookConfig",
          "ExperimentConfig", "DebugRuleConfigurations", "TensorBoardOutputConfig", "ProfilerConfig",
          "ProfilerRuleConfigurations", "Environment", "RetryStrategy", "RemoteDebugConfig", "InfraCheckConfig")
MESSAGES = {
    "Starting": "Preparing the instances for training",
    "Downloading": "Downloading input data",
    "Training": "Downloading the training image",
    "Uploading": "Uploading generated training model",
    "Completed": "Training job completed",
    "Stopping": "Stopping the training job",
    "Stopped": "Training job stopped",
    "MaxRuntimeExceeded": "Training job stopped because it exceeded MaxRuntimeInSeconds",
}
TRAINING = "Training image download completed. Training in progress."
NO_FAILURE_FILE = "See job logs for more information"


def now() -> float:
    """Epoch seconds with the service's millisecond precision."""
    return round(time.time(), 3)


@dataclass
class TrainingJob:
    """One training job: the request as given and everything the service tracks about it."""

    name: str
    arn: str
    request: dict[str, Any]
    seq: int
    created: float = field(default_factory=now)
    status: str = "InProgress"
    secondary: str = "Starting"
    failure_reason: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    modified: float = 0.0
    transitions: list[dict[str, Any]] = field(default_factory=list)
    tags: list[dict[str, str]] = field(default_factory=list)
    container_id: str | None = None
    exit_code: int | None = None
    log_stream: str | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.tags = list(self.request.get("Tags") or [])
        self.transition("Starting", at=self.created)

    @property
    def terminal(self) -> bool:
        """True once the job will not change any more."""
        return self.status in TERMINAL

    @property
    def max_runtime(self) -> float:
        """StoppingCondition.MaxRuntimeInSeconds."""
        return float(self.request["StoppingCondition"]["MaxRuntimeInSeconds"])

    def transition(self, secondary: str, message: str | None = None, *, status: str | None = None,
                   at: float | None = None) -> None:
        """Enter a secondary status (closing the previous one), optionally a new primary status."""
        at = now() if at is None else at
        if self.transitions and "EndTime" not in self.transitions[-1]:
            self.transitions[-1]["EndTime"] = at
        entry: dict[str, Any] = {"Status": secondary, "StartTime": at,
                                 "StatusMessage": message or MESSAGES.get(secondary, secondary)}
        if status in TERMINAL:
            entry["EndTime"] = at
        self.transitions.append(entry)
        self.secondary = secondary
        if status is not None:
            self.status = status
        if self.status in TERMINAL:
            self.end_time = self.end_time or at
        self.modified = at

    def message(self, text: str) -> None:
        """Update the current secondary status's message (the service rewrites it in place)."""
        self.transitions[-1]["StatusMessage"] = text
        self.modified = now()

    def describe(self) -> dict[str, Any]:
        """The DescribeTrainingJob response."""
        req = self.request
        out: dict[str, Any] = {
            "TrainingJobName": self.name, "TrainingJobArn": self.arn,
            "TrainingJobStatus": self.status, "SecondaryStatus": self.secondary,
            "CreationTime": self.created, "LastModifiedTime": self.modified,
            "SecondaryStatusTransitions": [dict(t) for t in self.transitions],
            "EnableNetworkIsolation": bool(req.get("EnableNetworkIsolation")),
            "EnableInterContainerTrafficEncryption": bool(req.get("EnableInterContainerTrafficEncryption")),
            "EnableManagedSpotTraining": bool(req.get("EnableManagedSpotTraining")),
        }
        out.update({key: req[key] for key in ECHOED if key in req})
        if self.status in ("Completed", "Stopped"):
            out["ModelArtifacts"] = {"S3ModelArtifacts": self.model_uri}
        if self.failure_reason:
            out["FailureReason"] = self.failure_reason
        if self.start_time is not None:
            out["TrainingStartTime"] = self.start_time
        if self.end_time is not None:
            out["TrainingEndTime"] = self.end_time
            if self.start_time is not None:
                seconds = max(1, round(self.end_time - self.start_time))
                out["TrainingTimeInSeconds"] = out["BillableTimeInSeconds"] = seconds
        return out

    def summary(self) -> dict[str, Any]:
        """The job's entry in ListTrainingJobs."""
        out: dict[str, Any] = {"TrainingJobName": self.name, "TrainingJobArn": self.arn,
                               "CreationTime": self.created, "LastModifiedTime": self.modified,
                               "TrainingJobStatus": self.status, "SecondaryStatus": self.secondary}
        if self.end_time is not None:
            out["TrainingEndTime"] = self.end_time
        return out

    @property
    def model_uri(self) -> str:
        """Where the real service would upload /opt/ml/model."""
        return f"{self.request['OutputDataConfig']['S3OutputPath'].rstrip('/')}/{self.name}/output/model.tar.gz"

    @property
    def output_uri(self) -> str:
        """Where the real service uploads /opt/ml/output/data."""
        return self.model_uri.removesuffix("model.tar.gz") + "output.tar.gz"


class _Stop(Exception):
    """The job was asked to stop (StopTrainingJob or server shutdown)."""


@dataclass
class DockerExecutor:
    """Runs training jobs as containers on a Docker daemon, one asyncio task per job."""

    docker: aiodocker.Docker
    instance_id: str
    region: str
    network: str = "host"
    container_env: Mapping[str, str] = field(default_factory=dict)
    stop_grace: float = 2.0
    phase_delay: float = 0.0
    logs_client: Any = None
    ensure_log_group: Callable[[bool], Awaitable[None]] | None = None
    credentials: CredentialsEndpoint | None = None
    data: S3Data | None = None
    _pulls: dict[str, asyncio.Task[Any]] = field(default_factory=dict)

    def start(self, job: TrainingJob) -> None:
        """Start the job's lifecycle task (returns at once)."""
        job.task = asyncio.get_running_loop().create_task(self._lifecycle(job), name=f"training-job-{job.name}")

    def stop(self, job: TrainingJob) -> None:
        """StopTrainingJob: report Stopping now; the lifecycle task stops the container."""
        if job.terminal or job.stop_requested.is_set():
            return
        job.transition("Stopping", status="Stopping")
        job.stop_requested.set()

    # -------------------------------------------------------------- the lifecycle task
    async def _lifecycle(self, job: TrainingJob) -> None:
        """Run the job to its end.

        The terminal status is reported only once the container is removed and its output
        shipped, so a client that sees the job finished can read every log line.
        """
        held: dict[str, Any] = {}
        cancelled = False
        try:
            outcome = await self._execute(job, held)
        except _Stop:  # raised only while no container runs (before it starts, or after it exited)
            outcome = ("Stopped", "")
        except asyncio.CancelledError:  # server shutdown
            outcome, cancelled = ("Stopped", ""), True
        except Exception as exc:
            log.exception("training job %s: internal error", job.name)
            outcome = ("Failed", f"InternalServerError: {type(exc).__name__}: {exc}")
        with contextlib.suppress(BaseException):
            await asyncio.shield(self._finish(held.get("container"), held.get("shipper")))
        if self.credentials is not None and "grant" in held:
            self.credentials.revoke(held["grant"])  # the role's credentials outlive no job
        final, reason = outcome
        if final == "Failed":
            job.failure_reason = reason[:1024]  # the FailureReason limit
            job.transition("Failed", f"Training job failed. {job.failure_reason}"[:1024], status="Failed")
        elif final == "Stopped":
            if job.status != "Stopping":
                job.transition("Stopping", status="Stopping")
            job.transition("Stopped", status="Stopped")
        else:  # Completed, MaxRuntimeExceeded
            job.transition(final, status="Stopped" if final == "MaxRuntimeExceeded" else "Completed")
        if cancelled:
            raise asyncio.CancelledError

    async def _execute(self, job: TrainingJob, held: dict[str, Any]) -> tuple[str, str]:
        """Everything up to the container's end: (final secondary status, failure reason)."""
        await self._until_stop(job, asyncio.sleep(self.phase_delay))
        job.start_time = now()
        try:
            await self._until_stop(job, self._check_buckets(job))
            job.transition("Downloading")
            archives = await self._until_stop(job, self._inputs(job))
        except DataError as exc:
            return "Failed", str(exc)
        job.transition("Training")
        image = job.request["AlgorithmSpecification"]["TrainingImage"]
        try:
            await self._until_stop(job, self._ensure_image(image))
        except DockerError as exc:
            return "Failed", f"ClientError: Unable to pull the training image '{image}': {exc.message}"
        role_env: dict[str, str] = {}
        if self.credentials is not None:
            held["grant"], role_env = self.credentials.issue(job.request["RoleArn"])
        container = held["container"] = await self._create(job, image, role_env)
        for archive in archives:
            await container.put_archive("/", archive)
        job.log_stream = f"{job.name}/algo-1-{int(time.time())}"
        shipper = held["shipper"] = await self._shipper(job.log_stream)
        try:
            await container.start()
        except DockerError as exc:
            return "Failed", f"AlgorithmError: unable to start the training container: {exc.message}"
        job.message(TRAINING)
        pump = asyncio.get_running_loop().create_task(self._pump(container, shipper))
        try:
            outcome = await self._wait(job, container)
            try:
                shipped = await asyncio.wait_for(asyncio.shield(pump), 5)  # the rest of the output
                await self._ship_missed(container, shipper, shipped)
            except Exception as exc:
                log.warning("training job %s: output may be incomplete: %r", job.name, exc)
        finally:
            pump.cancel()
        state = (await container.show())["State"]
        job.exit_code = int(state.get("ExitCode", -1))
        stopped = outcome == "stopped" or job.stop_requested.is_set()  # a stop that raced the exit still wins
        succeeded = stopped or outcome == "timeout" or job.exit_code == 0
        try:
            if succeeded and not stopped and outcome != "timeout":
                job.transition("Uploading")
            await self._upload(job, container, artifacts=succeeded, stopped=stopped or outcome == "timeout")
        except DataError as exc:
            return "Failed", str(exc)
        if stopped:
            return "Stopped", ""
        if outcome == "timeout":
            return "MaxRuntimeExceeded", ""
        if job.exit_code == 0:
            await self._until_stop(job, asyncio.sleep(self.phase_delay))
            return "Completed", ""
        if state.get("OOMKilled"):
            return "Failed", ("OutOfMemoryError: Please use an instance type with more memory, or reduce the "
                              "size of job data processed on an instance.")
        # The service reports the container's failure file, never its output.
        suffix = f", exit code: {job.exit_code}"
        text = await failure_text(container) or NO_FAILURE_FILE
        return "Failed", f"AlgorithmError: {text[:FAILURE_LIMIT - len('AlgorithmError: ') - len(suffix)]}{suffix}"

    async def _check_buckets(self, job: TrainingJob) -> None:
        if self.data is None:
            return
        req = job.request
        await self.data.check_bucket(req["OutputDataConfig"]["S3OutputPath"], "OutputDataConfig.S3OutputPath")
        if req.get("CheckpointConfig"):
            await self.data.check_bucket(req["CheckpointConfig"]["S3Uri"], "CheckpointConfig.S3Uri")

    async def _inputs(self, job: TrainingJob) -> list[bytes]:
        """Tars of the input channels and the checkpoints, to put in the container before it starts."""
        if self.data is None:
            return []
        archives = []
        for channel in job.request.get("InputDataConfig") or []:
            source = (channel.get("DataSource") or {}).get("S3DataSource")
            if source:
                local = f"/opt/ml/input/data/{channel['ChannelName']}"
                archives.append(await self.data.download(source["S3Uri"], local, required=True))
        checkpoints = job.request.get("CheckpointConfig")
        if checkpoints:
            local = checkpoints.get("LocalPath") or DEFAULT_CHECKPOINT_PATH
            archives.append(await self.data.download(checkpoints["S3Uri"], local, required=False))
        return [a for a in archives if a is not None]

    async def _upload(self, job: TrainingJob, container: Any, *, artifacts: bool, stopped: bool) -> None:
        """Checkpoints back to S3 whatever the outcome; the model and output data unless the job failed."""
        if self.data is None:
            return
        checkpoints = job.request.get("CheckpointConfig")
        if checkpoints:
            await self.data.sync_up(container, checkpoints.get("LocalPath") or DEFAULT_CHECKPOINT_PATH,
                                    checkpoints["S3Uri"])
        if artifacts:
            # A completed job always has a model archive; a stopped one only when it saved something.
            await self.data.pack(container, "/opt/ml/model", job.model_uri, always=not stopped)
            await self.data.pack(container, "/opt/ml/output/data", job.output_uri, always=False)

    async def _finish(self, container: Any, shipper: LogShipper | None) -> None:
        if container is not None:
            with contextlib.suppress(DockerError):
                await container.delete(force=True)
        if shipper is not None:
            await shipper.close()

    async def _until_stop(self, job: Any, work: Awaitable[Any]) -> Any:
        """Await ``work`` unless the job is asked to stop first (then raise _Stop)."""
        return await unless_set(job.stop_requested, work, _Stop)

    async def _wait(self, job: TrainingJob, container: Any) -> str:
        """'exited', 'stopped' (StopTrainingJob) or 'timeout' (MaxRuntimeInSeconds)."""
        assert job.start_time is not None
        remaining = max(0.0, job.max_runtime - (time.time() - job.start_time))
        waiter = asyncio.ensure_future(container.wait())
        stop = asyncio.ensure_future(job.stop_requested.wait())
        done, _ = await asyncio.wait({waiter, stop}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if waiter in done:
            return "exited"
        waiter.cancel()
        if stop in done:
            await self._stop_container(container)
            return "stopped"
        job.transition("MaxRuntimeExceeded", status="Stopping")
        await self._stop_container(container)
        return "timeout"

    # -------------------------------------------------------------- docker
    async def _ensure_image(self, image: str) -> None:
        try:
            await self.docker.images.inspect(image)
            return
        except DockerError as exc:
            if exc.status != 404:
                raise
        pull = self._pulls.get(image)
        if pull is None or pull.done():  # one pull per image, shared by the jobs that need it
            pull = asyncio.get_running_loop().create_task(self.docker.images.pull(image))
            self._pulls[image] = pull
        await asyncio.shield(pull)

    async def _create(self, job: TrainingJob, image: str, role_env: Mapping[str, str]) -> Any:
        algo = job.request["AlgorithmSpecification"]
        # The credentials variables come last: the request's Environment cannot redirect them.
        env = {**self.environment(job), **role_env}
        config: dict[str, Any] = {
            "Image": image,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Labels": {JOB_LABEL: job.name, INSTANCE_LABEL: self.instance_id},
            "HostConfig": {"NetworkMode": self.network},
        }
        if algo.get("ContainerEntrypoint"):
            config["Entrypoint"] = list(algo["ContainerEntrypoint"])
            config["Cmd"] = list(algo.get("ContainerArguments") or [])
        else:  # the service runs `docker run IMAGE train` (or the given arguments)
            config["Cmd"] = list(algo.get("ContainerArguments") or ["train"])
        if self.network != "host":
            config["Hostname"] = "algo-1"
        name = f"fake-sm-{job.name}-{self.instance_id[:8]}"
        container = await self.docker.containers.create(config, name=name)
        job.container_id = container.id
        await container.put_archive("/", _ml_files(job))
        return container

    async def _stop_container(self, container: Any) -> None:
        with contextlib.suppress(DockerError):
            await container.stop(t=max(0, round(self.stop_grace)))

    async def _shipper(self, stream: str) -> LogShipper | None:
        if self.logs_client is None:
            return None
        shipper = LogShipper(self.logs_client, stream, ensure_group=self.ensure_log_group)
        try:
            await shipper.start()
        except Exception as exc:
            log.warning("no CloudWatch log stream %s: %s", stream, exc)
            return None
        return shipper

    async def _pump(self, container: Any, shipper: LogShipper | None) -> int:
        """Every line of stdout and stderr to the log stream, as it is written; returns the count."""
        partial, count = "", 0
        async for chunk in container.log(stdout=True, stderr=True, follow=True):
            partial += chunk
            *lines, partial = partial.split("\n")
            count += len(lines)
            for line in lines:
                if shipper is not None:
                    shipper.put(line.rstrip("\r"))
        if partial:
            count += 1
            if shipper is not None:
                shipper.put(partial)
        return count

    async def _ship_missed(self, container: Any, shipper: LogShipper | None, shipped: int) -> None:
        """Ship what a follow stream missed: Docker may end it before the container's last output."""
        if shipper is None:
            return
        lines = "".join(await container.log(stdout=True, stderr=True)).split("\n")
        if lines and not lines[-1]:
            lines.pop()
        for line in lines[shipped:]:
            shipper.put(line.rstrip("\r"))

    def environment(self, job: TrainingJob) -> dict[str, str]:
        """What the container sees: region, AWS endpoint, SM_* basics, the request's Environment.

        Without the job role's credentials variables, which are issued per container (see ``_create``).
        """
        req = job.request
        channels = sorted(c["ChannelName"] for c in req.get("InputDataConfig") or [])
        hps = dict(req.get("HyperParameters") or {})
        env = {
            "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region,
            **self.container_env,
            "SM_CURRENT_HOST": "algo-1", "SM_HOSTS": json.dumps(["algo-1"]),
            "SM_CURRENT_INSTANCE_TYPE": req["ResourceConfig"]["InstanceType"],
            "SM_NUM_CPUS": str(os.cpu_count() or 1), "SM_NUM_GPUS": "0",
            "SM_MODEL_DIR": "/opt/ml/model", "SM_OUTPUT_DIR": "/opt/ml/output",
            "SM_OUTPUT_DATA_DIR": "/opt/ml/output/data", "SM_INPUT_DIR": "/opt/ml/input",
            "SM_INPUT_CONFIG_DIR": "/opt/ml/input/config", "SM_CHANNELS": json.dumps(channels),
            "SM_HPS": json.dumps(hps),
            **{f"SM_CHANNEL_{c.upper()}": f"/opt/ml/input/data/{c}" for c in channels},
            **{f"SM_HP_{k.upper()}": str(v) for k, v in hps.items()},
        }
        env.update(req.get("Environment") or {})
        env.update({"TRAINING_JOB_NAME": job.name, "TRAINING_JOB_ARN": job.arn})
        return env


def _ml_files(job: TrainingJob) -> bytes:
    """A tar of /opt/ml as the service lays it out: config JSON files and the empty directories."""
    req = job.request
    channels = req.get("InputDataConfig") or []
    files = {
        "opt/ml/input/config/hyperparameters.json": dict(req.get("HyperParameters") or {}),
        "opt/ml/input/config/resourceconfig.json": {
            "current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0",
            "current_instance_type": req["ResourceConfig"]["InstanceType"], "current_group_name": "homogeneousCluster",
            "instance_groups": [{"instance_group_name": "homogeneousCluster", "hosts": ["algo-1"],
                                 "instance_type": req["ResourceConfig"]["InstanceType"]}]},
        "opt/ml/input/config/inputdataconfig.json": {
            c["ChannelName"]: {"TrainingInputMode": c.get("InputMode") or req["AlgorithmSpecification"]
                               ["TrainingInputMode"], "RecordWrapperType": c.get("RecordWrapperType", "None")}
            for c in channels},
    }
    dirs = ["opt/ml", "opt/ml/input", "opt/ml/input/data", "opt/ml/model", "opt/ml/output", "opt/ml/output/data",
            "opt/ml/checkpoints",
            *(f"opt/ml/input/data/{c['ChannelName']}" for c in channels)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in dirs:
            info = tarfile.TarInfo(path)
            info.type, info.mode = tarfile.DIRTYPE, 0o777
            tar.addfile(info)
        for path, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def new_instance_id() -> str:
    """A short id labelling the containers of one server instance."""
    return uuid.uuid4().hex[:12]
