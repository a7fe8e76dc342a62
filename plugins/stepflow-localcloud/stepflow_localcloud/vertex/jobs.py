"""Custom jobs: their record (what GetCustomJob reports) and their execution on Docker.

Lifecycle, as Vertex AI reports it::

    JOB_STATE_QUEUED -> JOB_STATE_PENDING (image pulled when missing, container created)
      -> JOB_STATE_RUNNING (container started; every output line logged)
      -> JOB_STATE_SUCCEEDED                exit code 0
      -> JOB_STATE_FAILED + error           non-zero exit, out of memory, scheduling.timeout, no image
    CancelCustomJob before the end: JOB_STATE_CANCELLING -> JOB_STATE_CANCELLED + error code 1

A failed job's error is the service's documented sentence (exit status, termination reason) and
where the logs are, without the container's output: Vertex AI documents no way for a container
to set ``CustomJob.error``, so what went wrong inside it is read from its log entries.

Only the first worker pool's single replica runs (task ``workerpool0-0``).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import datetime as dt
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiodocker
from aiodocker.exceptions import DockerError
from google.cloud import aiplatform_v1
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, status_pb2

from .._common import unless_set
from .._docker import ImagePuller
from .logs import ERROR, INFO, LogStore

log = logging.getLogger(__name__)

State = aiplatform_v1.JobState
#: Labels on every container this control plane starts: the job id, and the server instance.
JOB_LABEL = "stepflow.local-vertex.job"
INSTANCE_LABEL = "stepflow.local-vertex.instance"
TASK = "workerpool0-0"
TERMINAL = frozenset({State.JOB_STATE_SUCCEEDED, State.JOB_STATE_FAILED, State.JOB_STATE_CANCELLED})
DEFAULT_TIMEOUT = dt.timedelta(days=7)  # the service's default scheduling.timeout


def _stamp(ns: int | None) -> timestamp_pb2.Timestamp | None:
    if ns is None:
        return None
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


@dataclass
class CustomJobRecord:
    """One custom job: the request as given and everything the service tracks about it."""

    job_id: str
    name: str
    project: str
    location: str
    request: bytes  # the CustomJob as created (serialized): echoed back by every read
    display_name: str
    labels: dict[str, str]
    seq: int
    state: int = State.JOB_STATE_QUEUED
    create_ns: int = field(default_factory=time.time_ns)
    update_ns: int = 0
    start_ns: int | None = None
    end_ns: int | None = None
    error: tuple[int, str] | None = None
    container_id: str | None = None
    exit_code: int | None = None
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.update_ns = self.create_ns

    @property
    def terminal(self) -> bool:
        """True once the job will not change any more."""
        return self.state in TERMINAL

    @property
    def spec(self) -> aiplatform_v1.CustomJobSpec:
        """The job spec as created."""
        return aiplatform_v1.CustomJob.deserialize(self.request).job_spec

    @property
    def timeout(self) -> dt.timedelta:
        """scheduling.timeout (the service's default when unset)."""
        spec = self.spec
        timeout = spec.scheduling.timeout if "scheduling" in spec else dt.timedelta(0)
        return timeout or DEFAULT_TIMEOUT

    def set_state(self, state: int, error: tuple[int, str] | None = None) -> None:
        """Enter ``state`` (with the google.rpc code and message of a failure or cancellation)."""
        now = time.time_ns()
        self.state, self.update_ns = state, now
        log.debug("custom job %s (%s): %s", self.job_id, self.display_name, State(state).name)
        if state == State.JOB_STATE_RUNNING and self.start_ns is None:
            self.start_ns = now
        if state in TERMINAL:
            self.end_ns = self.end_ns or now
        if error is not None:
            self.error = error

    def to_proto(self) -> aiplatform_v1.CustomJob:
        """The CustomJob resource as GetCustomJob returns it."""
        job = aiplatform_v1.CustomJob.deserialize(self.request)
        job.name, job.state = self.name, self.state
        job.create_time, job.update_time = _stamp(self.create_ns), _stamp(self.update_ns)
        if self.start_ns is not None:
            job.start_time = _stamp(self.start_ns)
        if self.end_ns is not None:
            job.end_time = _stamp(self.end_ns)
        if self.error is not None:
            job.error = status_pb2.Status(code=self.error[0], message=self.error[1])
        return job


class _Cancel(Exception):
    """The job was cancelled (CancelCustomJob or server shutdown) while no container ran."""


@dataclass
class DockerExecutor:
    """Runs custom jobs as containers on a Docker daemon, one asyncio task per job."""

    docker: aiodocker.Docker
    logs: LogStore
    instance_id: str
    network: str = "host"
    container_env: Mapping[str, str] = field(default_factory=dict)
    stop_grace: float = 2.0
    phase_delay: float = 0.0
    keep_containers: bool = False
    _images: ImagePuller | None = None

    def start(self, job: CustomJobRecord) -> None:
        """Start the job's lifecycle task (returns at once)."""
        job.task = asyncio.get_running_loop().create_task(self._lifecycle(job), name=f"custom-job-{job.job_id}")

    def cancel(self, job: CustomJobRecord) -> None:
        """CancelCustomJob: report CANCELLING now; the lifecycle task stops the container."""
        if job.terminal or job.cancel_requested.is_set():
            return
        job.set_state(State.JOB_STATE_CANCELLING)
        job.cancel_requested.set()

    # -------------------------------------------------------------- the lifecycle task
    async def _lifecycle(self, job: CustomJobRecord) -> None:
        """Run the job to its end.

        The final state is reported only once the container's output is all logged (and the
        container removed), so a client that sees the job ended can read every line.
        """
        held: dict[str, Any] = {}
        shutdown = False
        try:
            outcome = await self._execute(job, held)
        except _Cancel:
            outcome = None
        except asyncio.CancelledError:  # server shutdown
            outcome, shutdown = None, True
        except Exception as exc:
            log.exception("custom job %s: internal error", job.job_id)
            outcome = (code_pb2.INTERNAL, f"Internal error encountered: {type(exc).__name__}: {exc}")
        container = held.get("container")
        if container is not None and not self.keep_containers:
            with contextlib.suppress(BaseException):
                await asyncio.shield(_delete(container))
        if outcome is None or (job.cancel_requested.is_set() and job.state == State.JOB_STATE_CANCELLING):
            if job.state != State.JOB_STATE_CANCELLING:
                job.set_state(State.JOB_STATE_CANCELLING)
            job.set_state(State.JOB_STATE_CANCELLED, (code_pb2.CANCELLED, "CANCELED"))
        elif outcome == "ok":
            job.set_state(State.JOB_STATE_SUCCEEDED)
        else:
            job.set_state(State.JOB_STATE_FAILED, outcome)
        if shutdown:
            raise asyncio.CancelledError

    async def _execute(self, job: CustomJobRecord, held: dict[str, Any]) -> Any:
        """Everything up to the container's end: "ok", or the (code, message) of the failure."""
        await self._until_cancel(job, asyncio.sleep(self.phase_delay))
        job.set_state(State.JOB_STATE_PENDING)
        pool = job.spec.worker_pool_specs[0]
        image = pool.container_spec.image_uri
        if self._images is None:
            self._images = ImagePuller(self.docker)
        try:
            await self._until_cancel(job, self._images.ensure(image))
        except DockerError as exc:
            return (code_pb2.INVALID_ARGUMENT,
                    f"The replica {TASK} could not pull the image {image}: {exc.message}. Check that the image "
                    "exists and the job's service account can read it.")
        container = held["container"] = await self._create(job, pool, image)
        # Attached before the start, as `docker run` is: no output can be missed. No log replay
        # (logs=False): the daemon replays after answering the attach, so a container started at once
        # could have its first lines both replayed and streamed, i.e. logged twice.
        async with container.attach(stdout=True, stderr=True, logs=False) as stream:
            await self._until_cancel(job, asyncio.sleep(self.phase_delay))
            try:
                await container.start()
            except DockerError as exc:
                return code_pb2.INVALID_ARGUMENT, f"The replica {TASK} could not start: {exc.message}"
            job.set_state(State.JOB_STATE_RUNNING)
            pump = asyncio.get_running_loop().create_task(self._pump(job, stream))
            try:
                outcome = await self._wait(job, container)
                try:
                    await asyncio.wait_for(asyncio.shield(pump), 5)  # the rest of the output
                except Exception as exc:
                    log.warning("custom job %s: output may be incomplete: %r", job.job_id, exc)
            finally:
                pump.cancel()
        if outcome == "cancelled" or job.cancel_requested.is_set():  # a cancel that raced the exit still wins
            raise _Cancel
        if outcome == "timeout":
            return (code_pb2.DEADLINE_EXCEEDED,
                    f"The job exceeded its maximum running time of {_seconds(job.timeout)} (scheduling.timeout) "
                    f"and was terminated. Replica {TASK} was stopped.")
        state = (await container.show())["State"]
        job.exit_code = int(state.get("ExitCode", -1))
        if job.exit_code == 0:
            return "ok"
        # The documented sentences of the service (exit code and reason only), then where the logs are.
        if state.get("OOMKilled"):
            message = f"The replica {TASK} ran out of memory and exited with a non-zero status of {job.exit_code}."
        else:
            message = (f"The replica {TASK} exited with a non-zero status of {job.exit_code}. "
                       "Termination reason: Error.")
        return code_pb2.INVALID_ARGUMENT, f"{message} {_logs_hint(job)}"

    async def _until_cancel(self, job: Any, work: Awaitable[Any]) -> Any:
        """Await ``work`` unless the job is asked to stop first (then raise _Cancel)."""
        return await unless_set(job.cancel_requested, work, _Cancel)

    async def _wait(self, job: CustomJobRecord, container: Any) -> str:
        """'exited', 'cancelled' (CancelCustomJob) or 'timeout' (scheduling.timeout)."""
        waiter = asyncio.ensure_future(container.wait())
        cancel = asyncio.ensure_future(job.cancel_requested.wait())
        done, _ = await asyncio.wait({waiter, cancel}, timeout=job.timeout.total_seconds(),
                                     return_when=asyncio.FIRST_COMPLETED)
        cancel.cancel()
        if waiter in done:
            return "exited"
        waiter.cancel()
        with contextlib.suppress(DockerError):
            await container.stop(t=max(0, round(self.stop_grace)))
        return "cancelled" if cancel in done else "timeout"

    # -------------------------------------------------------------- docker
    async def _create(self, job: CustomJobRecord, pool: aiplatform_v1.WorkerPoolSpec, image: str) -> Any:
        spec = pool.container_spec
        env = self.environment(job)
        config: dict[str, Any] = {
            "Image": image,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Labels": {JOB_LABEL: job.job_id, INSTANCE_LABEL: self.instance_id},
            "HostConfig": {"NetworkMode": self.network},
            "AttachStdout": True, "AttachStderr": True,
        }
        # Kubernetes' rules, which Vertex AI follows: command replaces the entrypoint (and then the
        # image's CMD is dropped), args replace the CMD.
        if spec.command:
            config["Entrypoint"] = list(spec.command)
            config["Cmd"] = list(spec.args)
        elif spec.args:
            config["Cmd"] = list(spec.args)
        container = await self.docker.containers.create(config, name=f"local-vertex-{job.job_id}")
        job.container_id = container.id
        return container

    async def _pump(self, job: CustomJobRecord, stream: Any) -> None:
        """Log every line of stdout (INFO) and stderr (ERROR) as the container writes it."""
        decoders = {1: codecs.getincrementaldecoder("utf-8")("replace"),
                    2: codecs.getincrementaldecoder("utf-8")("replace")}
        partial = {1: "", 2: ""}
        while True:
            message = await stream.read_out()
            if message is None:
                break
            fd = 2 if message.stream == 2 else 1
            text = partial[fd] + decoders[fd].decode(message.data)
            *lines, partial[fd] = text.split("\n")
            for line in lines:
                self._log(job, line.rstrip("\r"), fd)
        for fd, rest in partial.items():
            rest += decoders[fd].decode(b"", final=True)
            if rest:
                self._log(job, rest.rstrip("\r"), fd)

    def _log(self, job: CustomJobRecord, line: str, fd: int) -> None:
        self.logs.append(job.project, job.job_id, line, ERROR if fd == 2 else INFO, TASK)

    def environment(self, job: CustomJobRecord) -> dict[str, str]:
        """What the container sees: the configured extras, the spec's env, then what Vertex AI sets."""
        spec = job.spec
        pool = spec.worker_pool_specs[0]
        env = dict(self.container_env)
        env.update({e.name: e.value for e in pool.container_spec.env})
        host = f"cmle-training-workerpool0-{job.job_id}-0:2222"
        cluster = {"workerpool0": [host]}
        env.update({
            "CLOUD_ML_JOB_ID": job.job_id,
            "CLOUD_ML_PROJECT_ID": job.project,
            "CLOUD_ML_REGION": job.location,
            "CLUSTER_SPEC": json.dumps({"cluster": cluster, "environment": "cloud",
                                        "task": {"type": "workerpool0", "index": 0}}),
            "TF_CONFIG": json.dumps({"cluster": {"chief": [host]}, "environment": "cloud",
                                     "task": {"type": "chief", "index": 0}}),
        })
        base = spec.base_output_directory.output_uri_prefix if "base_output_directory" in spec else ""
        if base:
            base = base.rstrip("/")
            env.update({"AIP_MODEL_DIR": f"{base}/model/", "AIP_CHECKPOINT_DIR": f"{base}/checkpoints/",
                        "AIP_TENSORBOARD_LOG_DIR": f"{base}/logs/"})
        return env


async def _delete(container: Any) -> None:
    with contextlib.suppress(DockerError):
        await container.delete(force=True)


def _seconds(value: dt.timedelta) -> str:
    seconds = value.total_seconds()
    return f"{seconds:g}s"


def _logs_hint(job: CustomJobRecord) -> str:
    """Where the console would show the job's logs, as the service's failure message ends."""
    query = f'resource.type="ml_job"\nresource.labels.job_id="{job.job_id}"'
    params = urllib.parse.urlencode({"project": job.project, "resource": f"ml_job/job_id/{job.job_id}",
                                     "advancedFilter": query})
    return f"To find out more about why your job exited please check the logs: " \
           f"https://console.cloud.google.com/logs/viewer?{params}"


def new_instance_id() -> str:
    """A short id labelling the containers of one server instance."""
    return uuid.uuid4().hex[:12]
