"""Step images against the real dockerd and registry: build, push, cache, single-flight, errors.

Run ``scripts/services.sh`` first (dockerd, registry on 127.0.0.1:5000, stepflow-base:py3.11).
Timings are printed as ``METRIC name value`` lines (``pytest -s`` shows them).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from packaging.utils import parse_wheel_filename
from stepflow_docker.builder import DockerImageBuilder, split_reference
from stepflow_docker.flavors import DockerBuilderConfig, DockerImageBuilderFlavor

from stepflow.errors import BackendError, ImageBuildError
from stepflow.events import Event, ImageBuildFinished, ImageBuildStarted, ImagePushed, LogLine
from stepflow.remote import _images
from stepflow.remote._images import (
    ImageManager,
    ImageSpec,
    WheelTarget,
    check_base,
    file_lock,
    host_platform,
    normalize_platform,
    render_dockerfile,
    resolve_closure,
    stage_project,
    tree_hash,
    unpack_wheel,
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

    async def build(self, context: Path, tag: str, *, progress: Any = None, platform: str | None = None) -> str:
        self.builds += 1
        return await super().build(context, tag, progress=progress, platform=platform)

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
    assert not any(i.startswith(("stepflow-docker", "stepflow-vertex")) for i in installs)  # plugins stay home
    with pytest.raises(ImageBuildError, match="distribution 'nope' is not installed on the host"):
        resolve_closure(["nope"])
    text = render_dockerfile("base:1", ENV, True, (3, 11))
    assert 'ENV STEPFLOW_TEST_ENV="a \\"quoted\\" \\$HOME \\\\ value"' in text
    # Files only: an image for another architecture builds without running anything of it.
    assert 'ENV PYTHONUSERBASE=/opt/stepflow PATH="/opt/stepflow/bin:${PATH}"\nADD python.tar /opt/stepflow/\n' in text
    assert not any(line.startswith("RUN") for line in text.splitlines())
    assert text.endswith("ENV PYTHONPATH=/opt/stepflow/project\nWORKDIR /opt/stepflow/project\n")
    with pytest.raises(ImageBuildError, match="invalid environment variable name"):
        render_dockerfile("base:1", (("NOT VALID", "x"),), False, (3, 11))


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
            "import importlib.util, stepflow, anyio, attrs, cloudpickle, mypkg, train; "
            "print(json.dumps([stepflow.__version__, train.main(), os.getcwd(), os.environ['PYTHONPATH'], "
            "os.environ['STEPFLOW_TEST_ENV'], listing, importlib.util.find_spec('stepflow_docker') is None]))")
    out = await docker("run", "--rm", "--network", "host", ref, "python3", "-c", code)
    version, value, cwd, pythonpath, env_value, listing, no_plugin = json.loads(out.strip().splitlines()[-1])
    assert no_plugin  # plugins stay on the runner: a job runs stepflow's entrypoint only
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


# ------------------------------------------------------------------------------------ platforms
PY = (sys.version_info[0], sys.version_info[1])
PY_TAG = f"cp{PY[0]}{PY[1]}"
needs_amd64_host = pytest.mark.skipif(host_platform() != "linux/amd64", reason="the scenarios assume an amd64 host")


def binary_platforms(paths: list[Path]) -> dict[str, set[str]]:
    """Platform tags of every wheel that is not pure Python, by file name."""
    out = {}
    for path in paths:
        platforms = {t.platform for t in parse_wheel_filename(path.name)[3]}
        if platforms != {"any"}:
            out[path.name] = platforms
    return out


def fake_installed(site: Path, name: str, version: str, *, direct: dict[str, Any] | None = None,
                   pure: bool | None = None) -> None:
    """Make ``name`` look installed (metadata only) in the throw-away site dir ``site``."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if direct is not None:
        (info / "direct_url.json").write_text(json.dumps(direct))
    if pure is not None:
        tag = "py3-none-any" if pure else f"{PY_TAG}-{PY_TAG}-linux_x86_64"
        (info / "WHEEL").write_text(f"Wheel-Version: 1.0\nRoot-Is-Purelib: {str(pure).lower()}\nTag: {tag}\n")


