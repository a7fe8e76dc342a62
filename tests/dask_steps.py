"""Steps and pipelines of tests/test_dask.py, importable by the test cluster's workers."""

from __future__ import annotations

import os
import threading
import time

from stepflow import Resources, pipeline, step


def _record(path: str, text: str) -> None:
    with open(path, "a") as fh:  # one line per execution: a step run twice shows twice
        fh.write(text + "\n")


@step(step_operator="dask")
def nap(marker: str, index: int, seconds: float) -> int:
    """Record that it ran, then work for ``seconds`` in short slices (cancellable between them)."""
    _record(marker, f"nap_{index} {os.getpid()}")
    print(f"nap {index} starts", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return index * index


@step
def total(values: list[int]) -> int:
    return sum(values)


@pipeline
def naps(marker: str, count: int = 4, seconds: float = 2.0):
    """``count`` napping steps on Dask, summed locally."""
    return total([nap.with_options(name=f"nap_{i}")(marker, i, seconds) for i in range(count)])


@step
def make_lock() -> object:
    return threading.Lock()


@step(step_operator="dask")
def use(value: object) -> str:
    return repr(value)


@pipeline
def unserializable():
    return use(make_lock())


@step(step_operator="dask", resources=Resources(gpu=1))
def on_gpu() -> int:
    return 1


@pipeline
def needs_gpu():
    return on_gpu()


@step(step_operator="docker")
def containerized(x: int) -> int:
    """Written for the docker operator; the stack decides where it runs."""
    return x + 1


@pipeline
def written_for_docker(x: int = 1):
    return containerized(x)
