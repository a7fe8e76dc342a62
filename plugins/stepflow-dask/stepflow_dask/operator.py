"""The ``dask`` step operator: each step attempt is one task on a Dask distributed cluster.

The runner talks to the scheduler with ``distributed.Client(asynchronous=True)`` on its own
event loop (no threads). Per attempt:

1. the step function and its resolved inputs are pickled (a value that cannot be is reported
   naming the step) and submitted under a deterministic key, ``stepflow-RUN-STEP-ATTEMPT``,
   with the Dask resources, worker restrictions and priority of the step;
2. the job is recorded in the run store, and the task is published on the scheduler (one
   dataset ``stepflow-RUN-b...`` per submission batch, mapping keys to futures): a published
   task outlives a runner that dies, so ``stepflow resume`` re-attaches to it
   (``Client.get_dataset``) instead of running it again;
3. the step's prints and log records and the worker it started on arrive as Dask events
   (:mod:`stepflow_dask._task`) and are emitted as ``LogLine`` / ``JobStatusChanged``; a second
   start means its worker died and Dask rescheduled it, which is an event, not a failure;
4. the result comes back with the future; a step's exception comes back as data with its
   remote traceback. Cancellation cancels the future and interrupts the step's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import anyio
import attrs
import cloudpickle
import distributed
from distributed import Client
from distributed.client import FutureCancelledError

from stepflow import NonRetryableError, StepflowError
from stepflow.errors import ConfigError, JobStoppedError, RemoteStepError
from stepflow.events import JobStatusChanged, JobSubmitted, LogLine
from stepflow.interfaces import Invocation, StepOperator
from stepflow.remote import RunResources
from stepflow.resources import Resources
from stepflow_dask import _task
from stepflow_dask.flavor import DaskOperatorConfig, DaskSettings

#: Distributions whose versions must match between the runner and the cluster, beyond Dask's own.
CHECKED_PACKAGES = ("stepflow", "stepflow-dask")
#: Dask's own packages worth failing for (a micro Python difference is fine for cloudpickle).
DASK_PACKAGES = ("dask", "distributed", "cloudpickle", "msgpack", "tornado", "toolz")
#: Seconds after a cancellation when the steps of cancelled tasks are interrupted a second time.
INTERRUPT_AGAIN_S = 1.0
#: Seconds a fetched list of the cluster's workers is reused to check steps' resources.
IDENTITY_TTL = 2.0


class DaskOperatorError(NonRetryableError):
    """The Dask cluster refused or lost a step (the message says what and how to fix it)."""


class RemoteNonRetryableError(RemoteStepError, NonRetryableError):
    """The step raised NonRetryableError on the cluster, or the cluster cannot load it at all."""


def task_key(run_id: str, step: str, attempt: int) -> str:
    """The deterministic Dask key of one attempt: the same run, step and attempt give the same key."""
    return f"stepflow-{run_id}-{re.sub(r'[^A-Za-z0-9_.-]', '_', step)}-{attempt}"


@attrs.define
class _Watch:
    """What the event handler needs to report one running attempt."""

    emit: Callable[..., None]
    worker: str = ""
    starts: int = 0


class _Batcher:
    """Coalesces calls made in the same loop iteration into one call with all their items."""

    def __init__(self, flush: Callable[[dict[str, Any]], Awaitable[Mapping[str, Any] | None]]) -> None:
        self.flush = flush
        self.pending: dict[str, tuple[Any, asyncio.Future[Any]]] = {}
        self.task: asyncio.Task[None] | None = None
        self.inflight: dict[str, asyncio.Future[Any]] = {}

    def add(self, name: str, value: Any) -> asyncio.Future[Any]:
        """Queue one item; the future answers with the flush's result for ``name`` (None without one)."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[name] = (value, done)
        self.inflight[name] = done
        done.add_done_callback(lambda _: self.inflight.pop(name, None))
        if self.task is None:
            self.task = asyncio.ensure_future(self._run())
        return done

    async def _run(self) -> None:
        try:
            while self.pending:
                await asyncio.sleep(0)  # let the other steps started in this iteration join the batch
                batch, self.pending = self.pending, {}
                try:
                    results = await self.flush({name: value for name, (value, _) in batch.items()}) or {}
                except Exception as exc:
                    for _, done in batch.values():
                        if not done.done():
                            done.set_exception(exc)
                            done.exception()  # a waiter cancelled meanwhile must not leave it unretrieved
                else:
                    for name, (_, done) in batch.items():
                        if not done.done():
                            done.set_result(results.get(name))
        finally:
            self.task = None

    async def drain(self) -> None:
        """Wait until every queued item was flushed."""
        while self.task is not None:
            await asyncio.shield(self.task)