def test_wheel_targets_select_manylinux_tags_of_the_target_arch() -> None:
    assert normalize_platform("linux/aarch64") == normalize_platform("Linux/arm64/v8") == "linux/arm64"
    assert normalize_platform("linux/x86_64") == "linux/amd64"
    with pytest.raises(ImageBuildError, match=r"unsupported image platform 'windows/amd64'.*linux/amd64, linux/arm64"):
        normalize_platform("windows/amd64")
    arm = WheelTarget.of("linux/arm64", (3, 11), "glibc 2.36")
    amd = WheelTarget.of("linux/amd64", (3, 11), "glibc 2.36")
    tags = arm.platform_tags()
    assert tags[0] == "manylinux_2_36_aarch64" and tags[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert all(t.endswith("_aarch64") and t.startswith("manylinux") for t in tags)  # never linux_aarch64
    assert amd.platform_tags()[-1] == "manylinux1_x86_64" and "manylinux2010_x86_64" in amd.platform_tags()
    assert arm.key != amd.key and arm.key == "cp311-manylinux_2_36_aarch64"  # the wheel cache keeps them apart
    args = arm.pip_args()
    assert args[-10:] == ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--abi", "abi3",
                          "--abi", "none"]
    assert WheelTarget.of("linux/arm64", (3, 11), "musl").platform_tags() == ["musllinux_1_2_aarch64",
                                                                             "musllinux_1_1_aarch64"]
    assert WheelTarget.of("linux/amd64", (3, 11), "").libc_version == (2, 28)  # unknown C library: a safe floor
    assert arm.accepts("six-1.17.0-py2.py3-none-any.whl") and amd.accepts("six-1.17.0-py2.py3-none-any.whl")
    aarch64 = "cffi-2.1.1-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.whl"
    assert arm.accepts(aarch64) and not amd.accepts(aarch64)
    assert not arm.accepts("x-1-cp311-abi3-manylinux_2_38_aarch64.whl")  # needs a newer glibc than the base has
    assert not arm.accepts("x-1-cp312-cp312-manylinux_2_17_aarch64.whl")  # another Python
    # A wheel built on this host runs on the host's platform only.
    host_built = f"x-1-{PY_TAG}-{PY_TAG}-linux_x86_64.whl"
    if host_platform() == "linux/amd64":
        assert WheelTarget.of("linux/amd64", PY, "glibc 2.36").accepts(host_built)
    assert not WheelTarget.of("linux/arm64", PY, "glibc 2.36").accepts(host_built)


def test_base_image_checks_name_both_sides() -> None:
    info = {"platform": "linux/amd64", "python": [3, 11], "libc": "glibc 2.36", "user_site": True}
    target = check_base("base:1", info, "linux/amd64", runner=(3, 11))
    assert target == WheelTarget("linux/amd64", (3, 11), "glibc", (2, 36))
    with pytest.raises(ImageBuildError, match=r"base image 'base:1' has Python 3\.12, but this runner uses Python "
                                              r"3\.11: .*cloudpickle.*Use a base image with Python 3\.11"):
        check_base("base:1", dict(info, python=[3, 12]), "linux/amd64", runner=(3, 11))
    with pytest.raises(ImageBuildError, match=r"base image 'base:1' is a linux/amd64 image, but the step image is "
                                              r"for linux/arm64.*docker pull --platform linux/arm64"):
        check_base("base:1", info, "linux/arm64", runner=(3, 11))
    with pytest.raises(ImageBuildError, match=r"ignores user site-packages"):
        check_base("base:1", dict(info, user_site=False), "linux/amd64", runner=(3, 11))
    assert check_base("b", dict(info, platform="linux/arm64/v8"), "linux/aarch64", runner=(3, 11)).machine == "aarch64"


