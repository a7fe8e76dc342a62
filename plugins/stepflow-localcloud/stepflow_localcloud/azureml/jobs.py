"""Command jobs: their record (the job resource and its run-history details) and their run on Docker.

Lifecycle, with the statuses the service reports::

    NotStarted (accepted) -> Starting (being processed) -> Preparing (the image pulled when
    missing) -> Queued (waiting for a node: the container created) -> Running (the command runs;
    its output grows user_logs/std_log.txt) -> Finalizing (the last output collected) -> Completed
      -> Failed + error        non-zero exit, image missing, container not startable
    cancel at any point before Finalizing, or limits.timeout passed while Running:
      CancelRequested -> Canceled (SIGTERM, then SIGKILL after the grace time)

That is the service's documented order (NotResponding aside, runs move only forward through it;
Provisioning is documented as unused). A job reaches its final status only once all its output is
in its log file, so a client that sees it finished reads every line.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiodocker
from aiodocker.exceptions import DockerError

from .._common import unless_set
from .._docker import ImagePuller
from .validation import compute_name, job_timeout

log = logging.getLogger(__name__)

#: Label on every container this control plane starts (value: the job name), and the server instance.
JOB_LABEL = "stepflow.local-azureml.job"
INSTANCE_LABEL = "stepflow.local-azureml.instance"
TERMINAL = frozenset({"Completed", "Failed", "Canceled"})
LOG_NAME = "user_logs/std_log.txt"
#: How many trailing output lines a failed job's error message quotes.
ERROR_TAIL = 10


def now() -> dt.datetime:
    """The current UTC time."""
    return dt.datetime.now(dt.UTC)


def iso(at: dt.datetime | None) -> str | None:
    """ISO 8601 with a Z, as the service writes timestamps."""
    return None if at is None else at.isoformat().replace("+00:00", "Z")


@dataclass
class Job:
    """One command job: the request's properties and everything the service tracks about it."""

    name: str
    resource_id: str
    props: dict[str, Any]
    image: str
    seq: int
    log_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    run_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    created: dt.datetime = field(default_factory=now)
    modified: dt.datetime = field(default_factory=now)
    started: dt.datetime | None = None
    ended: dt.datetime | None = None
    status: str = "NotStarted"
    error: dict[str, Any] | None = None
    output: bytearray = field(default_factory=bytearray)
    container_id: str | None = None
    exit_code: int | None = None
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def terminal(self) -> bool:
        """True once the job will not change any more."""
        return self.status in TERMINAL

    @property
    def compute(self) -> str | None:
        """The compute target's name, or None for serverless."""
        return compute_name(self.props.get("computeId"))

    def set_status(self, status: str) -> None:
        """Enter a status; the first Running one is the start time, a terminal one the end time."""
        at = now()
        self.status, self.modified = status, at
        if status == "Running" and self.started is None:
            self.started = at
        if status in TERMINAL and self.ended is None:
            self.ended = at

    def fail(self, message: str, code: str = "UserError") -> None:
        """Record the error the run history reports, then enter Failed."""
        self.error = {"error": {"code": code, "message": message, "messageParameters": {}, "details": []},
                      "time": iso(now())}
        self.set_status("Failed")

    def resource(self, studio: str) -> dict[str, Any]:
        """The job resource as GET .../jobs/{name} answers it."""
        props = dict(self.props)
        props["status"] = self.status
        props["services"] = {
            "Studio": {"jobServiceType": "Studio", "endpoint": f"{studio}/runs/{self.name}", "status": None},
            "Tracking": {"jobServiceType": "Tracking", "endpoint": None, "status": None},
        }
        props.setdefault("experimentName", "Default")
        props.setdefault("displayName", self.name)
        return {"id": self.resource_id, "name": self.name, "type": "Microsoft.MachineLearningServices/workspaces/jobs",
                "properties": props,
                "systemData": {"createdAt": iso(self.created), "createdBy": "local user", "createdByType": "User",
                               "lastModifiedAt": iso(self.modified)}}

    def details(self, log_url: str) -> dict[str, Any]:
        """The run-history details (``.../runs/{name}/details``), ``logFiles`` pointing at ``log_url``."""
        out: dict[str, Any] = {
            "runId": self.name, "runUuid": self.run_uuid, "rootRunId": self.name, "status": self.status,
            "target": self.compute or "serverless", "createdTimeUtc": iso(self.created),
            "startTimeUtc": iso(self.started), "endTimeUtc": iso(self.ended), "lastModifiedUtc": iso(self.modified),
            "tags": dict(self.props.get("tags") or {}), "properties": dict(self.props.get("properties") or {}),
            "warnings": [], "services": {}, "inputDatasets": [], "outputDatasets": [],
            "logFiles": {LOG_NAME: log_url} if self.container_id is not None else {},  # once there is a process
            "runTypeV2": {"orchestrator": None, "traits": [], "name": None},
        }
        if self.error is not None:
            out["error"] = self.error
        return out


