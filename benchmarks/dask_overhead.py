"""What stepflow's dask operator costs over plain Dask: 1,000 small steps on a 2-worker cluster.

    python -m benchmarks.dask_overhead                 # 1,000 steps, 5 repetitions
    python -m benchmarks.dask_overhead --steps 200 --reps 3

Starts a real cluster on 127.0.0.1 with the ``dask`` command line (a scheduler and two worker
processes of one thread each), then measures, on that same cluster and in the same run:

- **plain Dask** (the baseline): ``client.map(fn, range(N), pure=False)`` then ``client.gather``;
- **stepflow**: a pipeline of N independent steps on the ``dask`` operator, run with the
  defaults (run store on, each task recorded and published so that a crashed runner can
  re-attach to it);
- **stepflow, no resume**: the same with ``persist=False`` and ``reattach=false`` (no run-store
  record, no publishing), to show what the resume machinery costs.

Each contender gets one untimed warm-up, then ``--reps`` rounds run the contenders in turn (so a
load that comes and goes on the machine touches them alike); the table shows the min and median
wall time, the runner process's CPU time per step, and the ratio of each median to plain Dask's
(goal: stepflow <= 1.5x). The runner, the scheduler and the workers share the machine's cores,
so the runner's CPU time is part of the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

GOAL = 1.5
ROOT = Path(__file__).resolve().parent.parent


def small(i: int) -> int:
    """The unit of work: small enough that the orchestration is what is measured."""
    return i * 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cluster(logs: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    dask = str(Path(sys.executable).with_name("dask"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              cwd=ROOT, env=env, stdout=open(logs / "scheduler.log", "wb"),  # noqa: SIM115
                              stderr=subprocess.STDOUT)]
    for i in range(2):
        procs.append(subprocess.Popen([dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                       "--no-nanny", "--no-dashboard"], cwd=ROOT, env=env,
                                      stdout=open(logs / f"worker-{i}.log", "wb"),  # noqa: SIM115
                                      stderr=subprocess.STDOUT))
    return address, procs


async def time_all(contenders: list[tuple[str, Callable[[], Awaitable[Any]]]],
                   reps: int) -> list[tuple[str, list[float], list[float]]]:
    """``(name, wall times, runner CPU times)`` of each contender, run in turn ``reps`` times after a warm-up."""
    for _, fn in contenders:
        await fn()  # warm-up: imports, connections, the workers' first tasks
    walls: dict[str, list[float]] = {name: [] for name, _ in contenders}
    cpus: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for _ in range(reps):
        for name, fn in contenders:
            started, cpu = time.perf_counter(), time.process_time()
            await fn()
            walls[name].append(time.perf_counter() - started)
            cpus[name].append(time.process_time() - cpu)
    return [(name, walls[name], cpus[name]) for name, _ in contenders]


async def measure(address: str, steps: int, reps: int) -> list[tuple[str, list[float], list[float]]]:
    from distributed import Client
    from stepflow_dask.flavor import DaskOperatorConfig
    from stepflow_dask.operator import DaskStepOperator

    from stepflow import pipeline, run, step

    client = await Client(address, asynchronous=True, set_as_default=False)
    await client.wait_for_workers(2)

    async def plain() -> None:
        futures = client.map(small, range(steps), pure=False)
        values = await client.gather(futures)
        assert values == [small(i) for i in range(steps)]

    on_dask = step(step_operator="dask")(small)

    @pipeline
    def fan(n: int):
        return [on_dask.with_options(name=f"s{i}")(i) for i in range(n)]

    built = fan(steps)

    def stepflow_run(persist: bool, reattach: bool) -> Callable[[], Awaitable[None]]:
        async def go() -> None:
            op = DaskStepOperator("dask", DaskOperatorConfig(address=address, reattach=reattach))
            result = await run(built, operators={"dask": op}, persist=persist)
            assert result.status == "succeeded", result
            assert all(result.outputs[f"s{i}"] == small(i) for i in range(steps))

        return go

    try:
        return await time_all([("plain Dask (client.map + gather)", plain),
                               ("stepflow, dask operator (defaults)", stepflow_run(True, True)),
                               ("stepflow, no run store, no reattach", stepflow_run(False, False))], reps)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stepflow-dask-bench-") as tmp:
        os.environ["STEPFLOW_HOME"] = str(Path(tmp) / "home")
        address, procs = start_cluster(Path(tmp))
        try:
            rows = asyncio.run(measure(address, args.steps, args.reps))
        finally:
            for proc in reversed(procs):  # workers first, then their scheduler
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    import distributed

    import stepflow

    base = statistics.median(rows[0][1])
    print(f"dask overhead: {args.steps} steps, 2 workers x 1 thread, {args.reps} reps; stepflow "
          f"{stepflow.__version__}, distributed {distributed.__version__}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"| {'contender':<38} | {'min s':>7} | {'median s':>8} | {'ms/step':>7} | {'runner CPU ms/step':>18} | "
          f"{'x plain':>7} |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 20}|{'-' * 9}|")
    for name, times, cpus in rows:
        median = statistics.median(times)
        print(f"| {name:<38} | {min(times):7.3f} | {median:8.3f} | {1000 * median / args.steps:7.3f} | "
              f"{1000 * statistics.median(cpus) / args.steps:18.3f} | {median / base:7.2f} |")
    ratio = statistics.median(rows[1][1]) / base
    print(f"\ngoal: stepflow (defaults) <= {GOAL}x plain Dask: {'met' if ratio <= GOAL else 'MISSED'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
