"""The ``sagemaker`` step operator: each step attempt runs as an AWS SageMaker training job.

On top of :class:`stepflow.remote.RemoteJobOperator` (image, payload, deterministic job name,
run store, polling loop, output) this module implements the SageMaker side:

- **submit**: CreateTrainingJob with the step image, ``python3 -m stepflow.entrypoint`` as the
  container entrypoint and arguments, the job environment (checked against SageMaker's limits),
  resources, stopping condition, spot, VPC, warm pool and tags. Throttled or dropped requests are
  retried with jittered backoff; a ``ResourceInUse`` answer means the job already exists under
  its deterministic name (an earlier try whose answer was lost, or a runner that died) and it is
  re-attached, never created twice.
- **status_many**: one ListTrainingJobs round (``NameContains`` = the run's job-name prefix,
  paginated) gives the state of every in-flight job of the run; DescribeTrainingJob is called
  only for a job whose state changed and whose summary lacks what is needed (the secondary
  status, or the FailureReason of a failed job). Requests grow with rounds, not jobs x rounds.
  Throttling and 5xx raise TransientBackendError so the base poller backs off.
- **logs**: one tailer per operator lists the run's CloudWatch log streams
  (``/aws/sagemaker/TrainingJobs``, ``<job>/algo-1-<ts>``) per round and reads the streams that
  grew with GetLogEvents; lines go out as ``LogLine`` events (and so into ``stepflow logs``).
- **cancel**: StopTrainingJob (retried); the base class then awaits ``Stopped``. A job stopped by
  someone else is reported as phase ``stopped`` (the step is cancelled); one stopped by SageMaker
  for exceeding ``max_runtime_s`` as a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import anyio
import attrs

from stepflow.errors import BackendError, ConfigError, StepflowError, TransientBackendError
from stepflow.remote import JobSpec, JobState, RemoteJobOperator, RunResources
from stepflow_sagemaker.aws import Aws, brief, error_code, error_message, http_status
from stepflow_sagemaker.config import (
    MAX_TAGS,
    SageMakerOperatorConfig,
    SageMakerStepSettings,
    ecr_region,
    job_options,
)
from stepflow_sagemaker.flavors import region_mismatch

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
#: Tries of the calls that must not be lost to throttling (create, stop, find, preflight).
CALL_ATTEMPTS = 8
#: SageMaker's limits on a training job's environment (CreateTrainingJob's service model).
MAX_ENV_ENTRIES, MAX_ENV_VALUE = 100, 512
ENV_KEY = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
#: ContainerEntrypoint / ContainerArguments: at most 100 items of at most 256 characters.
MAX_COMMAND_ITEMS, MAX_COMMAND_ITEM = 100, 256
TAG_TEXT = re.compile(r"[^\w\s.:/=+\-@]", re.UNICODE)
#: Secondary statuses of a Stopped job that mean SageMaker's own limit stopped it.
LIMIT_STOPS = {"MaxRuntimeExceeded": "max_runtime_s", "MaxWaitTimeExceeded": "max_wait_s"}
RUNNING = frozenset({"InProgress", "Stopping"})


def _clean(text: str) -> str:
    """How :func:`stepflow.remote.job_name` writes a run id into a job name."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def _not_found(exc: BaseException) -> bool:
    """SageMaker answers ResourceNotFound, or ValidationException "... not found", for a missing job."""
    code = error_code(exc)
    if code in ("ResourceNotFound", "ResourceNotFoundException"):
        return True
    text = error_message(exc).lower()
    return code == "ValidationException" and ("not found" in text or "could not find" in text
                                              or "does not exist" in text)


def _tag(text: object, limit: int) -> str:
    return TAG_TEXT.sub("_", str(text))[:limit]


