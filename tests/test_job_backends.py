"""JobBackends against the conformance suite, the FakeJobBackend's knobs, and the Tracker at scale.

The conformance suite (``stepflow.testing.check_job_backend``) runs against the in-process
FakeJobBackend (fast) and the real docker backend (``docker_test``: skipped loudly without
Docker, failing in CI). The Tracker tests drive ``stepflow.remote._tracker.Tracker`` with the
fake: thousands of jobs, throttling, failing rounds and log lines, without Docker.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from stepflow.errors import BackendError, TransientBackendError
from stepflow.interfaces.operator import RunResources
from stepflow.remote import Job, JobState, Limits, LogBatch, RetryPolicy, job_name
from stepflow.remote._tracker import Tracker
from stepflow.testing import FakeJobBackend, acheck_job_backend, check_job_backend, job_command
from stepflow.testing._job_backend_check import CHECKS
from tests.docker_env import BASE_IMAGE, docker_test
from tests.services import moto_server

__all__ = ["moto_server"]

FAST = {"poll_interval": 0.02, "max_poll_interval": 0.1, "log_interval": 0.03}


def make_job(step: str, command: tuple[str, ...], run_id: str = "r1", limits: Limits = FakeJobBackend.limits) -> Job:
    return Job(name=job_name(run_id, step, 1, limits), image="img", command=command, env={}, labels={}, run_id=run_id,
               step=step, attempt=1, options=None)


async def settle(seconds: float) -> None:
    await asyncio.sleep(seconds)


# --------------------------------------------------------------------------- conformance


def test_fake_backend_conforms() -> None:
    backend = FakeJobBackend(**FAST)
    report = check_job_backend(backend.twin, image="img", job_seconds=0.2)
    assert set(report.passed) == set(CHECKS) - {"prepare succeeds"}
    assert report.skipped == ("prepare succeeds",)
    assert report.notes["poll of an unknown id leaves it out or reports it failed"].startswith("reported failed")
    assert not backend.stats.created_twice()
    assert backend.service.jobs == {}, "the suite must clean up every job it created"


async def test_fake_backend_conforms_under_throttling_and_lost_answers() -> None:
    # Every first submit loses its answer after creating the job: the retried submit must find it.
    backend = FakeJobBackend(**FAST, throttle_rate=0.2, fault_rate=0.05, fail_submit_after_create=1.0,
                             batch_poll=False, latency=0.002, seed=7)
    report = await acheck_job_backend(backend.twin, image="img", job_seconds=0.2, attempts=12)
    assert "submitting the same job again returns the same id and creates no second job" in report.passed
    stats = backend.stats
    assert stats.lost_answers >= 4 and stats.throttled > 0
    assert not stats.created_twice()


def test_conformance_names_each_failing_check() -> None:
    class Forgetful(FakeJobBackend):
        async def submit(self, job: Job) -> str:  # a second job for every submit: not idempotent
            self.service.by_name.pop(job.name, None)
            return await super().submit(job)

    service = FakeJobBackend(**FAST).service
    with pytest.raises(AssertionError) as info:
        check_job_backend(lambda: Forgetful(service=service, **FAST), image="img", job_seconds=0.1, timeout=5)
    text = str(info.value)
    assert "check 'submitting the same job again returns the same id and creates no second job'" in text
    assert "passed: limits are sane data" in text


@docker_test
async def test_docker_backend_conforms(tmp_path: Path) -> None:
    from stepflow_docker.operator import DockerBackend
    from stepflow_docker.operator_config import DockerOperatorConfig

    def docker(*args: str) -> str:
        return subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=60).stdout

    def count(name: str) -> int:
        return len(docker("ps", "-a", "-q", "--filter", f"name=^/{name}$").split())

    def leave_created(backend: object, job: Job) -> str:
        # A runner that died between `docker create` and `docker start` leaves exactly this.
        return docker("create", "--name", job.name, "--label", f"stepflow.job={job.name}", "--user", "65534:65534",
                      job.image, *job.command).strip()

    resources = RunResources(run_id="conformance", stack=None, artifact_store=None, container_registry=None,
                             image_builder=None, run_store=None, emit=lambda *a, **k: None, cache_dir=tmp_path,
                             home=tmp_path, derive_key=lambda purpose: bytes(32))
    report = await acheck_job_backend(lambda: DockerBackend("docker", DockerOperatorConfig()), image=BASE_IMAGE,
                                      count_jobs=count, leave_unstarted=leave_created, resources=resources)
    assert set(report.passed) == set(CHECKS), report.skipped
    assert report.notes["a job exiting non-zero fails (with its exit code when known)"] == "exit_code reported"
    left = [n for n in docker("ps", "-a", "--format", "{{.Names}}").split() if n.startswith("sf-conf-")]
    assert not left, f"the suite left containers behind: {left}"


@docker_test
async def test_sagemaker_backend_conforms(tmp_path: Path, moto_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the local SageMaker control plane (its jobs run on Docker), driven by aiobotocore."""
    import json
    import urllib.request
    import uuid

    import boto3
    from stepflow_localcloud.sagemaker import serve_in_thread
    from stepflow_sagemaker.config import SageMakerOperatorConfig
    from stepflow_sagemaker.operator import SageMakerBackend

    from stepflow._components.fsspec_store import S3ArtifactStore
    from tests.services import AWS_TEST_REGION, aws_env

    for key, value in aws_env(moto_server).items():
        monkeypatch.setenv(key, value)
    bucket = f"conf-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, region_name=AWS_TEST_REGION).create_bucket(Bucket=bucket)
    store = S3ArtifactStore("s3", path=f"s3://{bucket}/sf", storage_options={"endpoint_url": moto_server})
    resources = RunResources(run_id="conformance", stack=None, artifact_store=store, container_registry=None,
                             image_builder=None, run_store=None, emit=lambda *a, **k: None, cache_dir=tmp_path,
                             home=tmp_path, derive_key=lambda purpose: bytes(32))
    with serve_in_thread(logs_endpoint=moto_server, phase_delay=0.1) as control_plane:
        config = SageMakerOperatorConfig(role="arn:aws:iam::123456789012:role/SageMakerRole",
                                         endpoint_url=control_plane.url, region=AWS_TEST_REGION)

        def created(name: str) -> int:
            with urllib.request.urlopen(f"{control_plane.url}/_fake/stats", timeout=10) as resp:
                return int(json.load(resp)["created"].get(name, 0))

        report = await acheck_job_backend(lambda: SageMakerBackend("sagemaker", config), image=BASE_IMAGE,
                                          options=config, count_jobs=created, resources=resources)
    assert set(report.passed) >= set(CHECKS) - {"a job left created but never started starts when submitted again"}, \
        report.skipped