class _LeftTasks:
    """What ``stepflow runs stop`` asks of an operator: find and stop tasks a dead runner left on the cluster."""

    def __init__(self, operator: DaskStepOperator) -> None:
        self.operator = operator
        self.stopped: set[str] = set()  # keys cancelled here (a future's own status may lag behind)

    async def _published(self, key: str) -> tuple[str, dict[str, Any]] | None:
        client = await self.operator.connect()
        for name in await client.list_datasets():
            if str(name).startswith("stepflow-") and key.startswith(str(name).rsplit("-b", 1)[0]):
                tasks = await client.get_dataset(name)
                if isinstance(tasks, dict) and key in tasks:
                    return str(name), tasks
        return None

    async def find(self, name: str) -> str | None:
        """The task's key when the cluster still holds it (published), else None."""
        return name if await self._published(name) is not None else None

    async def cancel(self, job_id: str) -> None:
        """Cancel the task, stop its step on the worker, unpublish its batch once none of it runs; gone: no-op."""
        found = await self._published(job_id)
        if found is None:
            return
        client = await self.operator.connect()
        name, tasks = found
        await client.cancel([tasks[job_id]], force=True, reason="stopped by `stepflow runs stop`")
        self.stopped.add(job_id)
        await client.run(_task.interrupt, [job_id], on_error="ignore")
        if all(key in self.stopped or f.status in ("finished", "error") for key, f in tasks.items()):
            await client.unpublish_dataset(name)