def test_unpack_wheel_lays_out_a_user_base(tmp_path: Path) -> None:
    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo_pkg/__init__.py", "def main():\n    print('demo ran')\n")
        zf.writestr("demo_pkg-1.0.data/purelib/demo_extra.py", "X = 2\n")
        zf.writestr("demo_pkg-1.0.data/scripts/demo-tool", "#!python\nprint('tool ran')\n")
        zf.writestr("demo_pkg-1.0.data/data/share/demo/readme.txt", "data\n")
        zf.writestr("demo_pkg-1.0.data/headers/demo.h", "int demo;\n")
        zf.writestr("demo_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n")
        zf.writestr("demo_pkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("demo_pkg-1.0.dist-info/entry_points.txt", "[console_scripts]\nDemo = demo_pkg:main\n")
        zf.writestr("demo_pkg-1.0.dist-info/RECORD", "")
    dest = tmp_path / "base"
    unpack_wheel(wheel, dest, (3, 11))
    site = dest / "lib/python3.11/site-packages"
    assert (site / "demo_pkg/__init__.py").is_file() and (site / "demo_extra.py").is_file()
    assert (dest / "share/demo/readme.txt").read_text() == "data\n"
    assert (dest / "include/python3.11/demo-pkg/demo.h").is_file()
    tool, launcher = dest / "bin/demo-tool", dest / "bin/Demo"
    assert tool.read_text() == "#!/usr/bin/env python3\nprint('tool ran')\n" and tool.stat().st_mode & 0o777 == 0o755
    assert launcher.read_text().startswith("#!/usr/bin/env python3\n") and launcher.stat().st_mode & 0o111
    ran = subprocess.run([sys.executable, str(launcher)], env={"PYTHONPATH": str(site)}, capture_output=True,
                         text=True, check=True)
    assert ran.stdout == "demo ran\n"
    record = {line.split(",")[0] for line in (site / "demo_pkg-1.0.dist-info/RECORD").read_text().splitlines()}
    assert {"demo_pkg/__init__.py", "demo_extra.py", "../../../bin/demo-tool", "../../../bin/Demo",
            "../../../share/demo/readme.txt", "demo_pkg-1.0.dist-info/INSTALLER",
            "demo_pkg-1.0.dist-info/RECORD"} <= record
    evil = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../evil.py", "")
    with pytest.raises(ImageBuildError, match=r"unsafe member path '\.\./evil\.py'"):
        unpack_wheel(evil, tmp_path / "evil", (3, 11))


async def test_wheel_cache_lock_is_shared_between_processes_and_cancellable(tmp_path: Path) -> None:
    lock = tmp_path / "cache" / ".lock"
    lock.parent.mkdir()
    code = ("import filelock, sys, time\nlock = filelock.FileLock(sys.argv[1])\nlock.acquire()\n"
            "print('held', flush=True)\ntime.sleep(1.5)\nlock.release()\n")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async with await anyio.open_process([sys.executable, "-c", code, str(lock)]) as holder, \
            anyio.create_task_group() as tg:
        assert holder.stdout is not None
        assert (await holder.stdout.receive()).startswith(b"held")
        tg.start_soon(ticker)
        with anyio.move_on_after(0.4) as scope:
            async with file_lock(lock):
                pytest.fail("acquired a lock another process holds")
        assert scope.cancelled_caught  # waiting can be cancelled ...
        assert ticks >= 20  # ... and never blocked the event loop
        t0 = time.perf_counter()
        async with file_lock(lock):
            waited = time.perf_counter() - t0
        tg.cancel_scope.cancel()
    assert 0.3 < waited < 5  # got it once the other process let go


@pytest.fixture
def pretend_arm64_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as if this host were linux/arm64: wheels built here would then run on arm64 only."""
    monkeypatch.setattr(_images, "host_platform", lambda: "linux/arm64")


@needs_amd64_host
async def test_wheelhouse_is_chosen_for_the_target_not_the_host(wheel_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On this amd64 host, an arm64 wheelhouse is all aarch64; on a (pretended) arm64 host, amd64 is x86_64."""
    mgr = ImageManager(None, None, cache_dir=wheel_cache)  # type: ignore[arg-type]  # wheels only
    arm = WheelTarget.of("linux/arm64", PY, "glibc 2.36")
    t0 = time.perf_counter()
    arm_wheels = await mgr.wheelhouse([], arm)
    metric("arm64_wheelhouse_seconds", time.perf_counter() - t0)
    binary = binary_platforms(arm_wheels)
    print("arm64 binary wheels:", *sorted(binary), sep="\n  ")
    assert len(binary) >= 2  # cffi and cryptography (dependencies of stepflow; plugins stay on the runner)
    for name, platforms in binary.items():
        assert all(p.endswith("_aarch64") and p.startswith(("manylinux", "musllinux")) for p in platforms), name
    assert all(p.is_relative_to(wheel_cache / "wheels" / arm.key) for p in arm_wheels)

    monkeypatch.setattr(_images, "host_platform", lambda: "linux/arm64")
    amd = WheelTarget.of("linux/amd64", PY, "glibc 2.36")
    amd_wheels = await mgr.wheelhouse([], amd)
    binary = binary_platforms(amd_wheels)
    print("amd64 binary wheels:", *sorted(binary), sep="\n  ")
    assert len(binary) >= 2
    for name, platforms in binary.items():
        assert all(p.endswith("_x86_64") and p.startswith("manylinux") for p in platforms), name
    assert {p.name for p in arm_wheels}.isdisjoint(binary)  # amd64 and arm64 wheels never mix


@needs_amd64_host
async def test_missing_wheels_for_the_platform_name_package_and_platform(tmp_path: Path, wheel_cache: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    # psycopg2 publishes source distributions only, and has C code: no linux/arm64 wheel can be had here.
    fake_installed(site, "psycopg2", "2.9.10", pure=False)
    # docopt publishes a source distribution only, pure Python: its wheel, built here, runs anywhere.
    fake_installed(site, "docopt", "0.6.2")
    # A local project with a (declared) C extension builds a platform-specific wheel.
    src = tmp_path / "cext"
    src.mkdir()
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n'
                                        'build-backend = "setuptools.build_meta"\n')
    (src / "setup.py").write_text(
        "from setuptools import setup\nfrom setuptools.dist import Distribution\n\n\n"
        "class Binary(Distribution):\n    def has_ext_modules(self):\n        return True\n\n\n"
        "setup(name='stepflow-test-cext', version='0.1.0', py_modules=['stepflow_test_cext'], distclass=Binary)\n")
    (src / "stepflow_test_cext.py").write_text("VALUE = 1\n")
    fake_installed(site, "stepflow-test-cext", "0.1.0", direct={"url": src.as_uri(), "dir_info": {}})
    monkeypatch.syspath_prepend(str(site))
    mgr = ImageManager(None, None, cache_dir=wheel_cache)  # type: ignore[arg-type]
    arm = WheelTarget.of("linux/arm64", PY, "glibc 2.36")

    with pytest.raises(ImageBuildError, match=r"(?s)cannot get a wheel of 'psycopg2==2\.9\.10' for linux/arm64 "
                                              r"\(CPython 3\.\d+, glibc 2\.36\): the package index has none.*"
                                              r"Pin a version of psycopg2 that publishes wheels for linux/arm64.*"
                                              r"build the image on a linux/arm64 host"):
        await mgr.wheelhouse(["psycopg2"], arm)
    with pytest.raises(ImageBuildError, match=r"'stepflow-test-cext' has no wheel for linux/arm64 .*"
                                              rf"stepflow_test_cext-0\.1\.0-{PY_TAG}-{PY_TAG}-linux_x86_64\.whl, which "
                                              r"runs only on linux_x86_64\. Build the image on a linux/arm64 host"):
        await mgr.wheelhouse(["stepflow-test-cext"], arm)
    assert not list((wheel_cache / "wheels" / arm.key / "local").glob("stepflow-test-cext-*"))  # nothing cached

    docopt = [p for p in await mgr.wheelhouse(["docopt"], arm) if p.name.startswith("docopt-0.6.2-")]
    assert len(docopt) == 1 and not binary_platforms(docopt)
    # On this host's own platform the platform-specific wheel is fine.
    amd = WheelTarget.of("linux/amd64", PY, "glibc 2.36")
    names = {p.name for p in await mgr.wheelhouse(["stepflow-test-cext"], amd)}
    assert f"stepflow_test_cext-0.1.0-{PY_TAG}-{PY_TAG}-linux_x86_64.whl" in names


# ------------------------------------------------------------------------------------ platforms, real daemon
@docker_test
async def test_base_image_inspection_is_real_and_cached(builder: Any, registry: Any, project: Path,
                                                        wheel_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = await builder.inspect_base(BASE_IMAGE)
    read = await builder.inspect_base(BASE_IMAGE, run=False)  # from its files, as for a foreign architecture
    assert ran["platform"] == read["platform"] == "linux/amd64"
    assert ran["python"] == read["python"] == [3, 11]
    assert ran["user_site"] is True and re.fullmatch(r"glibc 2\.\d+", ran["libc"]) and read["libc"] == ran["libc"]

    monkeypatch.setattr(_images, "_BASE_INFO", {})
    mgr = ImageManager(builder, registry, cache_dir=wheel_cache)
    with pytest.raises(ImageBuildError, match=rf"base image '{re.escape(BASE_IMAGE)}' is a linux/amd64 image, but "
                                              r"the step image is for linux/arm64"):
        await mgr.ensure(ImageSpec(base_image=BASE_IMAGE, project_root=project, platform="linux/arm64"))
    with pytest.raises(ImageBuildError, match="is a linux/amd64 image"):
        await mgr.ensure(ImageSpec(base_image=BASE_IMAGE, project_root=project, env=ENV, platform="linux/arm64"))
    assert mgr.stats.base_inspections == 1  # once per base image id

    class Py312(DockerImageBuilder):
        async def inspect_base(self, ref: str, *, run: bool = True) -> dict[str, Any]:
            return dict(await super().inspect_base(ref, run=run), python=[3, 12])

    monkeypatch.setattr(_images, "_BASE_INFO", {})
    other = Py312()
    try:
        with pytest.raises(ImageBuildError, match=rf"base image '{re.escape(BASE_IMAGE)}' has Python 3\.12, but this "
                                                  rf"runner uses Python {PY[0]}\.{PY[1]}"):
            await ImageManager(other, registry, cache_dir=wheel_cache).ensure(ImageSpec(base_image=BASE_IMAGE))
    finally:
        await other.aclose()


async def image_listing(ref: str, code: str) -> Any:
    """Run ``code`` with the image's python3; return the JSON it prints last."""
    out = await docker("run", "--rm", "--network", "none", ref, "python3", "-c", code)
    return json.loads(out.strip().splitlines()[-1])


WHEEL_TAGS = ("import glob, json; print(json.dumps({p.split('/')[-2]: [l.split(': ')[1] for l in open(p).read()"
              ".splitlines() if l.startswith('Tag: ')] for p in glob.glob('/opt/stepflow/lib/python*/site-packages/"
              "*.dist-info/WHEEL')}))")


@docker_test
@needs_amd64_host
async def test_arm64_host_builds_an_amd64_image_of_manylinux_wheels(builder: Any, registry: Any, project: Path,
                                                                      wheel_cache: Path, pretend_arm64_host: None) -> None:
    """A step built on an arm64 host produces a linux/amd64 image whose wheels are manylinux."""
    mgr = ImageManager(builder, registry, cache_dir=wheel_cache)
    t0 = time.perf_counter()
    ref = await mgr.ensure(ImageSpec(base_image=BASE_IMAGE, project_root=project, env=ENV, platform="linux/amd64"))
    metric("amd64_image_from_arm64_host_seconds", time.perf_counter() - t0)
    await docker("rmi", ref)  # run what was pushed
    await docker("pull", ref)
    assert (await docker("image", "inspect", "-f", "{{.Os}}/{{.Architecture}}", ref)).strip() == "linux/amd64"
    tags = await image_listing(ref, WHEEL_TAGS)
    assert "stepflow-" + __import__("stepflow").__version__ + ".dist-info" in tags
    binary = {info: t for info, t in tags.items() if any(not tag.endswith("-any") for tag in t)}
    print("wheel tags in the image:", *(f"{k}: {v}" for k, v in sorted(binary.items())), sep="\n  ")
    assert len(binary) >= 2
    for info, wheel_tags in binary.items():
        assert all(re.search(r"-manylinux(_\d+_\d+|1|2010|2014)_x86_64$", t) for t in wheel_tags), info
    # The binary modules load, and the step entrypoint starts.
    code = ("import importlib, json, pathlib, site; root = pathlib.Path(site.getusersitepackages()); bad = []\n"
            "for so in sorted(root.rglob('*.so')):\n"
            "    name = '.'.join(so.relative_to(root).with_suffix('').with_suffix('').parts)\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as exc:\n        bad.append(f'{name}: {exc}')\n"
            "print(json.dumps([len(list(root.rglob('*.so'))), bad]))")
    count, bad = await image_listing(ref, code)
    assert count >= 2 and bad == []
    out = await docker("run", "--rm", "--network", "none", ref, "python3", "-m", "stepflow.entrypoint", "--help")
    assert "--payload" in out


@pytest.fixture(scope="session")
def arm64_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base image relabelled linux/arm64 (its programs stay amd64, so this daemon can still run them).

    Stands in for a real arm64 base image, which cannot be pulled here: enough to assemble an
    arm64 step image and look inside it.
    """
    docker_env.require_docker()
    tmp = tmp_path_factory.mktemp("arm64-base")
    tag = f"stepflow-test-arm64-base:{int(time.time())}"
    subprocess.run(["docker", "save", "-o", str(tmp / "base.tar"), BASE_IMAGE], check=True, timeout=300)
    with tarfile.open(tmp / "base.tar") as src, tarfile.open(tmp / "arm64.tar", "w") as out:
        manifest = json.load(src.extractfile("manifest.json"))  # type: ignore[arg-type]
        old = manifest[0]["Config"]
        config = json.load(src.extractfile(old))  # type: ignore[arg-type]
        config["architecture"], config["variant"] = "arm64", "v8"
        data = json.dumps(config).encode()
        manifest[0]["Config"], manifest[0]["RepoTags"] = f"{hashlib.sha256(data).hexdigest()}.json", [tag]
        for member in src.getmembers():
            if member.name not in (old, "manifest.json", "repositories"):
                out.addfile(member, src.extractfile(member) if member.isfile() else None)
        for name, body in ((manifest[0]["Config"], data), ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            out.addfile(info, io.BytesIO(body))
    subprocess.run(["docker", "load", "-i", str(tmp / "arm64.tar")], check=True, capture_output=True, timeout=300)
    yield tag
    subprocess.run(["docker", "rmi", tag], capture_output=True, timeout=120)


@docker_test
@needs_amd64_host
async def test_arm64_image_is_assembled_without_emulation(builder: Any, registry: Any, project: Path,
                                                          wheel_cache: Path, arm64_base: str) -> None:
    mgr = ImageManager(builder, registry, cache_dir=wheel_cache)
    t0 = time.perf_counter()
    ref = await mgr.ensure(ImageSpec(base_image=arm64_base, project_root=project, platform="linux/arm64"))
    metric("arm64_image_seconds", time.perf_counter() - t0)
    assert (await docker("image", "inspect", "-f", "{{.Os}}/{{.Architecture}}", ref)).strip() == "linux/arm64"
    tags = await image_listing(ref, WHEEL_TAGS)
    binary = {info: t for info, t in tags.items() if any(not tag.endswith("-any") for tag in t)}
    assert len(binary) >= 2
    for info, wheel_tags in binary.items():
        assert all(t.endswith("_aarch64") for t in wheel_tags), info
    # Every shared library shipped is AArch64 machine code (ELF e_machine 183).
    code = ("import json, pathlib, site, struct; root = pathlib.Path(site.getusersitepackages())\n"
            "print(json.dumps(sorted({struct.unpack('<H', p.read_bytes()[18:20])[0] for p in root.rglob('*.so')})))")
    assert await image_listing(ref, code) == [183]