# --------------------------------------------------------------------------- job_command


@pytest.mark.parametrize("fail_output", [False, True])
def test_job_command_runs_for_real(fail_output: bool) -> None:
    command = job_command(seconds=0.2, exit_code=7, lines=["first", "second"], fail_output=fail_output)
    assert command[:2] == ("python3", "-c")
    started = time.monotonic()
    done = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started >= 0.2
    assert done.returncode == 7
    printed, silent = (done.stderr, done.stdout) if fail_output else (done.stdout, done.stderr)
    assert printed.splitlines() == ["first", "second"] and silent == ""


def test_job_command_refuses_what_a_process_cannot_do() -> None:
    with pytest.raises(ValueError, match="exit_code"):
        job_command(exit_code=256)
    with pytest.raises(ValueError, match="seconds"):
        job_command(seconds=-1)
    with pytest.raises(ValueError, match="newline"):
        job_command(lines=["two\nlines"])


# --------------------------------------------------------------------------- FakeJobBackend


async def test_fake_job_runs_on_the_loop_clock() -> None:
    backend = FakeJobBackend(start_delay=0.1)
    job_id = await backend.submit(make_job("a", job_command(seconds=0.2, exit_code=4)))
    assert (await backend.poll([job_id]))[job_id].phase == "pending"
    await settle(0.15)
    assert (await backend.poll([job_id]))[job_id].phase == "running"
    await settle(0.2)
    state = (await backend.poll([job_id]))[job_id]
    assert (state.phase, state.exit_code) == ("failed", 4)
    assert backend.stats.poll_calls == 3 and backend.stats.jobs_created == 1


