"""Scheduler overhead: stepflow against a hand-written raw-asyncio floor, in the same process.

Run:  python benchmarks/overhead.py [--quick] [--json FILE]

Workloads (each measured several times; min and median reported):
  fanout-10k   one source step feeding 10,000 async no-op steps (also with every event
               delivered to a subscriber, and with the DAG built beforehand)
  chain-1k     1,000 async no-op steps, each consuming the previous output
  sleep-200    200 independent async steps each sleeping 0.5 s
  memory-100k  tracemalloc peak per step while building, validating and running 100,000 steps
  import       `import stepflow` in a fresh interpreter, and whether any cloud SDK got imported

The floor does the same bookkeeping stepflow does per step (status, start/end timestamps,
output kept by name) with plain asyncio tasks and gather: the physical lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import stepflow
from stepflow import pipeline, step

# ---------------------------------------------------------------- stepflow definitions


@step
async def source() -> int:
    return 1


@step
async def noop(x: int) -> int:
    return x


@step
async def nap(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@pipeline
def fanout(n: int) -> None:
    root = source()
    for _ in range(n):
        noop(root)


@pipeline
def chain(n: int) -> None:
    prev = source()
    for _ in range(n):
        prev = noop(prev)


@pipeline
def sleepers(n: int, seconds: float) -> None:
    for _ in range(n):
        nap(seconds)


async def sf_run(make: Callable[[], stepflow.Pipeline]) -> None:
    result = await stepflow.run(make())
    assert result.status == "succeeded", result.status


async def sf_run_subscribed(make: Callable[[], stepflow.Pipeline]) -> None:
    """Same, with a subscriber attached so every event is built and delivered."""
    bus = stepflow.EventBus()
    async with bus.subscribe(buffer=100_000) as events:
        result = await stepflow.run(make(), event_bus=bus)
        assert len(events.pending()) == 3 * len(result.steps) + 2
    assert result.status == "succeeded", result.status


# ---------------------------------------------------------------- raw asyncio floor
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
import _floor  # noqa: E402  (shared with workers/native_worker.py)

floor_fanout, floor_chain, floor_sleep = _floor.fanout, _floor.chain, _floor.sleep


# ---------------------------------------------------------------- harness


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def memory_per_step(fn: Callable[[], Any], n: int) -> float:
    gc.collect()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / n


def import_time() -> tuple[float, list[str]]:
    code = (
        "import time,sys;t=time.perf_counter();import stepflow;"
        "d=time.perf_counter()-t;"
        "bad=[m for m in sys.modules if m.split('.')[0] in "
        "('boto3','botocore','aiobotocore','google','azure','aiodocker','docker','sagemaker')];"
        "print(d);print(','.join(bad))"
    )
    times = []
    bad: list[str] = []
    for _ in range(5):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        lines = out.stdout.splitlines()
        times.append(float(lines[0]))
        bad = [m for m in (lines[1] if len(lines) > 1 else "").split(",") if m]
    return min(times), bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke run)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    repeat = 3 if args.quick else 7
    rows: list[dict[str, Any]] = []

    def compare(name: str, sf: Callable[[], Any], fl: Callable[[], Any], budget: float | None,
                rep: int = repeat) -> None:
        sf_t = timed(sf, rep)
        fl_t = timed(fl, rep)
        ratio = min(sf_t) / min(fl_t)
        rows.append({
            "workload": name, "stepflow_min_s": min(sf_t), "stepflow_median_s": statistics.median(sf_t),
            "floor_min_s": min(fl_t), "floor_median_s": statistics.median(fl_t), "ratio": ratio,
            "budget": budget, "ok": None if budget is None else ratio <= budget,
        })

    compare("fanout-10k (build+run)", lambda: asyncio.run(sf_run(lambda: fanout(10_000))),
            lambda: asyncio.run(floor_fanout(10_000)), 3.0)
    compare("fanout-10k (build+run, events)",
            lambda: asyncio.run(sf_run_subscribed(lambda: fanout(10_000))),
            lambda: asyncio.run(floor_fanout(10_000)), 3.0)
    built = fanout(10_000)
    compare("fanout-10k (run only)", lambda: asyncio.run(sf_run(lambda: built)),
            lambda: asyncio.run(floor_fanout(10_000)), 3.0)
    compare("chain-1k (build+run)", lambda: asyncio.run(sf_run(lambda: chain(1_000))),
            lambda: asyncio.run(floor_chain(1_000)), 3.0)
    sleep_t = timed(lambda: asyncio.run(sf_run(lambda: sleepers(200, 0.5))), 3)
    floor_sleep_t = timed(lambda: asyncio.run(floor_sleep(200, 0.5)), 3)
    rows.append({
        "workload": "sleep-200x0.5s (wall s)", "stepflow_min_s": min(sleep_t),
        "stepflow_median_s": statistics.median(sleep_t), "floor_min_s": min(floor_sleep_t),
        "floor_median_s": statistics.median(floor_sleep_t), "ratio": min(sleep_t) / min(floor_sleep_t),
        "budget": 0.6, "ok": max(sleep_t) <= 0.6,
    })
    mem_rows = [
        ("memory fanout-100k (B/step)", lambda: asyncio.run(sf_run(lambda: fanout(100_000))),
         lambda: asyncio.run(floor_fanout(100_000))),
        ("memory chain-100k (B/step)", lambda: asyncio.run(sf_run(lambda: chain(100_000))),
         lambda: asyncio.run(floor_chain(100_000))),
    ]
    for name, sf, fl in mem_rows:
        sf_m = memory_per_step(sf, 100_001)
        fl_m = memory_per_step(fl, 100_001)
        rows.append({"workload": name, "stepflow_min_s": sf_m, "stepflow_median_s": sf_m,
                     "floor_min_s": fl_m, "floor_median_s": fl_m, "ratio": sf_m / fl_m,
                     "budget": 2048, "ok": sf_m <= 2048})
    imp, bad = import_time()
    rows.append({"workload": "import stepflow (s)", "stepflow_min_s": imp, "stepflow_median_s": imp,
                 "floor_min_s": None, "floor_median_s": None, "ratio": None, "budget": 0.1,
                 "ok": imp <= 0.1 and not bad, "cloud_sdks_imported": bad})

    header = f"{'workload':32} {'stepflow min':>13} {'median':>10} {'floor min':>11} {'median':>10} {'ratio':>7}  budget"
    print(header)
    print("-" * len(header))
    for r in rows:
        def f(v: Any) -> str:
            return "-" if v is None else (f"{v:.4f}" if v < 100 else f"{v:.0f}")
        verdict = "" if r["ok"] is None else ("ok" if r["ok"] else "MISSED")
        budget = r["budget"]
        absolute = "B/step" in r["workload"] or r["workload"].endswith(("(wall s)", "(s)"))
        btxt = "" if budget is None else (f"<= {budget:g}" if absolute else f"<= {budget:g}x")
        print(f"{r['workload']:32} {f(r['stepflow_min_s']):>13} {f(r['stepflow_median_s']):>10} "
              f"{f(r['floor_min_s']):>11} {f(r['floor_median_s']):>10} "
              f"{'-' if r['ratio'] is None else format(r['ratio'], '.2f'):>7}  {btxt} {verdict}")
    if bad:
        print("cloud SDK modules imported by `import stepflow`:", ", ".join(bad))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"python": sys.version, "stepflow": stepflow.__version__, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
