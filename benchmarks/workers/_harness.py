"""Shared by every worker (stdlib only: it also runs in the Prefect and Dagster venvs).

A worker runs ONE workload for ONE contender in a fresh interpreter: an untimed warm-up (imports,
servers, first-run caches), then ``reps`` timed repetitions, and prints one line
``BENCH-RESULT {json}`` that the suite parses.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

PAYLOAD_BYTES = 1 << 20  # diamond workload: 1 MB per edge
SLEEP_SECONDS = 0.5

#: total steps of a workload of size n (what per-step overhead divides by)
STEPS: dict[str, Callable[[int], int]] = {
    "fanout": lambda n: n + 1,   # one source + n no-ops reading its output
    "chain": lambda n: n + 1,    # one source + n no-ops, each reading the previous output
    "sleep": lambda n: n,        # n independent steps sleeping 0.5 s
    "diamond": lambda n: n + 2,  # source -> n transforms of a 1 MB payload -> join
    "memory": lambda n: n + 1,   # fan-out of n, measured for memory
}


def args(contenders: tuple[str, ...] = ()) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=sorted(STEPS))
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-warmup", action="store_true")
    if contenders:
        ap.add_argument("--contender", choices=contenders, default=contenders[0])
    return ap.parse_args()


def rss_now() -> int:
    """Current resident set size in bytes (Linux)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rotate(data: bytes) -> bytes:
    """The diamond workload's per-step work: a new 1 MB payload derived from the input."""
    return data[1:] + data[:1]


def join_sizes(parts: list[bytes]) -> int:
    return sum(len(p) for p in parts)


def diamond_ideal(width: int, reps: int = 5) -> float:
    """Seconds the diamond's work takes as plain sequential calls (no orchestration at all)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        src = bytes(PAYLOAD_BYTES)
        outs = [rotate(src) for _ in range(width)]
        join_sizes(outs)
        del outs
        best = min(best, time.perf_counter() - t0)
    return best


def ideal_seconds(workload: str, n: int) -> float:
    if workload == "sleep":
        return SLEEP_SECONDS
    if workload == "diamond":
        return diamond_ideal(n)
    return 0.0


def measure(run_once: Callable[[int], Any], a: argparse.Namespace, warmup_n: int | None = None) -> dict[str, Any]:
    """Warm up, then time ``run_once(n)`` ``reps`` times (wall and process CPU)."""
    if not a.no_warmup:
        run_once(warmup_n if warmup_n is not None else min(a.n, 10))
    times: list[float] = []
    cpu: list[float] = []
    for _ in range(a.reps):
        gc.collect()
        c0 = time.process_time()
        t0 = time.perf_counter()
        run_once(a.n)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"times": times, "cpu": cpu, "n": a.n, "steps": STEPS[a.workload](a.n),
            "ideal": ideal_seconds(a.workload, a.n), "peak_rss": peak_rss()}


def emit(result: dict[str, Any]) -> None:
    result.setdefault("python", sys.version.split()[0])
    sys.stdout.write("BENCH-RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
