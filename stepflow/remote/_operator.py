"""The shared remote path every container backend builds on: :class:`RemoteJobOperator`.

A backend plugin implements only ``submit`` / ``status`` / ``cancel`` (and optionally
``find``, ``status_many``, ``logs``, ``cleanup``) plus its config class. The base class owns
the rest of an attempt: ensure the step image (built and pushed once per content hash),
write the signed payload to the artifact store, submit idempotently under a deterministic job
name, record the job in the run store before waiting, await the job with coalesced polling
and backoff, stream its logs as ``LogLine`` events, and read the output envelope back (a
remote exception comes back with its remote traceback). Cancellation stops the backend job.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import anyio
import attrs

from stepflow.errors import (
    BackendError,
    JobStoppedError,
    RemoteStepError,
    StepflowError,
    TransientBackendError,
)
from stepflow.events import JobStatusChanged, JobSubmitted, LogLine
from stepflow.interfaces.artifact_store import ArtifactStore
from stepflow.interfaces.container_registry import ContainerRegistry
from stepflow.interfaces.image_builder import ImageBuilder
from stepflow.interfaces.operator import Invocation, StepOperator

__all__ = [
    "BackendError",
    "JobSpec",
    "JobState",
    "RemoteJobOperator",
    "RunResources",
    "TransientBackendError",
    "job_name",
]

Phase = Literal["pending", "running", "succeeded", "failed", "stopped"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "stopped"})


@attrs.frozen
class JobState:
    """A backend's view of a job: its raw ``status``, the normalized ``phase`` and details."""

    status: str
    phase: Phase
    detail: str = ""
    exit_code: int | None = None

    @property
    def terminal(self) -> bool:
        """True once the job will not change any more."""
        return self.phase in TERMINAL


@attrs.frozen
class JobSpec:
    """Everything a backend needs to start one step attempt as a job."""

    name: str
    image: str
    command: tuple[str, ...]
    env: dict[str, str]
    settings: Mapping[str, Any]
    run_id: str
    step: str
    attempt: int
    payload_uri: str
    output_uri: str
    timeout: float | None = None
    labels: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class RunResources:
    """What a run hands its operators: the stack's live components and the run store."""

    run_id: str
    stack: str | None
    artifact_store: ArtifactStore | None
    container_registry: ContainerRegistry | None
    image_builder: ImageBuilder | None
    run_store: Any
    emit: Callable[..., None]
    cache_dir: Path


def job_name(run_id: str, step: str, attempt: int, *, max_length: int = 63, prefix: str = "sf") -> str:
    """Deterministic, backend-safe job name: ``sf-<run>-<step>-<attempt>``.

    Lowercase letters, digits and hyphens only; when too long the step part is shortened and a
    hash of the full name keeps it unique.
    """
    def clean(text: str) -> str:
        return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")

    full = f"{prefix}-{clean(run_id)}-{clean(step)}-{attempt}"
    if len(full) <= max_length:
        return full
    digest = hashlib.sha256(f"{run_id}/{step}/{attempt}".encode()).hexdigest()[:8]
    head = f"{prefix}-{clean(run_id)}-"
    tail = f"-{digest}-{attempt}"
    room = max_length - len(head) - len(tail)
    if room < 1:
        return f"{prefix}-{digest}-{attempt}"[:max_length]
    return (head + clean(step)[:room].rstrip("-") + tail)[:max_length]


