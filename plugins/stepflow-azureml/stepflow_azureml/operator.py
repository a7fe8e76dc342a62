"""The ``azureml`` step operator: each step attempt runs as an Azure Machine Learning command job.

A :class:`~stepflow.remote.JobBackend` on ``azure-ai-ml``'s ``MLClient``; stepflow's operator
carries the rest of the path. The SDK is synchronous: every call runs in a worker thread under
one bounded limiter per operator, so the event loop never waits on it. Here:

- **submit**: Azure ML takes client-chosen names, so the job's deterministic name is looked up
  first (``jobs.get``) and the job created (``jobs.create_or_update`` of a ``command()`` whose
  environment is the step image) only when absent;
- **poll**: one round for every job in flight, ``jobs.get`` each (concurrently, in the limiter);
  a failed job's error comes from its run-history details, as the SDK's own stream reads it;
- **read_logs**: the run-history details list the job's log files; ``user_logs/std_log*.txt``
  are read from their (pre-signed) URLs with HTTP ranges, from the byte each was read to;
- **cancel**: ``jobs.begin_cancel``, without waiting for the operation.

The SDK's own retries are off (``retry_total=0``): stepflow's one policy retries what
:meth:`AzureMLBackend.is_transient` calls transient (429 honouring Retry-After, 408, 5xx,
connection errors). Jobs reach the artifact store as their identity: no key goes into a job.
"""

from __future__ import annotations

import functools
import logging
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import anyio

from stepflow.errors import BackendError, ConfigError, StepflowError, TransientBackendError
from stepflow.remote import Job, JobBackend, JobState, Limits, LogBatch, Resources, RunResources
from stepflow_azureml import azure
from stepflow_azureml.config import AzureMLOperatorConfig, job_shape

log = logging.getLogger("stepflow.azureml")
#: Worker threads one operator's SDK calls may hold at once.
THREADS = 4
PHASES = {"NotStarted": "pending", "Queued": "pending", "Preparing": "pending", "Provisioning": "pending",
          "Starting": "pending", "Paused": "pending", "Running": "running", "Finalizing": "running",
          "CancelRequested": "running", "Completed": "succeeded", "Failed": "failed", "NotResponding": "failed",
          "Canceled": "stopped"}
STORE_SCHEMES = ("az://", "abfs://", "abfss://")


