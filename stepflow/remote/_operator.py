"""The operator that carries a step attempt down the remote path, for any :class:`JobBackend`.

Per attempt:

1. **prepare** (once per run, errors memoised): the stack has what it needs, the registry
   answers and accepts the credentials, the base image exists, the backend's own checks pass;
2. **image**: built and pushed once per content hash (skipped when the registry has it);
3. **payload**: pickled, signed for this job only and written content-addressed to the store;
4. **submit**: the job is recorded in the run store *before* it is submitted, under a
   deterministic name, so a runner that dies anywhere is resumed without a second job; submit is
   idempotent and retried by one policy;
5. **follow**: the shared tracker's status and log loops;
6. **output**: the envelope is verified with a key only this job could have had, then loaded; a
   remote exception comes back with its remote traceback. Cancellation stops the job.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
import attrs

from stepflow import _envelope as envelope
from stepflow.errors import (
    ConfigError,
    ImageBuildError,
    JobStoppedError,
    RegistryError,
    RemoteStepError,
    StepflowError,
)
from stepflow.events import JobStatusChanged, JobSubmitted, LogLine
from stepflow.interfaces.artifact_store import ArtifactStore
from stepflow.interfaces.operator import Invocation, RunResources, StepOperator
from stepflow.remote import _keys as keys
from stepflow.remote import _retry as retry
from stepflow.remote import _tracker
from stepflow.remote._backend import Job, JobBackend, JobState
from stepflow.remote._config import merge
from stepflow.remote._failpoints import failpoint
from stepflow.remote._io import STORAGE_OPTIONS_ENV
from stepflow.remote._naming import check_limits, clean_labels, job_name
from stepflow.remote._retry import RetryPolicy
from stepflow.resources import Resources

DEFAULT_BASE_IMAGE = f"stepflow-base:py{sys.version_info.major}.{sys.version_info.minor}"
#: Storage credentials in the job's environment (only with pass_storage_credentials and no secret channel).
STORAGE_CREDENTIALS_ENV = "STEPFLOW_STORAGE_CREDENTIALS"
JOB_SPEC_VERSION = 1


@attrs.define
class OperatorStats:
    """What an operator asked of its backend (tests and benchmarks read it)."""

    submits: int = 0
    submit_calls: int = 0
    cancels: int = 0
    reattached: int = 0


class JobOperator(StepOperator):
    """A step operator over a :class:`JobBackend` (see the module docstring)."""

    requires_pickling: ClassVar[bool] = True
    #: Seconds to wait for a stopped job to reach a terminal state.
    stop_timeout: float = 60.0

    def __init__(self, backend: JobBackend, settings_class: type | None = None) -> None:
        self.backend = backend
        self.name = backend.name
        self.flavor = backend.flavor  # type: ignore[misc]
        self.config = backend.config
        self.settings_class = settings_class
        self.max_concurrency = getattr(backend.config, "max_concurrency", None)
        self.policy = RetryPolicy(attempts=max(1, int(getattr(backend.config, "submit_attempts", 6) or 1)))
        self.stats = OperatorStats()
        self.resources: RunResources | None = None
        self._tracker: _tracker.Tracker | None = None
        self._images: Any = None
        self._builder: Any = None
        self._prepared: Any = None
        self._stopped_by_us: set[str] = set()
        self._warned: set[str] = set()

    @property
    def what(self) -> str:
        """``step-operator 'NAME' (flavor)`` for messages."""
        return f"step-operator '{self.name}' ({self.flavor})"

    @property
    def tracker(self) -> _tracker.Tracker:
        """The status and log loops following this operator's jobs."""
        if self._tracker is None:
            self._tracker = _tracker.acquire(self.backend)
        return self._tracker

    # ------------------------------------------------------------------ settings
    def options_for(self, settings: Mapping[str, Any]) -> Any:
        """The operator's config with a step's settings merged over it (ConfigError when invalid)."""
        if not settings or self.settings_class is None:
            return self.config
        from stepflow._config import options

        parsed = options.build(self.settings_class, settings, what=f"{self.what}: step settings")
        return merge(self.config, parsed)

    def validate_settings(self, settings: Mapping[str, Any], resources: Resources | None = None) -> list[str]:
        """Problems of one step's merged options and resources (the run does not start with any)."""
        try:
            merged = self.options_for(settings)
        except ConfigError:
            return []  # the run's own settings validation reports it, with the valid options
        return list(self.backend.check(merged, resources))

    # ------------------------------------------------------------------ run lifecycle
    async def attach(self, resources: RunResources) -> None:
        """Receive the run's components; the image manager and checks start afresh."""
        self.resources = resources
        self._images = None
        self._prepared = None
        self._warned.clear()

    def _store(self) -> ArtifactStore:
        res = self.resources
        if res is None:
            raise StepflowError(f"{self.what} was not attached to a run")
        if res.artifact_store is None:
            raise ConfigError(f"{self.what} needs an artifact store in stack '{res.stack}'")
        return res.artifact_store

    async def prepare(self) -> None:
        """Check once per run that jobs can be built, pushed, submitted and read back."""
        if self._prepared is None:
            self._prepared = _Memo(self._prepare)
        await self._prepared.get()

    async def _prepare(self) -> None:
        res = self.resources
        store = self._store()
        assert res is not None
        # The image machinery (pathspec, the wheelhouse) is imported off the loop, before any step
        # launches: compiling it on the loop would stall every other step for tens of ms.
        await anyio.to_thread.run_sync(importlib.import_module, "stepflow.remote._images")
        await anyio.to_thread.run_sync(self._image_builder)  # scans entry points: off the loop too
        if res.container_registry is None:
            raise ConfigError(f"{self.what} needs a container registry in stack '{res.stack}' (add one with "
                              f"`stepflow stack update {res.stack} -c NAME`)")
        if store.flavor == "local" and not self.backend.local_store:
            raise ConfigError(f"{self.what} runs jobs on other machines, which cannot reach the local artifact store "
                              f"'{store.name}' ({store.root}): use a remote one (s3, gcs or azure)")
        builder = self._image_builder()
        registry = res.container_registry
        base = self._base_image(self.config)

        async def registry_ok() -> None:
            check = getattr(registry, "check", None)
            if check is None:
                return
            try:
                await check("stepflow-steps", push=True)
            except RegistryError as exc:
                raise ConfigError(f"{self.what}: cannot push step images: {exc}") from None

        async def base_image_ok() -> None:
            image_id = getattr(builder, "image_id", None)
            if image_id is None:
                return
            if await image_id(base) is not None:
                return
            pull = getattr(builder, "pull", None)
            try:
                if pull is not None:
                    await pull(base)
                    return
            except ImageBuildError as exc:
                raise ConfigError(f"{self.what}: base image '{base}' is not on the image builder's Docker daemon and "
                                  f"cannot be pulled ({exc}). Build it (scripts/services.sh does) or set "
                                  "--base_image") from None
            raise ConfigError(f"{self.what}: base image '{base}' is not on the image builder's Docker daemon: build "
                              "it (scripts/services.sh does) or set --base_image")

        await all_of(registry_ok, base_image_ok, functools.partial(self.backend.prepare, res))

    def _image_builder(self) -> Any:
        res = self.resources
        assert res is not None
        if res.image_builder is not None:
            return res.image_builder
        if self._builder is None:
            self._builder = default_image_builder(self.what)
        return self._builder

    def _base_image(self, options: Any) -> str:
        return str(getattr(options, "base_image", None) or getattr(self.backend, "default_base_image", None)
                   or DEFAULT_BASE_IMAGE)

    async def aclose(self) -> None:
        """Release the tracker (closing the backend when no run uses it) and the default builder."""
        if self._tracker is not None:
            tracker, self._tracker = self._tracker, None
            await _tracker.release(tracker, self.backend)
        else:
            await _tracker._close(self.backend)
        if self._builder is not None:
            builder, self._builder = self._builder, None
            with contextlib.suppress(Exception):  # closing must not hide the run's outcome
                await builder.aclose()

    # ------------------------------------------------------------------ one attempt
    async def launch(self, invocation: Invocation) -> Any:
        """Run one attempt as a backend job (see the module docstring)."""
        await self.prepare()
        res = self.resources
        assert res is not None
        store = self._store()
        options = self.options_for(invocation.settings)
        attempt = _Attempt.plan(self, invocation, store, res)
        run_store = res.run_store
        recorded = None
        if run_store is not None:
            recorded = await anyio.to_thread.run_sync(run_store.find_job, invocation.run_id, invocation.step,
                                                      invocation.attempt)
        if recorded is not None and recorded.spec and await store.exists(attempt.output_uri):
            # Finished while no runner watched: read its output, ask the backend nothing.
            invocation.emit(LogLine, line=f"re-attached to finished job {attempt.name}; reading its output",
                            stream="stepflow")
            self.stats.reattached += 1
            return await attempt.read_output(None)
        if recorded is not None and recorded.spec:
            job = attempt.job_from_record(recorded.spec, options, invocation)
            invocation.emit(LogLine, line=f"re-attaching to job {attempt.name}", stream="stepflow")
            self.stats.reattached += 1
            if recorded.job_id:  # the backend accepted (and started) it: follow it, submit nothing
                return await self._collect(attempt, job, recorded.job_id, invocation)
        else:
            image = await self.ensure_image(options, invocation.step)
            job = await attempt.prepare_job(image, options, invocation)
            check_limits(job, self.backend.limits, what=self.what)
            if run_store is not None:  # recorded before it exists: a runner dying now never submits twice
                await anyio.to_thread.run_sync(run_store.record_job, invocation.run_id, invocation.step,
                                               invocation.attempt, self.name, job.name, "", attempt.payload_uri,
                                               attempt.spec_json(job))
            failpoint("job.recorded")
        job_id = await self._submit(job)
        failpoint("job.submitted")
        if run_store is not None:
            await anyio.to_thread.run_sync(run_store.set_job_id, invocation.run_id, invocation.step,
                                           invocation.attempt, job_id)
        return await self._collect(attempt, job, job_id, invocation)

    async def _collect(self, attempt: _Attempt, job: Job, job_id: str, invocation: Invocation) -> Any:
        """Follow a submitted job to its end and read its output."""
        run_store = self.resources.run_store if self.resources is not None else None
        invocation.emit(JobSubmitted, operator=self.name, job_id=job_id, attempt=invocation.attempt)
        state = await self._follow(job_id, invocation)
        failpoint("job.finished")
        if run_store is not None:
            await anyio.to_thread.run_sync(run_store.update_job, invocation.run_id, invocation.step,
                                           invocation.attempt, state.phase)
        if state.phase == "stopped":
            raise JobStoppedError(f"job {job.name} was stopped on its backend outside stepflow "
                                  f"({state.detail or state.status})")
        return await attempt.read_output(state)

    async def _submit(self, job: Job) -> str:
        """Submit with the retry policy; if it gives up, a job created by a try whose answer was lost is adopted."""
        self.stats.submits += 1

        async def once() -> str:
            self.stats.submit_calls += 1
            return await self.backend.submit(job)

        try:
            return await self.policy.call(once, classify=self.backend.is_transient)
        except Exception as exc:
            if not retry.transient(exc, self.backend.is_transient):
                raise
            with contextlib.suppress(Exception):  # the lookup is a last chance, not a new failure
                found = await self.backend.find(job.name)
                if found:
                    return found
            raise

    async def _follow(self, job_id: str, inv: Invocation) -> JobState:
        tracker = self.tracker

        def on_state(state: JobState) -> None:
            inv.emit(JobStatusChanged, job_id=job_id, status=state.status, detail=state.detail)

        def on_lines(lines: Sequence[str]) -> None:
            for line in lines:
                inv.emit(LogLine, line=line.rstrip("\n"), stream="stdout")

        watch = tracker.follow(job_id, on_state, on_lines)
        state: JobState | None = None
        try:
            state = await tracker.wait(watch)
        except BaseException:
            with anyio.CancelScope(shield=True):
                state = await self._stop(job_id, watch, inv)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                tracker.forget(job_id)
                with contextlib.suppress(Exception):  # a leftover is not worth failing the step
                    await self.policy.call(functools.partial(self.backend.cleanup, job_id, state),
                                           classify=self.backend.is_transient)
        assert state is not None
        if state.phase == "stopped" and job_id in self._stopped_by_us:
            state = attrs.evolve(state, detail="stopped by stepflow")
        return state

    async def _stop(self, job_id: str, watch: Any, inv: Invocation) -> JobState | None:
        """Stop the job on its backend and wait (bounded) until it says it ended."""
        self._stopped_by_us.add(job_id)
        self.stats.cancels += 1
        try:
            await self.policy.call(functools.partial(self.backend.cancel, job_id), classify=self.backend.is_transient)
        except Exception as exc:
            inv.emit(LogLine, line=f"[stepflow] could not stop job {job_id}: {exc}", stream="stepflow")
            return None
        self.tracker.hurry()
        try:
            state = await self.tracker.wait(watch, timeout=self.stop_timeout)
        except StepflowError:
            return None
        if state is not None:
            inv.emit(JobStatusChanged, job_id=job_id, status=state.status, detail="stopped by stepflow")
        return state

    # ------------------------------------------------------------------ images
    async def ensure_image(self, options: Any, step: str) -> str:
        """The pushed image for this step (built at most once per content hash)."""
        from stepflow.remote._images import ImageManager, ImageSpec

        res = self.resources
        assert res is not None and res.container_registry is not None
        if self._images is None:
            self._images = ImageManager(self._image_builder(), res.container_registry, cache_dir=res.cache_dir,
                                        emit=res.emit, home=res.home)
        wanted = list(getattr(options, "requirements", None) or ())
        wanted += [r for r in self._store().image_requirements if r not in wanted]  # jobs must reach the store
        spec = ImageSpec(base_image=self._base_image(options), requirements=tuple(wanted),
                         project_root=project_root(options), platform=getattr(options, "platform", "linux/amd64"))
        return str(await self._images.ensure(spec, step=step))

    def warn_once(self, key: str, inv: Invocation, line: str) -> None:
        """One LogLine per run about ``key`` (e.g. credentials passed in a job's environment)."""
        if key not in self._warned:
            self._warned.add(key)
            inv.emit(LogLine, line=f"[stepflow] {line}", stream="stepflow")