class _Poller:
    """One polling loop per operator: every in-flight job is checked in the same round."""

    def __init__(self, op: RemoteJobOperator) -> None:
        self.op = op
        self.watchers: dict[str, tuple[anyio.Event, list[JobState | None], Callable[[JobState], None]]] = {}
        self.running = False
        self.rounds = 0
        self.error: BaseException | None = None

    async def wait(self, job_id: str, on_change: Callable[[JobState], None]) -> JobState:
        done = anyio.Event()
        box: list[JobState | None] = [None]
        self.watchers[job_id] = (done, box, on_change)
        if not self.running:
            self.running = True
            self.op._spawn(self._loop())
        try:
            await done.wait()
        finally:
            self.watchers.pop(job_id, None)
        state = box[0]
        if state is None:
            raise self.error or BackendError(f"lost track of job {job_id}")
        return state

    async def _loop(self) -> None:
        interval = self.op.poll_interval
        failures = 0
        last: dict[str, JobState] = {}
        try:
            while self.watchers:
                await anyio.sleep(interval * random.uniform(0.9, 1.1))
                ids = list(self.watchers)
                if not ids:
                    break
                try:
                    states = await self.op.status_many(ids)
                    failures = 0
                except TransientBackendError:
                    failures += 1
                    interval = min(self.op.max_poll_interval, interval * 2)
                    if failures < self.op.max_poll_failures:
                        continue
                    raise
                self.rounds += 1
                changed = False
                for job_id, state in states.items():
                    watcher = self.watchers.get(job_id)
                    if watcher is None:
                        continue
                    if last.get(job_id) != state:
                        changed = True
                        last[job_id] = state
                        watcher[2](state)
                    if state.terminal:
                        watcher[1][0] = state
                        watcher[0].set()
                        last.pop(job_id, None)
                interval = self.op.poll_interval if changed else min(self.op.max_poll_interval, interval * 1.5)
        except BaseException as exc:
            self.error = exc
            for done, _, _ in list(self.watchers.values()):
                done.set()
            if not isinstance(exc, Exception):
                raise
        finally:
            self.running = False
            if self.watchers and self.error is None:  # a watcher arrived as we were leaving
                self.running = True
                self.op._spawn(self._loop())


