"""The dask step operator on a real cluster: a `dask scheduler` and two `dask worker` processes.

One module-scoped cluster on 127.0.0.1 serves every test. Workers run without a nanny, so a
SIGKILLed worker stays dead (the test then starts a fresh one for the tests after it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from stepflow import EventBus, run
from stepflow._stack.client import Client
from stepflow.errors import ConfigError
from stepflow.events import JobStatusChanged, LogLine, StepSucceeded
from stepflow.testing import capture_events, check_step_operator_flavor
from tests import dask_steps

ROOT = Path(__file__).resolve().parent.parent
DASK = str(Path(sys.executable).with_name("dask"))
pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A scheduler and its worker processes, started with the `dask` command line."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.scheduler = self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                                   "--no-dashboard"])
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        return subprocess.Popen([DASK, *args], cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def add_worker(self, env: dict[str, str] | None = None, name: str = "") -> str:
        port = free_port()
        address = f"tcp://127.0.0.1:{port}"
        self.workers[address] = self._spawn(
            f"worker-{port}", ["worker", self.address, "--host", "127.0.0.1", "--worker-port", str(port),
                               "--nthreads", "2", "--no-nanny", "--no-dashboard", "--name", name or f"w{port}"], env)
        return address

    def wait_for(self, addresses: set[str], timeout: float = 60) -> None:
        from distributed import Client as DaskClient

        deadline = time.monotonic() + timeout
        with DaskClient(self.address, timeout=timeout) as client:
            while set(client.scheduler_info(n_workers=-1)["workers"]) != addresses:
                assert time.monotonic() < deadline, f"workers {addresses} did not join: see {self.logs}"
                time.sleep(0.1)

    def kill(self, address: str) -> None:
        proc = self.workers.pop(address)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def ensure_two(self) -> None:
        while len(self.workers) < 2:
            self.add_worker()
        self.wait_for(set(self.workers))

    def close(self) -> None:
        for proc in [*self.workers.values(), self.scheduler]:
            proc.terminate()
        for proc in [*self.workers.values(), self.scheduler]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("dask-logs"))
    try:
        c.add_worker()
        c.add_worker()
        c.wait_for(set(c.workers))
        yield c
    finally:
        c.close()


@pytest.fixture
def dask_stack(cluster: Cluster) -> Cluster:
    """The test's home has a `dask` step operator on the cluster in its active stack (two workers up)."""
    cluster.ensure_two()
    client = Client()
    client.register_component("step_operator", "dask", "dask", {"address": cluster.address})
    client.register_stack("dask_stack", artifact_store="default", step_operators=["dask", "local"])
    client.set_active_stack("dask_stack")
    return cluster


async def observe(address: str) -> object:
    from distributed import Client as DaskClient

    return await DaskClient(address, asynchronous=True, set_as_default=False)


# ---------------------------------------------------------------------------------------------- 1
async def test_example_fans_out_over_both_workers(dask_stack: Cluster) -> None:
    from examples.dask import pipeline as example

    bus = EventBus()
    async with capture_events(bus) as events:
        result = await run(example.ingestion(partitions=100, rows=500), event_bus=bus)
    assert result.status == "succeeded", result
    source = example.plan.fn(500)
    expected = example.summarize.fn([example.ingest.fn(source, p) for p in range(100)])
    got = dict(result.output)
    assert {k: v for k, v in got.items() if k != "processes"} == pytest.approx(
        {k: v for k, v in expected.items() if k != "processes"})
    assert got["processes"] == 2  # two worker processes ran partitions
    where = {e.detail.removeprefix("on worker ") for e in events.of_type(JobStatusChanged) if e.status == "finished"}
    assert where == set(dask_stack.workers), where
    assert len(events.of_type(StepSucceeded)) == 102
    logs = [e.line for e in events.of_type(LogLine) if e.step == "ingest_007"]
    assert any("partition 7:" in line for line in logs), logs  # a log record from the worker


