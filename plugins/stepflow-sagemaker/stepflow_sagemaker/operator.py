"""The ``sagemaker`` step operator: each step attempt runs as an AWS SageMaker training job.

A :class:`~stepflow.remote.JobBackend`: stepflow's operator carries the rest of the path (image,
payload, names, retries, the status and log loops, output). Here:

- **prepare** (once per run): credentials, region of the ECR registry, the role's ARN, the bucket;
- **submit**: CreateTrainingJob with ``python3 -m stepflow.entrypoint`` as the container's
  entrypoint; ``ResourceInUse`` means this attempt's job exists already (an earlier try whose
  answer was lost, or a runner that died): it is re-attached, never created twice;
- **poll**: one ListTrainingJobs round per run prefix; DescribeTrainingJob only for a job whose
  summary changed and lacks what is needed (a failure reason, a secondary status);
- **read_logs**: DescribeLogStreams once per run prefix, GetLogEvents for streams that grew;
- **cancel**: StopTrainingJob. A job SageMaker stopped at ``max_runtime_s`` is a failure.

Jobs reach the artifact store with the job's IAM role: no key goes into a job's environment.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import anyio

from stepflow.errors import BackendError, ConfigError, StepflowError
from stepflow.remote import Job, JobBackend, JobState, Limits, LogBatch, Resources, RunResources
from stepflow_sagemaker.aws import Aws, brief, error_code, error_message, http_status
from stepflow_sagemaker.config import SageMakerOperatorConfig, ecr_region, job_options
from stepflow_sagemaker.flavors import region_mismatch

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
#: Calls of the once-per-run checks that must not fail on a throttle.
CHECK_ATTEMPTS = 6
#: Secondary statuses of a Stopped job that mean SageMaker's own limit stopped it.
LIMIT_STOPS = {"MaxRuntimeExceeded": "max_runtime_s", "MaxWaitTimeExceeded": "max_wait_s"}
RUNNING = frozenset({"InProgress", "Stopping"})
#: Job names sharing this many leading characters are listed in one round ("sf-" + a run id).
GROUP = 24
#: FilterLogEvents pages per round (the rest follows next round), and the window re-read each round.
LOG_PAGES = 20
LOG_OVERLAP_MS = 5000


def _not_found(exc: BaseException) -> bool:
    """SageMaker answers ResourceNotFound, or ValidationException "... not found", for a missing job."""
    code = error_code(exc)
    if code in ("ResourceNotFound", "ResourceNotFoundException"):
        return True
    text = error_message(exc).lower()
    return code == "ValidationException" and any(w in text for w in ("not found", "could not find", "does not exist"))


def _groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Names by the longest prefix they share with their run's other jobs (one listing each)."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for name in names:
        grouped[name[:GROUP]].append(name)
    return {_shared_start(group): group for group in grouped.values()}


def _shared_start(names: Sequence[str]) -> str:
    """The longest string every name starts with (comparing the smallest and largest is enough)."""
    first, last = min(names), max(names)
    size = next((i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), min(len(first), len(last)))
    return first[:size]


class SageMakerBackend(JobBackend):
    """SageMaker training jobs (see the module docstring)."""

    flavor: ClassVar[str] = "sagemaker"
    limits: ClassVar[Limits] = Limits(name_length=63, name_charset="a-zA-Z0-9-", env_entries=100,
                                      env_value_length=512, command_items=100, command_item_length=256,
                                      label_length=128, label_charset=r"\w\s.:/=+@-")
    poll_interval: ClassVar[float] = 0.5
    max_poll_interval: ClassVar[float] = 5.0
    log_interval: ClassVar[float] = 1.0
    failure_file: ClassVar[str | None] = "/opt/ml/output/failure"  # DescribeTrainingJob's FailureReason

    def __init__(self, name: str, config: SageMakerOperatorConfig) -> None:
        super().__init__(name, config)
        self.what = f"step-operator '{name}' (sagemaker)"
        self.aws = Aws(region=config.region, profile=config.profile, what=self.what)
        self._role_arn: str | None = None
        self._bucket: str | None = None
        self._known: dict[str, tuple[tuple[Any, ...], JobState]] = {}

    def is_transient(self, exc: BaseException) -> bool:
        """Throttling, 5xx and dropped connections."""
        from stepflow_sagemaker.aws import is_transient

        return is_transient(exc)

    def _error(self, exc: BaseException, doing: str) -> StepflowError:
        return self.aws.translate(exc, doing, self.config.endpoint_url)

    async def _call(self, method: str, attempts: int = 1, **params: Any) -> dict[str, Any]:
        return await self.aws.call("sagemaker", method, endpoint_url=self.config.endpoint_url, attempts=attempts,
                                   **params)

    # ---------------------------------------------------------------- once per run
    def check(self, options: Any, resources: Resources | None) -> list[str]:
        """The instance type and limits of one step (its settings and resources) can work."""
        try:
            job_options(self.config, options, resources)
        except ConfigError as exc:
            return [str(exc)]
        return []

    async def prepare(self, resources: RunResources) -> None:
        """Credentials, the ECR registry's region, the role's ARN and the output bucket."""
        region = self.aws.region
        await self.aws.credentials()
        registry = resources.container_registry
        named = getattr(registry, "region", None) if getattr(registry, "flavor", "") == "ecr" else \
            ecr_region(registry.uri) if registry is not None else None
        if named and named != region:
            raise ConfigError(region_mismatch(self.name, region, getattr(registry, "name", "?"), named))
        try:
            me = await self.aws.call("sts", "get_caller_identity", attempts=CHECK_ATTEMPTS)
        except Exception as exc:
            raise self.aws.translate(exc, "checking the AWS credentials (STS GetCallerIdentity)") from exc
        role = self.config.role
        partition = str(me.get("Arn", "arn:aws:")).split(":")[1] or "aws"
        self._role_arn = role if role.startswith("arn:") else \
            f"arn:{partition}:iam::{me.get('Account')}:role/{role.strip('/')}"
        store = resources.artifact_store
        root = str(getattr(store, "root", ""))
        bucket, why = self.config.bucket_name, "--bucket_name: SageMaker writes the job output there"
        if not bucket and root.startswith("s3://"):
            bucket = root.removeprefix("s3://").split("/", 1)[0]
            why = f"artifact store '{getattr(store, 'name', '?')}' ({root}), also SageMaker's job output"
        if not bucket:
            raise ConfigError(f"{self.what}: SageMaker writes job output to S3: set --bucket_name (the artifact "
                              f"store '{getattr(store, 'name', '?')}' at {root} is not an S3 bucket)")
        self._bucket = bucket
        public, _ = store.job_storage_options() if store is not None else ({}, {})
        try:
            await self.aws.call("s3", "head_bucket", endpoint_url=public.get("endpoint_url"),
                                attempts=CHECK_ATTEMPTS, Bucket=bucket)
        except Exception as exc:
            status, code = http_status(exc), error_code(exc)
            if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
                raise BackendError(f"{self.what}: S3 bucket '{bucket}' does not exist ({why}): create it in "
                                   f"{region} or point stepflow at an existing one") from None
            if status == 403 or code in ("403", "AccessDenied", "Forbidden"):
                raise BackendError(f"{self.what}: access denied to S3 bucket '{bucket}' ({why}): the credentials "
                                   "in use (and the job role) need s3:ListBucket, s3:GetObject and s3:PutObject "
                                   "on it") from None
            raise self.aws.translate(exc, f"checking S3 bucket '{bucket}'", public.get("endpoint_url")) from exc

    # ---------------------------------------------------------------- submit
    def _request(self, job: Job) -> dict[str, Any]:
        opts = job_options(self.config, job.options, job.resources)
        prefix = self.config.experiment_name or "stepflow"
        tags = {**opts.tags, **job.labels}
        if self.config.experiment_name:
            tags["stepflow.experiment"] = self.config.experiment_name
        resource: dict[str, Any] = {"InstanceType": opts.instance_type, "InstanceCount": opts.instance_count,
                                    "VolumeSizeInGB": opts.volume_size_gb}
        if opts.keep_alive_s:
            resource["KeepAlivePeriodInSeconds"] = opts.keep_alive_s
        stopping: dict[str, Any] = {"MaxRuntimeInSeconds": opts.max_runtime_s}
        command = list(job.command)
        request: dict[str, Any] = {
            "TrainingJobName": job.name,
            "RoleArn": self._role_arn or self.config.role,
            "AlgorithmSpecification": {"TrainingImage": job.image, "TrainingInputMode": "File",
                                       "ContainerEntrypoint": command[:1], "ContainerArguments": command[1:]},
            "OutputDataConfig": {"S3OutputPath": f"s3://{self._bucket}/{prefix}/{job.run_id}/"},
            "ResourceConfig": resource,
            "StoppingCondition": stopping,
            "Environment": dict(job.env),
            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
        }
        if opts.use_spot:
            request["EnableManagedSpotTraining"] = True
            stopping["MaxWaitTimeInSeconds"] = opts.max_wait_s
        if self.config.subnets:
            request["VpcConfig"] = {"Subnets": list(self.config.subnets),
                                    "SecurityGroupIds": list(self.config.security_group_ids)}
        return request

    async def submit(self, job: Job) -> str:
        """CreateTrainingJob; a job already created under this name is this attempt's, re-attached."""
        try:
            await self._call("create_training_job", **self._request(job))
        except Exception as exc:
            code = error_code(exc)
            if code == "ResourceInUse" or (code == "ValidationException" and "already exists" in error_message(exc)):
                return job.name
            if code == "ValidationException":
                text = error_message(exc)
                hint = (" (check --role: the IAM role ARN SageMaker assumes, trusted by sagemaker.amazonaws.com)"
                        if "role" in text.lower() else
                        " (check instance_type, e.g. ml.m5.large)" if "instance" in text.lower() else "")
                raise BackendError(f"{self.what}: SageMaker refused training job {job.name}: {text}{hint}") from None
            if code == "ResourceLimitExceeded":
                from stepflow.errors import CapacityError

                raise CapacityError(f"{self.what}: CreateTrainingJob {job.name}: {brief(exc)}; ask for a quota "
                                    "increase or lower max_concurrency") from None
            raise self._error(exc, f"CreateTrainingJob {job.name}") from exc
        return job.name

    async def find(self, name: str) -> str | None:
        """The job named ``name`` if SageMaker has it."""
        return name if await self._describe(name) is not None else None

    async def _describe(self, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("describe_training_job", TrainingJobName=name)
        except Exception as exc:
            if _not_found(exc):
                return None
            raise self._error(exc, f"DescribeTrainingJob {name}") from exc

    # ---------------------------------------------------------------- status
    def _state(self, job: Mapping[str, Any]) -> JobState:
        status = str(job.get("TrainingJobStatus") or "Unknown")
        secondary = str(job.get("SecondaryStatus") or "")
        if status == "Completed":
            return JobState(status, "succeeded", secondary)
        if status == "Failed":
            return JobState(status, "failed", str(job.get("FailureReason") or secondary or "failed"))
        if status == "Stopped":
            if secondary in LIMIT_STOPS:
                option = LIMIT_STOPS[secondary]
                return JobState(status, "failed", f"{secondary}: SageMaker stopped the job when it reached its "
                                                  f"{option} limit; raise {option}")
            return JobState(status, "stopped", "StopTrainingJob")
        if status in RUNNING:
            return JobState(status, "running", secondary)
        if status == "Deleting":
            return JobState(status, "stopped", "the training job is being deleted")
        return JobState(status, "pending", secondary)

    async def _list(self, prefix: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        params: dict[str, Any] = {"NameContains": prefix, "MaxResults": 100}
        while True:
            try:
                page = await self._call("list_training_jobs", **params)
            except Exception as exc:
                raise self._error(exc, "ListTrainingJobs") from exc
            for summary in page.get("TrainingJobSummaries") or ():
                name = str(summary.get("TrainingJobName", ""))
                if name.startswith(prefix):
                    out[name] = summary
            if not page.get("NextToken"):
                return out
            params["NextToken"] = page["NextToken"]

    async def poll(self, job_ids: Sequence[str]) -> Mapping[str, JobState]:
        """One ListTrainingJobs round per run prefix; Describe only changed jobs that need it."""
        out: dict[str, JobState] = {}
        describe: list[tuple[str, tuple[Any, ...] | None]] = []
        for prefix, names in _groups(job_ids).items():
            summaries = await self._list(prefix)  # TransientBackendError: the round is retried
            for name in names:
                summary = summaries.get(name)
                if summary is None:  # not listed yet (eventual consistency): ask for it directly
                    describe.append((name, None))
                    continue
                key = (summary.get("TrainingJobStatus"), summary.get("SecondaryStatus"),
                       str(summary.get("LastModifiedTime")))
                known = self._known.get(name)
                if known is not None and known[0] == key:
                    out[name] = known[1]
                elif summary.get("TrainingJobStatus") == "Failed" or "SecondaryStatus" not in summary:
                    describe.append((name, key))  # FailureReason / SecondaryStatus are only in the description
                else:
                    out[name] = self._remember(name, key, self._state(summary))
        limiter = anyio.Semaphore(8)

        async def one(name: str, key: tuple[Any, ...] | None) -> None:
            async with limiter:
                try:
                    found = await self._describe(name)
                except StepflowError:
                    return  # asked again next round
            out[name] = self._remember(name, key, self._state(found)) if found is not None else \
                JobState("NotFound", "failed", f"training job {name} does not exist on SageMaker")

        async with anyio.create_task_group() as tg:
            for name, key in describe:
                tg.start_soon(one, name, key)
        return out

    def _remember(self, name: str, key: tuple[Any, ...] | None, state: JobState) -> JobState:
        if state.terminal:
            self._known.pop(name, None)
        elif key is not None:
            self._known[name] = (key, state)
        return state

    # ---------------------------------------------------------------- logs, cancel
    async def read_logs(self, cursors: Mapping[str, Any]) -> Mapping[str, LogBatch]:
        """CloudWatch lines of each job since its cursor: one FilterLogEvents round per run prefix.

        A cursor is the newest event time read and the ids of events read in the last
        ``LOG_OVERLAP_MS`` before it: each round re-reads that window (CloudWatch may publish a
        slightly older event late) and skips what it already delivered.
        """
        out: dict[str, LogBatch] = {}
        for prefix, names in _groups(list(cursors)).items():
            state = {n: dict(cursors[n] or {"ts": 0, "ids": []}) for n in names}
            lines: dict[str, list[str]] = {n: [] for n in names}
            params: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamNamePrefix": prefix, "interleaved": True,
                                      "startTime": max(0, min(c["ts"] for c in state.values()) - LOG_OVERLAP_MS)}
            for _ in range(LOG_PAGES):
                try:
                    page = await self.aws.call("logs", "filter_log_events", **params)
                except Exception as exc:
                    if error_code(exc) == "ResourceNotFoundException":
                        break  # no job has logged yet: the group does not exist
                    raise self._error(exc, "FilterLogEvents") from exc
                for event in page.get("events") or ():
                    name = str(event.get("logStreamName", "")).split("/")[0]
                    cursor, ts, event_id = state.get(name), int(event.get("timestamp") or 0), event.get("eventId")
                    if cursor is None or ts < cursor["ts"] - LOG_OVERLAP_MS or event_id in cursor["ids"]:
                        continue
                    lines[name].extend(str(event.get("message", "")).rstrip("\n").split("\n"))
                    cursor["ids"].append(event_id)
                    cursor["ts"] = max(cursor["ts"], ts)
                if not page.get("nextToken"):
                    break
                params["nextToken"] = page["nextToken"]
            for name in names:
                c = state[name]
                c["ids"] = c["ids"][-500:]  # bounded: the overlap window holds far fewer
                out[name] = LogBatch(lines[name], c)
        return out

    async def cancel(self, job_id: str) -> None:
        """StopTrainingJob; a job already ended (or stopping, or gone) is left alone."""
        try:
            await self._call("stop_training_job", TrainingJobName=job_id)
        except Exception as exc:
            if error_code(exc) == "ValidationException" or _not_found(exc):
                return
            raise self._error(exc, f"StopTrainingJob {job_id}") from exc

    async def cleanup(self, job_id: str, state: JobState | None) -> None:
        """Forget the job (SageMaker keeps finished jobs; nothing to delete)."""
        self._known.pop(job_id, None)

    async def aclose(self) -> None:
        """Close the AWS clients."""
        await self.aws.aclose()

