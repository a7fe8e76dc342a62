"""The local Azure ML control plane: an aiohttp server over TLS speaking the REST calls of ``MLClient``.

Routes and answers are listed in the package docstring (:mod:`stepflow_localcloud.azureml`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import ssl
import tempfile
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

from aiohttp import web

from .._background import BackgroundServer
from .._docker import docker_client
from ..vertex.tls import self_signed
from .jobs import INSTANCE_LABEL, LOG_NAME, DockerRunner, Job, now
from .validation import AzureError, immutable_changes, resource_not_found, user_error, validate_job

log = logging.getLogger(__name__)

PROVIDER = "Microsoft.MachineLearningServices"
DEFAULT_SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
_WS = rf"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/{PROVIDER}/workspaces/(?P<ws>[^/]+)"
#: (method, path pattern, operation) of every API call; paths match without regard to case, as ARM's do.
ROUTES: list[tuple[str, re.Pattern[str], str]] = [(m, re.compile(p, re.IGNORECASE), op) for m, p, op in (
    ("GET", rf"{_WS}", "GetWorkspace"),
    ("GET", rf"{_WS}/computes", "ListComputes"),
    ("GET", rf"{_WS}/computes/(?P<name>[^/]+)", "GetCompute"),
    ("PUT", rf"{_WS}/environments/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", "CreateOrUpdateEnvironmentVersion"),
    ("GET", rf"{_WS}/environments/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", "GetEnvironmentVersion"),
    ("GET", rf"{_WS}/jobs", "ListJobs"),
    ("PUT", rf"{_WS}/jobs/(?P<name>[^/]+)", "CreateOrUpdateJob"),
    ("GET", rf"{_WS}/jobs/(?P<name>[^/]+)", "GetJob"),
    ("POST", rf"{_WS}/jobs/(?P<name>[^/]+)/cancel", "CancelJob"),
    ("GET", rf"/subscriptions/(?P<sub>[^/]+)/providers/{PROVIDER}/locations/(?P<loc>[^/]+)"
            r"/mfeOperationResults/(?P<op>[^/]+)", "GetOperationResult"),
    ("GET", rf"/history/v1\.0{_WS}/runs/(?P<name>[^/]+)/details", "GetRunDetails"),
    ("GET", r"/discovery", "GetDiscovery"),
)]
#: Data-plane operations (run history, discovery): api-version is not required there.
NO_API_VERSION = frozenset({"GetRunDetails", "GetDiscovery"})
DISCOVERY_KEYS = ("api", "catalog", "experimentation", "gallery", "history", "hyperdrive", "labeling",
                  "modelmanagement", "pipelines", "studiometadata")
ENVIRONMENT_ID = re.compile(rf"{_WS}/environments/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", re.IGNORECASE)


class LocalAzureML:
    """An Azure ML workspace on this machine: command jobs run as containers on Docker, over HTTPS.

    ``async with LocalAzureML(computes=("cpu-cluster",)) as aml:`` then build an ``MLClient``
    with ``cloud=aml.cloud_name``, ``cloud_metadata=aml.cloud_metadata`` and
    ``connection_verify=aml.certificate_file``. ``throttle_rate`` / ``error_rate`` answer that
    fraction of API calls HTTP 429 (with Retry-After) / 503 before anything is done, so a faulted
    create creates nothing.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, subscription_id: str = DEFAULT_SUBSCRIPTION,
                 resource_group: str = "stepflow-rg", workspace_name: str = "stepflow-ws",
                 computes: Iterable[str] = ("cpu-cluster",), container_env: Mapping[str, str] | None = None,
                 throttle_rate: float = 0.0, error_rate: float = 0.0, seed: int | None = None,
                 network: str = "host", docker_url: str | None = None, stop_grace: float = 2.0,
                 phase_delay: float = 0.0, location: str = "eastus", retry_after: int = 1,
                 list_page_size: int = 50) -> None:
        """Configure the server; nothing starts before ``start()`` / ``async with``.

        ``computes`` names the workspace's compute clusters (jobs may also go serverless);
        ``container_env`` is added to every job container's environment, standing in for what the
        compute's managed identity would give it (e.g. a storage connection string).
        ``stop_grace`` is the SIGTERM-to-SIGKILL time of a cancelled job; ``phase_delay`` holds
        Starting, Preparing, Queued and Finalizing that long so pollers see them.
        ``retry_after`` is the Retry-After (seconds) of throttled answers and of the cancel operation;
        ``list_page_size`` the number of jobs per page of the job list (further pages through ``nextLink``).
        """
        self.host, self.port = host, port
        self.subscription_id, self.resource_group, self.workspace_name = subscription_id, resource_group, workspace_name
        self.location = location
        self.computes = {name: self._compute(name) for name in computes}
        self.container_env = dict(container_env or {})
        self.network, self.docker_url = network, docker_url
        self.stop_grace, self.phase_delay, self.retry_after = stop_grace, phase_delay, retry_after
        self.list_page_size = list_page_size
        self.throttle_rate, self.error_rate = throttle_rate, error_rate
        self._check_rates(throttle_rate, error_rate)
        self._initial_faults = (throttle_rate, error_rate, seed)
        self._rng = random.Random(seed)
        self.instance_id = uuid.uuid4().hex[:12]
        self.workspace_id = str(uuid.UUID(int=random.Random(f"{subscription_id}/{workspace_name}").getrandbits(128)))
        self.jobs: dict[str, Job] = {}
        self.environments: dict[tuple[str, str], dict[str, Any]] = {}
        self._operations: dict[str, str] = {}  # cancel operation id -> job name
        self._seq = 0
        self._calls: Counter[str] = Counter()
        self._created: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self._throttled = self._errors = 0
        self._runner: web.AppRunner | None = None
        self._stack = contextlib.AsyncExitStack()
        self._jobs_runner: DockerRunner | None = None
        self._tls_dir: str | None = None
        self._handlers: dict[str, Callable[[web.Request, dict[str, str]], Awaitable[web.Response]]] = {
            "GetWorkspace": self._get_workspace, "ListComputes": self._list_computes, "GetCompute": self._get_compute,
            "CreateOrUpdateEnvironmentVersion": self._put_environment, "GetEnvironmentVersion": self._get_environment,
            "ListJobs": self._list_jobs, "CreateOrUpdateJob": self._put_job, "GetJob": self._get_job,
            "CancelJob": self._cancel_job, "GetOperationResult": self._operation_result,
            "GetRunDetails": self._run_details, "GetDiscovery": self._discovery,
        }

    # ---------------------------------------------------------------- what clients need
    @property
    def url(self) -> str:
        """The HTTPS base URL (ARM, run history and log files alike)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"https://{host}:{self.port}"

    @property
    def certificate_file(self) -> str:
        """The PEM file of the server's self-signed certificate: give it to ``connection_verify``."""
        assert self._tls_dir is not None, "the server is not started"
        return os.path.join(self._tls_dir, "cert.pem")

    @property
    def cloud_name(self) -> str:
        """A cloud name unique to this server (the SDK keeps the first registration of a name)."""
        return f"LocalAzureML-{self.instance_id}"

    @property
    def cloud_metadata(self) -> dict[str, str]:
        """The endpoints of the custom cloud to give ``MLClient(cloud_metadata=...)``."""
        base = self.url + "/"
        return {"resource_manager": base, "active_directory": base, "aml_resource_id": base, "azure_portal": base,
                "registry_discovery_endpoint": base, "storage_endpoint": "core.windows.net"}

    @property
    def workspace_path(self) -> str:
        """The workspace's ARM resource id."""
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}/providers/{PROVIDER}"
                f"/workspaces/{self.workspace_name}")

    # ---------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> LocalAzureML:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Make the certificate, connect to Docker, then listen."""
        try:
            docker = await self._stack.enter_async_context(docker_client(self.docker_url))
            await docker.version()  # fail now, not at the first job, when there is no daemon
            self._tls_dir = tempfile.mkdtemp(prefix="local-azureml-tls-")
            cert = self_signed((self.host,))
            with open(os.path.join(self._tls_dir, "cert.pem"), "wb") as f:
                f.write(cert.cert_pem)
            key_file = os.path.join(self._tls_dir, "key.pem")
            with open(os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(cert.key_pem)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.certificate_file, key_file)
            app = web.Application(client_max_size=16 * 1024 * 1024)
            app.router.add_get("/_fake/stats", self._stats_route)
            app.router.add_post("/_fake/config", self._config_route)
            app.router.add_post("/_fake/reset", self._reset_route)
            app.router.add_get(r"/logs/{token}/{path:.+}", self._log_file)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port, ssl_context=context)
            await site.start()
            if self.port == 0:
                self.port = int(self._runner.addresses[0][1])
            self._jobs_runner = DockerRunner(
                docker=docker, instance_id=self.instance_id, network=self.network, stop_grace=self.stop_grace,
                phase_delay=self.phase_delay, container_env=self.container_env, service_env={
                    "AZUREML_ARM_SUBSCRIPTION": self.subscription_id, "AZUREML_ARM_RESOURCEGROUP": self.resource_group,
                    "AZUREML_ARM_WORKSPACE_NAME": self.workspace_name, "AZUREML_WORKSPACE_ID": self.workspace_id,
                    "AZUREML_SERVICE_ENDPOINT": self.url, "AZUREML_DISCOVERY_SERVICE_ENDPOINT": f"{self.url}/discovery",
                })
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop every job, remove every container this server started, stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._stop_all()
        await self._stack.aclose()
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)

    async def _stop_all(self) -> None:
        runner = self._jobs_runner
        if runner is None:
            return
        for job in self.jobs.values():
            runner.cancel(job)
        tasks = [job.task for job in self.jobs.values() if job.task is not None and not job.task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.stop_grace + 10)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=10)
        with contextlib.suppress(Exception):  # anything left behind still carries this instance's label
            for container in await runner.docker.containers.list(
                    all=True, filters=json.dumps({"label": [f"{INSTANCE_LABEL}={self.instance_id}"]})):
                with contextlib.suppress(Exception):
                    await container.delete(force=True)

    # ---------------------------------------------------------------- test hooks
    def stats(self) -> dict[str, Any]:
        """Counters and the current fault config.

        ``calls``: API calls per operation (faulted ones included); ``created``: jobs created per
        name; ``refused``: error answers per Azure error code (injected faults excluded);
        ``throttled`` / ``errors``: injected 429 / 503 answers; ``jobs`` / ``active``: jobs known / not ended.
        """
        return {"calls": dict(self._calls), "created": dict(self._created), "refused": dict(self._refused),
                "throttled": self._throttled, "errors": self._errors, "throttle_rate": self.throttle_rate,
                "error_rate": self.error_rate, "jobs": len(self.jobs),
                "active": sum(not j.terminal for j in self.jobs.values())}

    @staticmethod
    def _check_rates(*rates: float | None) -> None:
        for value in rates:
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"a fault rate is between 0 and 1, got {value}")

    def configure(self, *, throttle_rate: float | None = None, error_rate: float | None = None,
                  seed: int | None = None) -> None:
        """Change the fault rates (and re-seed the RNG) while the server runs."""
        self._check_rates(throttle_rate, error_rate)
        if throttle_rate is not None:
            self.throttle_rate = float(throttle_rate)
        if error_rate is not None:
            self.error_rate = float(error_rate)
        if seed is not None:
            self._rng.seed(seed)

    async def reset(self, *, jobs: bool = False) -> None:
        """Zero the counters and restore the fault config given at construction.

        With ``jobs``, also cancel every job, remove its container and forget it.
        """
        self._calls.clear()
        self._created.clear()
        self._refused.clear()
        self._throttled = self._errors = 0
        self.throttle_rate, self.error_rate, seed = self._initial_faults
        self._rng.seed(seed)
        if jobs:
            await self._stop_all()
            self.jobs.clear()
            self._operations.clear()

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

    # ---------------------------------------------------------------- HTTP
    async def _handle(self, request: web.Request) -> web.Response:
        request_id = str(uuid.uuid4())
        log.debug("%s %s?%s", request.method, request.path, request.query_string)  # what the SDK asks, for reference
        try:
            op, params = self._route(request)
            self._calls[op] += 1
            fault = self._fault()
            if fault is not None:
                return _error(fault, request_id)
            if op not in NO_API_VERSION and "api-version" not in request.query:
                raise AzureError(400, "MissingApiVersionParameter",
                                 "The api-version query parameter (?api-version=) is required for all requests.")
            if op != "GetDiscovery" and not request.headers.get("Authorization", "").startswith("Bearer "):
                raise AzureError(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header "
                                                              "is missing or not a bearer token.")
            if "ws" in params:
                self._check_workspace(params)
            response = await self._handlers[op](request, params)
        except AzureError as exc:
            self._refused[exc.code] += 1
            return _error(exc, request_id)
        response.headers["x-ms-request-id"] = request_id
        return response

    def _route(self, request: web.Request) -> tuple[str, dict[str, str]]:
        path = request.path.rstrip("/") or "/"
        known = False
        for method, pattern, op in ROUTES:
            match = pattern.fullmatch(path)
            if match is not None:
                known = True
                if method == request.method:
                    return op, match.groupdict()
        if known:
            raise AzureError(405, "MethodNotAllowed", f"The requested resource does not support http method "
                                                      f"'{request.method}'.")
        raise AzureError(404, "NotFound", f"No route matches {request.method} {request.path}")

    def _fault(self) -> AzureError | None:
        """An injected fault for this call, or None."""
        draw = self._rng.random()
        if draw < self.throttle_rate:
            self._throttled += 1
            return AzureError(429, "TooManyRequests", "The request is being throttled as the limit has been reached "
                                                      "for this operation. Please retry after the time given in the "
                                                      "Retry-After header.",
                              headers={"Retry-After": str(self.retry_after)})
        if draw < self.throttle_rate + self.error_rate:
            self._errors += 1
            return AzureError(503, "ServiceUnavailable", "The service is temporarily unavailable. Please retry.")
        return None

    def _check_workspace(self, params: dict[str, str]) -> None:
        """ARM's answers for a subscription, resource group or workspace it does not know."""
        if params["sub"].lower() != self.subscription_id.lower():
            raise AzureError(404, "SubscriptionNotFound", f"The subscription '{params['sub']}' could not be found.")
        if params["rg"].lower() != self.resource_group.lower():
            raise AzureError(404, "ResourceGroupNotFound", f"Resource group '{params['rg']}' could not be found.")
        if params["ws"].lower() != self.workspace_name.lower():
            raise resource_not_found(f"{PROVIDER}/workspaces/{params['ws']}", params["rg"])

    # ---------------------------------------------------------------- workspace and computes
    def _compute(self, name: str) -> dict[str, Any]:
        return {
            "id": f"{self.workspace_path}/computes/{name}", "name": name,
            "type": f"{PROVIDER}/workspaces/computes", "location": self.location,
            "properties": {
                "computeType": "AmlCompute", "computeLocation": self.location, "provisioningState": "Succeeded",
                "description": "a cluster of the local control plane: jobs run on the local Docker daemon",
                "isAttachedCompute": False, "disableLocalAuth": True,
                "properties": {
                    "vmSize": "STANDARD_DS3_V2", "vmPriority": "Dedicated", "osType": "Linux",
                    "scaleSettings": {"maxNodeCount": 4, "minNodeCount": 0, "nodeIdleTimeBeforeScaleDown": "PT120S"},
                    "allocationState": "Steady", "currentNodeCount": 0, "targetNodeCount": 0,
                    "remoteLoginPortPublicAccess": "Disabled", "enableNodePublicIp": True,
                },
            },
        }

    async def _get_workspace(self, request: web.Request, params: dict[str, str]) -> web.Response:
        return web.json_response({
            "id": self.workspace_path, "name": self.workspace_name, "type": f"{PROVIDER}/workspaces",
            "location": self.location, "kind": "Default", "tags": {},
            "sku": {"name": "Basic", "tier": "Basic"},
            "identity": {"type": "SystemAssigned", "principalId": self.workspace_id, "tenantId": self.workspace_id},
            "properties": {
                "friendlyName": self.workspace_name, "description": "", "workspaceId": self.workspace_id,
                "discoveryUrl": f"{self.url}/discovery", "provisioningState": "Succeeded", "hbiWorkspace": False,
                "publicNetworkAccess": "Enabled", "v1LegacyMode": False,
                "mlFlowTrackingUri": f"azureml://{self.location}.api.azureml.ms/mlflow/v1.0{self.workspace_path}",
            },
        })

    async def _list_computes(self, request: web.Request, params: dict[str, str]) -> web.Response:
        return web.json_response({"value": list(self.computes.values())})

    async def _get_compute(self, request: web.Request, params: dict[str, str]) -> web.Response:
        compute = self.computes.get(params["name"])
        if compute is None:
            raise resource_not_found(f"{PROVIDER}/workspaces/{self.workspace_name}/computes/{params['name']}",
                                     self.resource_group)
        return web.json_response(compute)

    async def _discovery(self, request: web.Request, params: dict[str, str]) -> web.Response:
        return web.json_response({key: self.url for key in DISCOVERY_KEYS})

    # ---------------------------------------------------------------- environments
    def _environment_resource(self, name: str, version: str) -> dict[str, Any]:
        env = self.environments[(name, version)]
        return {"id": f"{self.workspace_path}/environments/{name}/versions/{version}", "name": version,
                "type": f"{PROVIDER}/workspaces/environments/versions",
                "properties": {**env, "environmentType": "UserCreated", "osType": "Linux",
                               "provisioningState": "Succeeded", "autoRebuild": "Disabled"}}

    async def _put_environment(self, request: web.Request, params: dict[str, str]) -> web.Response:
        body = await _json(request)
        props = body.get("properties")
        if not isinstance(props, dict) or not (props.get("image") or props.get("build")):
            raise user_error("An environment version needs an image or a build context.", inner="RequiredField")
        if not props.get("image"):
            raise user_error("Building environments from a context is not supported by the local control plane.",
                             inner="NotSupported")
        key = (params["name"], params["version"])
        existing = self.environments.get(key)
        if existing is not None and existing.get("image") != props.get("image"):
            raise user_error(f"Environment {key[0]} version {key[1]} already exists with a different image: "
                             "environment versions cannot be changed.", inner="Immutable", status=409)
        self.environments[key] = {k: v for k, v in props.items() if k in (
            "image", "isAnonymous", "isArchived", "description", "tags", "properties", "condaFile", "inferenceConfig")}
        return web.json_response(self._environment_resource(*key), status=200 if existing else 201)

    async def _get_environment(self, request: web.Request, params: dict[str, str]) -> web.Response:
        key = (params["name"], params["version"])
        if key not in self.environments:
            raise resource_not_found(f"{PROVIDER}/workspaces/{self.workspace_name}/environments/{key[0]}/versions/"
                                     f"{key[1]}", self.resource_group)
        return web.json_response(self._environment_resource(*key))

    # ---------------------------------------------------------------- jobs
    def _job(self, name: str) -> Job:
        job = self.jobs.get(name)
        if job is None:
            raise AzureError(404, "UserError", f"Job {name} was not found in workspace {self.workspace_name}.",
                             inner="NotFoundError")
        return job

    def _image_of(self, environment_id: Any) -> str:
        match = ENVIRONMENT_ID.fullmatch(str(environment_id).removeprefix("azureml:"))
        if match is None:
            raise user_error(f"Environment '{environment_id}' is not a workspace environment version: the local "
                             "control plane has no registries.", inner="NotSupported")
        if match["ws"].lower() != self.workspace_name.lower():
            raise user_error(f"Environment '{environment_id}' belongs to another workspace.", inner="BadArgument")
        env = self.environments.get((match["name"], match["version"]))
        if env is None:
            raise AzureError(404, "UserError", f"Environment {match['name']}:{match['version']} was not found in "
                                               f"workspace {self.workspace_name}.", inner="NotFoundError")
        return str(env["image"])

    def _studio(self) -> str:
        return f"{self.url}/studio"

    async def _put_job(self, request: web.Request, params: dict[str, str]) -> web.Response:
        name = params["name"]
        body = await _json(request)
        props = body.get("properties")
        existing = self.jobs.get(name)
        if existing is not None:
            changed = immutable_changes(existing.props, props if isinstance(props, dict) else {})
            if changed:
                raise user_error(
                    "A job with this name already exists. If you are trying to create a new job, use a different "
                    "name. If you are trying to update an existing job, the existing job's "
                    f"{', '.join(changed)} cannot be changed. Only description, tags, displayName, properties, "
                    "and isArchived can be updated.", inner="Immutable")
            assert isinstance(props, dict)
            for key in ("description", "tags", "displayName", "properties", "isArchived"):
                if key in props:
                    existing.props[key] = props[key]
            existing.modified = now()
            return web.json_response(existing.resource(self._studio()), status=200)
        validate_job(name, props, self.computes, self.workspace_name)
        assert isinstance(props, dict)
        image = self._image_of(props["environmentId"])
        assert self._jobs_runner is not None, "the server is not started"
        self._seq += 1
        job = Job(name=name, resource_id=f"{self.workspace_path}/jobs/{name}", props=dict(props), image=image,
                  seq=self._seq)
        self.jobs[name] = job
        self._created[name] += 1
        self._jobs_runner.start(job)
        return web.json_response(job.resource(self._studio()), status=201)

    async def _get_job(self, request: web.Request, params: dict[str, str]) -> web.Response:
        return web.json_response(self._job(params["name"]).resource(self._studio()))

    async def _list_jobs(self, request: web.Request, params: dict[str, str]) -> web.Response:
        view = request.query.get("listViewType", "ActiveOnly")
        jobs = sorted(self.jobs.values(), key=lambda j: j.seq, reverse=True)  # newest first
        if view == "ActiveOnly":
            jobs = [j for j in jobs if not j.props.get("isArchived")]
        elif view == "ArchivedOnly":
            jobs = [j for j in jobs if j.props.get("isArchived")]
        token = request.query.get("$skipToken")
        if token:  # the sequence number of the last job of the previous page: stable while jobs are created
            try:
                last = int(token)
            except ValueError:
                raise user_error(f"Invalid $skipToken {token!r}.", inner="InvalidSkipToken") from None
            jobs = [j for j in jobs if j.seq < last]
        page = jobs[:self.list_page_size]
        body: dict[str, Any] = {"value": [j.resource(self._studio()) for j in page]}
        if len(jobs) > len(page):
            query = {**request.query, "$skipToken": str(page[-1].seq)}
            body["nextLink"] = str(request.url.with_scheme("https").with_query(query))
        return web.json_response(body)

    def _operation_url(self, op_id: str, api_version: str) -> str:
        return (f"{self.url}/subscriptions/{self.subscription_id}/providers/{PROVIDER}/locations/{self.location}"
                f"/mfeOperationResults/{op_id}?api-version={api_version}")

    async def _cancel_job(self, request: web.Request, params: dict[str, str]) -> web.Response:
        job = self._job(params["name"])
        if job.terminal or job.status == "Finalizing":  # the service refuses these (its user code has ended)
            raise user_error(f"Job {job.name} cannot be canceled: it is in status {job.status}.",
                             inner="JobNotCancelable")
        assert self._jobs_runner is not None
        self._jobs_runner.cancel(job)
        op_id = f"jc:{uuid.uuid4()}"
        self._operations[op_id] = job.name
        return web.Response(status=202, headers={
            "Location": self._operation_url(op_id, request.query["api-version"]),
            "Retry-After": str(self.retry_after)})

    async def _operation_result(self, request: web.Request, params: dict[str, str]) -> web.Response:
        name = self._operations.get(params["op"])
        if name is None or params["sub"].lower() != self.subscription_id.lower():
            raise AzureError(404, "NotFound", f"Operation {params['op']} was not found.")
        job = self.jobs.get(name)
        if job is not None and not job.terminal:
            return web.Response(status=202, headers={
                "Location": self._operation_url(params["op"], request.query["api-version"]),
                "Retry-After": str(self.retry_after)})
        return web.Response(status=200)

    # ---------------------------------------------------------------- run history and logs
    def log_url(self, job: Job) -> str:
        """Where a job's ``user_logs/std_log.txt`` is served (no auth, like a SAS URL)."""
        return f"{self.url}/logs/{job.log_token}/{LOG_NAME}"

    async def _run_details(self, request: web.Request, params: dict[str, str]) -> web.Response:
        job = self.jobs.get(params["name"])
        if job is None:
            raise AzureError(404, "UserError", f"Run {params['name']} was not found", inner="NotFoundError")
        return web.json_response(job.details(self.log_url(job)))

    async def _log_file(self, request: web.Request) -> web.Response:
        """A job's log file, with HTTP Range support (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``)."""
        self._calls["GetLogFile"] += 1
        token, path = request.match_info["token"], request.match_info["path"]
        job = next((j for j in self.jobs.values() if j.log_token == token), None)
        if job is None or path != LOG_NAME:
            return web.Response(status=404, text="BlobNotFound", headers={"x-ms-error-code": "BlobNotFound"})
        data = bytes(job.output)
        headers = {"Accept-Ranges": "bytes", "Content-Type": "text/plain; charset=utf-8",
                   "x-ms-blob-type": "AppendBlob", "Last-Modified": _http_date(job.modified)}
        spec = request.headers.get("Range") or request.headers.get("x-ms-range")
        if not spec:
            return web.Response(body=data, headers=headers)
        span = _parse_range(spec, len(data))
        if span is None:
            return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{len(data)}",
                                                     "x-ms-error-code": "InvalidRange"})
        start, end = span
        return web.Response(status=206, body=data[start:end + 1],
                            headers={**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})


