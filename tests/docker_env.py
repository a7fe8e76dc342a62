"""Shared fixtures for tests against the real Docker daemon and registry of this machine.

``scripts/services.sh`` starts dockerd, a registry on 127.0.0.1:5000 and builds the base image
``stepflow-base:py3.11``. Without them the Docker tests are skipped loudly, except under CI (env
``CI`` set), where they fail: they must run there.

Decorate each such test with :func:`docker_test` (marks it ``docker`` and checks the services).
The fixtures ``builder``, ``registry``, ``make_registry`` and ``docker_available`` depend on no
other fixture of this module: bind the ones a test module uses as module attributes
(``builder = docker_env.builder``) and pytest finds them.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import subprocess
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stepflow._components.registry import DefaultContainerRegistry
from stepflow._flavors.builtin import DefaultRegistryConfig

REGISTRY = "127.0.0.1:5000"
BASE_IMAGE = "stepflow-base:py3.11"
SERVICES = "scripts/services.sh"

_probe_result: list[str | None] = []


def _probe() -> str | None:
    """What is missing for the Docker tests (None: all there). Checked once per session."""
    if _probe_result:
        return _probe_result[0]
    problem = None
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=20)
        if info.returncode != 0:
            problem = f"dockerd does not answer `docker info` ({(info.stderr or info.stdout).strip()})"
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = f"cannot run `docker info` ({exc})"
    if problem is None:
        try:
            with urllib.request.urlopen(f"http://{REGISTRY}/v2/", timeout=5) as resp:
                if resp.status != 200:
                    problem = f"the registry http://{REGISTRY}/v2/ answers HTTP {resp.status}"
        except OSError as exc:
            problem = f"no registry at http://{REGISTRY}/v2/ ({exc})"
    if problem is None:
        found = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, timeout=20)
        if found.returncode != 0:
            problem = f"the base image {BASE_IMAGE} is missing"
    _probe_result.append(problem)
    return problem


def require_docker() -> None:
    """Skip the calling test (locally) or fail it (CI) when a Docker service is missing."""
    problem = _probe()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"Docker tests must run in CI: run {SERVICES} first ({problem})", pytrace=False)
    pytest.skip(f"SKIPPED DOCKER TESTS: {problem}. Run `sudo {SERVICES}` to start dockerd, the registry "
                f"on {REGISTRY} and build {BASE_IMAGE}; CI (env CI set) fails instead of skipping")


@pytest.fixture(scope="session")
def docker_available() -> None:
    """Skip (locally) or fail (CI) when dockerd, the registry or the base image is missing."""
    require_docker()


def docker_test(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a test as needing Docker (``pytest -m docker``) and check the services before it runs.

    Works without importing any fixture: the check runs in a wrapper around the test.
    """
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            require_docker()
            return await fn(*args, **kwargs)

        return pytest.mark.docker(async_wrapper)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        require_docker()
        return fn(*args, **kwargs)

    return pytest.mark.docker(wrapper)


def remove_local_images(prefix: str) -> None:
    """Remove this daemon's images whose repository starts with ``prefix`` (test cleanup)."""
    listed = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                            text=True, timeout=60)
    refs = [r for r in listed.stdout.split() if r.startswith(prefix)]
    if refs:
        subprocess.run(["docker", "rmi", "-f", *refs], capture_output=True, timeout=120)


#: A bring-your-own-container training image (tests/byoc): no entrypoint, a `train` program on PATH.
BYOC_IMAGE = "stepflow-test-byoc:1"


