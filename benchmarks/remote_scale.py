"""Remote-job scale: N concurrent remote steps against an in-process, wire-level fake backend.

    python -m benchmarks.remote_scale --jobs 1000 --status batch --throttle 0.2

The backend is a real HTTP server (aiohttp.web on 127.0.0.1, in a thread of this process with
its own event loop) with 20-50 ms latency on every request:

    POST   /jobs             submit {name, payload_uri, output_uri, key, ...} -> {"id"}
    GET    /jobs/{id}        one job's state
    GET    /jobs?ids=a,b,..  batch status, at most 100 ids per request (like AWS Batch DescribeJobs)
    GET    /jobs?name=NAME   find a job by name (idempotent submit)
    DELETE /jobs/{id}        cancel

A job is PENDING for 0.1-0.5 s, RUNNING for a random 2-10 s, then it "runs" the step the way
``python -m stepflow.entrypoint`` would (verifies and unpickles the signed payload, calls the
function, writes the signed output envelope beside it) and turns SUCCEEDED. ``--throttle 0.2``
answers 20% of all requests (any endpoint) with HTTP 429 after the latency.

``FakeOperator`` is a RemoteJobOperator that follows the documented backend contract: it raises
``TransientBackendError`` on 429/5xx and does not retry by itself (retrying is the base's job).
``--status batch`` overrides ``status_many`` with the batch endpoint (100 ids per request,
chunks requested concurrently; states of the chunks that answered are returned); ``--status
per-job`` keeps the base's default ``status_many`` (one ``status`` call per job).
Everything else is stepflow's real remote path: payload written to the artifact store, submit,
job recorded in the run store, coalesced polling, output envelope read back, events, outputs
persisted. Only ``ensure_image`` is replaced (a fixed tag: images are measured by
benchmarks/image_cache.py).

CPU: process CPU (getrusage) over build + run, minus the backend thread's own CPU
(RUSAGE_THREAD), is the orchestration CPU. Prints ``BENCH-RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
from types import SimpleNamespace
from typing import Any

import attrs
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

import stepflow
from stepflow import pipeline, step
from stepflow.remote import JobSpec, JobState, RemoteJobOperator, TransientBackendError
from stepflow.remote import _envelope as envelope
from stepflow.remote._io import read_uri, write_uri

BATCH_LIMIT = 100
PHASES = {"PENDING": "pending", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
          "STOPPED": "stopped"}


# ---------------------------------------------------------------- the fake backend


class FakeBackend:
    """A job service over HTTP, run in its own thread and event loop."""

    def __init__(self, *, latency: tuple[float, float] = (0.020, 0.050), duration: tuple[float, float] = (2.0, 10.0),
                 throttle: float = 0.0, seed: int = 0, deny_status_after: float | None = None) -> None:
        self.latency = latency
        #: seconds after start when status calls start answering 403 (credentials expired mid-run)
        self.deny_status_after = deny_status_after
        self.started = time.monotonic()
        self.duration = duration
        self.throttle = throttle
        self.rng = random.Random(seed)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.by_name: dict[str, str] = {}
        self.requests: collections.Counter[str] = collections.Counter()
        self.throttled: collections.Counter[str] = collections.Counter()
        self.executed = 0
        self.exec_errors: list[str] = []
        self.cpu_seconds = 0.0
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="fake-backend", daemon=True)

    # -- lifecycle
    def start(self) -> str:
        self._thread.start()
        self._ready.wait(30)
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _main(self) -> None:
        cpu0 = resource.getrusage(resource.RUSAGE_THREAD)
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()
            cpu1 = resource.getrusage(resource.RUSAGE_THREAD)
            self.cpu_seconds = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/jobs", self._submit)
        app.router.add_get("/jobs", self._list)
        app.router.add_get("/jobs/{id}", self._get)
        app.router.add_delete("/jobs/{id}", self._cancel)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    # -- HTTP
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/jobs":
            endpoint = "GET /jobs?ids" if "ids" in request.query else "GET /jobs?name"
        elif request.method == "GET":
            endpoint = "GET /jobs/{id}"
        else:
            endpoint = f"{request.method} {request.path if request.method == 'POST' else '/jobs/{id}'}"
        self.requests[endpoint] += 1
        throttled = self.throttle > 0 and self.rng.random() < self.throttle
        await asyncio.sleep(self.rng.uniform(*self.latency))
        if throttled:
            self.throttled[endpoint] += 1
            return web.json_response({"error": "ThrottlingException: rate exceeded"}, status=429)
        if (self.deny_status_after is not None and endpoint in ("GET /jobs?ids", "GET /jobs/{id}")
                and time.monotonic() - self.started > self.deny_status_after):
            return web.json_response({"error": "ExpiredTokenException: the security token has expired"}, status=403)
        return await handler(request)  # type: ignore[no-any-return]

    def _state(self, job: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        status = job["final"] or ("PENDING" if now < job["start"] else "RUNNING")
        return {"id": job["id"], "name": job["name"], "status": status, "detail": job.get("detail", "")}

    async def _submit(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body["name"] in self.by_name:
            return web.json_response({"id": self.by_name[body["name"]]})
        job_id = f"j{len(self.jobs):06x}"
        now = time.monotonic()
        start = now + self.rng.uniform(0.1, 0.5)
        end = start + self.rng.uniform(*self.duration)
        job = {"id": job_id, "name": body["name"], "start": start, "end": end, "final": None, "spec": body}
        self.jobs[job_id] = job
        self.by_name[body["name"]] = job_id
        job["timer"] = asyncio.get_running_loop().call_at(
            asyncio.get_running_loop().time() + (end - now), self._finish, job)
        return web.json_response({"id": job_id}, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            return web.json_response({"error": "no such job"}, status=404)
        return web.json_response(self._state(job))

    async def _list(self, request: web.Request) -> web.Response:
        if "name" in request.query:
            job_id = self.by_name.get(request.query["name"])
            return web.json_response({"jobs": [] if job_id is None else [self._state(self.jobs[job_id])]})
        ids = [i for i in request.query.get("ids", "").split(",") if i]
        if len(ids) > BATCH_LIMIT:
            return web.json_response({"error": f"at most {BATCH_LIMIT} ids per request"}, status=400)
        return web.json_response({"jobs": [self._state(self.jobs[i]) for i in ids if i in self.jobs]})

    async def _cancel(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            return web.json_response({"error": "no such job"}, status=404)
        if job["final"] is None:
            job["timer"].cancel()
            job["final"] = "STOPPED"
        return web.json_response(self._state(job))

    # -- the job itself: what `python -m stepflow.entrypoint` does, in-process
    def _finish(self, job: dict[str, Any]) -> None:
        spec = job["spec"]
        try:
            key = bytes.fromhex(spec["key"])
            header, body = envelope.decode(read_uri(spec["payload_uri"]), key, kind="payload")
            fn = envelope.resolve_function(body["fn_ref"]) if "fn_ref" in body else body["fn"]
            started = time.time()
            value = fn(*body["args"], **body["kwargs"])
            meta = {k: header.get(k) for k in ("run_id", "step", "attempt")}
            write_uri(spec["output_uri"], envelope.encode(
                "output", {"ok": True, "value": value, "duration": time.time() - started}, key, **meta))
            job["final"] = "SUCCEEDED"
            self.executed += 1
        except Exception as exc:  # reported as a failed job, as a real backend would
            job["final"] = "FAILED"
            job["detail"] = f"{type(exc).__name__}: {exc}"
            self.exec_errors.append(job["detail"])


# ---------------------------------------------------------------- the operator


class FakeOperator(RemoteJobOperator):
    """A backend plugin for the fake service (see the module docstring)."""

    flavor = "fake"

    def __init__(self, name: str, base_url: str, *, batch_status: bool) -> None:
        super().__init__(name, SimpleNamespace())
        self.base_url = base_url
        self.batch_status = batch_status
        self._session: ClientSession | None = None
        self.http_errors: collections.Counter[str] = collections.Counter()

    async def attach(self, resources: Any) -> None:
        # This benchmark has no registry or builder: ensure_image below returns a fixed tag.
        placeholder = SimpleNamespace(name="none")
        await super().attach(attrs.evolve(resources, container_registry=placeholder, image_builder=placeholder))

    async def ensure_image(self, settings: Any, step: str) -> str:
        return "127.0.0.1:5000/bench/fake-step:latest"

    async def _http(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._session is None:
            self._session = ClientSession(self.base_url, connector=TCPConnector(limit=100),
                                          timeout=ClientTimeout(total=60))
        async with self._session.request(method, path, **kwargs) as resp:
            if resp.status == 429 or resp.status >= 500:
                self.http_errors[str(resp.status)] += 1
                raise TransientBackendError(f"{method} {path}: HTTP {resp.status} {await resp.text()}")
            if resp.status >= 400:
                raise stepflow.errors.BackendError(f"{method} {path}: HTTP {resp.status} {await resp.text()}")
            return await resp.json()

    @staticmethod
    def _job_state(doc: dict[str, Any]) -> JobState:
        return JobState(status=doc["status"], phase=PHASES[doc["status"]], detail=doc.get("detail", ""))  # type: ignore[arg-type]

    async def submit(self, job: JobSpec) -> str:
        body = {"name": job.name, "image": job.image, "payload_uri": job.payload_uri, "output_uri": job.output_uri,
                "key": job.env[envelope.KEY_ENV], "step": job.step, "attempt": job.attempt}
        return str((await self._http("POST", "/jobs", json=body))["id"])

    async def status(self, job_id: str) -> JobState:
        return self._job_state(await self._http("GET", f"/jobs/{job_id}"))

    async def status_many(self, job_ids: list[str]) -> dict[str, JobState]:
        if not self.batch_status:
            return await super().status_many(job_ids)
        chunks = [job_ids[i:i + BATCH_LIMIT] for i in range(0, len(job_ids), BATCH_LIMIT)]
        answers = await asyncio.gather(*(self._http("GET", "/jobs", params={"ids": ",".join(c)}) for c in chunks),
                                       return_exceptions=True)
        out: dict[str, JobState] = {}
        errors = []
        for answer in answers:
            if isinstance(answer, BaseException):
                errors.append(answer)
                continue
            for doc in answer["jobs"]:
                out[doc["id"]] = self._job_state(doc)
        if errors and not out:
            raise errors[0]  # nothing answered: let the base back off
        for exc in errors:
            if not isinstance(exc, TransientBackendError):
                raise exc
        return out

    async def cancel(self, job_id: str) -> None:
        await self._http("DELETE", f"/jobs/{job_id}")

    async def aclose(self) -> None:
        await super().aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None


# ---------------------------------------------------------------- the pipeline


@step(step_operator="fake")
def remote_work(i: int) -> int:
    return i * 2


@pipeline
def fleet(n: int) -> None:
    for i in range(n):
        remote_work(i)


async def bench(jobs: int, batch_status: bool, throttle: float, seed: int,
                duration: tuple[float, float] = (2.0, 10.0), deny_status_after: float | None = None) -> dict[str, Any]:
    backend = FakeBackend(throttle=throttle, seed=seed, duration=duration, deny_status_after=deny_status_after)
    url = backend.start()
    op = FakeOperator("fake", url, batch_status=batch_status)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = await stepflow.run(fleet(jobs), operators={"fake": op})
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    backend.stop()
    cpu_total = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    counts = result.counts()
    errors = collections.Counter(
        f"{s.error.type}: {s.error.message[:90]}" for s in result.steps.values() if s.error is not None)
    status_requests = backend.requests["GET /jobs?ids"] + backend.requests["GET /jobs/{id}"]
    orchestration = cpu_total - backend.cpu_seconds
    return {
        "jobs": jobs, "job_seconds": list(duration), "deny_status_after": deny_status_after, "status_mode": "batch" if batch_status else "per-job", "throttle": throttle,
        "run_status": result.status, "succeeded": counts.get("succeeded", 0),
        "failed": counts.get("failed", 0), "step_errors": dict(errors.most_common(3)),
        "wall_s": wall, "cpu_process_s": cpu_total, "cpu_backend_s": backend.cpu_seconds,
        "cpu_orchestration_s": orchestration, "cpu_orchestration_per_100_jobs_s": orchestration / jobs * 100,
        "peak_rss_bytes": ru1.ru_maxrss * 1024,
        "requests": dict(backend.requests), "throttled": dict(backend.throttled),
        "status_requests": status_requests, "poll_rounds": op._poller.rounds,
        "submitted": op.submissions, "backend_executed": backend.executed,
        "backend_exec_errors": backend.exec_errors[:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--status", choices=("batch", "per-job"), default="batch")
    ap.add_argument("--throttle", type=float, default=0.0, help="fraction of requests answered 429")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-duration", type=float, default=2.0, help="shortest job run time, seconds")
    ap.add_argument("--max-duration", type=float, default=10.0, help="longest job run time, seconds")
    ap.add_argument("--deny-status-after", type=float, default=None, metavar="SECONDS",
                    help="fault injection: status calls answer 403 (expired credentials) after SECONDS; every job "
                         "then fails, and what that failure costs is measured")
    a = ap.parse_args()
    if not os.environ.get("STEPFLOW_HOME"):  # never touch the user's store
        os.environ["STEPFLOW_HOME"] = tempfile.mkdtemp(prefix="stepflow-bench-")
    out = asyncio.run(bench(a.jobs, a.status == "batch", a.throttle, a.seed, (a.min_duration, a.max_duration),
                          a.deny_status_after))
    out["stepflow"] = stepflow.__version__
    out["python"] = sys.version.split()[0]
    sys.stdout.write("BENCH-RESULT " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
