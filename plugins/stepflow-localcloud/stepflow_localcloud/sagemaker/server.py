"""The local SageMaker control plane: an aiohttp server speaking the real AWS JSON 1.1 protocol.

``POST /`` with ``X-Amz-Target: SageMaker.<Operation>`` and a JSON body, exactly what botocore
and aiobotocore send to ``endpoint_url``; answers are JSON with epoch-second timestamps, errors
HTTP 400 ``{"__type": ..., "message": ...}``. Test hooks live under ``/_fake/``. The jobs' role
credentials are served by a second listener on 127.0.0.1 (see :mod:`.credentials`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import json
import logging
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from aiohttp import web

from .._background import BackgroundServer
from .._docker import docker_client as _docker
from .credentials import TEST_KEY, TEST_SECRET, CredentialsEndpoint, RoleCredentials
from .cwlogs import LOG_GROUP
from .jobs import INSTANCE_LABEL, DockerExecutor, TrainingJob, new_instance_id
from .s3data import S3Data
from .validation import STATUSES, ApiError, validate_create, validate_name, validation_error

log = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
DEFAULT_ACCOUNT = "123456789012"  # moto's default account
SORT_KEYS: dict[str, Callable[[TrainingJob], Any]] = {
    "Name": lambda j: j.name, "CreationTime": lambda j: j.created, "Status": lambda j: j.status}


class LocalSageMaker:
    """A SageMaker training-job service on this machine: jobs run as containers on Docker.

    Use ``async with LocalSageMaker(logs_endpoint=moto_url) as sm:`` then point any AWS client
    at ``sm.url``. ``throttle_rate`` / ``error_rate`` answer that fraction of requests with a
    ThrottlingException (HTTP 400) / InternalFailure or ServiceUnavailable (HTTP 500/503) before
    anything is done, so a faulted CreateTrainingJob creates nothing and a retry is safe.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, logs_endpoint: str | None = None,
                 region: str = "us-east-1", account_id: str = DEFAULT_ACCOUNT, throttle_rate: float = 0.0,
                 error_rate: float = 0.0, seed: int | None = None, network: str = "host",
                 docker_url: str | None = None, aws_endpoint: str | None = None,
                 container_env: Mapping[str, str] | None = None, stop_grace: float = 2.0,
                 phase_delay: float = 0.0, role_credentials: RoleCredentials | None = None,
                 credentials_port: int = 0, s3_endpoint: str | None = None) -> None:
        """Configure the server; nothing starts before ``start()`` / ``async with``.

        ``aws_endpoint`` (default: ``logs_endpoint``) is what containers get as
        ``AWS_ENDPOINT_URL``; ``container_env`` adds to or overrides that environment. Containers
        get no keys in their environment: as on SageMaker, their SDKs fetch the job role's
        credentials from the container credentials endpoint, which serves ``role_credentials``
        (default: this process's ``AWS_*`` keys, else moto's test keys) on 127.0.0.1 at
        ``credentials_port`` (0: a free port). ``stop_grace`` is the SIGTERM-to-SIGKILL time of
        a stopped job; ``phase_delay`` holds Starting and Uploading that long so pollers can see them.
        ``s3_endpoint`` (default: ``aws_endpoint``, else ``logs_endpoint``) is the S3 the service
        moves the jobs' data through (input channels, checkpoints, model and output archives), with
        the role's credentials; without any endpoint jobs move no data.
        """
        self.host, self.port = host, port
        self.logs_endpoint = logs_endpoint
        self.region, self.account_id = region, account_id
        self.network, self.docker_url = network, docker_url
        self.stop_grace, self.phase_delay = stop_grace, phase_delay
        self.throttle_rate, self.error_rate = throttle_rate, error_rate
        self._initial_faults = (throttle_rate, error_rate, seed)
        self._rng = random.Random(seed)
        self.credentials = CredentialsEndpoint(role_credentials or RoleCredentials.from_environment(),
                                               port=credentials_port)
        endpoint = aws_endpoint or logs_endpoint
        self.s3_endpoint = s3_endpoint or endpoint
        # No keys: the SDKs find the role through the credentials endpoint. EC2 metadata is off so a
        # container whose SDK cannot use that endpoint fails at once instead of probing for an instance role.
        env = {"AWS_EC2_METADATA_DISABLED": "true"}
        if endpoint:
            env["AWS_ENDPOINT_URL"] = endpoint
        env.update(container_env or {})
        self.container_env = env
        self.jobs: dict[str, TrainingJob] = {}  # by lower-cased name: names are unique regardless of case
        self.instance_id = new_instance_id()
        self._seq = 0
        self._calls: Counter[str] = Counter()
        self._created: Counter[str] = Counter()
        self._throttled = self._errors = 0
        self._runner: web.AppRunner | None = None
        self._stack = contextlib.AsyncExitStack()
        self._executor: DockerExecutor | None = None
        self._logs: Any = None
        self._group_ready = False
        self._group_lock = asyncio.Lock()
        self._ops: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "CreateTrainingJob": self._create_training_job, "DescribeTrainingJob": self._describe_training_job,
            "StopTrainingJob": self._stop_training_job, "ListTrainingJobs": self._list_training_jobs,
            "AddTags": self._add_tags, "ListTags": self._list_tags,
        }

    # ---------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        """The endpoint URL to give AWS clients."""
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> LocalSageMaker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect to Docker (and the logs endpoint), then listen."""
        try:
            docker = await self._stack.enter_async_context(_docker(self.docker_url))
            await docker.version()  # fail now, not at the first job, when there is no daemon
            await self.credentials.start()
            self._stack.push_async_callback(self.credentials.close)  # after the jobs: close() stops them first
            if self.network != "host":
                log.warning("job containers on network %r cannot reach the credentials endpoint on %s: "
                            "their AWS SDKs will find no credentials", self.network, self.credentials.url)
            if self.logs_endpoint:
                self._logs = await self._stack.enter_async_context(
                    self._aws_client("logs", self.logs_endpoint, role=False))
            data = None
            if self.s3_endpoint:
                s3 = await self._stack.enter_async_context(self._aws_client("s3", self.s3_endpoint, role=True))
                data = S3Data(s3)
            self._executor = DockerExecutor(
                docker=docker, instance_id=self.instance_id, region=self.region, network=self.network,
                container_env=self.container_env, stop_grace=self.stop_grace, phase_delay=self.phase_delay,
                logs_client=self._logs, ensure_log_group=self._ensure_log_group, credentials=self.credentials,
                data=data)
            app = web.Application(client_max_size=16 * 1024 * 1024)
            app.router.add_post("/", self._handle)
            app.router.add_get("/", self._hello)
            app.router.add_get("/_fake/stats", self._stats_route)
            app.router.add_post("/_fake/config", self._config_route)
            app.router.add_post("/_fake/reset", self._reset_route)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            if self.port == 0:
                self.port = int(self._runner.addresses[0][1])
        except BaseException:
            await self.close()
            raise

    def _aws_client(self, service: str, endpoint: str, *, role: bool) -> Any:
        """An aiobotocore client: the service's own (test keys), or the jobs' role (``role``)."""
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        keys = self.credentials.credentials if role else RoleCredentials(TEST_KEY, TEST_SECRET)
        return get_session().create_client(
            service, endpoint_url=endpoint, region_name=self.region, aws_access_key_id=keys.access_key_id,
            aws_secret_access_key=keys.secret_access_key, aws_session_token=keys.session_token,
            config=AioConfig(max_pool_connections=64, retries={"max_attempts": 5, "mode": "standard"}))

    async def close(self) -> None:
        """Stop every job, remove every container this server started, stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._stop_all()
        await self._stack.aclose()

    async def _stop_all(self) -> None:
        executor = self._executor
        if executor is None:
            return
        for job in self.jobs.values():
            executor.stop(job)
        tasks = [job.task for job in self.jobs.values() if job.task is not None and not job.task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.stop_grace + 10)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=10)
        # Anything left behind (a task that died mid-way) still carries this instance's label.
        with contextlib.suppress(Exception):
            for container in await executor.docker.containers.list(
                    all=True, filters=json.dumps({"label": [f"{INSTANCE_LABEL}={self.instance_id}"]})):
                with contextlib.suppress(Exception):
                    await container.delete(force=True)

    # ---------------------------------------------------------------- test hooks
    def stats(self) -> dict[str, Any]:
        """Counters and the current fault config.

        ``calls``: requests per operation (faulted ones included); ``created``: successful
        creates per job name; ``throttled`` / ``errors``: injected faults; ``credentials``: open
        job URLs and requests served / refused by the credentials endpoint.
        """
        creds = self.credentials
        return {"calls": dict(self._calls), "created": dict(self._created), "throttled": self._throttled,
                "errors": self._errors, "throttle_rate": self.throttle_rate, "error_rate": self.error_rate,
                "jobs": len(self.jobs), "active": sum(not j.terminal for j in self.jobs.values()),
                "credentials": {"open": creds.active, "served": creds.served, "refused": creds.refused}}

    def configure(self, *, throttle_rate: float | None = None, error_rate: float | None = None,
                  seed: int | None = None) -> None:
        """Change the fault rates (and re-seed the RNG) while the server runs."""
        for name, value in (("throttle_rate", throttle_rate), ("error_rate", error_rate)):
            if value is not None:
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{name} must be between 0 and 1, got {value}")
                setattr(self, name, float(value))
        if seed is not None:
            self._rng.seed(seed)

    async def reset(self, *, jobs: bool = False) -> None:
        """Zero the counters and restore the fault config given at construction.

        With ``jobs``, also stop every job, remove its container and forget it.
        """
        self._calls.clear()
        self._created.clear()
        self._throttled = self._errors = 0
        self.throttle_rate, self.error_rate, seed = self._initial_faults
        self._rng.seed(seed)
        if jobs:
            await self._stop_all()
            self.jobs.clear()

    # ---------------------------------------------------------------- HTTP
    async def _handle(self, request: web.Request) -> web.Response:
        request_id = str(uuid.uuid4())
        service, _, op = request.headers.get("X-Amz-Target", "").partition(".")
        handler = self._ops.get(op) if service == "SageMaker" else None
        if handler is None:
            return _error(ApiError("UnknownOperationException", f"Unknown operation {op or '(none)'}"), request_id)
        self._calls[op] += 1
        fault = self._fault()
        if fault is not None:
            return _error(fault, request_id)
        try:
            raw = await request.read()
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("the body is not a JSON object")
        except ValueError as exc:
            return _error(ApiError("SerializationException", f"Cannot parse the request body: {exc}"), request_id)
        try:
            result = await handler(body)
        except ApiError as exc:
            return _error(exc, request_id)
        return web.Response(body=json.dumps(result).encode(), content_type=JSON_CONTENT_TYPE,
                            headers={"x-amzn-RequestId": request_id})

    def _fault(self) -> ApiError | None:
        """An injected fault for this request, or None."""
        draw = self._rng.random()
        if draw < self.throttle_rate:
            self._throttled += 1
            return ApiError("ThrottlingException", "Rate exceeded")
        if draw < self.throttle_rate + self.error_rate:
            self._errors += 1
            if self._rng.random() < 0.5:
                return ApiError("InternalFailure", "We encountered an internal error. Please try again.", 500)
            return ApiError("ServiceUnavailable", "Service is unavailable. Please try again.", 503)
        return None

    async def _hello(self, request: web.Request) -> web.Response:
        return web.json_response({"service": "local SageMaker (stepflow)", "url": self.url})

    async def _stats_route(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _config_route(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            self.configure(throttle_rate=body.get("throttle_rate"), error_rate=body.get("error_rate"),
                           seed=body.get("seed"))
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.stats())

    async def _reset_route(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        await self.reset(jobs=bool(body.get("jobs")))
        return web.json_response(self.stats())

    # ---------------------------------------------------------------- operations
    def _arn(self, name: str) -> str:
        # The service lower-cases resource names in its ARNs.
        return f"arn:aws:sagemaker:{self.region}:{self.account_id}:training-job/{name.lower()}"

    def _job(self, name: Any) -> TrainingJob:
        job = self.jobs.get(validate_name(name).lower())
        if job is None:  # what the real service answers (not ResourceNotFound, despite its model)
            raise validation_error("Requested resource not found.")
        return job

    async def _create_training_job(self, body: dict[str, Any]) -> dict[str, Any]:
        validate_create(body)
        name = body["TrainingJobName"]
        existing = self.jobs.get(name.lower())
        if existing is not None:
            raise ApiError("ResourceInUse", "Training job names must be unique within an AWS account and region, "
                                            f"and a training job with this name already exists ({existing.arn})")
        assert self._executor is not None, "the server is not started"
        self._seq += 1
        job = TrainingJob(name=name, arn=self._arn(name), request=body, seq=self._seq)
        self.jobs[name.lower()] = job
        self._created[name] += 1
        self._executor.start(job)
        return {"TrainingJobArn": job.arn}

    async def _describe_training_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._job(body.get("TrainingJobName")).describe()

    async def _stop_training_job(self, body: dict[str, Any]) -> dict[str, Any]:
        job = self._job(body.get("TrainingJobName"))
        if job.terminal:
            raise validation_error(f"The request was rejected because the training job is in status {job.status}.")
        assert self._executor is not None
        self._executor.stop(job)
        return {}

    async def _list_training_jobs(self, body: dict[str, Any]) -> dict[str, Any]:
        max_results = body.get("MaxResults", 10)
        sort_by, order = body.get("SortBy", "CreationTime"), body.get("SortOrder", "Descending")
        status = body.get("StatusEquals")
        if not isinstance(max_results, int) or not 1 <= max_results <= 100:
            raise validation_error(f"1 validation error detected: Value '{max_results}' at 'maxResults' failed to "
                                   "satisfy constraint: Member must have value between 1 and 100")
        if sort_by not in SORT_KEYS or order not in ("Ascending", "Descending") or \
                (status is not None and status not in STATUSES):
            raise validation_error(f"Invalid SortBy ({sort_by}), SortOrder ({order}) or StatusEquals ({status})")
        contains = str(body.get("NameContains") or "").lower()
        bounds = {key: _epoch(body.get(key), key) for key in (
            "CreationTimeAfter", "CreationTimeBefore", "LastModifiedTimeAfter", "LastModifiedTimeBefore")}

        def keep(job: TrainingJob) -> bool:
            after, before = bounds["CreationTimeAfter"], bounds["CreationTimeBefore"]
            m_after, m_before = bounds["LastModifiedTimeAfter"], bounds["LastModifiedTimeBefore"]
            return (contains in job.name.lower() and (status is None or job.status == status)
                    and (after is None or job.created > after) and (before is None or job.created < before)
                    and (m_after is None or job.modified > m_after)
                    and (m_before is None or job.modified < m_before))

        def key(job: TrainingJob) -> list[Any]:
            return [SORT_KEYS[sort_by](job), job.seq]

        descending = order == "Descending"
        jobs = sorted((j for j in self.jobs.values() if keep(j)), key=key, reverse=descending)
        if body.get("NextToken"):
            # The token is the sort key of the last job returned: pages stay right while jobs are created.
            last = _decode_token(body["NextToken"])
            jobs = [j for j in jobs if (key(j) < last if descending else key(j) > last)]
        page = jobs[:max_results]
        out: dict[str, Any] = {"TrainingJobSummaries": [j.summary() for j in page]}
        if len(jobs) > max_results:
            out["NextToken"] = base64.urlsafe_b64encode(json.dumps(key(page[-1])).encode()).decode()
        return out

    def _by_arn(self, arn: Any) -> TrainingJob:
        for job in self.jobs.values():
            if job.arn == arn:
                return job
        raise validation_error("Requested resource not found.")

    async def _add_tags(self, body: dict[str, Any]) -> dict[str, Any]:
        job = self._by_arn(body.get("ResourceArn"))
        new = {t["Key"]: t["Value"] for t in body.get("Tags") or []}
        job.tags = [t for t in job.tags if t["Key"] not in new] + [{"Key": k, "Value": v} for k, v in new.items()]
        if len(job.tags) > 50:
            raise validation_error("Resource can have at most 50 tags")
        return {"Tags": [{"Key": k, "Value": v} for k, v in new.items()]}

    async def _list_tags(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"Tags": list(self._by_arn(body.get("ResourceArn")).tags)}

    async def _ensure_log_group(self, force: bool) -> None:
        """Create the training jobs' log group once (again with ``force``: moto may be reset)."""
        async with self._group_lock:
            if self._group_ready and not force:
                return
            with contextlib.suppress(self._logs.exceptions.ResourceAlreadyExistsException):
                await self._logs.create_log_group(logGroupName=LOG_GROUP)
            self._group_ready = True


def _error(exc: ApiError, request_id: str) -> web.Response:
    body = json.dumps({"__type": exc.code, "message": exc.message}).encode()
    return web.Response(body=body, status=exc.status, content_type=JSON_CONTENT_TYPE,
                        headers={"x-amzn-RequestId": request_id, "x-amzn-ErrorType": f"{exc.code}:"})


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    with contextlib.suppress(ValueError):
        body = json.loads(raw) if raw.strip() else {}
        if isinstance(body, dict):
            return body
    return {}


def _epoch(value: Any, field: str) -> float | None:
    """A timestamp as the JSON protocol sends it (epoch seconds), or ISO 8601."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        parsed = dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise validation_error(f"Invalid timestamp for {field}: {value!r}") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()


def _decode_token(token: Any) -> list[Any]:
    try:
        last = json.loads(base64.urlsafe_b64decode(str(token).encode()))
    except (ValueError, binascii.Error):
        last = None
    if not isinstance(last, list) or len(last) != 2:
        raise validation_error("Invalid pagination token")
    return last


# -------------------------------------------------------------------- from synchronous code
class BackgroundLocalSageMaker(BackgroundServer[LocalSageMaker]):
    """A :class:`LocalSageMaker` running on its own event loop in a daemon thread.

    For synchronous code and session-scoped pytest fixtures; its methods are thread-safe.
    """

    server_class = LocalSageMaker
    label = "the local SageMaker backend"

    @property
    def url(self) -> str:
        """The endpoint URL to give AWS clients."""
        assert self.backend is not None
        return self.backend.url


@contextlib.contextmanager
def serve_in_thread(**options: Any) -> Iterator[BackgroundLocalSageMaker]:
    """A :class:`BackgroundLocalSageMaker` for a ``with`` block (options: see LocalSageMaker)."""
    with BackgroundLocalSageMaker(**options) as backend:
        yield backend