def build_byoc_image() -> str:
    """Build :data:`BYOC_IMAGE` from the base image (no pull: FROM is local); returns its tag."""
    require_docker()
    done = subprocess.run(["docker", "build", "-q", "-t", BYOC_IMAGE, str(Path(__file__).parent / "byoc")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"cannot build {BYOC_IMAGE}: {done.stderr}"
    return BYOC_IMAGE


@pytest.fixture
def make_registry(request: pytest.FixtureRequest) -> Iterator[Callable[[], DefaultContainerRegistry]]:
    """Factory of registries at ``127.0.0.1:5000/<unique prefix>``: tests never see each other's tags.

    Local images pushed under those prefixes are removed afterwards.
    """
    require_docker()
    made: list[str] = []
    test = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")

    def make() -> DefaultContainerRegistry:
        prefix = f"t-{uuid.uuid4().hex[:8]}-{test}"
        made.append(f"{REGISTRY}/{prefix}/")
        return DefaultContainerRegistry("test-registry", DefaultRegistryConfig(uri=f"{REGISTRY}/{prefix}"))

    yield make
    for prefix in made:
        remove_local_images(prefix)


@pytest.fixture
def registry(make_registry: Callable[[], DefaultContainerRegistry]) -> DefaultContainerRegistry:
    """A registry under a prefix of its own."""
    return make_registry()


@pytest.fixture
async def builder() -> AsyncIterator[Any]:
    """The real Docker image builder on the local daemon (closed after the test)."""
    from stepflow_docker.builder import DockerImageBuilder

    require_docker()

    b = DockerImageBuilder(name="docker")
    yield b
    await b.aclose()


# ------------------------------------------------------------------ projects and the CLI
def write_project(root: Any, source: str, prefix: str = "pipes") -> str:
    """Write ``source`` as a uniquely named module in the project folder ``root``; return the module name."""
    import pathlib

    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    module = f"{prefix}_{uuid.uuid4().hex[:8]}"
    (root / f"{module}.py").write_text(source)
    return module


def cli_environ(project: Any, base: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of a `stepflow` subprocess run from ``project`` with this test's home."""
    return {**base, "PYTHONPATH": os.pathsep.join([str(project), base.get("PYTHONPATH", "")]),
            "STEPFLOW_HOME": os.environ["STEPFLOW_HOME"], **extra}


def stepflow_cli(args: list[str], project: Any, env: dict[str, str], timeout: float = 300) -> Any:
    """Run ``python -m stepflow ARGS`` in ``project``; the completed process."""
    import sys

    return subprocess.run([sys.executable, "-m", "stepflow", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)


def containers_created(run_id: str, since: str) -> list[str]:
    """The step of every container the daemon created for ``run_id`` since ``since`` (epoch seconds)."""
    import json
    import time

    out = subprocess.run(["docker", "events", "--since", since, "--until", str(int(time.time()) + 1),
                          "--filter", "event=create", "--filter", f"label=stepflow.run={run_id}",
                          "--format", "{{json .Actor.Attributes}}"], capture_output=True, text=True, timeout=60,
                         check=True)
    return [json.loads(line)["stepflow.step"] for line in out.stdout.splitlines() if line.strip()]


def shared_pipes(operator: str) -> str:
    """Pipelines every remote backend's tests run, with their remote steps on ``operator``.

    ``square``/``many`` (parallel steps), ``nap``/``sleepy``/``naps`` (a job to cancel or kill)
    and ``broken``/``failing`` (a remote traceback); a backend's tests append their own.
    """
    import textwrap

    return textwrap.dedent(
        f'''
        import os
        import time

        from stepflow import pipeline, step


        @step(step_operator="{operator}")
        def square(x: int) -> int:
            return x * x


        @pipeline
        def many(n: int = 8):
            return [square(i) for i in range(n)]


        @step(step_operator="{operator}")
        def nap(seconds: float) -> float:
            print("napping", flush=True)
            time.sleep(seconds)
            return seconds


        @step
        def after_nap(x: float) -> str:
            return f"slept {{x}}"


        @pipeline
        def sleepy(seconds: float = 6.0):
            return after_nap(nap(seconds))


        @pipeline
        def naps(n: int = 4, seconds: float = 60.0):
            return [nap(seconds) for _ in range(n)]


        @step(step_operator="{operator}")
        def broken(x: int) -> int:
            values = {{"a": 1}}
            return values["missing"] + x


        @pipeline
        def failing():
            broken(1)
        '''
    )


async def run_with_events(p: Any, **kw: Any) -> tuple[Any, list[Any]]:
    """``run(p, **kw)`` and every event it published (a lossless capture)."""
    from stepflow import EventBus, run
    from stepflow.testing import capture_events

    bus = EventBus()
    async with capture_events(bus) as events:
        result = await run(p, event_bus=bus, **kw)
    return result, list(events)


def register_docker_stack(project: Any, name: str = "docker_stack") -> str:
    """Registry (own prefix), docker builder and operator for ``project``, a stack using them: active.

    Returns the registry prefix (remove its local images when done).
    """
    from stepflow._stack.client import Client

    prefix = f"t-{uuid.uuid4().hex[:8]}"
    c = Client()
    c.register_component("container_registry", "reg", "default", {"uri": f"{REGISTRY}/{prefix}"})
    c.register_component("image_builder", "docker", "docker", {})
    c.register_component("step_operator", "docker", "docker", {"project_root": str(project)})
    c.register_stack(name, artifact_store="default", container_registry="reg", image_builder="docker",
                     step_operators=["docker", "local"])
    c.set_active_stack(name)
    return prefix


# -- crash and resume: the same checks for every remote backend --------------------------------
def _project_env(project: Any, **extra: str) -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(project), root, os.environ.get("PYTHONPATH", "")]),
            "COLUMNS": "160", **extra}


def _resume(project: Any, run_id: str) -> Any:
    import sys

    from stepflow._store.runs import RunStore

    resumed = subprocess.run([sys.executable, "-m", "stepflow", "resume", run_id, "--no-progress"], cwd=project,
                             env=_project_env(project), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    store = RunStore()
    assert store.get_run(run_id).status == "succeeded"
    steps = {s.step: s.status for s in store.steps(run_id)}
    assert set(steps.values()) == {"succeeded"}, steps
    (job,) = store.jobs(run_id)
    return job


def sigkill_after_submit_then_resume(project: Any, module: str, creates: Callable[[], int]) -> Any:
    """Run ``MODULE:sleepy`` (one remote step) in a ``stepflow run`` process, SIGKILL it once the
    backend accepted the job, then ``stepflow resume``: it must succeed without a create call.

    ``creates()`` counts the backend's job-creating calls. Returns the run store's job record.
    """
    import signal
    import sys
    import time

    from stepflow._store.runs import RunStore

    runner = subprocess.Popen([sys.executable, "-m", "stepflow", "run", f"{module}:sleepy", "-p", "seconds=8",
                               "--no-progress"], cwd=project, env=_project_env(project), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    store = RunStore()
    run_id = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run_id is None:
            runs = store.list_runs(1)
            if runs and any(j.job_id for j in store.jobs(runs[0].run_id)):  # accepted by the backend
                run_id = runs[0].run_id
            elif runner.poll() is not None:
                pytest.fail(f"runner exited early: {runner.stdout.read() if runner.stdout else ''}")
            time.sleep(0.2)
        assert run_id is not None, "the runner never recorded the job"
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
    before = creates()
    job = _resume(project, run_id)
    assert creates() == before, "resume created the job again"
    return job


def sigkill_at_failpoint_then_resume(project: Any, module: str, phase: str) -> Any:
    """``stepflow run MODULE:sleepy`` killed by the failpoint ``phase``, then resumed; returns the job record."""
    import signal
    import sys

    run_id = f"crash-{phase.replace('.', '-')}-{uuid.uuid4().hex[:6]}"
    killed = subprocess.run([sys.executable, "-m", "stepflow", "run", f"{module}:sleepy", "-p", "seconds=1",
                             "--run-id", run_id, "--no-progress"], cwd=project,
                            env=_project_env(project, STEPFLOW_FAILPOINTS=phase), capture_output=True, text=True,
                            timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    return _resume(project, run_id)


async def cancel_once_running(p: Any, running: Callable[[Any], bool], count: int = 4) -> tuple[set[str], float,
                                                                                               list[Any]]:
    """Run ``p``; once ``count`` jobs had a ``JobStatusChanged`` that ``running`` accepts, cancel the run.

    Returns those jobs' ids, when the run was cancelled (``time.monotonic()``) and every event.
    """
    import time

    import anyio

    from stepflow import EventBus, run
    from stepflow.events import JobStatusChanged

    bus = EventBus()
    jobs: set[str] = set()
    seen: list[Any] = []
    async with bus.subscribe() as events:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: run(p, event_bus=bus))
                with anyio.fail_after(180):
                    while len(jobs) < count:
                        seen += events.pending()
                        jobs = {e.job_id for e in seen if isinstance(e, JobStatusChanged) and running(e)}
                        await anyio.sleep(0.1)
                cancelled_at = time.monotonic()
                scope.cancel()
        seen += events.pending()
    return jobs, cancelled_at, seen


def seconds_until(done: Callable[[], bool], since: float, limit: float = 30.0) -> float:
    """Poll ``done()`` until it holds (at most ``limit`` s after ``since``); the seconds it took since ``since``."""
    import time

    while not done() and time.monotonic() - since < limit:
        time.sleep(0.1)
    assert done(), f"still not done {limit:.0f} s later"
    return time.monotonic() - since