# ---------------------------------------------------------------------------------------------- 2
async def test_worker_sigkilled_mid_step_is_rescheduled(dask_stack: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    bus = EventBus()
    killed: list[str] = []

    @bus.on(JobStatusChanged)
    async def kill_a_busy_worker(ev: JobStatusChanged) -> None:
        if ev.status == "running" and not killed:  # 0.5 s into a 1.5 s step: its code runs
            killed.append(ev.detail.removeprefix("on worker "))
            dask_stack.kill(killed[0])

    async with capture_events(bus) as events:
        result = await run(dask_steps.naps(str(marker), count=3, seconds=1.5), event_bus=bus)
    assert result.status == "succeeded", result
    assert result.output == 0 + 1 + 4
    assert {name: res.attempts for name, res in result.steps.items()} == {"nap_0": 1, "nap_1": 1, "nap_2": 1,
                                                                         "total": 1}
    succeeded = [e.step for e in events.of_type(StepSucceeded)]
    assert sorted(succeeded) == ["nap_0", "nap_1", "nap_2", "total"]  # each exactly once
    moved = [e for e in events.of_type(JobStatusChanged) if e.status == "rescheduled"]
    assert moved and killed[0] in moved[0].detail, [e.detail for e in events.of_type(JobStatusChanged)]
    lines = marker.read_text().split()
    assert len([x for x in lines if x.startswith("nap_")]) >= 4  # the killed step started twice
    dask_stack.ensure_two()


# ---------------------------------------------------------------------------------------------- 3
async def test_cancel_cancels_every_future_and_idles_the_cluster(dask_stack: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    bus = EventBus()
    running: list[str] = []

    @bus.on(JobStatusChanged)
    async def seen(ev: JobStatusChanged) -> None:
        if ev.status == "running":
            running.append(ev.step)

    watcher = await observe(dask_stack.address)
    try:
        with anyio.move_on_after(60) as scope:
            async with anyio.create_task_group() as tg:
                async def go() -> None:
                    await run(dask_steps.naps(str(marker), count=6, seconds=60), event_bus=bus)

                tg.start_soon(go)
                while len(running) < 4:  # two workers with two threads each
                    await anyio.sleep(0.05)
                cancelled_at = time.monotonic()
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught, "the steps never all started"

        def tasks_on_scheduler(dask_scheduler: object) -> int:
            return len(dask_scheduler.tasks)  # type: ignore[attr-defined]

        def executing(dask_worker: object) -> int:
            return int(dask_worker.state.executing_count)  # type: ignore[attr-defined]

        while True:
            left = await watcher.run_on_scheduler(tasks_on_scheduler)  # type: ignore[attr-defined]
            busy = await watcher.run(executing)  # type: ignore[attr-defined]
            if left == 0 and not any(busy.values()):
                break
            assert time.monotonic() - cancelled_at < 5, f"not idle 5 s after cancel: {left} tasks, executing {busy}"
            await anyio.sleep(0.1)
        assert await watcher.list_datasets() == ()  # type: ignore[attr-defined]
    finally:
        await watcher.close()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- 4
def _cli(env: dict[str, str]) -> Any:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stepflow", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)

    return cli


def _killed_mid_run(cluster: Cluster, tmp_path: Path) -> tuple[Any, str, Path]:
    """A `stepflow run` of four 4-second steps on the cluster, SIGKILLed once all four run."""
    env = {**cluster.env, "STEPFLOW_HOME": str(tmp_path / "cli-home")}
    cli = _cli(env)
    registered = cli("step-operator", "register", "dask", "--type=dask", f"--address={cluster.address}")
    assert registered.returncode == 0, registered.stderr
    stacked = cli("stack", "register", "dask_stack", "-a", "default", "-s", "dask", "-s", "local", "--set")
    assert stacked.returncode == 0, stacked.stderr
    marker = tmp_path / "executions"
    run_id = f"dask-resume-{uuid.uuid4().hex[:6]}"
    runner = subprocess.Popen([sys.executable, "-m", "stepflow", "run", "tests.dask_steps:naps", "-p",
                               f"marker={marker}", "-p", "seconds=4", "--run-id", run_id, "--no-progress"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() or len(marker.read_text().splitlines()) < 4:
        assert runner.poll() is None, runner.stdout.read() if runner.stdout else ""
        assert time.monotonic() < deadline, "the steps never started"
        time.sleep(0.05)
    runner.send_signal(signal.SIGKILL)
    assert runner.wait(timeout=30) == -signal.SIGKILL
    return cli, run_id, marker


def test_sigkilled_runner_resumes_by_reattaching(dask_stack: Cluster, tmp_path: Path) -> None:
    cli, run_id, marker = _killed_mid_run(dask_stack, tmp_path)
    resumed = cli("resume", run_id, "--no-progress")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("re-attached to task") == 4, resumed.stdout
    assert sorted(marker.read_text().split()[::2]) == ["nap_0", "nap_1", "nap_2", "nap_3"]  # none ran twice
    shown = cli("runs", "show", run_id)
    assert "succeeded" in shown.stdout, shown.stdout
    assert "14" in resumed.stdout, resumed.stdout  # 0 + 1 + 4 + 9


def test_resume_runs_again_what_the_cluster_no_longer_holds(dask_stack: Cluster, tmp_path: Path) -> None:
    """As after a scheduler restart: the published tasks are gone, so resume runs the steps again, saying why."""
    cli, run_id, marker = _killed_mid_run(dask_stack, tmp_path)

    async def forget() -> None:
        watcher: Any = await observe(dask_stack.address)
        try:
            for name in await watcher.list_datasets():
                if name.startswith(f"stepflow-{run_id}-"):
                    await watcher.cancel(list((await watcher.get_dataset(name)).values()), force=True)
                    await watcher.unpublish_dataset(name)
        finally:
            await watcher.close()

    anyio.run(forget)
    resumed = cli("resume", run_id, "--no-progress")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("is no longer on the Dask cluster") == 4, resumed.stdout
    assert sorted(marker.read_text().split()[::2]) == ["nap_0", "nap_0", "nap_1", "nap_1", "nap_2", "nap_2",
                                                       "nap_3", "nap_3"]
    assert "14" in resumed.stdout, resumed.stdout


# ---------------------------------------------------------------------------------------------- 5
def test_conformance(dask_stack: Cluster) -> None:
    report = check_step_operator_flavor("dask", {"address": dask_stack.address}, settings={"priority": 5},
                                        cancel_within=5.0)
    assert "cancelling the run cancels a running step" in report.passed
    assert not report.skipped


# ---------------------------------------------------------------------------------------------- 7
async def test_unreachable_scheduler_is_one_clear_error(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    client = Client()
    client.register_component("step_operator", "dask", "dask", {"address": address, "connect_timeout": 1})
    client.register_stack("gone", artifact_store="default", step_operators=["dask", "local"])
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        await run(dask_steps.naps(str(tmp_path / "m"), count=1, seconds=0), stack="gone")
    message = str(caught.value)
    assert address in message and "tried for 1 s" in message and "\n" not in message, message
    assert time.monotonic() - started < 15
    assert not (tmp_path / "m").exists()


async def test_version_mismatch_names_the_package(dask_stack: Cluster, tmp_path: Path) -> None:
    old = tmp_path / "old-site"
    meta = old / "stepflow-0.0.1.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: stepflow\nVersion: 0.0.1\n")
    env = {**dask_stack.env, "PYTHONPATH": os.pathsep.join([str(old), dask_stack.env["PYTHONPATH"]])}
    stale = dask_stack.add_worker(env, name="stale")
    try:
        dask_stack.wait_for(set(dask_stack.workers))
        with pytest.raises(ConfigError) as caught:
            await run(dask_steps.naps(str(tmp_path / "m"), count=1, seconds=0))
        message = str(caught.value)
        assert f"stepflow 0.1.0 here but 0.0.1 on worker {stale}" in message and "\n" not in message, message
    finally:
        dask_stack.kill(stale)
    assert not (tmp_path / "m").exists()


async def test_resource_no_worker_has_fails_at_once(dask_stack: Cluster) -> None:
    with anyio.fail_after(20):
        result = await run(dask_steps.needs_gpu())
    error = result.steps["on_gpu"].error
    assert result.status == "failed" and error is not None
    assert "GPU=1" in error.message and "no worker declares it" in error.message, error.message
    assert result.steps["on_gpu"].attempts == 1


async def test_unserializable_input_names_the_step(dask_stack: Cluster) -> None:
    result = await run(dask_steps.unserializable(), check_outputs=False, persist=False)
    error = result.steps["use"].error
    assert result.status == "failed" and error is not None, {n: (r.status, r.error) for n, r in result.steps.items()}
    assert "step 'use'" in error.message and "cannot be serialized for the Dask cluster" in error.message


def test_runs_stop_cancels_what_a_dead_runner_left(dask_stack: Cluster, tmp_path: Path) -> None:
    home = tmp_path / "cli-home"
    env = {**dask_stack.env, "STEPFLOW_HOME": str(home)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stepflow", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)

    assert cli("step-operator", "register", "dask", "--type=dask", f"--address={dask_stack.address}").returncode == 0
    assert cli("stack", "register", "dask_stack", "-a", "default", "-s", "dask", "-s", "local", "--set").returncode == 0
    marker = tmp_path / "executions"
    run_id = f"dask-stop-{uuid.uuid4().hex[:6]}"
    runner = subprocess.Popen([sys.executable, "-m", "stepflow", "run", "tests.dask_steps:naps", "-p",
                               f"marker={marker}", "-p", "count=2", "-p", "seconds=60", "--run-id", run_id,
                               "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not marker.exists() or len(marker.read_text().splitlines()) < 2:
        assert runner.poll() is None and time.monotonic() < deadline, "the steps never started"
        time.sleep(0.05)
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    stopped = cli("runs", "stop", run_id)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert stopped.stdout.count("stop requested") == 2, stopped.stdout

    async def left() -> tuple[object, dict[str, int]]:
        watcher = await observe(dask_stack.address)
        try:
            def executing(dask_worker: object) -> int:
                return int(dask_worker.state.executing_count)  # type: ignore[attr-defined]

            return await watcher.list_datasets(), await watcher.run(executing)  # type: ignore[attr-defined]
        finally:
            await watcher.close()  # type: ignore[attr-defined]

    deadline = time.monotonic() + 10
    while True:
        datasets, busy = anyio.run(left)
        if not datasets and not any(busy.values()):
            break
        assert time.monotonic() < deadline, f"still on the cluster after `runs stop`: {datasets}, {busy}"
        time.sleep(0.1)


def test_gpu_type_is_refused_before_the_run_with_the_way_to_ask_for_it() -> None:
    from stepflow import Resources, pipeline, step
    from stepflow.errors import StepflowError

    @step(step_operator="dask", resources=Resources(gpu=1, gpu_type="A100"))
    def train() -> int:
        return 1

    @pipeline
    def typed():
        return train()

    client = Client()
    client.register_component("step_operator", "dask", "dask", {"address": "tcp://127.0.0.1:1"})
    client.register_stack("typed", artifact_store="default", step_operators=["dask", "local"])
    with pytest.raises(StepflowError, match=r"gpu_type='A100'.*--resources 'A100=1'"):
        anyio.run(lambda: run(typed(), stack="typed"))


def _certificates(where: Path) -> tuple[Path, Path]:
    """A CA and one certificate it signed (for the scheduler, the worker and the client)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey,
             ca: bool) -> x509.Certificate:
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                .sign(signer, hashes.SHA256()))

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("stepflow test CA", ca_key, "stepflow test CA", ca_key, True)
    leaf = cert("dask", key, "stepflow test CA", ca_key, False)
    pem = serialization.Encoding.PEM
    (where / "ca.pem").write_bytes(ca.public_bytes(pem))
    (where / "node.pem").write_bytes(leaf.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return where / "ca.pem", where / "node.pem"


async def test_tls_cluster(tmp_path: Path) -> None:
    ca, node = _certificates(tmp_path)
    tls = ["--tls-ca-file", str(ca), "--tls-cert", str(node), "--tls-key", str(node)]
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--protocol", "tls",
                               "--no-dashboard", *tls], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen([DASK, "worker", address, "--host", "127.0.0.1", "--nthreads", "2", "--no-nanny",
                                   "--no-dashboard", *tls], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))
    try:
        client = Client()
        client.register_component("step_operator", "dask", "dask", {
            "address": address, "tls_ca_file": str(ca), "tls_client_cert": str(node), "connect_timeout": 30})
        client.register_stack("tls", artifact_store="default", step_operators=["dask", "local"])
        with anyio.fail_after(60):
            result = await run(dask_steps.naps(str(tmp_path / "m"), count=2, seconds=0), stack="tls")
        assert result.status == "succeeded" and result.output == 1, result
        with pytest.raises(ConfigError, match="uses TLS: set tls_ca_file and tls_client_cert"):
            client.register_component("step_operator", "plain", "dask", {"address": address})
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:  # a TLS worker may hang on shutdown: the test is over
                proc.kill()
                proc.wait(timeout=15)


async def test_a_step_written_for_docker_moves_to_dask_by_a_stack_change(dask_stack: Cluster) -> None:
    client = Client()
    client.register_stack("moved", artifact_store="default", step_operators=["docker=dask", "local"])
    bus = EventBus()
    async with capture_events(bus) as events:
        result = await run(dask_steps.written_for_docker(41), event_bus=bus, stack="moved")
    assert result.status == "succeeded" and result.output == 42, result
    finished = [e.detail for e in events.of_type(JobStatusChanged) if e.status == "finished"]
    assert len(finished) == 1 and finished[0].removeprefix("on worker ") in dask_stack.workers, finished