class AzureMLBackend(JobBackend):
    """Azure ML command jobs (see the module docstring)."""

    flavor: ClassVar[str] = "azureml"
    limits: ClassVar[Limits] = Limits(name_length=255, name_charset="a-zA-Z0-9_-", label_length=256)
    poll_interval: ClassVar[float] = 1.0
    max_poll_interval: ClassVar[float] = 10.0
    log_interval: ClassVar[float] = 2.0

    def __init__(self, name: str, config: AzureMLOperatorConfig) -> None:
        super().__init__(name, config)
        self.what = f"step-operator '{name}' (azureml)"
        self._client: Any = None
        self._limiter = anyio.CapacityLimiter(THREADS)
        self._http: Any = None
        self._environments: dict[str, Any] = {}  # image -> its registered (anonymous) environment

    # ---------------------------------------------------------------- plumbing
    async def _ml(self) -> Any:
        """The MLClient, made in a worker thread: the SDK's import takes seconds, never on the loop."""
        if self._client is None:
            client = await anyio.to_thread.run_sync(azure.ml_client, self.config)
            self._client = self._client or client
        return self._client

    async def _call(self, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in a worker thread; its failure as a stepflow error about ``doing``."""
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self._limiter)
        except StepflowError:
            raise
        except Exception as exc:
            raise self._error(exc, doing) from exc

    def is_transient(self, exc: BaseException) -> bool:
        """429, 408, 5xx and unanswered requests."""
        return azure.is_transient(exc)

    def _error(self, exc: BaseException, doing: str) -> StepflowError:
        text = f"{self.what}: {doing}: {azure.message(exc)}"
        if azure.is_transient(exc):
            return TransientBackendError(text, retry_after=azure.retry_after(exc))
        if azure.status(exc) in (401, 403):
            return BackendError(f"{text}: the identity in use needs the 'AzureML Data Scientist' role (or Contributor)"
                                f" on workspace {self.config.workspace_name}")
        return BackendError(text)

    # ---------------------------------------------------------------- once per run
    def check(self, options: Any, resources: Resources | None) -> list[str]:
        """The compute, VM size and tiers of one step can work."""
        try:
            job_shape(self.config, options, resources)
        except ConfigError as exc:
            return [str(exc)]
        return []

    async def prepare(self, resources: RunResources) -> None:
        """Credentials, the workspace, the compute target, and an Azure Blob artifact store that answers."""
        cfg = self.config
        if not cfg.endpoint:
            cred = await anyio.to_thread.run_sync(azure.credential, cfg)
            await anyio.to_thread.run_sync(azure.check_credential, cred, self.what)
        ml = await self._ml()
        try:
            await anyio.to_thread.run_sync(ml.workspaces.get, cfg.workspace_name, limiter=self._limiter)
        except Exception as exc:
            raise self._missing_workspace(exc) from exc
        if cfg.compute != "serverless":
            await self._check_compute(cfg.compute)
        store = resources.artifact_store
        if store is None or not store.root.startswith(STORE_SCHEMES):
            raise ConfigError(f"{self.what}: Azure ML jobs reach the artifact store with their identity: use an azure "
                              f"artifact store (az://CONTAINER/PREFIX), not {getattr(store, 'root', 'none')}")
        await store.exists(f"{store.root.rstrip('/')}/.stepflow-preflight")  # names a missing container

    def _missing_workspace(self, exc: BaseException) -> StepflowError:
        cfg = self.config
        code = azure.error_code(exc)
        if azure.status(exc) != 404 and code not in ("SubscriptionNotFound", "ResourceGroupNotFound"):
            return self._error(exc, f"getting workspace {cfg.workspace_name}")
        if code == "SubscriptionNotFound" or code == "InvalidSubscriptionId":
            what = f"subscription {cfg.subscription_id} does not exist or the identity cannot see it"
        elif code == "ResourceGroupNotFound":
            what = f"resource group {cfg.resource_group} does not exist in subscription {cfg.subscription_id}"
        else:
            what = f"workspace {cfg.workspace_name} does not exist in resource group {cfg.resource_group}"
        return ConfigError(f"{self.what}: {what} ({azure.message(exc)}); check --subscription_id, --resource_group "
                           "and --workspace_name (`az ml workspace list`)")

    async def _check_compute(self, name: str) -> None:
        ml = await self._ml()
        try:
            await anyio.to_thread.run_sync(ml.compute.get, name, limiter=self._limiter)
            return
        except Exception as exc:
            if azure.status(exc) != 404:
                raise self._error(exc, f"getting compute {name}") from exc
        names = await self._call("listing computes", lambda: sorted(c.name for c in ml.compute.list()))
        raise ConfigError(f"{self.what}: compute {name!r} does not exist in workspace {self.config.workspace_name}; "
                          f"existing: {', '.join(names) or 'none'} (or use --compute=serverless)")

    # ---------------------------------------------------------------- submit
    async def _environment(self, image: str) -> Any:
        """The image's anonymous environment, registered once per operator (a retried submit sends only the job)."""
        if image not in self._environments:
            from azure.ai.ml.entities import Environment

            ml = await self._ml()
            self._environments[image] = await self._call(f"registering the environment of {image}",
                                                         ml.environments.create_or_update, Environment(image=image))
        return self._environments[image]

    def _command(self, job: Job, environment: Any) -> Any:
        from azure.ai.ml import command

        opts = job.options
        shape = job_shape(self.config, opts, job.resources)
        timeout = opts.timeout or (int(job.timeout) if job.timeout else None)
        return command(
            name=job.name, display_name=job.name, command=shlex.join(job.command),
            environment=environment, environment_variables=dict(job.env),
            experiment_name=opts.experiment_name or job.labels.get("stepflow.pipeline") or "stepflow",
            tags={**opts.tags, **job.labels}, compute=None if shape.serverless else shape.compute,
            instance_type=shape.instance_type, instance_count=shape.instance_count, shm_size=opts.shm_size,
            timeout=timeout, job_tier=opts.job_tier.lower() if opts.job_tier else None, priority=opts.priority)

    async def submit(self, job: Job) -> str:
        """The job of this attempt if Azure ML has it (its deterministic name), else create it."""
        job_shape(self.config, job.options, job.resources)  # a bad shape fails before any call
        if await self.find(job.name) is not None:
            return job.name
        command = await self._call(f"building job {job.name}", self._command, job, await self._environment(job.image))
        created = await self._call(f"creating job {job.name}", (await self._ml()).jobs.create_or_update, command)
        return str(created.name)

    async def find(self, name: str) -> str | None:
        """``name`` when a job of that name exists."""
        ml = await self._ml()
        try:
            await anyio.to_thread.run_sync(ml.jobs.get, name, limiter=self._limiter)
        except Exception as exc:
            if azure.status(exc) == 404:
                return None
            raise self._error(exc, f"getting job {name}") from exc
        return name

    # ---------------------------------------------------------------- status
    async def poll(self, job_ids: Sequence[str]) -> Mapping[str, JobState]:
        """Every job's state in one round (its calls concurrent in the limiter)."""
        out: dict[str, JobState] = {}
        errors: list[BaseException] = []

        async def one(job_id: str) -> None:
            try:
                job = await self._call(f"getting job {job_id}", (await self._ml()).jobs.get, job_id)
            except BackendError as exc:
                if isinstance(exc.__cause__, Exception) and azure.status(exc.__cause__) == 404:
                    out[job_id] = JobState("NotFound", "failed", f"job {job_id} no longer exists")
                else:
                    errors.append(exc)  # raised as itself, so the status loop sees a throttled round
                return
            status = str(getattr(job.status, "value", job.status) or "NotStarted")
            detail = ""
            if status in ("Failed", "NotResponding"):
                detail = await self._failure(job_id)
            elif status == "Canceled":
                detail = "canceled"
            out[job_id] = JobState(status, PHASES.get(status, "pending"), detail)  # type: ignore[arg-type]

        async with anyio.create_task_group() as tg:
            for job_id in job_ids:
                tg.start_soon(one, job_id)
        if errors and not out:
            raise errors[0]
        return out  # jobs missing from the answer are asked again next round

    async def _details(self, job_id: str) -> Any:
        ml = await self._ml()
        # The SDK makes its run-history client on first use, with a network call: in the thread too.
        return await self._call(f"reading run details of {job_id}",
                                lambda: ml.jobs._runs_operations.get_run_details(job_id))

    async def _failure(self, job_id: str) -> str:
        """The job's error as the SDK's stream reports it (run-history details)."""
        try:
            details = await self._details(job_id)
        except BackendError as exc:
            return f"failed (its error could not be read: {exc})"
        error = getattr(getattr(details, "error", None), "error", None)
        if error is None:
            return "failed"
        return f"({error.code}) {error.message}" if getattr(error, "code", None) else str(error.message)

    # ---------------------------------------------------------------- logs, cancel
    async def read_logs(self, cursors: Mapping[str, Any]) -> Mapping[str, LogBatch]:
        """Each job's user log lines since its cursor: ``{file name: byte offset}`` plus an unfinished line."""
        out: dict[str, LogBatch] = {}
        for job_id, cursor in cursors.items():
            offsets, partial = cursor or ({}, "")
            details = await self._details(job_id)
            files = {k: v for k, v in (getattr(details, "log_files", None) or {}).items()
                     if k.startswith("user_logs/std_log")}
            text, offsets = "", dict(offsets)
            for name in sorted(files):
                chunk = await self._read_from(files[name], offsets.get(name, 0))
                offsets[name] = offsets.get(name, 0) + len(chunk)
                text += chunk.decode("utf-8", "replace")
            if not text and partial:  # nothing new: the unfinished line was the last one
                out[job_id] = LogBatch([partial], (offsets, ""))
                continue
            *lines, rest = (partial + text).split("\n")
            out[job_id] = LogBatch([line.rstrip("\r") for line in lines], (offsets, rest))
        return out

    async def _read_from(self, url: str, offset: int) -> bytes:
        import httpx

        if self._http is None:
            import ssl

            verify: Any = ssl.create_default_context(cafile=self.config.ca_bundle) if self.config.ca_bundle else True
            self._http = httpx.AsyncClient(verify=verify, timeout=30.0)
        try:
            response = await self._http.get(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        except httpx.HTTPError as exc:
            raise TransientBackendError(f"{self.what}: reading a job log: {exc}") from exc
        if response.status_code == 416:  # nothing past the offset yet
            return b""
        if response.status_code >= 400:
            raise BackendError(f"{self.what}: reading a job log: HTTP {response.status_code}")
        body: bytes = response.content
        return body if response.status_code == 206 or not offset else body[offset:]

    async def cancel(self, job_id: str) -> None:
        """``jobs.begin_cancel``; an ended or gone job is left alone."""
        ml = await self._ml()
        try:
            await anyio.to_thread.run_sync(ml.jobs.begin_cancel, job_id, limiter=self._limiter)
        except Exception as exc:
            # Gone, or already ended (Azure answers 400 "cannot be canceled" for a finished job).
            if azure.status(exc) in (404, 409) or (azure.status(exc) == 400 and "cancel" in str(exc).lower()):
                return
            raise self._error(exc, f"canceling job {job_id}") from exc

    async def aclose(self) -> None:
        """Close the log reader and the SDK's connections."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        client, self._client = self._client, None
        if client is not None:
            close = getattr(client, "close", None)
            if callable(close):
                try:
                    await anyio.to_thread.run_sync(close)
                except Exception as exc:  # closing must not hide the run's outcome
                    log.debug("closing the MLClient: %s", exc)
