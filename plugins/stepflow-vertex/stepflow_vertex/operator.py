"""The ``vertex`` step operator: each step attempt runs as a Google Cloud Vertex AI custom job.

A :class:`~stepflow.remote.JobBackend` on the async GAPIC clients (``JobServiceAsyncClient``,
``LoggingServiceV2AsyncClient``); stepflow's operator carries the rest of the path. Here:

- **submit**: Vertex assigns job ids, so a job is first looked up by its deterministic display
  name and its run label, and created (CreateCustomJob) only when absent;
- **poll**: one ListCustomJobs per run per round (``labels.stepflow_run="RUN"``), whose answer
  holds every job's state and error; GetCustomJob only for a job of unknown run (a resumed one);
- **read_logs**: Cloud Logging entries of ``resource.type="ml_job"`` for each running job, since
  its cursor;
- **cancel**: CancelCustomJob; an ended job is left alone.

The client libraries' own retries are off (``retry=None``): stepflow's one policy retries what
:meth:`VertexBackend.is_transient` calls transient (UNAVAILABLE, RESOURCE_EXHAUSTED ...).
Jobs reach the artifact store as their service account: no key goes into a job's environment.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from stepflow.errors import BackendError, ConfigError, StepflowError, TransientBackendError
from stepflow.remote import Job, JobBackend, JobState, Limits, LogBatch, Resources, RunResources
from stepflow_vertex import gcp
from stepflow_vertex.config import VertexOperatorConfig, job_shape, registry_region

log = logging.getLogger("stepflow.vertex")
#: Seconds each API call may take before it counts as failed (and is retried by the policy).
CALL_TIMEOUT = 60.0
PHASES = {"JOB_STATE_QUEUED": "pending", "JOB_STATE_PENDING": "pending", "JOB_STATE_PAUSED": "pending",
          "JOB_STATE_UPDATING": "running", "JOB_STATE_RUNNING": "running", "JOB_STATE_CANCELLING": "running",
          "JOB_STATE_SUCCEEDED": "succeeded", "JOB_STATE_FAILED": "failed", "JOB_STATE_EXPIRED": "failed",
          "JOB_STATE_PARTIALLY_SUCCEEDED": "failed", "JOB_STATE_CANCELLED": "stopped"}
RUN_LABEL = "stepflow_run"


class VertexBackend(JobBackend):
    """Vertex AI custom jobs (see the module docstring)."""

    flavor: ClassVar[str] = "vertex"
    limits: ClassVar[Limits] = Limits(name_length=128, name_charset="a-zA-Z0-9_.-", label_length=63,
                                      label_charset="a-z0-9_-")
    poll_interval: ClassVar[float] = 1.0
    max_poll_interval: ClassVar[float] = 10.0
    log_interval: ClassVar[float] = 2.0

    def __init__(self, name: str, config: VertexOperatorConfig) -> None:
        super().__init__(name, config)
        self.what = f"step-operator '{name}' (vertex)"
        self.parent = f"projects/{config.project}/locations/{config.region}"
        self._jobs: Any = None
        self._logs: Any = None
        self._run_of: dict[str, str] = {}  # job resource name -> its run label (to list the run's jobs)

    def _clients(self) -> tuple[Any, Any]:
        if self._jobs is None:
            self._jobs, self._logs = gcp.clients(self.config.api_endpoint, self.config.region)
        return self._jobs, self._logs

    def is_transient(self, exc: BaseException) -> bool:
        """UNAVAILABLE, RESOURCE_EXHAUSTED (quota), DEADLINE_EXCEEDED, ABORTED, INTERNAL."""
        return gcp.is_transient(exc)

    def _error(self, exc: BaseException, doing: str) -> StepflowError:
        text = f"{self.what}: {doing}: {gcp.message(exc)}"
        if gcp.code(exc) == "RESOURCE_EXHAUSTED":
            return TransientBackendError(f"{text} (quota exhausted: retried; ask for a quota increase in "
                                         f"{self.config.region}, lower max_concurrency, or pick another machine "
                                         "type or region)")
        if gcp.is_transient(exc):
            return TransientBackendError(text)
        if gcp.code(exc) in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            return BackendError(f"{text}: the identity in use needs roles/aiplatform.user on project "
                                f"{self.config.project} (and roles/iam.serviceAccountUser on the job's service "
                                "account)")
        return BackendError(text)

    # ---------------------------------------------------------------- once per run
    def check(self, options: Any, resources: Resources | None) -> list[str]:
        """The machine, accelerators and replicas of one step can work."""
        try:
            job_shape(self.config, options, resources)
        except ConfigError as exc:
            return [str(exc)]
        return []

    async def prepare(self, resources: RunResources) -> None:
        """Credentials (unless a local control plane), the artifact store's bucket, the registry's region."""
        if not (self.config.api_endpoint or "").startswith("http://"):
            import anyio

            await anyio.to_thread.run_sync(gcp.credentials)
        self._clients()
        store = resources.artifact_store
        if store is None or not store.root.startswith(("gs://", "gcs://")):
            raise ConfigError(f"{self.what}: Vertex AI jobs reach the artifact store as their service account: use a "
                              f"gcs artifact store (gs://BUCKET/PREFIX), not {getattr(store, 'root', 'none')}")
        await store.exists(f"{store.root.rstrip('/')}/.stepflow-preflight")  # names a missing or denied bucket
        registry = resources.container_registry
        named = registry_region(registry.uri) if registry is not None else None
        if named and named != self.config.region:
            log.warning("%s: container registry %s is in %s but jobs run in %s: images cross regions (slower, billed "
                        "egress); a registry in %s avoids it", self.what, registry.uri if registry else "?", named,
                        self.config.region, self.config.region)

    # ---------------------------------------------------------------- submit
    def _custom_job(self, job: Job) -> Any:
        from google.cloud.aiplatform_v1 import types
        from google.protobuf import duration_pb2

        opts = job.options
        shape = job_shape(self.config, opts, job.resources)
        machine = types.MachineSpec(machine_type=shape.machine_type)
        if shape.accelerator_type and shape.accelerator_count:
            machine.accelerator_type = types.AcceleratorType[shape.accelerator_type]
            machine.accelerator_count = shape.accelerator_count
        command = list(job.command)
        pool = types.WorkerPoolSpec(
            container_spec=types.ContainerSpec(image_uri=job.image, command=command[:1], args=command[1:],
                                               env=[types.EnvVar(name=k, value=v) for k, v in job.env.items()]),
            machine_spec=machine, replica_count=shape.replica_count,
            disk_spec=types.DiskSpec(boot_disk_type=opts.boot_disk_type, boot_disk_size_gb=shape.boot_disk_size_gb))
        scheduling = types.Scheduling(restart_job_on_worker_restart=opts.restart_job_on_worker_restart,
                                      strategy=types.Scheduling.Strategy[opts.scheduling_strategy])
        timeout = opts.timeout or (int(job.timeout) if job.timeout else None)
        if timeout:
            scheduling.timeout = duration_pb2.Duration(seconds=int(timeout))
        if opts.max_wait_duration:
            scheduling.max_wait_duration = duration_pb2.Duration(seconds=int(opts.max_wait_duration))
        spec = types.CustomJobSpec(worker_pool_specs=[pool], scheduling=scheduling,
                                   reserved_ip_ranges=list(opts.reserved_ip_ranges))
        for field in ("service_account", "network", "persistent_resource_id"):
            if getattr(opts, field):
                setattr(spec, field, getattr(opts, field))
        custom = types.CustomJob(display_name=job.name, labels={**opts.labels, **job.labels}, job_spec=spec)
        if opts.encryption_spec_key_name:
            custom.encryption_spec = types.EncryptionSpec(kms_key_name=opts.encryption_spec_key_name)
        return custom

    async def submit(self, job: Job) -> str:
        """The job of this attempt if Vertex has it (display name + run label), else CreateCustomJob."""
        custom = self._custom_job(job)
        run = job.labels.get(RUN_LABEL, "")
        existing = await self._find(job.name, run)
        if existing is not None:
            return existing
        jobs, _ = self._clients()
        try:
            created = await jobs.create_custom_job(parent=self.parent, custom_job=custom, retry=None,
                                                   timeout=CALL_TIMEOUT)
        except Exception as exc:
            raise self._error(exc, f"CreateCustomJob {job.name}") from exc
        self._run_of[created.name] = run
        return str(created.name)

    async def find(self, name: str) -> str | None:
        """The resource name of the job whose display name is ``name``."""
        return await self._find(name, None)

    async def _find(self, name: str, run: str | None) -> str | None:
        query = f'display_name="{name}"' + (f' AND labels.{RUN_LABEL}="{run}"' if run else "")
        found = await self._list(query)
        if not found:
            return None
        job = found[0]
        self._run_of[job.name] = dict(job.labels).get(RUN_LABEL, "")
        return str(job.name)

    async def _list(self, query: str) -> list[Any]:
        jobs, _ = self._clients()
        try:
            pager = await jobs.list_custom_jobs(request={"parent": self.parent, "filter": query, "page_size": 100},
                                                retry=None, timeout=CALL_TIMEOUT)
            return [job async for job in pager]
        except Exception as exc:
            raise self._error(exc, "ListCustomJobs") from exc

    # ---------------------------------------------------------------- status
    def _state(self, job: Any) -> JobState:
        status = getattr(job.state, "name", str(job.state))
        phase = PHASES.get(status, "pending")
        detail = ""
        if job.error and job.error.message:
            detail = str(job.error.message)
        elif status == "JOB_STATE_CANCELLED":
            detail = "CancelCustomJob"
        return JobState(status.removeprefix("JOB_STATE_"), phase, detail)  # type: ignore[arg-type]

    async def poll(self, job_ids: Sequence[str]) -> Mapping[str, JobState]:
        """One ListCustomJobs per run of the jobs asked for; GetCustomJob only for jobs of unknown run."""
        by_run: dict[str, list[str]] = {}
        for job_id in job_ids:
            by_run.setdefault(self._run_of.get(job_id, ""), []).append(job_id)
        out: dict[str, JobState] = {}
        for run, ids in by_run.items():
            listed = {job.name: job for job in await self._list(f'labels.{RUN_LABEL}="{run}"')} if run else {}
            for job_id in ids:
                job = listed.get(job_id) or await self._get(job_id)
                if job is None:
                    out[job_id] = JobState("NOT_FOUND", "failed", f"custom job {job_id} no longer exists")
                    continue
                self._run_of[job_id] = dict(job.labels).get(RUN_LABEL, "")
                out[job_id] = self._state(job)
        return out

    async def _get(self, job_id: str) -> Any:
        jobs, _ = self._clients()
        try:
            return await jobs.get_custom_job(name=job_id, retry=None, timeout=CALL_TIMEOUT)
        except Exception as exc:
            if gcp.code(exc) in ("NOT_FOUND", "INVALID_ARGUMENT"):  # gone, or never a custom job's name
                return None
            raise self._error(exc, f"GetCustomJob {job_id}") from exc

    # ---------------------------------------------------------------- logs, cancel
    async def read_logs(self, cursors: Mapping[str, Any]) -> Mapping[str, LogBatch]:
        """Each job's Cloud Logging lines since its cursor: (last timestamp, insert ids read at it)."""
        _, logs = self._clients()
        out: dict[str, LogBatch] = {}
        for job_id, cursor in cursors.items():
            since, seen = cursor or ("", [])
            query = f'resource.type="ml_job" AND resource.labels.job_id="{job_id.rsplit("/", 1)[-1]}"'
            if since:
                query += f' AND timestamp>="{since}"'
            try:
                pager = await logs.list_log_entries(
                    request={"resource_names": [f"projects/{self.config.project}"], "filter": query,
                             "order_by": "timestamp asc", "page_size": 1000}, retry=None, timeout=CALL_TIMEOUT)
                entries = [entry async for entry in pager]
            except Exception as exc:
                raise self._error(exc, "ListLogEntries") from exc
            lines, last, at_last = [], since, list(seen)
            for entry in entries:
                stamp = entry.timestamp.isoformat() if hasattr(entry.timestamp, "isoformat") else str(entry.timestamp)
                if stamp == since and entry.insert_id in seen:
                    continue
                at_last = [*at_last, entry.insert_id] if stamp == last else [entry.insert_id]
                last = stamp
                lines.extend(str(entry.text_payload).rstrip("\n").split("\n"))
            out[job_id] = LogBatch(lines, (last, at_last[-200:]))
        return out

    async def cancel(self, job_id: str) -> None:
        """CancelCustomJob; an ended (FAILED_PRECONDITION) or gone (NOT_FOUND) job is left alone."""
        jobs, _ = self._clients()
        try:
            await jobs.cancel_custom_job(name=job_id, retry=None, timeout=CALL_TIMEOUT)
        except Exception as exc:
            if gcp.code(exc) in ("FAILED_PRECONDITION", "NOT_FOUND"):
                return
            raise self._error(exc, f"CancelCustomJob {job_id}") from exc

    async def cleanup(self, job_id: str, state: JobState | None) -> None:
        """Forget the job (Vertex keeps finished jobs; nothing to delete)."""
        self._run_of.pop(job_id, None)

    async def aclose(self) -> None:
        """Close the gRPC channels."""
        for client in (self._jobs, self._logs):
            transport = getattr(client, "transport", None)
            if transport is not None:
                try:
                    await transport.close()
                except Exception as exc:  # closing must not hide the run's outcome
                    log.debug("closing a Vertex client: %s", exc)
        self._jobs = self._logs = None
