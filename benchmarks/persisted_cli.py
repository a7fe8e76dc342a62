"""A persisted `stepflow run` of 2,000 no-op steps against the in-process API, in the same run.

Run:  python benchmarks/persisted_cli.py [--steps 2000] [--repeat 5] [--json FILE]

Rows (min and median of ``--repeat`` runs, each in a fresh STEPFLOW_HOME):
  api             ``run(p, persist=False)`` inside one process: the engine alone
  api-persisted   ``run(p, persist=True)``: + run store, events and outputs recorded
  cli             ``stepflow run MODULE:many --no-progress`` as a subprocess, output discarded:
                  interpreter start, imports, the persisted run, the summary (budget <= 1 s)
  cli-startup     ``stepflow --version`` as a subprocess: what any command costs before working

After every persisted run the run store is checked: every succeeded step has its output
recorded (inline or in the artifact store), which is what resume relies on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUDGET_CLI_S = 1.0

PIPELINE = '''
from stepflow import pipeline, step


@step
def noop(i: int) -> int:
    return i


@pipeline
def many(n: int = 2000):
    return [noop(i) for i in range(n)]
'''


def _recorded(home: Path) -> tuple[int, int]:
    """(succeeded steps, steps with a recorded output) of the newest run in ``home``."""
    from stepflow._store.runs import RunStore
    from stepflow._store.sqlite import Store

    runs = RunStore(Store(home))
    run = runs.list_runs(1)[0]
    succeeded = sum(1 for s in runs.steps(run.run_id) if s.status == "succeeded")
    outputs = len(runs.outputs(run.run_id))
    runs.store.close()
    return succeeded, outputs


def _api(module: Any, steps: int, persist: bool, home: Path) -> float:
    from stepflow import run

    os.environ["STEPFLOW_HOME"] = str(home)
    pipeline = module.many(steps)
    t0 = time.perf_counter()
    result = asyncio.run(run(pipeline, persist=persist))
    took = time.perf_counter() - t0
    assert result.status == "succeeded", result.status
    return took


def _cli(project: Path, module: str, steps: int, home: Path) -> float:
    env = {**os.environ, "STEPFLOW_HOME": str(home), "PYTHONPATH": str(project)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stepflow", "run", f"{module}:many", "-p", f"n={steps}",
                           "--no-progress"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"stepflow run failed ({done.returncode}): {done.stderr}")
    return took


def _startup() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stepflow", "--version"], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", dest="json_file", default=None)
    args = parser.parse_args(argv)
    rows: dict[str, list[float]] = {"api": [], "api-persisted": [], "cli": [], "cli-startup": []}
    checks: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory(prefix="stepflow-bench-") as tmp:
        root = Path(tmp)
        project = root / "proj"
        project.mkdir()
        module = "bench_many"
        (project / f"{module}.py").write_text(PIPELINE)
        sys.path.insert(0, str(project))
        mod = __import__(module)
        for i in range(args.repeat):
            rows["api"].append(_api(mod, args.steps, False, root / f"api-{i}"))
            home = root / f"persisted-{i}"
            rows["api-persisted"].append(_api(mod, args.steps, True, home))
            checks.append(_recorded(home))
            home = root / f"cli-{i}"
            rows["cli"].append(_cli(project, module, args.steps, home))
            checks.append(_recorded(home))
            rows["cli-startup"].append(_startup())
    api = min(rows["api"])
    table = []
    for name, values in rows.items():
        best = min(values)
        table.append({"workload": name, "steps": args.steps if name != "cli-startup" else 0, "min_s": round(best, 3),
                      "median_s": round(statistics.median(values), 3),
                      "vs_api": round(best / api, 2) if name != "cli-startup" else None})
    recorded_ok = all(s == args.steps and o == args.steps for s, o in checks)
    cli_best = min(rows["cli"])
    print(f"persisted CLI run of {args.steps} no-op steps, {args.repeat} runs each (min / median seconds)")
    print(f"{'workload':<15}{'min':>9}{'median':>9}{'x api':>8}")
    for r in table:
        ratio = "" if r["vs_api"] is None else f"{r['vs_api']:.1f}x"
        print(f"{r['workload']:<15}{r['min_s']:>9.3f}{r['median_s']:>9.3f}{ratio:>8}")
    verdict = "met" if cli_best <= BUDGET_CLI_S else "MISSED"
    print(f"budget: cli <= {BUDGET_CLI_S:g} s: {verdict} ({cli_best:.3f} s)")
    print(f"every succeeded step has its output recorded: {'yes' if recorded_ok else 'NO'} "
          f"({checks[-1][1]}/{checks[-1][0]} in the last run)")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps({"rows": table, "budget_cli_s": BUDGET_CLI_S,
                                                    "cli_min_s": cli_best, "recorded_ok": recorded_ok}, indent=2))
    return 0 if recorded_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