class DaskStepOperator(StepOperator):
    """Runs each step attempt as a task on a Dask distributed cluster (see the module docstring)."""

    flavor: ClassVar[str] = "dask"
    requires_pickling: ClassVar[bool] = True
    settings_class: ClassVar[type] = DaskSettings

    def __init__(self, name: str = "dask", config: DaskOperatorConfig | None = None) -> None:
        self.name = name
        self.config = config or DaskOperatorConfig()
        self.max_concurrency = self.config.max_concurrency
        self.client: Any | None = None
        self.cluster: Any = None
        self.resources: RunResources | None = None
        self._connecting: asyncio.Task[Any] | None = None
        self._watches: dict[str, _Watch] = {}
        self._submitter = _Batcher(self._submit_batch)
        self._released = _Batcher(self._finish_batch)
        #: Keys re-attached by this operator (tests and `stepflow resume` messages read it).
        self.reattached: list[str] = []
        self._identity_at: tuple[float, asyncio.Future[Any]] | None = None
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._completion: Any = None
        self._collector: asyncio.Task[None] | None = None
        self._gatherer = _Batcher(self._gather_batch)
        self._interrupter = _Batcher(self._interrupt_batch)
        self._batch_of: dict[str, str] = {}  # task key -> the dataset publishing it
        self._batch_left: dict[str, set[str]] = {}  # dataset -> its keys not yet released
        # run -> (key -> (dataset, future)): what a dead runner of that run published, fetched once
        self._left_by_dead: dict[str, asyncio.Future[dict[str, tuple[str, Any]]]] = {}
        #: For `stepflow runs stop`: stops the tasks of a run whose runner died.
        self.backend = _LeftTasks(self)

    @property
    def what(self) -> str:
        """``step-operator 'NAME' (dask at ADDRESS)`` for messages."""
        return f"step-operator '{self.name}' (dask at {self.config.address})"

    # ------------------------------------------------------------------ run lifecycle
    async def attach(self, resources: RunResources) -> None:
        """Receive the run's resources (its run store, and whether it resumes an interrupted run)."""
        self.resources = resources

    async def prepare(self) -> None:
        """Reach the scheduler (or start the local cluster) and compare versions, once per run."""
        await self.connect()

    async def connect(self) -> Any:
        """The connected client, connecting on first use (concurrent callers share one attempt)."""
        if self.client is not None:
            return self.client
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        except StepflowError:
            self._connecting = None  # the next run (or a retry) tries again
            raise

    async def _connect(self) -> Any:
        cfg = self.config
        address: Any = cfg.address
        if cfg.address == "local":
            self.cluster = await distributed.LocalCluster(  # type: ignore[no-untyped-call]
                n_workers=cfg.local_workers, threads_per_worker=cfg.local_threads_per_worker, processes=True,
                asynchronous=True, dashboard_address=":0", resources=dict(cfg.local_resources) or None)
            address = self.cluster
        security = None
        if cfg.tls_ca_file:
            security = distributed.Security(  # type: ignore[no-untyped-call]
                tls_ca_file=cfg.tls_ca_file, tls_client_cert=cfg.tls_client_cert, tls_client_key=cfg.tls_client_key,
                require_encryption=True)
        started = time.monotonic()
        try:
            client = await Client(address, asynchronous=True, timeout=cfg.connect_timeout,  # type: ignore[no-untyped-call]
                                  security=security, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            waited = time.monotonic() - started
            raise ConfigError(f"{self.what}: cannot reach the Dask scheduler at {cfg.address} (tried for "
                              f"{waited:.0f} s: {type(exc).__name__}: {_first_line(exc)}); start it (`dask scheduler`) "
                              "or fix --address, or raise --connect_timeout") from None
        try:
            if cfg.check_versions:
                await self._check_versions(client)
            client.subscribe_topic(_task.TOPIC, self._on_event)
        except BaseException:
            await client.close()
            raise
        self.client = client
        return client

    async def _check_versions(self, client: Any) -> None:
        versions = await client.get_versions(packages=list(CHECKED_PACKAGES))
        problem = version_mismatch(versions)
        if problem:
            raise ConfigError(f"{self.what}: {problem}; install the same versions on this machine and on the "
                              "scheduler and workers (or set --check_versions=false)")

    async def aclose(self) -> None:
        """Close the client, and stop the local cluster when this run started one."""
        with contextlib.suppress(Exception):  # the last ends are recorded and unpublished first
            await self._released.drain()
            with anyio.move_on_after(5):
                await self._interrupter.drain()
            if self.client is not None:  # batches of an earlier runner whose other tasks ended before it died
                leftovers = {name for name in self._batch_left} | {
                    name for found in self._left_by_dead.values() if found.done() and not found.exception()
                    for name, _ in found.result().values()}
                await asyncio.gather(*(self.client.unpublish_dataset(n) for n in leftovers), return_exceptions=True)
        self._batch_left.clear()
        self._batch_of.clear()
        self._left_by_dead.clear()
        self._completion, self._collector, self._identity_at = None, None, None  # bound to this client
        client, self.client, self._connecting = self.client, None, None
        with contextlib.suppress(Exception):  # closing must not hide the run's outcome
            if client is not None:
                client.unsubscribe_topic(_task.TOPIC)
                await client.close()
        cluster, self.cluster = self.cluster, None
        with contextlib.suppress(Exception):
            if cluster is not None:
                await cluster.close()

    # ------------------------------------------------------------------ settings
    def _settings(self, settings: Mapping[str, Any]) -> DaskSettings:
        return DaskSettings(**dict(settings)) if settings else DaskSettings()

    def validate_settings(self, settings: Mapping[str, Any], resources: Resources | None = None) -> list[str]:
        """Problems of one step's resources for Dask (settings keys are checked by the run)."""
        try:
            self.task_resources(resources, self._settings(settings))
        except (ConfigError, TypeError, ValueError) as exc:
            return [str(exc)]
        return []

    def task_resources(self, resources: Resources | None, settings: DaskSettings) -> dict[str, float]:
        """The Dask worker resources one step asks for: the operator's, the step's Resources, its settings."""
        cfg = self.config
        out: dict[str, float] = dict(cfg.resources)
        if resources is not None:
            if resources.gpu_type:
                raise ConfigError(f"{self.what}: Resources(gpu_type={resources.gpu_type!r}) has no Dask equivalent; "
                                  "declare a worker resource for it (dask worker --resources 'A100=1') and ask for "
                                  "it with settings={'dask': {'resources': {'A100': 1}}}")
            if resources.gpu and cfg.gpu_resource:
                out[cfg.gpu_resource] = float(resources.gpu)
            if resources.memory_mib and cfg.memory_resource:
                out[cfg.memory_resource] = float(math.ceil(resources.memory_mib * 1024 * 1024))
            if resources.cpu and cfg.cpu_resource:
                out[cfg.cpu_resource] = float(resources.cpu)
        out.update(settings.resources)
        return out

    # ------------------------------------------------------------------ one attempt
    async def launch(self, invocation: Invocation) -> Any:
        """Run one attempt as a Dask task and return its value (or raise its error)."""
        inv = invocation
        client = await self.connect()
        settings = self._settings(inv.settings)
        key = task_key(inv.run_id, inv.step, inv.attempt)
        self._watches[key] = _Watch(inv.emit)
        future: Any = None
        published = False
        try:
            future = await self._reattach(client, inv, key)
            if future is not None:
                published = True
            else:
                published = self.config.reattach
                future = await self._submit(client, inv, settings, key)
                inv.emit(JobSubmitted, operator=self.name, job_id=key, attempt=inv.attempt)
            outcome = await self._outcome(client, future)
            await asyncio.sleep(0)  # log events that arrived with the result are handled first
        except FutureCancelledError:
            self._release(future, key, published, (inv.run_id, inv.step, inv.attempt, "stopped"))
            raise JobStoppedError(f"the Dask task {key} of step '{inv.step}' was cancelled on the cluster outside "
                                  "stepflow") from None
        except BaseException as exc:
            submitting = self._submitter.inflight.get(key)
            if future is None and submitting is not None:  # cancelled while its batch is sent: stop what it made
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    future = await submitting
            if future is not None:
                with anyio.CancelScope(shield=True):
                    await self._stop(client, future, key)
                self._release(future, key, published, (inv.run_id, inv.step, inv.attempt, "stopped"))
            if isinstance(exc, Exception) and not isinstance(exc, StepflowError):
                raise self._lost(inv, key, exc) from None
            raise
        finally:
            self._watches.pop(key, None)
        self._release(future, key, published, (inv.run_id, inv.step, inv.attempt,
                                               "succeeded" if outcome.get("ok") else "failed"))
        inv.emit(JobStatusChanged, job_id=key, status="finished" if outcome.get("ok") else "failed",
                 detail=f"on worker {outcome.get('worker', '?')}")
        if outcome.get("ok"):
            return outcome.get("value")
        cls = RemoteNonRetryableError if outcome.get("nonretryable") else RemoteStepError
        raise cls(f"{outcome.get('type')}: {outcome.get('message')}", remote_traceback=str(outcome.get("traceback")),
                  remote_type=str(outcome.get("type")))

    async def _outcome(self, client: Any, future: Any) -> dict[str, Any]:
        """The task's result, fetched together with the others that finished in the same loop iteration.

        ``await future`` would make one gather call per task; one collector follows every task
        of this operator (``as_completed``) and gathers finished results in batches.
        """
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[future.key] = waiter
        try:
            if self._completion is None:
                self._completion = distributed.as_completed([], loop=client.loop)  # type: ignore[no-untyped-call]
            self._completion.add(future)
            if self._collector is None or self._collector.done():
                self._collector = asyncio.ensure_future(self._collect())
            return dict(await waiter)
        finally:
            self._waiting.pop(future.key, None)

    async def _collect(self) -> None:
        async for future in self._completion:  # ends when no task is left to follow
            self._gatherer.add(future.key, future)

    async def _gather_batch(self, items: dict[str, Any]) -> None:
        client = self.client
        finished = {key: f for key, f in items.items() if f.status == "finished" and key in self._waiting}
        alone = [(key, f) for key, f in items.items() if key not in finished]
        if finished and client is not None:
            try:
                values = await client.gather(list(finished.values()))
            except Exception:  # one result lost between finishing and gathering: each on its own
                alone += list(finished.items())
            else:
                for key, value in zip(finished, values, strict=True):
                    waiter = self._waiting.get(key)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(value)
        for key, future in alone:  # errors and cancellations: the future's own exception
            waiter = self._waiting.get(key)
            if waiter is None or waiter.done():
                continue
            try:
                waiter.set_result(await future)
            except Exception as exc:
                if not waiter.done():
                    waiter.set_exception(exc)

    async def _reattach(self, client: Any, inv: Invocation, key: str) -> Any:
        """On a resumed run, the task a dead runner left on the cluster (None when there is none)."""
        res = self.resources
        if res is None or not res.resumed or res.run_store is None or not self.config.reattach:
            return None
        recorded = await anyio.to_thread.run_sync(res.run_store.find_job, inv.run_id, inv.step, inv.attempt)
        if recorded is None:
            return None
        if inv.run_id not in self._left_by_dead:
            self._left_by_dead[inv.run_id] = asyncio.ensure_future(self._published_tasks(client, inv.run_id))
        found = (await asyncio.shield(self._left_by_dead[inv.run_id])).get(key)
        if found is None or found[1].status == "cancelled":
            inv.emit(LogLine, line=f"task {key} is no longer on the Dask cluster (its scheduler restarted, or the "
                     "task was cancelled); running the step again", stream="stepflow")
            return None
        name, future = found
        self._batch_of[key] = name
        self._batch_left.setdefault(name, set()).add(key)
        self.reattached.append(key)
        inv.emit(LogLine, line=f"re-attached to task {key} on the Dask cluster", stream="stepflow")
        inv.emit(JobSubmitted, operator=self.name, job_id=key, attempt=inv.attempt)
        return future

    @staticmethod
    async def _published_tasks(client: Any, run_id: str) -> dict[str, tuple[str, Any]]:
        """Every task a runner of ``run_id`` published: key -> (dataset, future)."""
        prefix = f"stepflow-{run_id}-b"
        out: dict[str, tuple[str, Any]] = {}
        for name in await client.list_datasets():
            if str(name).startswith(prefix):
                tasks = await client.get_dataset(name)
                out.update({key: (str(name), future) for key, future in dict(tasks).items()})
        return out

    async def _submit(self, client: Any, inv: Invocation, settings: DaskSettings, key: str) -> Any:
        try:
            target = _task.function_ref(inv.fn) or inv.fn
            payload = cloudpickle.dumps((target, inv.args, dict(inv.kwargs)))
        except Exception as exc:
            raise NonRetryableError(f"step '{inv.step}': its inputs cannot be serialized for the Dask cluster "
                                    f"({type(exc).__name__}: {_first_line(exc)}); return plain data from the "
                                    "upstream step, or run this step on another operator") from None
        wanted = self.task_resources(inv.resources, settings)
        workers = list(settings.workers or self.config.workers)
        allow_other = (settings.allow_other_workers if settings.allow_other_workers is not None
                       else self.config.allow_other_workers)
        if wanted or workers:
            self._check_cluster(await self._identity(client), inv.step, wanted, workers, allow_other)
        placement = (tuple(sorted(wanted.items())), tuple(workers), allow_other and bool(workers),
                     settings.priority if settings.priority is not None else self.config.priority)
        record = (inv.run_id, inv.step, inv.attempt, self.name, key, key, None,
                  json.dumps({"address": self.config.address, "key": key}))
        args = (payload, key, inv.run_id, inv.step, inv.attempt, inv.pipeline, self.config.announce_after_s)
        return await self._submitter.add(key, (placement, args, record))

    async def _submit_batch(self, items: dict[str, Any]) -> dict[str, Any]:
        """Submit every attempt queued in this loop iteration: one graph per placement, one publish for all.

        One ``client.map`` sends one graph update for many tasks, where a submit per step would
        send one each (the scheduler's cost per update dominates small steps).
        """
        client = self.client
        if client is None:
            raise DaskOperatorError(f"{self.what}: not connected")
        store = self.resources.run_store if self.resources is not None else None
        if store is not None:  # recorded before they exist, so `stepflow runs` shows what a dead runner left
            rows = [record for _, _, record in items.values()]
            await anyio.to_thread.run_sync(lambda: [store.record_job(*row) for row in rows])
        groups: dict[Any, list[tuple[str, tuple[Any, ...]]]] = {}
        for key, (placement, args, _) in items.items():
            groups.setdefault(placement, []).append((key, args))
        futures: dict[str, Any] = {}
        for (resources, workers, allow_other, priority), members in groups.items():
            keys = [key for key, _ in members]
            columns = [list(column) for column in zip(*(args for _, args in members), strict=True)]
            made = client.map(_task.run_step, *columns, key=keys, pure=False, resources=dict(resources) or None,
                              workers=list(workers) or None, allow_other_workers=allow_other, priority=priority)
            futures.update(zip(keys, made, strict=True))
        if self.config.reattach:
            batches: dict[str, dict[str, Any]] = {}  # run -> key -> future: one dataset per run and batch
            for key, (_, args, _) in items.items():
                batches.setdefault(str(args[2]), {})[key] = futures[key]
            named = {f"stepflow-{run_id}-b{uuid.uuid4().hex[:12]}": tasks for run_id, tasks in batches.items()}
            for name, tasks in named.items():
                self._batch_left[name] = set(tasks)
                self._batch_of.update(dict.fromkeys(tasks, name))
            await client.publish_dataset(named)
        return futures

    async def _identity(self, client: Any) -> dict[str, Any]:
        """The scheduler's view of its workers, asked at most every IDENTITY_TTL seconds."""
        now = time.monotonic()
        if self._identity_at is None or now - self._identity_at[0] > IDENTITY_TTL:
            self._identity_at = (now, asyncio.ensure_future(client.scheduler.identity(n_workers=-1)))
        return dict(await asyncio.shield(self._identity_at[1]))

    def _check_cluster(self, info: Mapping[str, Any], step: str, wanted: Mapping[str, float], workers: list[str],
                       allow_other: bool) -> None:
        """Refuse a step no worker can run now, instead of letting it wait forever."""
        known = list((info.get("workers") or {}).values())
        if not known:
            return  # an adaptive cluster may still be scaling up: Dask queues the task
        if workers and not allow_other:
            names = {str(w.get(f)) for w in known for f in ("id", "name", "host")} | {a for a in info["workers"]}
            names |= {a.split("://")[-1].rsplit(":", 1)[0] for a in info["workers"]}
            if not any(w in names for w in workers):
                raise DaskOperatorError(f"step '{step}': none of the workers {', '.join(workers)} is in the Dask "
                                        f"cluster at {self.config.address}; fix --workers (or allow_other_workers)")
        for resource, amount in wanted.items():
            best = max((float((w.get("resources") or {}).get(resource, 0)) for w in known), default=0.0)
            if best < amount:
                have = (f"the most any worker has is {best:g}" if best
                        else "no worker declares it")
                raise DaskOperatorError(f"step '{step}': needs Dask worker resource {resource}={amount:g}, but {have} "
                                        f"(of {len(known)} workers at {self.config.address}); start workers with "
                                        f"`dask worker --resources '{resource}={amount:g}'` or lower the step's "
                                        "resources")

    # ------------------------------------------------------------------ events from the cluster
    def _on_event(self, event: Any) -> None:
        _, msg = event
        watch = self._watches.get(str(msg.get("key")))
        if watch is None:
            return
        if msg.get("kind") == "log":
            watch.emit(LogLine, line=str(msg.get("line", "")), stream=str(msg.get("stream", "stdout")))
        elif msg.get("kind") == "start":
            where = str(msg.get("worker", ""))
            watch.starts += 1
            if watch.starts == 1:
                watch.emit(JobStatusChanged, job_id=str(msg["key"]), status="running", detail=f"on worker {where}")
            else:
                watch.emit(JobStatusChanged, job_id=str(msg["key"]), status="rescheduled",
                           detail=f"worker {watch.worker} left the cluster while running the step; Dask runs it "
                                  f"again on {where}")
            watch.worker = where

    # ------------------------------------------------------------------ ends
    async def _finish_batch(self, items: dict[str, Any]) -> None:
        """Unpublish finished tasks (the cluster frees their results) and record their ends, for many at once."""
        client = self.client
        store = self.resources.run_store if self.resources is not None else None
        if store is not None:
            rows = [row for _, row in items.values()]
            await anyio.to_thread.run_sync(lambda: [store.update_job(*row) for row in rows])
        done: list[str] = []
        for key, (was_published, _) in items.items():
            name = self._batch_of.pop(key, None) if was_published else None
            left = self._batch_left.get(name) if name is not None else None
            if left is not None:
                left.discard(key)
                if not left:  # the whole batch ended: the cluster may forget its results
                    del self._batch_left[name]  # type: ignore[arg-type]
                    done.append(name)  # type: ignore[arg-type]
        if client is not None and done:
            await asyncio.gather(*(client.unpublish_dataset(name) for name in done), return_exceptions=True)

    def _release(self, future: Any, key: str, published: bool, row: tuple[str, str, int, str]) -> None:
        self._released.add(key, (published, row))
        if future is not None:
            future.release()

    async def _stop(self, client: Any, future: Any, key: str) -> None:
        """Cancel the task, take it off the scheduler and free the worker thread running it."""
        with contextlib.suppress(Exception):  # best effort: the cancellation itself must propagate
            with anyio.fail_after(10):
                await client.cancel([future], force=True, reason="cancelled by stepflow")
        self._interrupter.add(key, None)

    async def _interrupt_batch(self, items: dict[str, Any]) -> None:
        """Stop the steps of cancelled tasks on the workers, and once more a second later.

        The second time catches a task that was just starting when the first request arrived;
        stopping a step that is not running is a no-op.
        """
        keys = list(items)
        for delay in (0.0, INTERRUPT_AGAIN_S):
            await asyncio.sleep(delay)
            client = self.client
            if client is None:
                return
            await client.run(_task.interrupt, keys, on_error="ignore")

    def _lost(self, inv: Invocation, key: str, exc: BaseException) -> Exception:
        name = type(exc).__name__
        if name == "KilledWorker":
            return RemoteStepError(f"step '{inv.step}': Dask gave up on task {key} after the workers running it died "
                                   f"too often ({_first_line(exc)}); it may crash its worker (memory?)")
        if isinstance(exc, TypeError) and "serialize" in str(exc):
            return RemoteNonRetryableError(f"step '{inv.step}': its output cannot be sent back from the Dask cluster "
                                           f"({_first_line(exc)}); return plain data (lists, dicts, numbers, "
                                           "arrays)")
        return RemoteStepError(f"step '{inv.step}': the Dask cluster at {self.config.address} lost task {key} "
                               f"({name}: {_first_line(exc)})")


def version_mismatch(versions: Mapping[str, Any]) -> str:
    """One line naming each package whose version differs between client, scheduler and workers ('' when none)."""
    client = (versions.get("client") or {}).get("packages") or {}
    places: list[tuple[str, Mapping[str, Any]]] = [("the scheduler", (versions.get("scheduler") or {}).get("packages")
                                                    or {})]
    places += [(f"worker {addr}", (v or {}).get("packages") or {}) for addr, v in
               sorted((versions.get("workers") or {}).items())]
    problems = []
    for package in ("python", *DASK_PACKAGES, *CHECKED_PACKAGES):
        mine = _comparable(package, client.get(package))
        for where, theirs in places:
            if where == "the scheduler" and package == "stepflow":
                continue  # the scheduler loads the task function (stepflow-dask), never a step
            other = _comparable(package, theirs.get(package))
            if other != mine:
                problems.append(f"{package} {mine or 'missing'} here but {other or 'missing'} on {where}")
                break
    return ("package versions differ: " + "; ".join(problems)) if problems else ""


def _comparable(package: str, version: Any) -> str:
    text = "" if version is None else str(version)
    if package == "python":  # cloudpickle payloads load across micro versions
        return ".".join(text.split(".")[:2])
    return text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