async def test_unknown_commands_are_rejected_or_succeed() -> None:
    entrypoint = ("python3", "-m", "stepflow.entrypoint", "--payload", "x")
    with pytest.raises(BackendError, match="job_command"):
        await FakeJobBackend().submit(make_job("a", entrypoint))
    lenient = FakeJobBackend(unknown_commands="succeed")
    job_id = await lenient.submit(make_job("a", entrypoint))
    assert (await lenient.poll([job_id]))[job_id].phase == "succeeded"


async def test_throttling_and_faults_refuse_calls_without_acting() -> None:
    throttled = FakeJobBackend(throttle_rate=1.0, retry_after=0.7)
    with pytest.raises(TransientBackendError) as info:
        await throttled.submit(make_job("a", job_command()))
    assert info.value.retry_after == 0.7
    assert throttled.stats.throttled == 1 and throttled.stats.submit_calls == 1 and throttled.stats.jobs_created == 0

    faulty = FakeJobBackend(fault_rate=1.0)
    with pytest.raises(TransientBackendError) as info:
        await faulty.find("x")
    assert info.value.retry_after is None and faulty.stats.faults == 1

    some = FakeJobBackend(throttle_rate=0.2, seed=3)
    outcomes = []
    for _ in range(500):
        try:
            await some.find("x")
            outcomes.append(True)
        except TransientBackendError:
            outcomes.append(False)
    assert 0.12 < outcomes.count(False) / 500 < 0.28
    assert some.stats.find_calls == 500 and some.stats.throttled == outcomes.count(False)


@pytest.mark.anyio  # explicit: the conftest's late marking does not combine with parametrize
@pytest.mark.parametrize("lost_submit_starts", [False, True])
async def test_a_lost_submit_answer_leaves_one_job(lost_submit_starts: bool) -> None:
    backend = FakeJobBackend(fail_submit_after_create=1.0, lost_submit_starts=lost_submit_starts)
    job = make_job("a", job_command(seconds=10))
    with pytest.raises(TransientBackendError, match="answer lost"):
        await backend.submit(job)
    job_id = await backend.find(job.name)
    assert job_id is not None
    await settle(0.02)
    expected = "running" if lost_submit_starts else "pending"
    assert (await backend.poll([job_id]))[job_id].phase == expected
    assert await backend.submit(job) == job_id  # the retry: the same job, now started
    assert (await backend.poll([job_id]))[job_id].phase == "running"
    assert backend.stats.jobs_created == 1 and backend.stats.lost_answers == 1 and not backend.stats.created_twice()


async def test_a_job_left_created_starts_only_when_submitted() -> None:
    backend = FakeJobBackend()
    job = make_job("a", job_command(seconds=0.05))
    job_id = await backend.create_unstarted(job)
    await settle(0.1)
    state = (await backend.poll([job_id]))[job_id]
    assert (state.phase, state.status) == ("pending", "created")
    resumed = backend.twin()
    assert await resumed.submit(job) == job_id
    await settle(0.1)
    assert (await resumed.poll([job_id]))[job_id].phase == "succeeded"
    assert backend.stats.jobs_created == 1