class SageMakerStepOperator(RemoteJobOperator):
    """Runs each step attempt as a SageMaker training job (see the module docstring)."""

    flavor: ClassVar[str] = "sagemaker"
    poll_interval = 0.5
    max_poll_interval = 5.0
    stop_timeout = 60.0
    status_concurrency = 8
    #: Seconds between log rounds while jobs run (0.5 s once a job ended, for its last lines).
    log_interval = 1.0
    #: How long single status() calls wait for company before one round answers them all.
    status_batch_window = 0.05

    def __init__(self, name: str, config: SageMakerOperatorConfig) -> None:
        super().__init__(name, config)
        self.aws = Aws(region=config.region, profile=config.profile, what=f"step-operator '{name}' (sagemaker)")
        self._role_arn: str | None = None
        self._bucket: str | None = None
        self._preflight_ok = False
        self._preflight_error: BaseException | None = None
        self._preflight_lock: anyio.Lock | None = None
        self._known: dict[str, tuple[tuple[Any, ...], JobState]] = {}
        self._stopped_by_us: set[str] = set()
        self._tailer = _LogTailer(self)
        self._builder: Any = None
        self._status_batch: tuple[set[str], asyncio.Future[dict[str, JobState]]] | None = None

    # ---------------------------------------------------------------- lifecycle
    async def attach(self, resources: RunResources) -> None:
        """Take the run's components; without an image builder in the stack, build on local Docker."""
        if resources.image_builder is None:
            builder = self._default_builder()
            if builder is not None:
                resources = attrs.evolve(resources, image_builder=builder)
        await super().attach(resources)
        self._images = None  # the image manager follows this run's registry and builder
        self._preflight_ok, self._preflight_error = False, None

    def _default_builder(self) -> Any:
        if self._builder is None:
            try:
                from stepflow_docker.builder import DockerImageBuilder
            except ImportError:
                return None  # the base class then asks for an image builder (-i)
            self._builder = DockerImageBuilder(name=f"docker (default of step-operator '{self.name}')")
        return self._builder

    async def aclose(self) -> None:
        """Stop the log tailer, close the AWS clients and the default image builder."""
        await super().aclose()
        self._tailer.close()
        await self.aws.aclose()
        if self._builder is not None:
            with contextlib.suppress(Exception):
                await self._builder.aclose()

    @property
    def what(self) -> str:
        """``step-operator 'NAME' (sagemaker)`` for messages."""
        return f"step-operator '{self.name}' (sagemaker)"

    def api_calls(self) -> dict[str, dict[str, int]]:
        """AWS requests this operator sent, by operation: calls, throttled, retried."""
        return self.aws.stats.summary()

    # ---------------------------------------------------------------- settings
    def validate_settings(self, settings: Mapping[str, Any]) -> list[str]:
        """Problems of a step's settings combined with the operator's config (instance type ...)."""
        from stepflow._config import options

        try:
            parsed = options.build(SageMakerStepSettings, settings, what="")
        except ConfigError:
            return []  # reported by the run's own settings validation
        try:
            job_options(self.config, parsed)
        except ConfigError as exc:
            return [str(exc)]
        return []

    def _options(self, settings: Mapping[str, Any]) -> Any:
        from stepflow._config import options

        parsed = options.build(SageMakerStepSettings, settings, what=f"{self.what}: step settings")
        return job_options(self.config, parsed)

    # ---------------------------------------------------------------- preflight (once per run)
    async def launch(self, invocation: Any) -> Any:
        """Check credentials, region, role and buckets once per run, then run the attempt."""
        await self._preflight()
        return await super().launch(invocation)

    async def _preflight(self) -> None:
        if self._preflight_ok:
            return
        if self._preflight_error is None:
            if self._preflight_lock is None:
                self._preflight_lock = anyio.Lock()
            async with self._preflight_lock:
                if not self._preflight_ok and self._preflight_error is None:
                    try:
                        await self._check_setup()
                        self._preflight_ok = True
                    except TransientBackendError:
                        raise  # throttled even after retries: the next attempt checks again
                    except StepflowError as exc:
                        self._preflight_error = exc
        if self._preflight_error is not None:  # every step of the run gets the same clear error
            error = self._preflight_error
            try:
                fresh = type(error)(str(error))
            except Exception:
                fresh = StepflowError(str(error))
            raise fresh from None

    async def _check_setup(self) -> None:
        res = self._require()
        region = self.aws.region
        await self.aws.credentials()
        registry = res.container_registry
        if getattr(registry, "flavor", "") == "ecr":
            reg_region = getattr(registry, "region", None)
            if reg_region and reg_region != region:
                raise ConfigError(region_mismatch(self.name, region, getattr(registry, "name", "?"), reg_region))
        elif registry is not None:
            named = ecr_region(registry.uri)
            if named and named != region:
                raise ConfigError(region_mismatch(self.name, region, getattr(registry, "name", "?"), named))
        try:
            me = await self.aws.call("sts", "get_caller_identity", attempts=CALL_ATTEMPTS)
        except Exception as exc:
            raise self.aws.translate(exc, "checking the AWS credentials (STS GetCallerIdentity)") from exc
        role = self.config.role
        if role.startswith("arn:"):
            self._role_arn = role
        else:
            partition = str(me.get("Arn", "arn:aws:")).split(":")[1] or "aws"
            self._role_arn = f"arn:{partition}:iam::{me.get('Account')}:role/{role.strip('/')}"
        store = res.artifact_store
        root = str(getattr(store, "root", ""))
        bucket = self.config.bucket_name
        why = "--bucket_name: SageMaker writes the job output there"
        if not bucket and root.startswith("s3://"):
            bucket = root.removeprefix("s3://").split("/", 1)[0]
            why = (f"artifact store '{getattr(store, 'name', '?')}' ({root}), also SageMaker's job output "
                   "(--bucket_name unset)")
        if not bucket:
            raise ConfigError(f"{self.what}: SageMaker writes job output to S3: set --bucket_name (the artifact store "
                              f"'{getattr(store, 'name', '?')}' at {root} is not an S3 bucket)")
        self._bucket = bucket
        await self._check_bucket(bucket, store, why)
        if store is not None and getattr(store, "is_remote", False):
            await store.exists(f"{root.rstrip('/')}/.stepflow-preflight")  # a missing bucket is named here

    async def _check_bucket(self, bucket: str, store: Any, why: str) -> None:
        endpoint = None
        options = getattr(store, "storage_options", None)
        if callable(options) and str(getattr(store, "root", "")).startswith("s3://"):
            endpoint = (options() or {}).get("endpoint_url")
        try:
            await self.aws.call("s3", "head_bucket", endpoint_url=endpoint, attempts=CALL_ATTEMPTS, Bucket=bucket)
        except Exception as exc:
            status, code = http_status(exc), error_code(exc)
            if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
                raise BackendError(f"{self.what}: S3 bucket '{bucket}' does not exist ({why}): create it in "
                                   f"{self.aws.region} or point stepflow at an existing one") from None
            if status == 403 or code in ("403", "AccessDenied", "Forbidden"):
                raise BackendError(f"{self.what}: access denied to S3 bucket '{bucket}' ({why}): the credentials in "
                                   "use (and the job role) need s3:ListBucket, s3:GetObject and s3:PutObject on "
                                   "it") from None
            raise self.aws.translate(exc, f"checking S3 bucket '{bucket}'", endpoint) from exc

    # ---------------------------------------------------------------- submit
    def _request(self, job: JobSpec) -> dict[str, Any]:
        """The CreateTrainingJob request of ``job`` (ConfigError when SageMaker's limits are exceeded)."""
        opts = self._options(job.settings)
        env = dict(job.env)
        problems = []
        if len(env) > MAX_ENV_ENTRIES:
            problems.append(f"{len(env)} environment variables: SageMaker allows at most {MAX_ENV_ENTRIES}")
        for key, value in env.items():
            if not ENV_KEY.match(key) or len(key) > 512:
                problems.append(f"environment variable name {key!r} is not allowed by SageMaker "
                                "(letters, digits and '_', not starting with a digit)")
            if len(value) > MAX_ENV_VALUE:
                hint = (" It holds the artifact store's storage options: keep credentials out of the store's "
                        "config (the job's IAM role provides them)") if key == "STEPFLOW_STORAGE_OPTIONS" else ""
                problems.append(f"environment variable {key} is {len(value)} characters long; SageMaker allows at "
                                f"most {MAX_ENV_VALUE} per value.{hint}")
        command = list(job.command)
        long = [c for c in command if len(c) > MAX_COMMAND_ITEM]
        if long or len(command) > MAX_COMMAND_ITEMS:
            problems.append(f"the job's command has an argument longer than {MAX_COMMAND_ITEM} characters "
                            f"({long[0][:80]}...): use a shorter artifact store path or step name" if long
                            else f"the job's command has more than {MAX_COMMAND_ITEMS} items")
        if problems:
            raise ConfigError(f"{self.what}: cannot submit training job {job.name}: " + "; ".join(problems))
        prefix = self.config.experiment_name or "stepflow"
        tags = {**opts.tags, "stepflow:run": job.run_id, "stepflow:step": job.step,
                "stepflow:attempt": str(job.attempt)}
        if self.config.experiment_name:
            tags["stepflow:experiment"] = self.config.experiment_name
        resource: dict[str, Any] = {"InstanceType": opts.instance_type, "InstanceCount": opts.instance_count,
                                    "VolumeSizeInGB": opts.volume_size_gb}
        if opts.keep_alive_s:
            resource["KeepAlivePeriodInSeconds"] = opts.keep_alive_s
        stopping: dict[str, Any] = {"MaxRuntimeInSeconds": opts.max_runtime_s}
        request: dict[str, Any] = {
            "TrainingJobName": job.name,
            "RoleArn": self._role_arn or self.config.role,
            "AlgorithmSpecification": {"TrainingImage": job.image, "TrainingInputMode": "File",
                                       "ContainerEntrypoint": command[:1], "ContainerArguments": command[1:]},
            "OutputDataConfig": {"S3OutputPath": f"s3://{self._bucket}/{prefix}/{_clean(job.run_id)}/"},
            "ResourceConfig": resource,
            "StoppingCondition": stopping,
            "Environment": env,
            "Tags": [{"Key": _tag(k, 128), "Value": _tag(v, 256)} for k, v in tags.items()][:MAX_TAGS],
        }
        if opts.use_spot:
            request["EnableManagedSpotTraining"] = True
            stopping["MaxWaitTimeInSeconds"] = opts.max_wait_s
        if self.config.subnets:
            request["VpcConfig"] = {"Subnets": list(self.config.subnets),
                                    "SecurityGroupIds": list(self.config.security_group_ids)}
        return request

    async def submit(self, job: JobSpec) -> str:
        """CreateTrainingJob (retried when throttled); an existing job of that name is re-attached."""
        request = self._request(job)
        try:
            await self.aws.call("sagemaker", "create_training_job", endpoint_url=self.config.endpoint_url,
                                attempts=CALL_ATTEMPTS, **request)
        except Exception as exc:
            taken = error_code(exc) == "ResourceInUse" or (error_code(exc) == "ValidationException"
                                                           and "already exists" in error_message(exc))
            # The deterministic name is taken: this attempt's job already exists (created by an
            # earlier try whose answer was lost, or by a runner that died). Re-attach to it.
            if taken and await self._describe(job.name, attempts=CALL_ATTEMPTS) is not None:
                return job.name
            raise self._create_error(exc, job) from exc
        return job.name

    def _create_error(self, exc: BaseException, job: JobSpec) -> BackendError:
        code = error_code(exc)
        doing = f"CreateTrainingJob {job.name}"
        if code == "ValidationException":
            text = error_message(exc)
            hint = ""
            if "role" in text.lower():
                hint = " (check --role: the IAM role ARN SageMaker assumes, trusted by sagemaker.amazonaws.com)"
            elif "instance" in text.lower():
                hint = " (check instance_type, e.g. ml.m5.large)"
            return BackendError(f"{self.what}: SageMaker refused training job {job.name}: {text}{hint}")
        if code == "ResourceLimitExceeded":
            return BackendError(f"{self.what}: {doing}: {brief(exc)}; ask for a quota increase or lower "
                                "max_concurrency")
        return self.aws.translate(exc, doing, self.config.endpoint_url)

    async def find(self, job: JobSpec) -> str | None:
        """The job named ``job.name`` if SageMaker has it (DescribeTrainingJob), else None."""
        found = await self._describe(job.name, attempts=CALL_ATTEMPTS)
        return job.name if found is not None else None

    async def _describe(self, name: str, *, attempts: int = 1) -> dict[str, Any] | None:
        try:
            return await self.aws.call("sagemaker", "describe_training_job", endpoint_url=self.config.endpoint_url,
                                       attempts=attempts, TrainingJobName=name)
        except Exception as exc:
            if _not_found(exc):
                return None
            raise self.aws.translate(exc, f"DescribeTrainingJob {name}", self.config.endpoint_url) from exc

    # ---------------------------------------------------------------- status
    def _state(self, name: str, job: Mapping[str, Any]) -> JobState:
        status = str(job.get("TrainingJobStatus") or "Unknown")
        secondary = str(job.get("SecondaryStatus") or "")
        if status == "Completed":
            state = JobState(status, "succeeded", secondary)
        elif status == "Failed":
            state = JobState(status, "failed", str(job.get("FailureReason") or secondary or "failed"))
        elif status == "Stopped":
            if secondary in LIMIT_STOPS:
                option = LIMIT_STOPS[secondary]
                state = JobState(status, "failed", f"{secondary}: SageMaker stopped the job when it reached its "
                                                   f"{option} limit; raise {option}")
            elif name in self._stopped_by_us:
                state = JobState(status, "stopped", "stopped by stepflow")
            else:
                state = JobState(status, "stopped", "StopTrainingJob from outside stepflow")
        elif status in RUNNING:
            state = JobState(status, "running", secondary)
        elif status == "Deleting":
            state = JobState(status, "stopped", "the training job is being deleted")
        else:
            state = JobState(status, "pending", secondary)
        if state.terminal:
            self._tailer.finish(name)
        return state

    async def status(self, job_id: str) -> JobState:
        """One job's state; throttling and 5xx raise TransientBackendError.

        Calls arriving together (a cancelled run awaiting every job's Stopped) are answered by
        one :meth:`status_many` round instead of one DescribeTrainingJob each.
        """
        loop = asyncio.get_running_loop()
        batch = self._status_batch
        if batch is None or batch[1].done():
            batch = self._status_batch = (set(), loop.create_future())
            batch[1].add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, never logged
            self._spawn(self._status_round(batch))
        batch[0].add(job_id)
        states = await asyncio.shield(batch[1])
        state = states.get(job_id)
        if state is None:
            raise TransientBackendError(f"{self.what}: no status of training job {job_id} this round")
        return state

    async def _status_round(self, batch: tuple[set[str], asyncio.Future[dict[str, JobState]]]) -> None:
        ids, done = batch
        try:
            await asyncio.sleep(self.status_batch_window)
            if self._status_batch is batch:
                self._status_batch = None
            done.set_result(await self.status_many(sorted(ids)))
        except Exception as exc:
            done.set_exception(exc)
        finally:
            if not done.done():
                done.set_exception(TransientBackendError(f"{self.what}: status round interrupted"))

    def _run_prefix(self) -> str | None:
        res = self.resources
        return f"sf-{_clean(res.run_id)}-" if res is not None else None

    async def _list(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Summaries of every training job whose name starts with ``prefix`` (all pages)."""
        out: dict[str, dict[str, Any]] = {}
        token = None
        while True:
            params: dict[str, Any] = {"NameContains": prefix, "MaxResults": 100}
            if token:
                params["NextToken"] = token
            try:
                page = await self.aws.call("sagemaker", "list_training_jobs", endpoint_url=self.config.endpoint_url,
                                           **params)
            except Exception as exc:
                raise self.aws.translate(exc, "ListTrainingJobs", self.config.endpoint_url) from exc
            for summary in page.get("TrainingJobSummaries") or ():
                name = str(summary.get("TrainingJobName", ""))
                if name.startswith(prefix):
                    out[name] = summary
            token = page.get("NextToken")
            if not token:
                return out

    async def status_many(self, job_ids: list[str]) -> dict[str, JobState]:
        """One ListTrainingJobs round for the run's jobs; Describe only changed jobs that need it."""
        prefix = self._run_prefix()
        grouped = [j for j in job_ids if prefix and j.startswith(prefix)]
        describe = [j for j in job_ids if not (prefix and j.startswith(prefix))]
        out: dict[str, JobState] = {}
        keys: dict[str, tuple[Any, ...]] = {}
        if grouped:
            assert prefix is not None
            summaries = await self._list(prefix)  # TransientBackendError: the poller backs off
            for name in grouped:
                summary = summaries.get(name)
                if summary is None:  # not listed yet (eventual consistency): ask for it directly
                    describe.append(name)
                    continue
                key = (summary.get("TrainingJobStatus"), summary.get("SecondaryStatus"),
                       str(summary.get("LastModifiedTime")))
                known = self._known.get(name)
                if known is not None and known[0] == key:
                    out[name] = known[1]
                    continue
                keys[name] = key
                if summary.get("TrainingJobStatus") == "Failed" or "SecondaryStatus" not in summary:
                    describe.append(name)  # FailureReason / SecondaryStatus are only in the description
                else:
                    out[name] = self._remember(name, key, self._state(name, summary))
        if describe:
            limiter = anyio.Semaphore(self.status_concurrency)

            async def one(name: str) -> None:
                async with limiter:
                    try:
                        found = await self._describe(name)
                    except TransientBackendError:
                        return  # this job is checked again next round
                if found is None:
                    out[name] = JobState("NotFound", "failed", f"training job {name} no longer exists on SageMaker")
                    self._tailer.finish(name)
                    return
                out[name] = self._remember(name, keys.get(name), self._state(name, found))

            async with anyio.create_task_group() as tg:
                for name in describe:
                    tg.start_soon(one, name)
        return out

    def _remember(self, name: str, key: tuple[Any, ...] | None, state: JobState) -> JobState:
        if state.terminal:
            self._known.pop(name, None)
        elif key is not None:
            self._known[name] = (key, state)
        return state

    # ---------------------------------------------------------------- logs, cancel
    def logs(self, job_id: str) -> AsyncIterator[str]:
        """The job's CloudWatch log lines while it runs (a shared tailer reads every job of the run)."""
        return self._tailer.follow(job_id)

    async def cancel(self, job_id: str) -> None:
        """StopTrainingJob (retried when throttled); a job already ended is left alone."""
        self._stopped_by_us.add(job_id)
        try:
            await self.aws.call("sagemaker", "stop_training_job", endpoint_url=self.config.endpoint_url,
                                attempts=CALL_ATTEMPTS, TrainingJobName=job_id)
        except Exception as exc:
            if error_code(exc) == "ValidationException" or _not_found(exc):
                return  # not stoppable: it already ended (or is stopping)
            raise self.aws.translate(exc, f"StopTrainingJob {job_id}", self.config.endpoint_url) from exc

    async def cleanup(self, job_id: str, state: JobState | None) -> None:
        """Forget the job (SageMaker keeps finished jobs; nothing to delete)."""
        self._known.pop(job_id, None)
        self._tailer.finish(job_id)


@attrs.define
class _Watch:
    job: str
    queue: asyncio.Queue[str | None] = attrs.field(factory=asyncio.Queue)
    tokens: dict[str, str] = attrs.field(factory=dict)
    seen: dict[str, tuple[Any, ...]] = attrs.field(factory=dict)
    fetched: dict[str, float] = attrs.field(factory=dict)
    final_rounds: int | None = None
    failures: int = 0
    warned: bool = False


class _LogTailer:
    """Reads the CloudWatch log streams of every followed job of an operator, in shared rounds.

    Per round: DescribeLogStreams once per run prefix (paginated), then GetLogEvents only for
    streams that grew (or were not read for ``STALE_S``). A job that ended gets two more rounds
    for its last lines, then its iterator ends.
    """

    STALE_S = 10.0
    FINAL_ROUNDS = 2
    #: GetLogEvents pages read per stream and round (the rest follows next round).
    MAX_PAGES = 20

    def __init__(self, op: SageMakerStepOperator) -> None:
        self.op = op
        self.watches: dict[str, _Watch] = {}
        self._wake: asyncio.Event | None = None
        self._running = False

    def follow(self, job: str) -> AsyncIterator[str]:
        watch = _Watch(job)
        self.watches[job] = watch
        self._ensure_loop()

        async def lines() -> AsyncIterator[str]:
            try:
                while True:
                    line = await watch.queue.get()
                    if line is None:
                        return
                    yield line
            finally:
                if self.watches.get(job) is watch:
                    del self.watches[job]

        return lines()

    def finish(self, job: str) -> None:
        watch = self.watches.get(job)
        if watch is not None and watch.final_rounds is None:
            watch.final_rounds = self.FINAL_ROUNDS
            if self._wake is not None:
                self._wake.set()

    def close(self) -> None:
        for watch in list(self.watches.values()):
            watch.queue.put_nowait(None)
        self.watches.clear()

    def _ensure_loop(self) -> None:
        if not self._running:
            self._running = True
            self._wake = asyncio.Event()
            self.op._spawn(self._loop())

    async def _loop(self) -> None:
        try:
            while self.watches:
                finishing = any(w.final_rounds is not None for w in self.watches.values())
                assert self._wake is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5 if finishing else self.op.log_interval)
                self._wake.clear()
                with contextlib.suppress(Exception):
                    await self._round()
        finally:
            self._running = False
            if self.watches:  # a follower arrived as the loop was leaving
                self._ensure_loop()

    async def _round(self) -> None:
        prefix = self.op._run_prefix()
        groups: dict[str, list[_Watch]] = {}
        for watch in list(self.watches.values()):
            key = prefix if prefix and watch.job.startswith(prefix) else f"{watch.job}/"
            groups.setdefault(key, []).append(watch)
        for group, watches in groups.items():
            try:
                streams = await self._streams(group)
            except Exception as exc:
                for watch in watches:
                    watch.failures += 1
                    if watch.failures >= 3 and not watch.warned:
                        watch.warned = True
                        watch.queue.put_nowait(f"[stepflow] cannot read the job's CloudWatch logs: {brief(exc)}")
                    self._count_final(watch)
                continue
            by_job: dict[str, list[dict[str, Any]]] = {}
            for stream in streams:
                by_job.setdefault(str(stream.get("logStreamName", "")).split("/", 1)[0], []).append(stream)
            limiter = anyio.Semaphore(8)
            async with anyio.create_task_group() as tg:
                for watch in watches:
                    tg.start_soon(self._read_job, watch, by_job.get(watch.job, []), limiter)

    async def _read_job(self, watch: _Watch, streams: list[dict[str, Any]], limiter: anyio.Semaphore) -> None:
        async with limiter:
            for stream in sorted(streams, key=lambda s: str(s.get("logStreamName"))):
                await self._read_stream(watch, stream)
        self._count_final(watch)

    def _count_final(self, watch: _Watch) -> None:
        if watch.final_rounds is None:
            return
        watch.final_rounds -= 1
        if watch.final_rounds <= 0:
            watch.queue.put_nowait(None)
            if self.watches.get(watch.job) is watch:
                del self.watches[watch.job]

    async def _streams(self, prefix: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        token = None
        while True:
            params: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamNamePrefix": prefix, "limit": 50}
            if token:
                params["nextToken"] = token
            try:
                page = await self.op.aws.call("logs", "describe_log_streams", attempts=2, **params)
            except Exception as exc:
                if error_code(exc) == "ResourceNotFoundException":
                    return []  # no job has logged yet: the group does not exist
                raise
            out += page.get("logStreams") or []
            token = page.get("nextToken")
            if not token:
                return out

    async def _read_stream(self, watch: _Watch, stream: Mapping[str, Any]) -> None:
        name = str(stream.get("logStreamName"))
        marker = (stream.get("lastIngestionTime"), stream.get("storedBytes"), stream.get("lastEventTimestamp"))
        now = time.monotonic()
        last_round = watch.final_rounds == 1  # the job ended: read once more whatever the listing says
        if not last_round and watch.seen.get(name) == marker and now - watch.fetched.get(name, 0.0) < self.STALE_S:
            return
        token = watch.tokens.get(name)
        try:
            for _ in range(self.MAX_PAGES):
                params: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamName": name, "startFromHead": True}
                if token:
                    params["nextToken"] = token
                page = await self.op.aws.call("logs", "get_log_events", attempts=3, **params)
                events = page.get("events") or []
                for event in events:
                    for line in str(event.get("message", "")).rstrip("\n").split("\n"):
                        watch.queue.put_nowait(line)
                new = page.get("nextForwardToken") or token
                token = new
                if not events or new == params.get("nextToken"):  # nothing more for now
                    break
        finally:
            if token:
                watch.tokens[name] = token
        watch.seen[name] = marker
        watch.fetched[name] = now