class _Attempt:
    """Names, locations and keys of one step attempt."""

    def __init__(self, op: JobOperator, inv: Invocation, store: ArtifactStore, res: RunResources) -> None:
        self.op, self.inv, self.store = op, inv, store
        self.name = job_name(inv.run_id, inv.step, inv.attempt, op.backend.limits)
        self.keys = keys.JobKeys.derive(res.derive_key, self.name)
        self.base = f"{store.root.rstrip('/')}/runs/{inv.run_id}/{_safe(inv.step)}/attempt-{inv.attempt}"
        self.output_uri = f"{self.base}/out/output.bin"
        self.payload_uri = ""
        self.refs: list[str] = []

    @classmethod
    def plan(cls, op: JobOperator, inv: Invocation, store: ArtifactStore, res: RunResources) -> _Attempt:
        return cls(op, inv, store, res)

    def labels(self) -> dict[str, str]:
        inv = self.inv
        return clean_labels({"stepflow.run": inv.run_id, "stepflow.step": inv.step,
                             "stepflow.attempt": str(inv.attempt)}, self.op.backend.limits)

    async def prepare_job(self, image: str, options: Any, inv: Invocation) -> Job:
        data, refs = await self._payload(inv)
        digest = envelope.sha256(data)
        self.payload_uri = f"{self.base}/payload-{digest[:16]}.bin"
        self.refs = [uri for uri, _ in refs]
        for uri, blob in refs:  # content-addressed: written once, shared by every step and attempt
            if not await self.store.exists(uri):
                await self.store.write_bytes(uri, blob)
        await self.store.write_bytes(self.payload_uri, data)
        if not self.store.is_remote:
            await anyio.to_thread.run_sync(_writable_dir, self.output_uri.rsplit("/", 1)[0])
        return self._job(image, digest, options, inv)

    def _job(self, image: str, digest: str, options: Any, inv: Invocation, labels: Mapping[str, str] | None = None,
             command: Sequence[str] | None = None) -> Job:
        op = self.op
        public, secret = self.store.job_storage_options()
        env = {keys.PAYLOAD_SHA_ENV: digest, "HOME": "/tmp"}
        if op.backend.failure_file:
            env[keys.FAILURE_FILE_ENV] = op.backend.failure_file
        if public:
            env[STORAGE_OPTIONS_ENV] = json.dumps(public, sort_keys=True)
        env.update({str(k): str(v) for k, v in (getattr(options, "environment", None) or {}).items()})
        secrets: dict[str, Any] = {keys.TOKEN_SECRET: self.keys.token.hex()}
        if op.backend.secret_channel:
            if secret:
                secrets[keys.STORAGE_SECRET] = secret
        else:
            env[keys.TOKEN_ENV] = self.keys.token.hex()
            if secret and getattr(options, "pass_storage_credentials", False):
                env[STORAGE_CREDENTIALS_ENV] = json.dumps(secret, sort_keys=True)
                op.warn_once("storage-credentials", inv, f"artifact store '{self.store.name}': its credentials are in "
                             f"the environment of {op.flavor} jobs (pass_storage_credentials), where anyone who may "
                             "describe a job can read them; prefer the job's own identity")
            elif secret:
                op.warn_once("storage-identity", inv, f"artifact store '{self.store.name}': its credentials are not "
                             f"given to {op.flavor} jobs (their description would show them); jobs reach the store "
                             "with their own identity (role / service account / managed identity)")
        local: dict[str, str] = {}
        if not self.store.is_remote:
            local = {self.payload_uri: "ro", self.output_uri.rsplit("/", 1)[0]: "rw", **dict.fromkeys(self.refs, "ro")}
        return Job(name=self.name, image=image,
                   command=tuple(command or ("python3", "-m", "stepflow.entrypoint", "--payload", self.payload_uri,
                                             "--output", self.output_uri)),
                   env=env, labels=dict(labels or self.labels()), run_id=inv.run_id, step=inv.step,
                   attempt=inv.attempt, options=options, resources=inv.resources, timeout=inv.timeout,
                   secrets=secrets, local_paths=local)

    def spec_json(self, job: Job) -> str:
        """What the run store keeps to submit the same job again after a crash (no secrets)."""
        return json.dumps({"v": JOB_SPEC_VERSION, "image": job.image, "command": list(job.command),
                           "labels": dict(job.labels), "payload_uri": self.payload_uri,
                           "payload_sha256": job.env.get(keys.PAYLOAD_SHA_ENV), "refs": self.refs}, sort_keys=True)

    def job_from_record(self, spec_text: str, options: Any, inv: Invocation) -> Job:
        spec = json.loads(spec_text)
        self.payload_uri, self.refs = str(spec["payload_uri"]), list(spec.get("refs") or [])
        return self._job(str(spec["image"]), str(spec["payload_sha256"]), options, inv, labels=spec.get("labels"),
                         command=spec.get("command"))

    async def _payload(self, inv: Invocation) -> tuple[bytes, list[tuple[str, bytes]]]:
        store = self.store

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
            data = envelope.encode("payload", body, self.keys.payload_key, run_id=inv.run_id, step=inv.step,
                                   attempt=inv.attempt, job=self.name, output_key=self.keys.wrapped_output_key())
            return data, refs

        return await anyio.to_thread.run_sync(build)

    async def read_output(self, state: JobState | None) -> Any:
        name, uri = self.name, self.output_uri
        try:
            data = await self.store.read_bytes(uri)
        except FileNotFoundError:
            if state is not None and state.phase == "failed":
                code = f" (exit code {state.exit_code})" if state.exit_code is not None else ""
                raise RemoteStepError(f"job {name} failed: {state.detail or state.status}{code}; it wrote no output "
                                      "(see the step's log lines)") from None
            raise RemoteStepError(f"job {name} reported success but wrote no output at {uri}: the job's command did "
                                  "not run the step (check the image and its entrypoint)") from None
        inv = self.inv
        expect = {"job": name, "run_id": inv.run_id, "step": inv.step, "attempt": inv.attempt}
        _, body = await anyio.to_thread.run_sync(functools.partial(
            envelope.decode, data, self.keys.output_key, kind="output", expect=expect))
        if body.get("ok"):
            return body.get("value")
        detail = f" [{state.detail}]" if state is not None and state.detail and state.phase == "failed" else ""
        raise RemoteStepError(f"{body.get('type')}: {body.get('message')}{detail}",
                              remote_traceback=str(body.get("traceback") or ""), remote_type=str(body.get("type")))