async def test_batch_poll_off_makes_one_call_per_id() -> None:
    batch = FakeJobBackend()
    per_job = FakeJobBackend(batch_poll=False)
    for backend in (batch, per_job):
        ids = [await backend.submit(make_job(f"s{i}", job_command(seconds=1))) for i in range(5)]
        assert len(await backend.poll(ids)) == 5
    assert (batch.stats.poll_calls, batch.stats.ids_polled) == (1, 5)
    assert (per_job.stats.poll_calls, per_job.stats.ids_polled) == (5, 5)


async def test_per_id_polls_leave_out_the_refused_ids() -> None:
    backend = FakeJobBackend(batch_poll=False, throttle_rate=0.5, seed=1)
    ids = []
    while len(ids) < 20:
        with contextlib.suppress(TransientBackendError):  # throttled submits are simply tried again
            ids.append(await backend.submit(make_job(f"s{len(ids)}", job_command(seconds=5))))
    answer = await backend.poll(ids)
    assert 0 < len(answer) < 20 and set(answer) <= set(ids)
    backend.throttle_rate = 1.0
    with pytest.raises(TransientBackendError):
        await backend.poll(ids)  # every per-id call refused: the round fails


async def test_latency_is_paid_per_call() -> None:
    backend = FakeJobBackend(latency=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*(backend.find(f"n{i}") for i in range(20)))  # concurrent calls overlap
    elapsed = loop.time() - started
    assert 0.05 <= elapsed < 0.5


async def test_read_logs_with_cursors() -> None:
    backend = FakeJobBackend()
    lines = [f"line {i}" for i in range(5)]
    job_id = await backend.submit(make_job("a", job_command(seconds=0.5, lines=lines)))
    got: list[str] = []
    cursor = None
    rounds = 0
    while len(got) < 5:
        batch = (await backend.read_logs({job_id: cursor, "fj-unknown": None}))[job_id]
        got += batch.lines
        cursor = batch.cursor
        rounds += 1
        await settle(0.04)
    assert got == lines and rounds > 2
    assert "fj-unknown" not in await backend.read_logs({"fj-unknown": None})
    assert (await backend.read_logs({job_id: cursor}))[job_id].lines == ()


async def test_cancel_find_cleanup_and_twins() -> None:
    backend = FakeJobBackend()
    long_id = await backend.submit(make_job("long", job_command(seconds=60, lines=["a", "b"])))
    short_id = await backend.submit(make_job("short", job_command()))
    await settle(0.01)
    await backend.cancel(long_id)
    await backend.cancel(short_id)  # ended: no-op
    await backend.cancel("fj-unknown")  # unknown: no-op
    states = await backend.poll([long_id, short_id])
    assert (states[long_id].phase, states[short_id].phase) == ("stopped", "succeeded")
    assert (await backend.read_logs({long_id: None}))[long_id].lines == ("a",)  # printed before the stop
    twin = backend.twin()
    assert await twin.find(make_job("long", ()).name) == long_id
    assert await twin.find("no-such-name") is None
    await twin.cleanup(long_id, states[long_id])
    assert await backend.find(make_job("long", ()).name) is None
    assert (await backend.poll([long_id]))[long_id].status == "removed"
    assert backend.stats.cancel_calls == 3 and backend.stats.cleanup_calls == 1 and backend.stats.find_calls == 3


async def test_limits_are_data_and_enforced() -> None:
    backend = FakeJobBackend(limits=Limits(name_length=20, name_charset="a-z0-9-"))
    assert backend.limits.name_length == 20 and FakeJobBackend.limits.name_length == 63
    bad = Job(name="Not_Allowed", image="img", command=job_command(), env={}, labels={}, run_id="r", step="s",
              attempt=1, options=None)
    with pytest.raises(BackendError, match="naming rules"):
        await backend.submit(bad)
    assert backend.stats.jobs_created == 0


async def test_refuse_raises_a_fresh_error_per_call() -> None:
    backend = FakeJobBackend()
    backend.refuse("poll", lambda: BackendError("ExpiredTokenException"))
    errors = []
    for _ in range(2):
        with pytest.raises(BackendError) as info:
            await backend.poll(["x"])
        errors.append(info.value)
    assert errors[0] is not errors[1]
    backend.refuse("poll", None)
    assert (await backend.poll(["x"]))["x"].phase == "failed"