class _Cancel(Exception):
    """The job was asked to stop before its container ran (or after it exited)."""


@dataclass
class DockerRunner:
    """Runs command jobs as containers on a Docker daemon, one asyncio task per job."""

    docker: aiodocker.Docker
    instance_id: str
    service_env: Mapping[str, str] = field(default_factory=dict)
    container_env: Mapping[str, str] = field(default_factory=dict)
    network: str = "host"
    stop_grace: float = 2.0
    phase_delay: float = 0.0
    _puller: ImagePuller | None = None

    def start(self, job: Job) -> None:
        """Start the job's lifecycle task (returns at once)."""
        job.task = asyncio.get_running_loop().create_task(self._lifecycle(job), name=f"azureml-job-{job.name}")

    def cancel(self, job: Job) -> None:
        """Report CancelRequested now; the lifecycle task stops the container.

        A job in Finalizing has no user process left: it finishes as it is.
        """
        if job.terminal or job.status == "Finalizing" or job.cancel_requested.is_set():
            return
        job.set_status("CancelRequested")
        job.cancel_requested.set()

    async def _lifecycle(self, job: Job) -> None:
        container: Any = None
        cancelled = False
        try:
            container = await self._execute(job)
        except _Cancel:
            pass
        except asyncio.CancelledError:  # server shutdown
            cancelled = True
        except Exception as exc:
            log.exception("job %s: internal error", job.name)
            job.fail(f"Internal error of the local control plane: {type(exc).__name__}: {exc}", "SystemError")
        finally:
            held = container
            if held is None and job.container_id is not None:
                held = self.docker.containers.container(job.container_id)
            if held is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(self._remove(held))
        if not job.terminal:
            job.set_status("Canceled")
        if cancelled:
            raise asyncio.CancelledError

    async def _remove(self, container: Any) -> None:
        with contextlib.suppress(DockerError):
            await container.delete(force=True)

    async def _execute(self, job: Job) -> Any:
        """Everything up to the job's end; returns its container (removed by the caller)."""
        for status in ("Starting", "Preparing"):
            self._enter(job, status)
            await self._until_cancel(job, asyncio.sleep(self.phase_delay))
        if self._puller is None:
            self._puller = ImagePuller(self.docker)
        try:
            await self._until_cancel(job, self._puller.ensure(job.image))
        except DockerError as exc:
            job.fail(f"Failed to pull Docker image {job.image}. This error may occur because the Docker image "
                     f"does not exist, or the compute cannot reach its registry: {exc.message}")
            return None
        self._enter(job, "Queued")
        container = await self._create(job)
        await self._until_cancel(job, asyncio.sleep(self.phase_delay))
        try:
            await container.start()
        except DockerError as exc:
            job.fail(f"The job's container could not start: {exc.message}")
            return container
        if job.cancel_requested.is_set():  # a cancel that came while the container started
            await self._stop(container)
            return container
        job.set_status("Running")
        pump = asyncio.get_running_loop().create_task(self._pump(job, container))
        try:
            cancelled = await self._wait(job, container, job_timeout(job.props))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(pump), 5)
        finally:
            pump.cancel()
        await self._collect_missed(job, container)
        state = (await container.show())["State"]
        job.exit_code = int(state.get("ExitCode", -1))
        if cancelled or job.cancel_requested.is_set():
            return container
        job.set_status("Finalizing")
        await asyncio.sleep(self.phase_delay)
        if job.exit_code == 0:
            job.set_status("Completed")
        elif state.get("OOMKilled"):
            job.fail("Out of memory: the job's process was killed. Use a VM size with more memory.")
        else:
            job.fail(self._exit_message(job))
        return container

    @staticmethod
    def _enter(job: Job, status: str) -> None:
        """Enter ``status`` unless the job was cancelled meanwhile (then raise _Cancel)."""
        if job.cancel_requested.is_set():
            raise _Cancel
        job.set_status(status)

    def _exit_message(self, job: Job) -> str:
        lines = job.output.decode(errors="replace").rstrip("\n").splitlines()[-ERROR_TAIL:]
        tail = "\n".join(lines)
        message = (f"Execution failed. User process '/bin/bash' exited with status code {job.exit_code}. "
                   f"Please check log file '{LOG_NAME}' for more details.")
        return f"{message}\nError: {tail}" if tail else message

    async def _until_cancel(self, job: Any, work: Awaitable[Any]) -> Any:
        """Await ``work`` unless the job is asked to stop first (then raise _Cancel)."""
        return await unless_set(job.cancel_requested, work, _Cancel)

    async def _wait(self, job: Job, container: Any, timeout: float | None) -> bool:
        """Wait for the container's exit; True when the job was cancelled (the container is then stopped).

        Past ``timeout`` seconds (``limits.timeout``) the service cancels the job.
        """
        waiter = asyncio.ensure_future(container.wait())
        stop = asyncio.ensure_future(job.cancel_requested.wait())
        done, _ = await asyncio.wait({waiter, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if waiter in done:
            return False
        waiter.cancel()
        if not done:  # the timeout: cancelled as if asked to
            self.cancel(job)
        await self._stop(container)
        return True

    async def _stop(self, container: Any) -> None:
        with contextlib.suppress(DockerError):
            await container.stop(t=max(0, round(self.stop_grace)))

    async def _create(self, job: Job) -> Any:
        # Azure ML runs the job's command with a shell, whatever the image's entrypoint.
        config: dict[str, Any] = {
            "Image": job.image,
            "Entrypoint": ["/bin/bash", "-c"],
            "Cmd": [str(job.props["command"])],
            "Env": [f"{k}={v}" for k, v in self.environment(job).items()],
            "Labels": {JOB_LABEL: job.name, INSTANCE_LABEL: self.instance_id},
            "HostConfig": {"NetworkMode": self.network},
        }
        container = await self.docker.containers.create(config, name=f"local-aml-{job.name}-{self.instance_id[:8]}")
        job.container_id = container.id
        return container

    def environment(self, job: Job) -> dict[str, str]:
        """What the container sees: the job's variables, the service's own, then ``container_env``.

        The service's variables come after the job's: a job cannot pass for another run.
        """
        experiment = str(job.props.get("experimentName") or "Default")
        env = {str(k): str(v) for k, v in (job.props.get("environmentVariables") or {}).items()}
        env.update(self.service_env)
        env.update({
            "AZUREML_RUN_ID": job.name, "AZUREML_ARM_PROJECT_NAME": experiment, "AZUREML_EXPERIMENT_NAME": experiment,
            "AZUREML_COMPUTE_NAME": job.compute or "serverless",
        })
        instance_type = (job.props.get("resources") or {}).get("instanceType")
        if instance_type:
            env["AZUREML_INSTANCE_TYPE"] = str(instance_type)
        env.update(self.container_env)
        return env

    async def _pump(self, job: Job, container: Any) -> None:
        """Append the container's stdout and stderr to the job's log as they are written."""
        async for chunk in container.log(stdout=True, stderr=True, follow=True):
            job.output += chunk.encode()

    async def _collect_missed(self, job: Job, container: Any) -> None:
        """Add what a follow stream missed: Docker may end it before the container's last output."""
        with contextlib.suppress(DockerError):
            full = "".join(await container.log(stdout=True, stderr=True)).encode()
            if len(full) > len(job.output) and full.startswith(bytes(job.output)):
                job.output += full[len(job.output):]