class _Memo:
    """An async computation run once; its error is re-raised (as a fresh copy) to every caller."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.error: BaseException | None = None
        self.done = False
        self.lock = anyio.Lock()

    async def get(self) -> None:
        if self.done:
            return
        async with self.lock:
            if not self.done and self.error is None:
                try:
                    await self.fn()
                    self.done = True
                except StepflowError as exc:
                    self.error = exc
        if self.error is not None:
            error = self.error
            try:
                fresh = type(error)(*error.args)
            except Exception:
                fresh = StepflowError(str(error))
            raise fresh from None


async def all_of(*checks: Any) -> None:
    """Run independent async checks at once; raise the one error, or one listing them all."""
    errors: list[BaseException] = []

    async def one(check: Any) -> None:
        try:
            await check()
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for check in checks:
            tg.start_soon(one, check)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        stepflow_errors = [e for e in errors if isinstance(e, StepflowError)]
        if len(stepflow_errors) < len(errors):
            raise next(e for e in errors if not isinstance(e, StepflowError))
        raise ConfigError("\n".join(str(e) for e in errors))


def default_image_builder(what: str) -> Any:
    """The stack-less default: the ``docker`` image builder flavor, when a plugin provides it."""
    from stepflow._plugins import registry

    try:
        flavor = registry.load("image_builder", "docker")
    except StepflowError:
        raise ConfigError(f"{what} needs an image builder: add one to the stack (-i NAME), or install "
                          "stepflow-docker, whose docker builder is the default") from None
    return flavor.create(f"docker (default of {what})", flavor.config_class())


def project_root(options: Any) -> Path | None:
    """The project folder shipped in images: the option, else the current directory."""
    root = getattr(options, "project_root", None)
    if root:
        return Path(root).expanduser().resolve()
    return Path.cwd() if Path.cwd() != Path(sys.prefix) else None


def _safe(step: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", step)


def _writable_dir(path: str) -> None:
    """The job's output folder on a local store: a job runs as an unprivileged user."""
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o777)  # only this attempt's folder, under the owner's artifact root
