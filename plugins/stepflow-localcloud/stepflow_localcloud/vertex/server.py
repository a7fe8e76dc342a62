"""The local Vertex AI control plane: a grpc.aio server speaking the real services' protocol.

``google.cloud.aiplatform.v1.JobService`` (custom jobs) and ``google.logging.v2.LoggingServiceV2``
(ListLogEntries) on one plaintext port, (de)serialized by the SDK's own proto-plus types, so the
real GAPIC clients talk to it unmodified over ``grpc.aio.insecure_channel`` /
``grpc.insecure_channel``. Optionally the same services also listen with TLS on a second port
(a self-signed certificate made at start-up), for the high-level ``google.cloud.aiplatform`` SDK,
which opens only secure channels. Errors are the service's gRPC status codes; field errors carry a
``google.rpc.BadRequest`` in the status details. Test hooks (counters, fault rates) are methods of
:class:`LocalVertex` and, for other processes, a small HTTP endpoint under ``/_fake/``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import grpc
from aiohttp import web
from google.cloud import aiplatform_v1
from google.cloud.logging_v2 import types as logging_types
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2, timestamp_pb2
from google.rpc import error_details_pb2

from .._background import BackgroundServer
from .._docker import docker_client
from .filters import Field, Fields, compile_filter
from .jobs import INSTANCE_LABEL, CustomJobRecord, DockerExecutor, State, new_instance_id
from .logs import LogStore
from .tls import self_signed
from .validation import ApiError, invalid, parse_job_name, parse_parent, validate_custom_job

log = logging.getLogger(__name__)

JOB_SERVICE = "google.cloud.aiplatform.v1.JobService"
LOGGING_SERVICE = "google.logging.v2.LoggingServiceV2"
DEFAULT_PROJECT = "local-project"
DEFAULT_LOCATION = "us-central1"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: Fields a CustomJob request may carry but the service sets itself.
OUTPUT_ONLY = ("name", "state", "create_time", "start_time", "end_time", "update_time", "error", "web_access_uris",
               "satisfies_pzs", "satisfies_pzi")
JOB_FIELDS = Fields(
    {
        "display_name": Field("string", lambda j: j.display_name),
        "state": Field("enum", lambda j: int(j.state), {name: int(value) for name, value in State.__members__.items()}),
        "create_time": Field("timestamp", lambda j: j.create_ns),
        "update_time": Field("timestamp", lambda j: j.update_ns),
        "start_time": Field("timestamp", lambda j: j.start_ns),
        "end_time": Field("timestamp", lambda j: j.end_ns),
    },
    maps={"labels": Field("map", lambda j: j.labels)},
)


class LocalVertex:
    """A Vertex AI custom-job service on this machine: jobs run as containers on Docker.

    Use ``async with LocalVertex(project="p") as vertex:`` then give the GAPIC clients a channel
    to ``vertex.endpoint``. ``unavailable_rate`` answers that fraction of all calls UNAVAILABLE
    and ``resource_exhausted_rate`` that fraction of CreateCustomJob calls RESOURCE_EXHAUSTED
    (a quota error), before anything is done: a faulted create creates nothing.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, project: str = DEFAULT_PROJECT,
                 location: str = DEFAULT_LOCATION, project_number: str | None = None, http_port: int | None = 0,
                 resource_exhausted_rate: float = 0.0, unavailable_rate: float = 0.0, seed: int | None = None,
                 network: str = "host", docker_url: str | None = None,
                 container_env: Mapping[str, str] | None = None, gcs_endpoint: str | None = None,
                 stop_grace: float = 2.0, phase_delay: float = 0.0, keep_containers: bool = False,
                 tls_port: int | None = None, certificate_file: str | os.PathLike[str] | None = None) -> None:
        """Configure the server; nothing starts before ``start()`` / ``async with``.

        ``project_number``, when given, is accepted in resource names as well as ``project``.
        ``http_port`` is the test hooks' HTTP port (0: a free one; None: no HTTP endpoint).
        ``container_env`` adds to every job container's environment; ``gcs_endpoint`` (the GCS
        emulator's URL) is given to them as ``STORAGE_EMULATOR_HOST``. ``stop_grace`` is the
        SIGTERM-to-SIGKILL time of a cancelled job; ``phase_delay`` holds QUEUED and PENDING that
        long each so pollers see them; ``keep_containers`` leaves ended jobs' containers behind.
        ``tls_port`` (0: a free one; None: none) also serves the services with TLS, under a
        self-signed certificate for ``localhost``, ``127.0.0.1`` and ``host`` that is written to
        ``certificate_file`` (default: a temporary file, removed on close).
        """
        for name, rate in (("resource_exhausted_rate", resource_exhausted_rate),
                           ("unavailable_rate", unavailable_rate)):
            _check_rate(name, rate)
        self.host, self.port, self.http_port = host, port, http_port
        self.project, self.location, self.project_number = project, location, project_number
        self.network, self.docker_url = network, docker_url
        self.stop_grace, self.phase_delay, self.keep_containers = stop_grace, phase_delay, keep_containers
        self.resource_exhausted_rate, self.unavailable_rate = float(resource_exhausted_rate), float(unavailable_rate)
        self._initial_faults = (self.resource_exhausted_rate, self.unavailable_rate, seed)
        self._rng = random.Random(seed)
        env = {"STORAGE_EMULATOR_HOST": gcs_endpoint} if gcs_endpoint else {}
        env.update(container_env or {})
        self.container_env = env
        self.jobs: dict[str, CustomJobRecord] = {}
        self.logs = LogStore()
        self.instance_id = new_instance_id()
        self._next_id = random.Random().randrange(10**18, 5 * 10**18)  # ids look like the service's: 19 digits
        self._seq = 0
        self._calls: Counter[str] = Counter()
        self._created: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self._resource_exhausted = self._unavailable = 0
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._stack = contextlib.AsyncExitStack()
        self._executor: DockerExecutor | None = None
        self.tls_port = tls_port
        self._certificate_file = os.fspath(certificate_file) if certificate_file is not None else None
        self._tls_dir: str | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def endpoint(self) -> str:
        """``host:port`` of the gRPC services (give it to ``grpc.aio.insecure_channel``)."""
        return f"{self.host}:{self.port}"

    @property
    def tls_endpoint(self) -> str | None:
        """``host:port`` of the TLS port (the high-level SDK's ``api_endpoint``), or None without one."""
        return None if self.tls_port is None else f"{self.host}:{self.tls_port}"

    @property
    def certificate_file(self) -> str | None:
        """The PEM file of the TLS port's certificate (for ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``), once started."""
        return self._certificate_file if self.tls_port is not None else None

    @property
    def http_url(self) -> str | None:
        """The test hooks' base URL (``/_fake/stats`` ...), or None without the HTTP endpoint."""
        return None if self.http_port is None else f"http://{self.host}:{self.http_port}"

    @property
    def parent(self) -> str:
        """``projects/P/locations/L``, the parent of this endpoint's jobs."""
        return f"projects/{self.project}/locations/{self.location}"

    async def __aenter__(self) -> LocalVertex:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect to Docker, then listen (gRPC, and HTTP for the test hooks)."""
        try:
            docker = await self._stack.enter_async_context(docker_client(self.docker_url))
            await docker.version()  # fail now, not at the first job, when there is no daemon
            self._executor = DockerExecutor(
                docker=docker, logs=self.logs, instance_id=self.instance_id, network=self.network,
                container_env=self.container_env, stop_grace=self.stop_grace, phase_delay=self.phase_delay,
                keep_containers=self.keep_containers)
            # No SO_REUSEPORT: a port another server holds must fail here, not be shared silently.
            server = self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            server.add_generic_rpc_handlers(self._handlers())
            try:
                bound = server.add_insecure_port(f"{self.host}:{self.port}")
            except RuntimeError as exc:
                raise OSError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
            if not bound:
                raise OSError(f"cannot listen on {self.host}:{self.port}")
            self.port = bound
            if self.tls_port is not None:
                self.tls_port = self._add_tls_port(server)
            await server.start()
            if self.http_port is not None:
                app = web.Application()
                app.router.add_get("/", self._hello)
                app.router.add_get("/_fake/stats", self._stats_route)
                app.router.add_post("/_fake/config", self._config_route)
                app.router.add_post("/_fake/reset", self._reset_route)
                self._http = web.AppRunner(app, access_log=None)
                await self._http.setup()
                await web.TCPSite(self._http, self.host, self.http_port).start()
                if self.http_port == 0:
                    self.http_port = int(self._http.addresses[0][1])
        except BaseException:
            await self.close()
            raise

    def _add_tls_port(self, server: grpc.aio.Server) -> int:
        """Listen with TLS under a fresh self-signed certificate, written where clients can trust it."""
        cert = self_signed((self.host,))
        if self._certificate_file is None:
            self._tls_dir = tempfile.mkdtemp(prefix="local-vertex-tls-")
            self._certificate_file = os.path.join(self._tls_dir, "certificate.pem")
        with open(self._certificate_file, "wb") as f:
            f.write(cert.cert_pem)
        credentials = grpc.ssl_server_credentials([(cert.key_pem, cert.cert_pem)])
        address = f"{self.host}:{self.tls_port}"
        try:
            bound = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from exc
        if not bound:
            raise OSError(f"cannot listen on {address}")
        return int(bound)

    async def close(self) -> None:
        """Cancel every job, remove every container this server started, stop listening."""
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
            self._grpc = None
        await self._stop_all()
        await self._stack.aclose()
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)
            self._tls_dir = None

    async def _stop_all(self) -> None:
        executor = self._executor
        if executor is None:
            return
        for job in self.jobs.values():
            executor.cancel(job)
        tasks = [job.task for job in self.jobs.values() if job.task is not None and not job.task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.stop_grace + 10)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=10)
        if self.keep_containers:
            return
        # Anything left behind (a task that died mid-way) still carries this instance's label.
        with contextlib.suppress(Exception):
            for container in await executor.docker.containers.list(
                    all=True, filters=json.dumps({"label": [f"{INSTANCE_LABEL}={self.instance_id}"]})):
                with contextlib.suppress(Exception):
                    await container.delete(force=True)

    # ---------------------------------------------------------------- test hooks
    def stats(self) -> dict[str, Any]:
        """Counters and the current fault config.

        ``calls``: requests per method (faulted ones included); ``created``: jobs created per
        display name; ``refused``: error answers per status code name (injected or not);
        ``resource_exhausted`` / ``unavailable``: injected faults; ``jobs`` / ``active``: jobs
        known / not ended; ``log_entries``: lines logged.
        """
        return {"calls": dict(self._calls), "created": dict(self._created), "refused": dict(self._refused),
                "resource_exhausted": self._resource_exhausted, "unavailable": self._unavailable,
                "resource_exhausted_rate": self.resource_exhausted_rate, "unavailable_rate": self.unavailable_rate,
                "jobs": len(self.jobs), "active": sum(not j.terminal for j in self.jobs.values()),
                "log_entries": len(self.logs), "endpoint": self.endpoint, "project": self.project,
                "location": self.location}

    def configure(self, *, resource_exhausted_rate: float | None = None, unavailable_rate: float | None = None,
                  seed: int | None = None) -> None:
        """Change the fault rates (and re-seed the RNG) while the server runs."""
        for name, value in (("resource_exhausted_rate", resource_exhausted_rate),
                            ("unavailable_rate", unavailable_rate)):
            if value is not None:
                _check_rate(name, value)
                setattr(self, name, float(value))
        if seed is not None:
            self._rng.seed(seed)

    async def reset(self, *, jobs: bool = False) -> None:
        """Zero the counters and restore the fault config given at construction.

        With ``jobs``, also cancel every job, remove its container and forget it (its log entries stay).
        """
        self._calls.clear()
        self._created.clear()
        self._refused.clear()
        self._resource_exhausted = self._unavailable = 0
        self.resource_exhausted_rate, self.unavailable_rate, seed = self._initial_faults
        self._rng.seed(seed)
        if jobs:
            await self._stop_all()
            self.jobs.clear()

    def _fault(self, method: str) -> ApiError | None:
        """An injected fault for this call, or None."""
        draw = self._rng.random()
        if draw < self.unavailable_rate:
            self._unavailable += 1
            return ApiError(grpc.StatusCode.UNAVAILABLE, "The service is currently unavailable.")
        if method == "CreateCustomJob" and draw < self.unavailable_rate + self.resource_exhausted_rate:
            self._resource_exhausted += 1
            consumer = f"project_number:{self.project_number or self.project}"
            metric = "aiplatform.googleapis.com/custom_job_create_requests"
            return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"Quota exceeded for quota metric 'Create custom job requests' and limit 'Create custom "
                            f"job requests per minute per region' of service 'aiplatform.googleapis.com' for "
                            f"consumer '{consumer}'.",
                            [error_details_pb2.ErrorInfo(reason="RATE_LIMIT_EXCEEDED", domain="googleapis.com",
                                                         metadata={"quota_metric": metric, "consumer": consumer,
                                                                   "service": "aiplatform.googleapis.com"})])
        return None

    # ---------------------------------------------------------------- HTTP test hooks
    async def _hello(self, request: web.Request) -> web.Response:
        return web.json_response({"service": "local Vertex AI (stepflow)", "endpoint": self.endpoint,
                                  "tls_endpoint": self.tls_endpoint,
                                  "project": self.project, "location": self.location})

    async def _stats_route(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _config_route(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            self.configure(resource_exhausted_rate=body.get("resource_exhausted_rate"),
                           unavailable_rate=body.get("unavailable_rate"), seed=body.get("seed"))
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.stats())

    async def _reset_route(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        await self.reset(jobs=bool(body.get("jobs")))
        return web.json_response(self.stats())

    # ---------------------------------------------------------------- gRPC plumbing
    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        v1, lt = aiplatform_v1, logging_types
        jobs: dict[str, tuple[Callable[[Any], Awaitable[Any]], Any, Callable[[Any], bytes]]] = {
            "CreateCustomJob": (self._create_custom_job, v1.CreateCustomJobRequest, v1.CustomJob.serialize),
            "GetCustomJob": (self._get_custom_job, v1.GetCustomJobRequest, v1.CustomJob.serialize),
            "ListCustomJobs": (self._list_custom_jobs, v1.ListCustomJobsRequest, v1.ListCustomJobsResponse.serialize),
            "CancelCustomJob": (self._cancel_custom_job, v1.CancelCustomJobRequest,
                                empty_pb2.Empty.SerializeToString),
            "DeleteCustomJob": (self._delete_custom_job, v1.DeleteCustomJobRequest,
                                operations_pb2.Operation.SerializeToString),
        }
        logging_methods: dict[str, tuple[Callable[[Any], Awaitable[Any]], Any, Callable[[Any], bytes]]] = {
            "ListLogEntries": (self._list_log_entries, lt.ListLogEntriesRequest, lt.ListLogEntriesResponse.serialize),
        }
        return [
            grpc.method_handlers_generic_handler(service, {
                name: grpc.unary_unary_rpc_method_handler(self._method(name, fn), request_type.deserialize, serialize)
                for name, (fn, request_type, serialize) in methods.items()})
            for service, methods in ((JOB_SERVICE, jobs), (LOGGING_SERVICE, logging_methods))
        ] + [_Unimplemented(self._calls, self._refused)]

    def _method(self, name: str, fn: Callable[[Any], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._calls[name] += 1
            error = self._fault(name)
            if error is None:
                try:
                    return await fn(request)
                except ApiError as exc:
                    error = exc
                except Exception:
                    log.exception("%s failed", name)
                    error = ApiError(grpc.StatusCode.INTERNAL, "Internal error encountered.")
            self._refused[error.code.name] += 1
            log.debug("%s: %s %s", name, error.code.name, error.message)
            await context.abort(error.code, error.message, trailing_metadata=error.trailing_metadata())

        return handle

    # ---------------------------------------------------------------- JobService
    @property
    def _project_ids(self) -> tuple[str, ...]:
        return (self.project,) if not self.project_number else (self.project, self.project_number)

    def _job(self, name: str) -> CustomJobRecord:
        job_id = parse_job_name(name, self._project_ids, self.location)
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f'The CustomJob "{name}" does not exist.')
        return job

    async def _create_custom_job(self, request: aiplatform_v1.CreateCustomJobRequest) -> aiplatform_v1.CustomJob:
        parse_parent(request.parent, self._project_ids, self.location)
        validate_custom_job(request.custom_job)
        assert self._executor is not None, "the server is not started"
        job = aiplatform_v1.CustomJob.deserialize(aiplatform_v1.CustomJob.serialize(request.custom_job))
        raw = aiplatform_v1.CustomJob.pb(job)
        for name in OUTPUT_ONLY:
            raw.ClearField(name)
        self._seq += 1
        job_id = str(self._next_id + self._seq)
        # Names use the project as the request spelled it (id or number).
        project = request.parent.split("/")[1]
        record = CustomJobRecord(
            job_id=job_id, name=f"projects/{project}/locations/{self.location}/customJobs/{job_id}",
            project=self.project, location=self.location, request=aiplatform_v1.CustomJob.serialize(job),
            display_name=job.display_name, labels=dict(job.labels), seq=self._seq)
        self.jobs[job_id] = record
        self._created[record.display_name] += 1
        self._executor.start(record)
        return record.to_proto()

    async def _get_custom_job(self, request: aiplatform_v1.GetCustomJobRequest) -> aiplatform_v1.CustomJob:
        return self._job(request.name).to_proto()

    async def _list_custom_jobs(self, request: aiplatform_v1.ListCustomJobsRequest
                                ) -> aiplatform_v1.ListCustomJobsResponse:
        parse_parent(request.parent, self._project_ids, self.location)
        if request.page_size < 0:
            raise invalid(f"Invalid page_size {request.page_size}: it must not be negative.")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        keep = compile_filter(request.filter, JOB_FIELDS)
        query = hashlib.sha256(json.dumps([request.parent, request.filter]).encode()).hexdigest()[:12]
        before = _decode_token(request.page_token, query) if request.page_token else None
        # Newest first; the token is the last job's sequence number, so pages stay right while jobs are created.
        found = [j for j in sorted(self.jobs.values(), key=lambda j: j.seq, reverse=True)
                 if (before is None or j.seq < before) and keep(j)]
        page = found[:size]
        token = _encode_token(page[-1].seq, query) if len(found) > size else ""
        return aiplatform_v1.ListCustomJobsResponse(custom_jobs=[j.to_proto() for j in page], next_page_token=token)

    async def _cancel_custom_job(self, request: aiplatform_v1.CancelCustomJobRequest) -> empty_pb2.Empty:
        job = self._job(request.name)
        if job.terminal:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f'Cannot cancel CustomJob "{request.name}": it has already ended in state '
                           f"{State(job.state).name}.")
        assert self._executor is not None
        self._executor.cancel(job)
        return empty_pb2.Empty()

    async def _delete_custom_job(self, request: aiplatform_v1.DeleteCustomJobRequest) -> operations_pb2.Operation:
        job = self._job(request.name)
        if not job.terminal:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f'CustomJob "{request.name}" is in state {State(job.state).name} and cannot be deleted: '
                           "cancel it and wait until it ends.")
        del self.jobs[job.job_id]
        now = timestamp_pb2.Timestamp()
        now.FromNanoseconds(time.time_ns())
        metadata = aiplatform_v1.DeleteOperationMetadata(
            generic_metadata=aiplatform_v1.GenericOperationMetadata(create_time=now, update_time=now))
        op = operations_pb2.Operation(name=f"{request.name}/operations/{self._next_id + self._seq + 1}", done=True)
        op.metadata.Pack(aiplatform_v1.DeleteOperationMetadata.pb(metadata))
        op.response.Pack(empty_pb2.Empty())
        return op

    # ---------------------------------------------------------------- LoggingServiceV2
    async def _list_log_entries(self, request: logging_types.ListLogEntriesRequest
                                ) -> logging_types.ListLogEntriesResponse:
        return self.logs.list_entries(request)


class _Unimplemented(grpc.GenericRpcHandler):
    """Every other method: counted, and answered UNIMPLEMENTED naming it."""

    def __init__(self, calls: Counter[str], refused: Counter[str]) -> None:
        self._calls, self._refused = calls, refused

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)  # type: ignore[attr-defined]

        async def unimplemented(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self._calls[method.rsplit("/", 1)[-1]] += 1
            self._refused[grpc.StatusCode.UNIMPLEMENTED.name] += 1
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"Method {method} is not implemented by the local Vertex AI control plane.")
            return b""  # not reached: abort raises

        return grpc.unary_unary_rpc_method_handler(unimplemented)


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")


def _encode_token(seq: int, query: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"before": seq, "query": query}).encode()).decode()


def _decode_token(token: str, query: str) -> int:
    try:
        data: Any = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("before"), int):
        raise invalid("Invalid page_token: pass next_page_token of a previous response unchanged.")
    if data.get("query") != query:
        raise invalid("Invalid page_token: it belongs to a request with another parent or filter.")
    return int(data["before"])


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    with contextlib.suppress(ValueError):
        body = json.loads(raw) if raw.strip() else {}
        if isinstance(body, dict):
            return body
    return {}


# -------------------------------------------------------------------- from synchronous code
class BackgroundLocalVertex(BackgroundServer[LocalVertex]):
    """A :class:`LocalVertex` running on its own event loop in a daemon thread.

    For synchronous code and session-scoped pytest fixtures; its methods are thread-safe.
    """

    server_class = LocalVertex
    label = "the local Vertex AI control plane"

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the gRPC services."""
        return self._started().endpoint

    @property
    def http_url(self) -> str | None:
        """The test hooks' base URL, or None."""
        return self._started().http_url

    @property
    def tls_endpoint(self) -> str | None:
        """``127.0.0.1:PORT`` of the TLS port, or None."""
        return self._started().tls_endpoint

    @property
    def certificate_file(self) -> str | None:
        """The TLS port's certificate (PEM), or None."""
        return self._started().certificate_file

    @property
    def project(self) -> str:
        """The project this endpoint serves."""
        return self._started().project

    @property
    def location(self) -> str:
        """The location (region) this endpoint serves."""
        return self._started().location

    @property
    def parent(self) -> str:
        """``projects/P/locations/L``."""
        return self._started().parent


@contextlib.contextmanager
def serve_in_thread(**options: Any) -> Iterator[BackgroundLocalVertex]:
    """A :class:`BackgroundLocalVertex` for a ``with`` block (options: see :class:`LocalVertex`)."""
    with BackgroundLocalVertex(**options) as backend:
        yield backend
