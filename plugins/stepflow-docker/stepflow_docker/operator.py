"""The ``docker`` step operator: each step attempt runs as a container on a Docker daemon."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

from stepflow.errors import BackendError, TransientBackendError
from stepflow.remote import JobSpec, JobState, RemoteJobOperator


def _daemon_error(host: str | None, exc: BaseException) -> BackendError:
    where = host or "unix:///var/run/docker.sock"
    return BackendError(
        f"cannot reach the Docker daemon at {where}: {type(exc).__name__}: {exc}. Start it (e.g. "
        "`sudo systemctl start docker`, or run `dockerd`; in this repository scripts/services.sh does) "
        "or set --docker_host"
    )


def _parse_memory(value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().removesuffix("b")
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


class DockerStepOperator(RemoteJobOperator):
    """Runs each step attempt as a container on a Docker daemon.

    It follows the container's logs, waits for it and removes it; cancelling stops it within
    ``stop_grace_s`` seconds.
    """

    flavor: ClassVar[str] = "docker"
    poll_interval = 0.25
    max_poll_interval = 2.0
    stop_timeout = 15.0

    def __init__(self, name: str, config: Any) -> None:
        super().__init__(name, config)
        self._docker: Any = None
        self._stopped_by_us: set[str] = set()

    # ---------------------------------------------------------------- connection
    async def _client(self) -> Any:
        if self._docker is None:
            import aiodocker

            try:
                self._docker = aiodocker.Docker(url=self.config.docker_host)
            except Exception as exc:
                raise _daemon_error(self.config.docker_host, exc) from exc
        return self._docker

    async def _call(self, coro_fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one Docker API call, turning connection failures into clear errors."""
        import aiodocker
        import aiohttp

        try:
            return await coro_fn(*args, **kwargs)
        except aiodocker.DockerError:
            raise
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionError) as exc:
            raise _daemon_error(self.config.docker_host, exc) from exc
        except aiohttp.ClientError as exc:
            raise TransientBackendError(f"Docker daemon call failed: {exc}") from exc

    # ---------------------------------------------------------------- job hooks
    def _host_config(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        cfg = self.config
        binds = list(cfg.mounts or []) + list(settings.get("mounts") or [])
        store = self.resources.artifact_store if self.resources is not None else None
        if cfg.mount_artifact_store and store is not None and not getattr(store, "is_remote", False):
            # The job reads its payload and writes its output at the same absolute paths.
            binds.append(f"{store.root}:{store.root}:rw")
        host: dict[str, Any] = {"NetworkMode": settings.get("network") or cfg.network, "Binds": binds}
        memory = _parse_memory(settings.get("memory") or cfg.memory)
        if memory:
            host["Memory"] = memory
            host["MemorySwap"] = memory  # no swap: an over-limit step is OOM-killed, not slowed down
        cpus = settings.get("cpus") or cfg.cpus
        if cpus:
            host["NanoCpus"] = int(float(cpus) * 1e9)
        gpus = settings.get("gpus") or cfg.gpus
        if gpus:
            count = -1 if str(gpus) == "all" else int(gpus)
            host["DeviceRequests"] = [{"Driver": "", "Count": count, "Capabilities": [["gpu"]]}]
        if cfg.shm_size:
            host["ShmSize"] = _parse_memory(cfg.shm_size)
        return host

    async def submit(self, job: JobSpec) -> str:
        """Create and start the container (idempotent on the deterministic job name)."""
        import aiodocker

        docker = await self._client()
        body = {
            "Image": job.image,
            "Cmd": list(job.command),
            "Env": [f"{k}={v}" for k, v in job.env.items()],
            "Labels": job.labels,
            "HostConfig": self._host_config(job.settings),
        }
        if self.config.user:
            body["User"] = self.config.user
        try:
            container = await self._call(docker.containers.create, config=body, name=job.name)
        except aiodocker.DockerError as exc:
            if exc.status == 409:  # same deterministic name: that attempt was already submitted
                existing = await self.find(job)
                if existing is not None:
                    return existing
            if exc.status == 404:
                raise BackendError(f"image {job.image} not found by the Docker daemon: {exc.message}") from exc
            raise BackendError(f"Docker refused to create container {job.name}: {exc.message}") from exc
        try:
            await self._call(container.start)
        except aiodocker.DockerError as exc:
            raise BackendError(f"Docker could not start container {job.name}: {exc.message}") from exc
        return str(container.id)

    async def find(self, job: JobSpec) -> str | None:
        """The id of the container already named ``job.name``, if any."""
        import aiodocker

        docker = await self._client()
        try:
            info = await self._call(docker.containers.get, job.name)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise BackendError(f"Docker: {exc.message}") from exc
        return str(info.id)

    async def status(self, job_id: str) -> JobState:
        """Map the container state (exit code, OOM kill, stop) to a job state."""
        import aiodocker

        docker = await self._client()
        try:
            container = await self._call(docker.containers.get, job_id)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return JobState("removed", "failed", "the container disappeared (removed outside stepflow)")
            raise TransientBackendError(f"Docker: {exc.message}") from exc
        state = container._container.get("State", {})
        status = str(state.get("Status", "unknown"))
        if status in ("created", "restarting"):
            return JobState(status, "pending")
        if status in ("running", "paused", "removing"):
            return JobState(status, "running")
        code = int(state.get("ExitCode", -1))
        if state.get("OOMKilled"):
            limit = container._container.get("HostConfig", {}).get("Memory") or 0
            return JobState(status, "failed", f"killed by the out-of-memory killer (memory limit "
                                              f"{limit // (1024 * 1024)} MiB); raise --memory", code)
        if code == 0:
            return JobState(status, "succeeded", "", code)
        if job_id in self._stopped_by_us:
            return JobState(status, "stopped", "stopped by stepflow", code)
        if code in (137, 143):  # SIGKILL / SIGTERM from `docker stop` or `docker kill`
            return JobState(status, "stopped", f"container stopped outside stepflow (exit code {code})", code)
        error = f": {state['Error']}" if state.get("Error") else ""
        return JobState(status, "failed", f"exit code {code}{error}", code)

    def logs(self, job_id: str) -> AsyncIterator[str]:
        """Follow the container's stdout and stderr, line by line."""
        async def lines() -> AsyncIterator[str]:
            docker = await self._client()
            container = docker.containers.container(job_id)
            buffer = ""
            async for chunk in container.log(stdout=True, stderr=True, follow=True):
                buffer += chunk
                while "\n" in buffer:
                    line, buffer = buffer.split("\n", 1)
                    yield line
            if buffer:
                yield buffer

        return lines()

    async def cancel(self, job_id: str) -> None:
        """Stop the container: SIGTERM, then SIGKILL after ``stop_grace_s``."""
        docker = await self._client()
        self._stopped_by_us.add(job_id)
        with contextlib.suppress(Exception):
            await self._call(docker.containers.container(job_id).stop, t=int(self.config.stop_grace_s))

    async def cleanup(self, job_id: str, state: JobState | None) -> None:
        """Remove the finished container (unless ``remove`` is off)."""
        if not self.config.remove:
            return
        docker = await self._client()
        with contextlib.suppress(Exception):
            await self._call(docker.containers.container(job_id).delete, force=True)

    async def aclose(self) -> None:
        """Close the Docker client."""
        await super().aclose()
        if self._docker is not None:
            with contextlib.suppress(Exception):
                await self._docker.close()
            self._docker = None
