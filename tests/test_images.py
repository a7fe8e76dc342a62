"""Step images against the real dockerd and registry: build, push, cache, single-flight, errors.

Run ``scripts/services.sh`` first (dockerd, registry on 127.0.0.1:5000, stepflow-base:py3.11).
Timings are printed as ``METRIC name value`` lines (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from stepflow_docker.builder import DockerImageBuilder, split_reference
from stepflow_docker.flavors import DockerBuilderConfig, DockerImageBuilderFlavor

from stepflow.errors import BackendError, ImageBuildError
from stepflow.events import Event, ImageBuildFinished, ImageBuildStarted, ImagePushed, LogLine
from stepflow.remote._images import (
    ImageManager,
    ImageSpec,
    render_dockerfile,
    resolve_closure,
    stage_project,
    tree_hash,
)
from tests import docker_env
from tests.docker_env import BASE_IMAGE, docker_test

# The fixtures of tests/docker_env.py used here.
builder = docker_env.builder
registry = docker_env.registry
make_registry = docker_env.make_registry

ENV = (("STEPFLOW_TEST_ENV", 'a "quoted" $HOME \\ value'),)


# ------------------------------------------------------------------------------------ helpers
class Recorder:
    """An ``emit`` that builds the real event objects, as the scheduler's does."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, cls: type[Event], **fields: Any) -> None:
        self.events.append(cls(run_id="test-run", seq=len(self.events) + 1, ts=time.time(), **fields))

    def of(self, *types: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, types)]

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events if not isinstance(e, LogLine)]


class CountingBuilder(DockerImageBuilder):
    """The real builder, counting the builds and pushes it performs."""

    def __init__(self) -> None:
        super().__init__(name="counting")
        self.builds = 0
        self.pushes = 0

    async def build(self, context: Path, tag: str, *, progress: Any = None) -> str:
        self.builds += 1
        return await super().build(context, tag, progress=progress)

    async def push(self, tag: str, credentials: tuple[str, str] | None = None, *, progress: Any = None) -> None:
        self.pushes += 1
        await super().push(tag, credentials, progress=progress)


def make_project(root: Path, value: str) -> Path:
    """A small project with code, plus things that must stay out of the image."""
    (root / "mypkg").mkdir(parents=True)
    (root / "mypkg" / "__init__.py").write_text(f"VALUE = {value!r}\n")
    (root / "train.py").write_text("from mypkg import VALUE\n\ndef main():\n    return VALUE\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\0" * 16)
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(b"\1" * 4096)
    (root / "notes.tmp").write_text("scratch\n")
    (root / ".stepflowignore").write_text("# local data, never shipped\ndata/\n*.tmp\n")
    return root


def tag_of(ref: str) -> str:
    return split_reference(ref)[1]


async def docker(*args: str, check: bool = True) -> str:
    """Run the docker CLI; return its stdout."""
    proc = await anyio.run_process(["docker", *args], check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout.decode()}{proc.stderr.decode()}")
    return proc.stdout.decode()


def metric(name: str, value: float | int, unit: str = "") -> None:
    print(f"METRIC {name} {value:.3f}{unit}" if isinstance(value, float) else f"METRIC {name} {value}{unit}")


def checkout_state() -> dict[str, str]:
    """Tree hashes of the local sources every image ships (stepflow itself, local plugins)."""
    dists, _ = resolve_closure([])
    return {d.name: tree_hash(Path(d.source)) for d in dists if d.kind == "local"}


