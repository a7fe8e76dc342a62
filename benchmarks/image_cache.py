"""Image cache on the real Docker daemon: cold build, warm unchanged rerun, one source file changed.

    python -m benchmarks.image_cache

Uses stepflow's real ImageManager with the docker plugin's DockerImageBuilder and a
DefaultContainerRegistry under ``127.0.0.1:5000/bench-<unique>`` (the registry of
scripts/services.sh), on a small throw-away project:

  cold      fresh cache_dir (so the wheelhouse is downloaded / built again) and a fresh registry
            prefix; a per-benchmark ENV line in the image spec keeps the daemon's layer cache from
            short-cutting the build (the daemon is shared, so it is never pruned)
  warm      a new ImageManager, same inputs: must build 0 and push 0 (the registry is asked)
  changed   one source file of the project edited: 1 build and 1 push, wheels from the cache

Reports wall time and ImageManager.stats per phase. Skips with a message when dockerd, the
registry or the base image are missing. Prints ``BENCH-RESULT {json}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REGISTRY = "127.0.0.1:5000"
BASE_IMAGE = "stepflow-base:py3.11"

PROJECT = {
    "pipeline.py": "from steps import load, train\n\n\ndef main():\n    return train(load())\n",
    "steps.py": "def load():\n    return list(range(100))\n\n\ndef train(data):\n    return sum(data) * 0.1\n",
    "utils/__init__.py": "",
    "utils/io.py": "import json\n\n\ndef dump(x):\n    return json.dumps(x)\n",
}


def docker_problem() -> str | None:
    """What is missing for this benchmark (None: all there)."""
    try:
        # `docker version`, not `docker info`: /info can hang on one stuck container while builds work.
        info = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                              text=True, timeout=90)
        if info.returncode != 0:
            return f"dockerd does not answer `docker version` ({(info.stderr or info.stdout).strip()[:200]})"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run `docker version` ({exc})"
    try:
        with urllib.request.urlopen(f"http://{REGISTRY}/v2/", timeout=5) as resp:
            if resp.status != 200:
                return f"the registry http://{REGISTRY}/v2/ answers HTTP {resp.status}"
    except OSError as exc:
        return f"no registry at http://{REGISTRY}/v2/ ({exc})"
    found = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, timeout=90)
    if found.returncode != 0:
        return f"the base image {BASE_IMAGE} is missing"
    try:
        import stepflow_docker  # noqa: F401
    except ImportError:
        return "the stepflow-docker plugin is not installed (pip install -e plugins/stepflow-docker)"
    return None


async def phase(name: str, spec: Any, registry: Any, cache_dir: Path) -> dict[str, Any]:
    from stepflow_docker.builder import DockerImageBuilder

    from stepflow.remote._images import ImageManager

    builder = DockerImageBuilder(name="docker")
    manager = ImageManager(builder, registry, cache_dir=cache_dir)
    try:
        t0 = time.perf_counter()
        ref = await manager.ensure(spec, step="bench")
        seconds = time.perf_counter() - t0
    finally:
        await builder.aclose()
    s = manager.stats
    return {"phase": name, "seconds": seconds, "image": ref, "builds": s.builds, "pushes": s.pushes,
            "registry_checks": s.registry_checks, "wheels_downloaded": s.wheels_downloaded,
            "wheels_built": s.wheels_built, "wheels_reused": s.wheels_reused, "wheel_count": s.last_wheel_count,
            "wheelhouse_seconds": s.last_wheelhouse_seconds, "context_seconds": s.last_context_seconds}


async def bench() -> dict[str, Any]:
    from stepflow._components.registry import DefaultContainerRegistry
    from stepflow._flavors.builtin import DefaultRegistryConfig
    from stepflow.remote._images import ImageSpec

    prefix = f"bench-{uuid.uuid4().hex[:10]}"
    scratch = Path(tempfile.mkdtemp(prefix="stepflow-bench-images-"))
    project = scratch / "project"
    for rel, text in PROJECT.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    registry = DefaultContainerRegistry("bench", DefaultRegistryConfig(uri=f"{REGISTRY}/{prefix}"))
    spec = ImageSpec(base_image=BASE_IMAGE, project_root=project, env={"STEPFLOW_BENCH_RUN": prefix})
    cache = scratch / "cache"
    phases = []
    try:
        phases.append(await phase("cold", spec, registry, cache))
        phases.append(await phase("warm (unchanged)", spec, registry, cache))
        (project / "steps.py").write_text(PROJECT["steps.py"].replace("0.1", "0.2"))
        phases.append(await phase("one file changed", spec, registry, cache))
    finally:
        listed = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                                text=True, timeout=60)
        mine = [r for r in listed.stdout.split() if r.startswith(f"{REGISTRY}/{prefix}/")]
        if mine:
            subprocess.run(["docker", "rmi", "-f", *mine], capture_output=True, timeout=300)
        shutil.rmtree(scratch, ignore_errors=True)
    return {"registry_prefix": f"{REGISTRY}/{prefix}", "docker_host": os.environ.get("DOCKER_HOST") or "default socket",
            "phases": phases}


def main() -> int:
    problem = docker_problem()
    if problem is not None:
        print(f"SKIPPED image-cache benchmark: {problem} (run `sudo bash scripts/services.sh`)", file=sys.stderr)
        sys.stdout.write("BENCH-RESULT " + json.dumps({"skipped": problem}) + "\n")
        return 0
    out = asyncio.run(bench())
    sys.stdout.write("BENCH-RESULT " + json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