# --------------------------------------------------------------------------- Tracker


async def submit_all(backend: FakeJobBackend, commands: Sequence[tuple[str, ...]], policy: RetryPolicy | None = None,
                     run_id: str = "r1") -> list[str]:
    policy = policy or RetryPolicy(attempts=1)

    async def one(i: int, command: tuple[str, ...]) -> str:
        job = make_job(f"step-{i}", command, run_id)
        return await policy.call(lambda: backend.submit(job), classify=backend.is_transient)

    return list(await asyncio.gather(*(one(i, c) for i, c in enumerate(commands))))


async def follow_all(tracker: Tracker, ids: Sequence[str], lines: dict[str, list[str]] | None = None) -> list[object]:
    """Every job's terminal state, or the exception its waiter got."""

    async def one(job_id: str) -> object:
        on_lines = None if lines is None else lines.setdefault(job_id, []).extend
        watch = tracker.follow(job_id, lambda state: None, on_lines)
        try:
            return await tracker.wait(watch)
        except BackendError as exc:
            return exc
        finally:
            tracker.forget(job_id)

    return list(await asyncio.gather(*(one(i) for i in ids)))


async def test_tracker_follows_1000_jobs_to_their_end() -> None:
    backend = FakeJobBackend(**FAST)
    rng = random.Random(0)
    codes = [rng.choice((0, 0, 0, 1)) for _ in range(1000)]
    ids = await submit_all(backend, [job_command(seconds=rng.uniform(0, 0.5), exit_code=c) for c in codes])
    tracker = Tracker(backend)
    states = await asyncio.wait_for(follow_all(tracker, ids), 30)
    assert all(isinstance(s, JobState) for s in states)
    assert [s.phase for s in states if isinstance(s, JobState)] == ["failed" if c else "succeeded" for c in codes]
    # One batched call per round, whatever the number of jobs.
    assert backend.stats.poll_calls == tracker.stats.poll_rounds < 100
    assert backend.stats.ids_polled == tracker.stats.polled_ids
    assert backend.stats.jobs_created == 1000 and not backend.stats.created_twice()


async def test_tracker_finishes_every_job_under_20_percent_throttling() -> None:
    backend = FakeJobBackend(**FAST, throttle_rate=0.2, seed=5)
    ids = await submit_all(backend, [job_command(seconds=0.1 + i % 7 * 0.05, lines=["x"]) for i in range(1000)],
                           RetryPolicy(attempts=8, base=0.01, cap=0.1))
    assert backend.stats.jobs_created == 1000 and not backend.stats.created_twice()
    tracker = Tracker(backend)
    states = await asyncio.wait_for(follow_all(tracker, ids, {}), 60)
    assert all(isinstance(s, JobState) and s.phase == "succeeded" for s in states)
    assert backend.stats.throttled > 100  # throttled submits and rounds (how many rounds depends on timing)


@pytest.mark.anyio  # explicit: the conftest's late marking does not combine with parametrize
@pytest.mark.parametrize("failure", ["transient every round", "refused for good"])
async def test_every_waiter_gets_its_own_exception(failure: str) -> None:
    backend = FakeJobBackend(**FAST, retry_after=0.01)
    ids = await submit_all(backend, [job_command(seconds=60) for _ in range(300)])
    if failure == "transient every round":
        backend.fault_rate = 1.0
    else:
        backend.refuse("poll", lambda: BackendError("ExpiredTokenException: the security token expired"))
    tracker = Tracker(backend, max_failures=3)
    started = time.monotonic()
    errors = await asyncio.wait_for(follow_all(tracker, ids), 30)
    assert time.monotonic() - started < 10
    assert all(isinstance(e, BackendError) for e in errors)
    assert len({id(e) for e in errors}) == len(errors), "waiters must not share one exception object"
    assert all("following its jobs failed" in str(e) for e in errors)
    expected = "503" if failure == "transient every round" else "ExpiredTokenException"
    assert expected in str(errors[0])