async def rerun_if_checkout_changes(scenario: Callable[[int], Awaitable[None]], attempts: int = 3) -> None:
    """Run ``scenario(attempt)`` again when it failed while someone edited the checkout.

    stepflow's own sources go into every image, so an edit during a test rightly changes the tag
    between two ensure() calls; in CI nothing edits the checkout and the first attempt counts.
    """
    for attempt in range(attempts):
        before = await anyio.to_thread.run_sync(checkout_state)
        try:
            await scenario(attempt)
            return
        except AssertionError:
            if attempt == attempts - 1 or await anyio.to_thread.run_sync(checkout_state) == before:
                raise
            print(f"NOTE: the checkout changed during attempt {attempt + 1}; running the scenario again")


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheel cache for the session (the first Docker test fills it)."""
    return tmp_path_factory.mktemp("image-cache")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project", "v1")


# ------------------------------------------------------------------------------------ no Docker needed
def test_staging_ships_what_the_context_rules_allow(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", "x")
    (root / "keep.tmp.py").write_text("")
    (root / "sub" / "data").mkdir(parents=True)
    (root / "sub" / "data" / "x.txt").write_text("")
    (root / ".stepflowignore").write_text("data/\n*.tmp\n/only_root.txt\n!important.tmp\n")
    (root / "only_root.txt").write_text("")
    (root / "sub" / "only_root.txt").write_text("")
    (root / "important.tmp").write_text("")
    (root / ".env").write_text("TOKEN=x\n")
    (root / ".gitignore").write_text("ignored.py\n")
    (root / "ignored.py").write_text("")
    home = root / ".stepflow-home"
    home.mkdir()
    (home / "stepflow.db").write_text("secrets")
    files, listing = stage_project(root, tmp_path / "staged", home=home)
    assert sorted(rel for rel, _, _ in files) == [".gitignore", ".stepflowignore", "important.tmp", "keep.tmp.py",
                                                  "mypkg/__init__.py", "sub/only_root.txt", "train.py"]
    assert not (tmp_path / "staged" / ".env").exists() and not (tmp_path / "staged" / ".stepflow-home").exists()
    assert {e.rel for e in listing.excluded} >= {".env", "ignored.py", ".stepflow-home"}
    assert tree_hash(root, home=home) == tree_hash(root, home=home)


def test_closure_and_dockerfile() -> None:
    dists, installs = resolve_closure([])
    names = {d.name for d in dists}
    assert {"stepflow", "anyio", "attrs", "cloudpickle", "structlog", "click", "rich", "idna"} <= names
    assert {"pytest", "mypy", "ruff"}.isdisjoint(names)  # extras not requested are not followed
    assert next(d for d in dists if d.name == "stepflow").kind == "local"  # editable: built from source
    assert any(i.startswith("stepflow==") for i in installs)
    assert any(i.startswith("stepflow-docker==") for i in installs)  # a locally installed plugin
    with pytest.raises(ImageBuildError, match="distribution 'nope' is not installed on the host"):
        resolve_closure(["nope"])
    text = render_dockerfile("base:1", ["stepflow==0.1.0"], ENV, True)
    assert 'ENV STEPFLOW_TEST_ENV="a \\"quoted\\" \\$HOME \\\\ value"' in text
    assert '"--no-index", "--find-links", "/opt/stepflow/wheels", "--break-system-packages"' in text
    assert text.endswith("ENV PYTHONPATH=/opt/stepflow/project\nWORKDIR /opt/stepflow/project\n")
    with pytest.raises(ImageBuildError, match="invalid environment variable name"):
        render_dockerfile("base:1", [], (("NOT VALID", "x"),), False)


def test_flavor_is_light_and_creates_the_builder() -> None:
    flavor = DockerImageBuilderFlavor()
    assert flavor.kind == "image_builder" and flavor.name == "docker"
    built = flavor.create("d", DockerBuilderConfig(docker_host="unix:///nowhere.sock"))
    assert isinstance(built, DockerImageBuilder) and built.docker_host == "unix:///nowhere.sock"
    code = "import sys, stepflow_docker.flavors; print('aiodocker' in sys.modules, 'aiohttp' in sys.modules)"
    out = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


async def test_unreachable_daemon_is_a_backend_error() -> None:
    b = DockerImageBuilder(config=DockerBuilderConfig(docker_host="unix:///nonexistent/docker.sock"))
    try:
        with pytest.raises(BackendError, match=r"cannot reach the Docker daemon at unix:///nonexistent/docker\.sock"
                                               r".*scripts/services\.sh.*--docker_host"):
            await b.image_id(BASE_IMAGE)
    finally:
        await b.aclose()


# ------------------------------------------------------------------------------------ real daemon + registry
@docker_test
async def test_first_ensure_builds_pushes_and_the_image_runs(builder: Any, registry: Any, project: Path,
                                                             wheel_cache: Path) -> None:
    rec = Recorder()
    mgr = ImageManager(builder, registry, cache_dir=wheel_cache, emit=rec)
    t0 = time.perf_counter()
    ref = await mgr.ensure(ImageSpec(base_image=BASE_IMAGE, project_root=project, env=ENV), step="train")
    metric("ensure_first_seconds", time.perf_counter() - t0)
    assert re.fullmatch(re.escape(registry.uri) + r"/stepflow-steps:[0-9a-f]{16}", ref)
    assert rec.kinds() == ["ImageBuildStarted", "ImageBuildFinished", "ImagePushed"]
    finished = rec.of(ImageBuildFinished)[0]
    assert finished.cached is False and finished.step == "train" and finished.image == ref
    assert rec.of(ImageBuildStarted)[0].step == "train" and rec.of(ImagePushed)[0].duration > 0
    logs = rec.of(LogLine)
    assert logs and all(e.step == "train" for e in logs)
    assert any("Successfully built" in e.line for e in logs)
    assert await registry.has_image("stepflow-steps", tag_of(ref))
    assert list((wheel_cache / "contexts").iterdir()) == []  # build contexts are removed

    # Drop the local copy: `docker run` must pull what was pushed.
    await docker("rmi", ref)
    code = ("import os, json; listing = sorted(os.listdir('.')); "  # before imports write __pycache__
            "import stepflow, anyio, attrs, cloudpickle, stepflow_docker, mypkg, train; "
            "print(json.dumps([stepflow.__version__, train.main(), os.getcwd(), os.environ['PYTHONPATH'], "
            "os.environ['STEPFLOW_TEST_ENV'], listing]))")
    out = await docker("run", "--rm", "--network", "host", ref, "python3", "-c", code)
    version, value, cwd, pythonpath, env_value, listing = json.loads(out.strip().splitlines()[-1])
    import stepflow

    assert version == stepflow.__version__
    assert value == "v1" and cwd == pythonpath == "/opt/stepflow/project"
    assert env_value == ENV[0][1]
    assert listing == [".stepflowignore", "mypkg", "train.py"]  # .git, data/, *.tmp, __pycache__ left out


@docker_test
async def test_second_manager_finds_the_image_in_the_registry(builder: Any, make_registry: Any, project: Path,
                                                              wheel_cache: Path) -> None:
    async def scenario(attempt: int) -> None:
        registry = make_registry()
        spec = ImageSpec(base_image=BASE_IMAGE, project_root=project, env=ENV)
        first = await ImageManager(builder, registry, cache_dir=wheel_cache).ensure(spec)
        counting = CountingBuilder()
        try:
            rec = Recorder()
            mgr = ImageManager(counting, registry, cache_dir=wheel_cache, emit=rec)  # fresh state, same cache
            t0 = time.perf_counter()
            again = await mgr.ensure(ImageSpec(base_image=BASE_IMAGE, project_root=project, env=ENV), step="eval")
            metric("ensure_warm_cached_seconds", time.perf_counter() - t0)
        finally:
            await counting.aclose()
        assert again == first
        assert (counting.builds, counting.pushes) == (0, 0)
        assert rec.kinds() == ["ImageBuildFinished"]
        assert rec.of(ImageBuildFinished)[0].cached is True and rec.of(ImageBuildFinished)[0].step == "eval"
        assert mgr.stats.registry_checks == 1 and mgr.stats.builds == 0 and mgr.stats.pushes == 0

    await rerun_if_checkout_changes(scenario)


@docker_test
async def test_concurrent_ensures_build_and_push_once(registry: Any, tmp_path: Path, wheel_cache: Path) -> None:
    project = make_project(tmp_path / "p", "concurrent")
    counting = CountingBuilder()
    rec = Recorder()
    mgr = ImageManager(counting, registry, cache_dir=wheel_cache, emit=rec)
    refs: list[str] = []

    async def one(i: int) -> None:
        refs.append(await mgr.ensure(ImageSpec(base_image=BASE_IMAGE, project_root=project, env=ENV),
                                     step=f"s{i}"))

    try:
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        metric("ensure_8_concurrent_seconds", time.perf_counter() - t0)
    finally:
        await counting.aclose()
    assert len(refs) == 8 and len(set(refs)) == 1
    assert (counting.builds, counting.pushes) == (1, 1)
    assert mgr.stats.registry_checks == 1
    assert len(rec.of(ImageBuildStarted)) == 1 and len(rec.of(ImagePushed)) == 1
    finished = rec.of(ImageBuildFinished)
    assert len(finished) == 8  # one per ensure() call
    assert sorted(e.cached for e in finished) == [False] + [True] * 7
    assert {e.step for e in finished} == {f"s{i}" for i in range(8)}


@docker_test
async def test_two_managers_in_one_process_build_once(make_registry: Any, tmp_path: Path, wheel_cache: Path) -> None:
    project = make_project(tmp_path / "p", "two-managers")

    async def scenario(attempt: int) -> None:
        registry = make_registry()
        builders = [CountingBuilder(), CountingBuilder()]
        managers = [ImageManager(b, registry, cache_dir=wheel_cache) for b in builders]
        refs: list[str] = []

        async def one(mgr: ImageManager) -> None:
            refs.append(await mgr.ensure(ImageSpec(base_image=BASE_IMAGE, project_root=project, env=ENV)))

        try:
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(one, managers[i % 2])
        finally:
            for b in builders:
                await b.aclose()
        assert len(set(refs)) == 1
        assert sum(b.builds for b in builders) == 1 and sum(b.pushes for b in builders) == 1

    await rerun_if_checkout_changes(scenario)


@docker_test
async def test_a_changed_source_file_changes_the_tag(builder: Any, make_registry: Any, tmp_path: Path,
                                                     wheel_cache: Path) -> None:
    async def scenario(attempt: int) -> None:
        project = make_project(tmp_path / f"p{attempt}", "before")
        rec = Recorder()
        mgr = ImageManager(builder, make_registry(), cache_dir=wheel_cache, emit=rec)
        spec = ImageSpec(base_image=BASE_IMAGE, project_root=project, env=ENV)
        before = await mgr.ensure(spec)
        (project / "mypkg" / "__init__.py").write_text("VALUE = 'after'\n")
        t0 = time.perf_counter()
        after = await mgr.ensure(spec)
        metric("ensure_after_one_file_change_seconds", time.perf_counter() - t0)
        assert tag_of(after) != tag_of(before)
        assert mgr.stats.builds == 2 and mgr.stats.pushes == 2
        # Ignored files do not count; reverting the change gives the first tag back, already pushed.
        (project / "data" / "big.bin").write_bytes(b"changed")
        (project / "notes.tmp").write_text("changed")
        (project / "mypkg" / "__init__.py").write_text("VALUE = 'before'\n")
        assert await mgr.ensure(spec) == before
        assert mgr.stats.builds == 2
        assert [e.cached for e in rec.of(ImageBuildFinished)] == [False, False, True]

    await rerun_if_checkout_changes(scenario)


@docker_test
async def test_errors_are_clear(builder: Any, registry: Any, project: Path, wheel_cache: Path,
                                tmp_path: Path, make_registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = ImageManager(builder, registry, cache_dir=wheel_cache)
    # Base image missing (and not pullable: no network for the daemon here).
    with pytest.raises(ImageBuildError, match=r"base image 'stepflow-no-such-base:1' not found on the Docker "
                                              r"daemon.*build it \(scripts/services\.sh does\) or set --base_image"):
        await mgr.ensure(ImageSpec(base_image="stepflow-no-such-base:1", project_root=project))
    # A requirement that is not installed here.
    with pytest.raises(ImageBuildError, match="distribution 'nope' is not installed on the host"):
        await mgr.ensure(ImageSpec(base_image=BASE_IMAGE, requirements=("nope",)))

    # Registry unreachable: every concurrent waiter gets the error, and the next call retries.
    from stepflow._components.registry import DefaultContainerRegistry
    from stepflow._flavors.builtin import DefaultRegistryConfig

    dead = DefaultContainerRegistry("dead", DefaultRegistryConfig(uri="127.0.0.1:1/stepflow"))
    dead_mgr = ImageManager(builder, dead, cache_dir=wheel_cache)
    spec = ImageSpec(base_image=BASE_IMAGE, project_root=project, env=ENV)
    errors: list[BaseException] = []

    async def attempt() -> None:
        try:
            await dead_mgr.ensure(spec)
        except ImageBuildError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(attempt)
    assert len(errors) == 4 and dead_mgr.stats.registry_checks == 1
    assert "127.0.0.1:1/stepflow" in str(errors[0]) and "is the registry running" in str(errors[0])
    with pytest.raises(ImageBuildError, match=r"127\.0\.0\.1:1"):
        await dead_mgr.ensure(spec)
    assert dead_mgr.stats.registry_checks == 2  # failures are not cached

    # A push the registry's host refuses: the daemon's message and the registry are named.
    await docker("tag", BASE_IMAGE, "127.0.0.1:1/stepflow-test/unpushable:x")
    try:
        with pytest.raises(ImageBuildError, match=r"pushing 127\.0\.0\.1:1/stepflow-test/unpushable:x to registry "
                                                  r"127\.0\.0\.1:1 failed: the Docker daemon said: .*refused"):
            await builder.push("127.0.0.1:1/stepflow-test/unpushable:x")
    finally:
        await docker("rmi", "127.0.0.1:1/stepflow-test/unpushable:x", check=False)

    # A failing build step: the error carries the tail of the build output.
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nRUN echo boom-marker-line && exit 3\n")
    with pytest.raises(ImageBuildError, match=r"(?s)building image .* failed: .*returned a non-zero code: 3"
                                              r".*last lines of the build output.*boom-marker-line"):
        await builder.build(context, f"{make_registry().uri}/broken:1")

    # pip failures name the distribution and quote pip: a distribution installed from a source
    # directory that no longer builds, and one that no index has.
    site = tmp_path / "site"
    src = tmp_path / "brokensrc"
    src.mkdir()
    (src / "pyproject.toml").write_text("[project\nname = broken\n")
    for name, direct in (("stepflow-broken-local", {"url": src.as_uri(), "dir_info": {"editable": True}}),
                         ("stepflow-test-nowhere-xyz", None)):
        info = site / f"{name.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        if direct is not None:
            (info / "direct_url.json").write_text(json.dumps(direct))
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ImageBuildError, match=r"(?s)cannot build a wheel of 'stepflow-broken-local' from .*brokensrc "
                                              r"\(pip wheel failed\):\n.*"):
        await mgr.ensure(ImageSpec(base_image=BASE_IMAGE, requirements=("stepflow-broken-local",)))
    with pytest.raises(ImageBuildError, match=r"(?s)cannot get a wheel of 'stepflow-test-nowhere-xyz==0\.0\.1'.*"
                                              r"(No matching distribution|no matching distribution)"):
        await mgr.ensure(ImageSpec(base_image=BASE_IMAGE, requirements=("stepflow-test-nowhere-xyz",)))


@docker_test
async def test_cancelled_ensure_leaves_nothing_behind(builder: Any, registry: Any, project: Path,
                                                      wheel_cache: Path) -> None:
    mgr = ImageManager(builder, registry, cache_dir=wheel_cache)
    spec = ImageSpec(base_image=BASE_IMAGE, project_root=project, env=ENV)
    with anyio.move_on_after(0.02):
        await mgr.ensure(spec)
    assert await mgr.ensure(spec)  # a fresh flight, not the cancelled one
    await anyio.sleep(0.1)
    assert not mgr._spec_flights and not mgr._tag_flights
    assert list((wheel_cache / "contexts").iterdir()) == []


@docker_test
async def test_wheelhouse_cache_survives_a_cleared_docker_cache(builder: Any, make_registry: Any,
                                                                tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", "wheelhouse")

    async def scenario(attempt: int) -> None:
        cache = tmp_path / f"fresh-cache-{attempt}"
        # A unique ENV line comes before the wheel layers: no Docker layer cache can help these builds.
        spec = ImageSpec(base_image=BASE_IMAGE, project_root=project,
                         env=(("STEPFLOW_UNIQUE", str(time.time_ns())),))
        cold = ImageManager(builder, make_registry(), cache_dir=cache)
        t0 = time.perf_counter()
        first = await cold.ensure(spec)
        metric("cold_ensure_seconds (fresh wheel cache, no layer cache, build+push)", time.perf_counter() - t0)
        metric("cold_wheelhouse_seconds", cold.stats.last_wheelhouse_seconds)
        metric("wheelhouse_wheels", cold.stats.last_wheel_count)
        metric("wheelhouse_bytes", cold.stats.last_wheelhouse_bytes)
        size = await docker("image", "inspect", "-f", "{{.Size}}", first)
        base = await docker("image", "inspect", "-f", "{{.Size}}", BASE_IMAGE)
        metric("image_bytes", int(size.strip()))
        metric("image_bytes_over_base", int(size.strip()) - int(base.strip()))
        assert cold.stats.pip_runs >= 1 and cold.stats.wheels_downloaded >= 1 and cold.stats.wheels_reused == 0

        await docker("rmi", first)  # the only image using these layers: the daemon forgets them all
        warm = ImageManager(builder, make_registry(), cache_dir=cache)  # empty repository: must build again
        t0 = time.perf_counter()
        second = await warm.ensure(spec)
        metric("rebuild_same_cache_ensure_seconds (no layer cache, build+push)", time.perf_counter() - t0)
        metric("warm_wheelhouse_seconds", warm.stats.last_wheelhouse_seconds)
        assert warm.stats.builds == 1 and warm.stats.pushes == 1
        assert warm.stats.pip_runs == 0, "the wheelhouse should come from the cache: pip must not run"
        assert warm.stats.wheels_reused == cold.stats.last_wheel_count
        assert tag_of(second) == tag_of(first)  # the tag depends neither on the registry nor on the daemon's cache

    await rerun_if_checkout_changes(scenario)
