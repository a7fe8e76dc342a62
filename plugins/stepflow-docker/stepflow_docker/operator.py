"""The ``docker`` step operator: each step attempt runs as a container on a Docker daemon."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from stepflow.errors import BackendError, TransientBackendError
from stepflow.remote import Job, JobBackend, JobState, Limits, LogBatch, Resources, RunResources, failpoint
from stepflow_docker import _wire

NOBODY = "65534:65534"
_LOOPBACK = ("127.", "localhost", "[::1]")


class DockerBackend(JobBackend):
    """Containers on a Docker daemon: created under the job's name, started, followed, removed."""

    flavor: ClassVar[str] = "docker"
    limits: ClassVar[Limits] = Limits(name_length=128, name_charset="a-zA-Z0-9_.-")
    poll_interval: ClassVar[float] = 0.25
    max_poll_interval: ClassVar[float] = 2.0
    log_interval: ClassVar[float] = 0.5
    secret_channel: ClassVar[bool] = True  # a file put into the container, not in `docker inspect`
    local_store: ClassVar[bool] = True  # the job's own payload and output paths are bind-mounted

    def __init__(self, name: str, config: Any) -> None:
        super().__init__(name, config)
        self._docker: Any = None

    async def _api(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One Docker API call; connection failures become clear errors, hiccups transient ones."""
        import aiodocker
        import aiohttp

        try:
            self._docker = self._docker or aiodocker.Docker(url=self.config.docker_host)
            return await fn(self._docker, *args, **kwargs)
        except aiodocker.DockerError as exc:
            if exc.status == 900:  # aiodocker's "cannot connect"
                raise _wire.unreachable(self.config.docker_host, exc) from None
            if exc.status >= 500 and "no such" not in str(exc.message).lower():
                raise TransientBackendError(f"Docker daemon: {exc.message}") from exc
            raise
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionError, ValueError) as exc:
            raise _wire.unreachable(self.config.docker_host, exc) from exc
        except aiohttp.ClientError as exc:
            raise TransientBackendError(f"Docker daemon call failed: {exc}") from exc

    async def prepare(self, resources: RunResources) -> None:
        """The daemon answers."""
        await self._api(lambda d: d.version())

    def check(self, options: Any, resources: Resources | None) -> list[str]:
        """A request larger than this machine (for a local daemon) cannot run."""
        return [] if resources is None or options.docker_host else _wire.capacity_problems(resources)

    def _host_config(self, job: Job) -> dict[str, Any]:
        opts, res = job.options, job.resources or Resources()
        binds = [*opts.mounts, *(f"{path}:{path}:{mode}" for path, mode in job.local_paths.items())]
        network = opts.network
        if network == "auto":  # host networking only when the job must reach a service on loopback
            network = "host" if any(h in job.env.get("STEPFLOW_STORAGE_OPTIONS", "") for h in _LOOPBACK) else "bridge"
        host: dict[str, Any] = {"NetworkMode": network, "Binds": binds}
        memory = _wire.parse_memory(opts.memory) or (int(res.memory_mib * 1024**2) if res.memory_mib else None)
        if memory:
            host["Memory"] = host["MemorySwap"] = memory  # no swap: over the limit is an OOM kill, not a crawl
        cpus = opts.cpus or res.cpu
        if cpus:
            host["NanoCpus"] = int(float(cpus) * 1e9)
        gpus = opts.gpus or (str(res.gpu) if res.gpu else None)
        if gpus:
            count = -1 if str(gpus) == "all" else int(gpus)
            host["DeviceRequests"] = [{"Driver": "", "Count": count, "Capabilities": [["gpu"]]}]
        if opts.shm_size:
            host["ShmSize"] = _wire.parse_memory(opts.shm_size)
        return host

    async def submit(self, job: Job) -> str:
        """Create the container (or find it under the job's name), hand it its secrets, start it."""
        import aiodocker

        body = {"Image": job.image, "Cmd": list(job.command), "User": job.options.user or NOBODY,
                "Env": [f"{k}={v}" for k, v in {**job.env, "STEPFLOW_SECRETS_FILE": _wire.SECRETS_PATH}.items()],
                "Labels": {**job.labels, "stepflow.job": job.name}, "HostConfig": self._host_config(job)}
        try:
            container = await self._api(lambda d: d.containers.create(config=body, name=job.name))
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise BackendError(f"image {job.image} not found by the Docker daemon: {exc.message}") from None
            if exc.status != 409:
                raise BackendError(f"Docker refused to create container {job.name}: {exc.message}") from None
            container = await self._api(lambda d: d.containers.get(job.name))  # this attempt was submitted before
        if container._container.get("State", {}).get("Status", "created") != "created":
            return str(container.id)  # started already: never twice
        failpoint("docker.created")
        user = str(body["User"]).split(":")[0]
        await self._api(lambda d: container.put_archive("/", _wire.secrets_tar(job.secrets, user)))
        try:
            await self._api(lambda d: container.start())
        except aiodocker.DockerError as exc:
            raise BackendError(f"Docker could not start container {job.name}: {exc.message}") from None
        return str(container.id)

    async def poll(self, job_ids: Sequence[str]) -> Mapping[str, JobState]:
        """One listing of stepflow's containers; an inspect only for those that just ended."""
        listed = await self._api(lambda d: d.containers.list(all=True, filters=json.dumps({"label": ["stepflow.job"]})))
        by_id = {c.id: c._container for c in listed}
        out: dict[str, JobState] = {}
        for job_id in job_ids:
            info = by_id.get(job_id)
            if info is None:
                out[job_id] = JobState("removed", "failed", "the container disappeared (removed outside stepflow)")
            elif info.get("State") in ("created", "restarting"):
                out[job_id] = JobState(info["State"], "pending")
            elif info.get("State") in ("running", "paused", "removing"):
                out[job_id] = JobState(info["State"], "running")
            else:
                out[job_id] = await self._ended(job_id)
        return out

    async def _ended(self, job_id: str) -> JobState:
        import aiodocker

        try:
            info = (await self._api(lambda d: d.containers.get(job_id)))._container
        except aiodocker.DockerError:
            return JobState("removed", "failed", "the container disappeared (removed outside stepflow)")
        state, status = info.get("State", {}), str(info.get("State", {}).get("Status", "exited"))
        code = int(state.get("ExitCode", -1))
        if state.get("OOMKilled"):
            limit = int(info.get("HostConfig", {}).get("Memory") or 0) // 1024**2
            return JobState(status, "failed", f"killed by the out-of-memory killer (memory limit {limit} MiB); "
                                              "raise memory", code)
        if code == 0:
            return JobState(status, "succeeded", "", code)
        if code in (137, 143):  # SIGKILL / SIGTERM: `docker stop` or `docker kill`
            return JobState(status, "stopped", f"container stopped (exit code {code})", code)
        return JobState(status, "failed", f"exit code {code}" + (f": {state['Error']}" if state.get("Error") else ""),
                        code)

    async def cancel(self, job_id: str) -> None:
        """SIGTERM, then SIGKILL after ``stop_grace_s``; an ended or removed container is left alone."""
        import aiodocker

        with contextlib.suppress(aiodocker.DockerError):
            await self._api(lambda d: d.containers.container(job_id).stop(t=int(self.config.stop_grace_s)))

    async def find(self, name: str) -> str | None:
        """The id of the container named ``name``."""
        import aiodocker

        try:
            return str((await self._api(lambda d: d.containers.get(name))).id)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise BackendError(f"Docker: {exc.message}") from None

    async def read_logs(self, cursors: Mapping[str, Any]) -> Mapping[str, LogBatch]:
        """Each container's output since its cursor: (last timestamp read, lines read at that timestamp)."""
        out = {}
        for job_id, cursor in cursors.items():
            since, skip = cursor or ("", 0)
            frames = await self._api(lambda d, j=job_id, s=since: d.containers.container(j).log(
                stdout=True, stderr=True, timestamps=True, since=_wire.since_param(s)))
            lines, last, count = [], since, skip
            for raw in "".join(frames).splitlines():
                stamp, _, text = raw.partition(" ")
                stamp = _wire.norm_stamp(stamp)
                if stamp < since or (stamp == since and skip > 0):
                    skip -= stamp == since
                    continue
                count, last = (count + 1 if stamp == last else 1), stamp
                lines.append(text)
            out[job_id] = LogBatch(lines, (last, count))
        return out

    async def cleanup(self, job_id: str, state: JobState | None) -> None:
        """Remove the finished container (unless ``remove`` is off)."""
        if self.config.remove:
            import aiodocker

            with contextlib.suppress(aiodocker.DockerError):
                await self._api(lambda d: d.containers.container(job_id).delete(force=True))

    async def aclose(self) -> None:
        """Close the Docker client."""
        docker, self._docker = self._docker, None
        if docker is not None:
            with contextlib.suppress(Exception):
                await docker.close()