def _parse_range(spec: str, size: int) -> tuple[int, int] | None:
    """The inclusive byte span a single-range header asks for, or None when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", spec)
    if match is None or (not match[1] and not match[2]):
        return None
    if not match[1]:  # a suffix: the last n bytes
        length = int(match[2])
        return (max(0, size - length), size - 1) if length and size else None
    start = int(match[1])
    end = min(int(match[2]), size - 1) if match[2] else size - 1
    return (start, end) if start < size and start <= end else None


def _http_date(at: Any) -> str:
    return str(at.strftime("%a, %d %b %Y %H:%M:%S GMT"))


def _error(exc: AzureError, request_id: str) -> web.Response:
    headers = {"x-ms-request-id": request_id, "x-ms-error-code": exc.code, **exc.headers}
    return web.json_response(exc.body(), status=exc.status, headers=headers)


async def _json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise AzureError(400, "InvalidRequestContent", f"The request content was invalid and could not be "
                                                       f"deserialized: {exc}") from None
    if not isinstance(body, dict):
        raise AzureError(400, "InvalidRequestContent", "The request content must be a JSON object.")
    return body


async def _json_body(request: web.Request) -> dict[str, Any]:
    with contextlib.suppress(AzureError):
        return await _json(request)
    return {}


# -------------------------------------------------------------------- from synchronous code
class BackgroundLocalAzureML(BackgroundServer[LocalAzureML]):
    """A :class:`LocalAzureML` running on its own event loop in a daemon thread.

    For synchronous code and session-scoped pytest fixtures; its methods are thread-safe.
    """

    server_class = LocalAzureML
    label = "the local Azure ML control plane"

    @property
    def url(self) -> str:
        """The HTTPS base URL."""
        return self._started().url

    @property
    def certificate_file(self) -> str:
        """The PEM file to trust (``connection_verify``)."""
        return self._started().certificate_file

    @property
    def cloud_name(self) -> str:
        """The custom cloud's name to give ``MLClient(cloud=...)``."""
        return self._started().cloud_name

    @property
    def cloud_metadata(self) -> dict[str, str]:
        """The custom cloud's endpoints to give ``MLClient(cloud_metadata=...)``."""
        return self._started().cloud_metadata

    @property
    def subscription_id(self) -> str:
        """The workspace's subscription."""
        return self._started().subscription_id

    @property
    def resource_group(self) -> str:
        """The workspace's resource group."""
        return self._started().resource_group

    @property
    def workspace_name(self) -> str:
        """The workspace's name."""
        return self._started().workspace_name


@contextlib.contextmanager
def serve_in_thread(**options: Any) -> Iterator[BackgroundLocalAzureML]:
    """A :class:`BackgroundLocalAzureML` for a ``with`` block (options: see LocalAzureML)."""
    with BackgroundLocalAzureML(**options) as backend:
        yield backend