async def test_tracker_delivers_log_lines_once_in_order() -> None:
    backend = FakeJobBackend(**FAST)
    wanted = {i: [f"job {i} line {n}" for n in range(10)] for i in range(100)}
    ids = await submit_all(backend, [job_command(seconds=0.3 + i % 5 * 0.1, lines=wanted[i]) for i in range(100)])
    got: dict[str, list[str]] = {}
    await asyncio.wait_for(follow_all(Tracker(backend), ids, got), 30)
    assert [got[job_id] for job_id in ids] == [wanted[i] for i in range(100)]
    assert backend.stats.log_calls < 100  # one read_logs call per round for every job


async def test_tracker_never_repeats_or_reorders_lines_under_throttling() -> None:
    backend = FakeJobBackend(**FAST, throttle_rate=0.2, seed=11)
    wanted = [f"line {n}" for n in range(10)]
    ids = await submit_all(backend, [job_command(seconds=0.4, lines=wanted) for _ in range(50)],
                           RetryPolicy(attempts=10, base=0.01, cap=0.05))
    got: dict[str, list[str]] = {}
    await asyncio.wait_for(follow_all(Tracker(backend), ids, got), 30)
    for job_id in ids:
        lines = [line for line in got[job_id] if not line.startswith("[stepflow]")]  # the tracker's own notices
        # A throttled final round may lose a job's last lines; never repeat or reorder them.
        assert lines == wanted[:len(lines)]


async def test_scattered_log_failures_raise_no_outage_notice() -> None:
    class EveryOtherLogCallFails(FakeJobBackend):
        async def read_logs(self, cursors: Mapping[str, Any]) -> Mapping[str, LogBatch]:
            if self.stats.log_calls % 2:
                self.stats.log_calls += 1
                raise TransientBackendError("throttled")
            return await super().read_logs(cursors)

    backend = EveryOtherLogCallFails(**FAST)
    wanted = [f"line {n}" for n in range(20)]
    ids = await submit_all(backend, [job_command(seconds=1.0, lines=wanted)])
    got: dict[str, list[str]] = {}
    await asyncio.wait_for(follow_all(Tracker(backend), ids, got), 30)
    assert backend.stats.log_calls > 8
    assert got[ids[0]] == wanted  # no "[stepflow] cannot read the job's logs" for failures that are not in a row


async def test_an_outage_of_logs_is_reported_once() -> None:
    backend = FakeJobBackend(**FAST)
    backend.refuse("read_logs", lambda: TransientBackendError("HTTP 503"))
    ids = await submit_all(backend, [job_command(seconds=0.5, lines=["never read"])])
    got: dict[str, list[str]] = {}
    await asyncio.wait_for(follow_all(Tracker(backend), ids, got), 30)
    assert got[ids[0]] == ["[stepflow] cannot read the job's logs: TransientBackendError: HTTP 503"]


async def test_the_tracker_stops_polling_jobs_it_gave_up_on() -> None:
    backend = FakeJobBackend(**FAST)
    ids = await submit_all(backend, [job_command(seconds=60) for _ in range(20)])
    backend.fault_rate = 1.0
    tracker = Tracker(backend, max_failures=3)
    calls_at_error: list[int] = []

    async def one(job_id: str) -> None:
        watch = tracker.follow(job_id, lambda state: None)
        with pytest.raises(BackendError):
            await tracker.wait(watch)
        calls_at_error.append(backend.stats.poll_calls)
        await asyncio.sleep(0.5)  # the operator is stopping the job (its cancel may be retried for long)
        tracker.forget(job_id)

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in ids)), 30)
    assert backend.stats.poll_calls == max(calls_at_error) == 3, "no status call about jobs nobody waits for"