class RemoteJobOperator(StepOperator):
    """Base class of every container backend (docker, sagemaker, vertex, azureml ...)."""

    requires_pickling: ClassVar[bool] = True
    #: Longest job name the backend accepts.
    max_job_name: ClassVar[int] = 63
    #: Seconds between status rounds at first; grows 1.5x per quiet round up to the max.
    poll_interval: float = 0.5
    max_poll_interval: float = 5.0
    #: Consecutive transient status failures before the attempt fails.
    max_poll_failures: int = 20
    #: Seconds to wait for a cancelled job to reach a terminal state.
    stop_timeout: float = 30.0
    #: How concurrent ``status_many``'s default fan-out may be.
    status_concurrency: int = 16
    #: Attempts at submitting a job when the backend throttles or fails transiently.
    max_submit_attempts: int = 8

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self.config = config
        self.max_concurrency = getattr(config, "max_concurrency", None)
        self.resources: RunResources | None = None
        self._poller = _Poller(self)
        self._tg: Any = None
        self._images: Any = None
        self.submissions = 0

    # ---------------------------------------------------------------- backend hooks
    @abc.abstractmethod
    async def submit(self, job: JobSpec) -> str:
        """Start ``job``; return the backend's job id. Must not wait for the job."""

    async def find(self, job: JobSpec) -> str | None:
        """The id of an existing job named ``job.name`` (for idempotent submit), else None."""
        return None

    @abc.abstractmethod
    async def status(self, job_id: str) -> JobState:
        """The job's current state. Raise TransientBackendError for throttling/5xx."""

    async def status_many(self, job_ids: list[str]) -> dict[str, JobState]:
        """States of many jobs in one round; override when the backend has a batch call."""
        out: dict[str, JobState] = {}
        limiter = anyio.Semaphore(self.status_concurrency)

        async def one(job_id: str) -> None:
            async with limiter:
                with contextlib.suppress(TransientBackendError):  # throttled: polled again next round
                    out[job_id] = await self.status(job_id)

        async with anyio.create_task_group() as tg:
            for job_id in job_ids:
                tg.start_soon(one, job_id)
        return out

    def logs(self, job_id: str) -> AsyncIterator[str] | None:
        """Lines of the job's output while it runs (None when the backend has no log stream)."""
        return None

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> None:
        """Ask the backend to stop the job (returns without waiting for it to stop)."""

    async def cleanup(self, job_id: str, state: JobState | None) -> None:
        """Release backend resources of a finished job (e.g. remove a container)."""

    def base_image(self, settings: Mapping[str, Any]) -> str:
        """The base image for this step (settings override config)."""
        return str(settings.get("base_image") or getattr(self.config, "base_image", None) or "stepflow-base:py3.11")

    def job_env(self, job_settings: Mapping[str, Any]) -> dict[str, str]:
        """Extra environment for jobs (config ``environment`` plus settings ``environment``)."""
        env = dict(getattr(self.config, "environment", None) or {})
        env.update(job_settings.get("environment") or {})
        return {str(k): str(v) for k, v in env.items()}

    # ---------------------------------------------------------------- lifecycle
    async def attach(self, resources: RunResources) -> None:
        """Receive the run's stack components; the first launch builds the image manager."""
        self.resources = resources

    def _spawn(self, coro: Any) -> None:
        import asyncio

        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def _background(self) -> set[Any]:
        if not hasattr(self, "_bg"):
            self._bg: set[Any] = set()
        return self._bg

    def _require(self) -> RunResources:
        res = self.resources
        problems = []
        if res is None:
            raise StepflowError(f"step operator '{self.name}' was not attached to a run")
        if res.artifact_store is None:
            problems.append("an artifact store")
        if res.container_registry is None:
            problems.append("a container registry (-c)")
        if res.image_builder is None:
            problems.append("an image builder (-i), e.g. `stepflow image-builder register docker --type=docker`")
        if problems:
            raise StepflowError(f"step operator '{self.name}' needs {', and '.join(problems)} in stack "
                                f"'{res.stack}'")
        return res

    async def ensure_image(self, settings: Mapping[str, Any], step: str) -> str:
        """The pushed image for this step (built at most once per content hash)."""
        from stepflow.remote._images import ImageManager, ImageSpec

        res = self._require()
        if self._images is None:
            self._images = ImageManager(res.image_builder, res.container_registry,  # type: ignore[arg-type]
                                        cache_dir=res.cache_dir, emit=res.emit)
        wanted = [*(settings.get("requirements") or getattr(self.config, "requirements", None) or ())]
        store = res.artifact_store
        wanted += [r for r in getattr(store, "image_requirements", ()) if r not in wanted]  # jobs must reach it
        spec = ImageSpec(
            base_image=self.base_image(settings),
            requirements=tuple(wanted),
            project_root=_project_root(settings, self.config),
        )
        return str(await self._images.ensure(spec, step=step))

    # ---------------------------------------------------------------- one attempt
    async def launch(self, invocation: Invocation) -> Any:
        """Run one attempt as a remote job (see the module docstring)."""
        from stepflow.remote import _envelope as envelope

        res = self._require()
        store = res.artifact_store
        assert store is not None
        key = await anyio.to_thread.run_sync(res.run_store.payload_key, store.name or "default") \
            if res.run_store is not None else _ephemeral_key(store)
        base = (f"{store.root.rstrip('/')}/runs/{invocation.run_id}/{_safe(invocation.step)}"
                f"/attempt-{invocation.attempt}")
        payload_uri, output_uri = f"{base}/payload.bin", f"{base}/output.bin"
        name = job_name(invocation.run_id, invocation.step, invocation.attempt, max_length=self.max_job_name)
        emit = invocation.emit

        # Resume: a job recorded for this attempt is re-attached, never submitted again.
        recorded = None
        if res.run_store is not None:
            recorded = await anyio.to_thread.run_sync(res.run_store.find_job, invocation.run_id,
                                                      invocation.step, invocation.attempt)
        if recorded is not None and await store.exists(output_uri):
            emit(LogLine, line=f"re-attached to finished job {recorded.job_name}; reading its output",
                 stream="stepflow")
            return await self._read_output(store, output_uri, key, name, None)

        image = await self.ensure_image(invocation.settings, invocation.step)
        env = {envelope.KEY_ENV: key.hex(), **self._storage_env(store), **self.job_env(invocation.settings)}
        spec = JobSpec(
            name=name, image=image,
            command=("python3", "-m", "stepflow.entrypoint", "--payload", payload_uri, "--output", output_uri),
            env=env, settings=invocation.settings, run_id=invocation.run_id, step=invocation.step,
            attempt=invocation.attempt, payload_uri=payload_uri, output_uri=output_uri,
            timeout=invocation.timeout,
            labels={"stepflow.run": invocation.run_id, "stepflow.step": invocation.step,
                    "stepflow.attempt": str(invocation.attempt)},
        )
        job_id = recorded.job_id if recorded is not None else None
        if job_id is None:
            job_id = await self.find(spec)
        if job_id is None:
            await store.write_bytes(payload_uri, await self._payload(invocation, key, store, base))
            job_id = await self._submit_with_retries(spec)
        if res.run_store is not None and recorded is None:
            await anyio.to_thread.run_sync(res.run_store.record_job, invocation.run_id, invocation.step,
                                           invocation.attempt, self.name, name, job_id, payload_uri)
        emit(JobSubmitted, operator=self.name, job_id=job_id, attempt=invocation.attempt)
        state: JobState | None = None
        log_task = None
        try:
            log_task = self._start_logs(job_id, emit)

            def changed(new: JobState) -> None:
                emit(JobStatusChanged, job_id=job_id, status=new.status, detail=new.detail)

            state = await self._poller.wait(job_id, changed)
        except BaseException:
            with anyio.CancelScope(shield=True):
                state = await self._stop(job_id, emit)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish_logs(log_task)
                if res.run_store is not None and state is not None:
                    with contextlib.suppress(Exception):
                        await anyio.to_thread.run_sync(res.run_store.update_job, invocation.run_id,
                                                       invocation.step, invocation.attempt, state.phase)
                with contextlib.suppress(Exception):
                    await self.cleanup(job_id, state)
        assert state is not None
        if state.phase == "stopped":
            raise JobStoppedError(f"job {name} was stopped on its backend outside stepflow "
                                  f"({state.detail or state.status})")
        return await self._read_output(store, output_uri, key, name, state)

    async def _submit_with_retries(self, spec: JobSpec) -> str:
        """Submit, retrying throttling and transient errors with jittered backoff.

        A failed submit may still have created the job, so each retry first looks it up by its
        deterministic name: a job is never created twice.
        """
        delay = 0.5
        for attempt in range(1, self.max_submit_attempts + 1):
            try:
                job_id = await self.submit(spec)
                self.submissions += 1
                return job_id
            except TransientBackendError:
                if attempt == self.max_submit_attempts:
                    raise
            await anyio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 10.0)
            try:
                existing = await self.find(spec)
            except TransientBackendError:
                existing = None
            if existing is not None:
                return existing
        raise BackendError(f"could not submit job {spec.name}")  # unreachable

    async def _payload(self, inv: Invocation, key: bytes, store: ArtifactStore, base: str) -> bytes:
        from stepflow.remote import _envelope as envelope

        def big_to_refs(value: Any, out: list[tuple[str, bytes]]) -> Any:
            data = envelope.pickle_input(value)
            if len(data) <= envelope.REF_THRESHOLD:
                return value
            digest = envelope.sha256(data)
            uri = f"{store.root.rstrip('/')}/inputs/{digest}.pkl"
            out.append((uri, data))
            return envelope.ArtifactRef(uri, digest, len(data))

        def build() -> tuple[bytes, list[tuple[str, bytes]]]:
            refs: list[tuple[str, bytes]] = []
            args = tuple(big_to_refs(a, refs) for a in inv.args)
            kwargs = {k: big_to_refs(v, refs) for k, v in inv.kwargs.items()}
            ref = envelope.function_ref(inv.fn)
            # By reference when importable: the image has the project code, and tracebacks keep
            # real file names and lines (by value they would read "<dynamic-code>").
            body = {"fn_ref": ref, "args": args, "kwargs": kwargs} if ref else {"fn": inv.fn, "args": args,
                                                                                 "kwargs": kwargs}
            data = envelope.encode("payload", body, key, run_id=inv.run_id, step=inv.step, attempt=inv.attempt)
            return data, refs

        data, refs = await anyio.to_thread.run_sync(build)
        for uri, blob in refs:  # content-addressed: written once, shared by every step and attempt
            if not await store.exists(uri):
                await store.write_bytes(uri, blob)
        return data

    async def _read_output(self, store: ArtifactStore, uri: str, key: bytes, name: str,
                           state: JobState | None) -> Any:
        from stepflow.remote import _envelope as envelope

        try:
            data = await store.read_bytes(uri)
        except FileNotFoundError:
            if state is not None and state.phase == "failed":
                raise RemoteStepError(f"job {name} failed: {state.detail or state.status}"
                                      + (f" (exit code {state.exit_code})" if state.exit_code is not None else "")
                                      + "; it wrote no output envelope") from None
            raise RemoteStepError(f"job {name} reported success but wrote no output at {uri}: the job's "
                                  "command did not run the step (check the image and its entrypoint)") from None
        _, body = await anyio.to_thread.run_sync(functools.partial(envelope.decode, data, key, kind="output"))
        if body.get("ok"):
            return body.get("value")
        detail = f" [{state.detail}]" if state is not None and state.detail and state.phase == "failed" else ""
        raise RemoteStepError(f"{body.get('type')}: {body.get('message')}{detail}",
                              remote_traceback=str(body.get("traceback") or ""), remote_type=str(body.get("type")))

    def _storage_env(self, store: ArtifactStore) -> dict[str, str]:
        import json

        from stepflow.remote._io import STORAGE_OPTIONS_ENV

        options = getattr(store, "storage_options", None)
        opts = options() if callable(options) else None
        return {STORAGE_OPTIONS_ENV: json.dumps(opts)} if opts else {}

    def _start_logs(self, job_id: str, emit: Callable[..., None]) -> Any:
        stream = self.logs(job_id)
        if stream is None:
            return None
        import asyncio

        async def pump() -> None:
            with contextlib.suppress(Exception):
                async for line in stream:
                    emit(LogLine, line=line.rstrip("\n"), stream="stdout")

        return asyncio.get_running_loop().create_task(pump())

    async def _finish_logs(self, task: Any) -> None:
        if task is None:
            return
        with anyio.move_on_after(2):  # let the tail of the log arrive
            await _wait_task(task)
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _stop(self, job_id: str, emit: Callable[..., None]) -> JobState | None:
        """Cancel the backend job and wait (bounded) until the backend says it ended."""
        with contextlib.suppress(Exception):
            await self.cancel(job_id)
        deadline = time.monotonic() + self.stop_timeout
        state: JobState | None = None
        while time.monotonic() < deadline:
            try:
                state = await self.status(job_id)
            except Exception:
                await anyio.sleep(0.5)
                continue
            if state.terminal:
                emit(JobStatusChanged, job_id=job_id, status=state.status, detail="stopped by stepflow")
                return state
            await anyio.sleep(0.25)
        return state

    async def aclose(self) -> None:
        """Close the image manager's builder connections."""
        for task in list(self._background):
            task.cancel()


async def _wait_task(task: Any) -> None:
    import asyncio

    await asyncio.wait({task})


def _safe(step: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", step)


def _ephemeral_key(store: ArtifactStore) -> bytes:
    import secrets

    return secrets.token_bytes(32)


def _project_root(settings: Mapping[str, Any], config: Any) -> Path | None:
    root = settings.get("project_root") or getattr(config, "project_root", None)
    if root:
        return Path(root).expanduser().resolve()
    return Path.cwd() if Path.cwd() != Path(sys.prefix) else None
