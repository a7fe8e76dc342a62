"""The benchmark suite: stepflow against the raw-asyncio floor, Prefect 3 and Dagster, same run, same machine.

    python -m benchmarks                      # everything (about 25-35 min on 2 cores)
    python -m benchmarks --quick              # smoke run, < 60 s: small N, 1 rep, no Prefect/Dagster
    python -m benchmarks --only fanout --only remote

Every (workload, contender) runs in its own fresh interpreter (benchmarks/workers/*): an untimed
warm-up, then the timed repetitions; min and median are reported. stepflow and the floor run on
this interpreter; Prefect and Dagster in throw-away venvs under benchmarks/.venvs/ that this script
creates from benchmarks/requirements/*.txt (pinned; never stepflow dependencies). A contender whose
install fails is skipped with a message. Prefect and Dagster fan-out sizes are calibrated so one
repetition takes about two minutes (from timed runs at N=100 and N=1000, extrapolated linearly).

Writes results/latest.json, results/latest.md (the tables) and results/latest.png (log-scale bar
chart, matplotlib from the benchmarks/.venvs/tools venv); --quick writes results/quick.* instead.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKERS = HERE / "workers"
VENVS = HERE / ".venvs"
RESULTS = HERE / "results"
REQUIREMENTS = HERE / "requirements"

HEAVY = ("prefect", "dagster")
WORKLOADS = ("fanout-1k", "fanout-10k", "chain-1k", "sleep-200", "diamond-100", "memory-100k", "remote-1k",
             "image-cache", "persisted-cli")
DESCRIPTIONS = {
    "fanout-1k": "1 source step + 1,000 no-op steps reading its output",
    "fanout-10k": "1 source step + 10,000 no-op steps (Prefect/Dagster: N calibrated to ~2 min)",
    "chain-1k": "1 source + 1,000 no-op steps, each reading the previous one's output",
    "sleep-200": "200 independent steps each sleeping 0.5 s (true concurrency; ideal wall 0.5 s)",
    "diamond-100": "source -> 100 steps each turning a 1 MB payload into a new 1 MB one -> join of all 100",
    "memory-100k": "tracemalloc peak / steps while building + running a 100k fan-out (and chain)",
    "remote-1k": "concurrent remote steps on the in-process FakeJobBackend through the shared status/log loops",
    "persisted-cli": "`stepflow run` of 2,000 no-op steps with the run store on, vs the in-process API",
    "image-cache": "step image: cold build, warm unchanged rerun, one source file changed (real dockerd)",
}
TARGET_SECONDS = 120.0  # Prefect/Dagster fan-out: N so that one repetition takes about this long


# ------------------------------------------------------------------------------------ processes


@dataclass
class Proc:
    ok: bool
    result: dict[str, Any] | None
    seconds: float
    rusage: Any = None
    error: str = ""


def run_worker(cmd: list[str], env: dict[str, str], timeout: float, log_name: str) -> Proc:
    """Run one worker in its own session; parse its BENCH-RESULT line; kill its leftovers."""
    scratch = RESULTS / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    out_path, err_path = scratch / f"{log_name}.out", scratch / f"{log_name}.err"
    t0 = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        rusage = None
        status = None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                _kill_group(proc.pid)
                os.wait4(proc.pid, 0)
                return Proc(False, None, time.perf_counter() - t0, None, f"timed out after {timeout:.0f} s")
            time.sleep(0.05)
        _kill_group(proc.pid)  # e.g. Prefect's ephemeral API server, started by the worker
    seconds = time.perf_counter() - t0
    text = out_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("BENCH-RESULT ")]
    code = os.waitstatus_to_exitcode(status) if status is not None else -1
    if not lines:
        err_lines = [x for x in err_path.read_text(errors="replace").splitlines() if x.strip()]
        last = err_lines[-1].strip()[:300] if err_lines else "(no stderr)"
        return Proc(False, None, seconds, rusage, f"exit code {code}, no result; last stderr line: {last}")
    return Proc(True, json.loads(lines[-1][len("BENCH-RESULT "):]), seconds, rusage)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    for _ in range(40):
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# ------------------------------------------------------------------------------------ venvs


def ensure_venv(name: str, log: Callable[[str], None]) -> Path | None:
    """benchmarks/.venvs/<name> with requirements/<name>.txt installed; None (and why) on failure."""
    req = REQUIREMENTS / f"{name}.txt"
    venv = VENVS / name
    python = venv / "bin" / "python"
    digest = hashlib.sha256(req.read_bytes() + sys.version.encode()).hexdigest()
    marker = venv / ".bench-installed"
    if python.exists() and marker.exists() and marker.read_text().strip() == digest:
        return python
    log(f"setting up {venv.relative_to(ROOT)} from {req.relative_to(ROOT)} (one time) ...")
    VENVS.mkdir(parents=True, exist_ok=True)
    logfile = VENVS / f"{name}-install.log"
    shutil.rmtree(venv, ignore_errors=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
             [str(python), "-m", "pip", "install", "-q", "-r", str(req)]]
    with open(logfile, "w") as fh:
        for cmd in steps:
            try:
                done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=1800)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log(f"  SKIPPED {name}: `{' '.join(cmd[-3:])}` failed ({exc}); see {logfile.relative_to(ROOT)}")
                return None
            if done.returncode != 0:
                log(f"  SKIPPED {name}: `{' '.join(cmd[-3:])}` exited {done.returncode}; see "
                    f"{logfile.relative_to(ROOT)}")
                return None
    marker.write_text(digest + "\n")
    return python


# ------------------------------------------------------------------------------------ the suite


@dataclass
class Plan:
    quick: bool
    reps_native: int
    reps_heavy: int
    sizes: dict[str, int]
    remote_jobs: int
    remote_duration: tuple[float, float]
    remote_configs: list[tuple[str, float]]
    memory_n: int
    heavy_sleep_n: int = 50


@dataclass
class Suite:
    plan: Plan
    only: list[str]
    contenders: list[str]
    log: Callable[[str], None] = print
    rows: list[dict[str, Any]] = field(default_factory=list)
    remote: list[dict[str, Any]] = field(default_factory=list)
    images: dict[str, Any] | None = None
    persisted: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    pythons: dict[str, Path] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def wanted(self, workload: str) -> bool:
        return not self.only or any(workload == o or workload.startswith(o) for o in self.only)

    # -- environments
    def env_for(self, contender: str, scratch: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DAGSTER_"))}
        env["STEPFLOW_HOME"] = str(scratch / "stepflow-home")
        env["PYTHONUNBUFFERED"] = "1"
        if contender == "prefect":
            env["PREFECT_HOME"] = str(scratch / "prefect-home")
        if contender == "dagster":
            env["DAGSTER_HOME"] = str(scratch / "dagster-home")
            (scratch / "dagster-home").mkdir(parents=True, exist_ok=True)
        return env

    def setup(self) -> None:
        self.pythons = {"stepflow": Path(sys.executable), "floor": Path(sys.executable),
                        "stepflow-result": Path(sys.executable)}
        for name in HEAVY:
            if name not in self.contenders:
                continue
            python = ensure_venv(name, self.log)
            if python is None:
                self.skipped.append(f"{name}: install failed (see benchmarks/.venvs/{name}-install.log)")
                self.contenders.remove(name)
            else:
                self.pythons[name] = python

    def worker_cmd(self, contender: str, workload: str, n: int, reps: int) -> list[str]:
        kind = workload.split("-")[0]
        if contender in HEAVY:
            script = WORKERS / f"{contender}_worker.py"
            return [str(self.pythons[contender]), str(script), kind, "--n", str(n), "--reps", str(reps)]
        return [str(self.pythons[contender]), str(WORKERS / "native_worker.py"), kind, "--n", str(n), "--reps",
                str(reps), "--contender", contender]

    def measure(self, workload: str, contender: str, n: int, reps: int, timeout: float) -> dict[str, Any] | None:
        with tempfile.TemporaryDirectory(prefix="stepflow-bench-") as tmp:
            cmd = self.worker_cmd(contender, workload, n, reps)
            proc = run_worker(cmd, self.env_for(contender, Path(tmp)), timeout, f"{workload}-{contender}-{n}")
        if not proc.ok or proc.result is None:
            msg = f"{workload} / {contender} (N={n}): {proc.error}"
            self.log(f"  FAILED {msg}")
            self.skipped.append(msg)
            return None
        res = proc.result
        for key in ("stepflow", "prefect", "dagster", "python"):
            if key in res:
                self.versions[key if key != "python" else "python"] = str(res[key])
        return res

    def add_row(self, workload: str, contender: str, res: dict[str, Any], note: str = "") -> None:
        times = res["times"]
        row = {"workload": workload, "contender": contender, "n": res["n"], "steps": res["steps"],
               "reps": len(times), "times_s": times, "min_s": min(times), "median_s": statistics.median(times),
               "max_s": max(times), "cpu_min_s": min(res["cpu"]), "ideal_s": res["ideal"],
               "overhead_us_per_step": max(0.0, min(times) - res["ideal"]) / res["steps"] * 1e6,
               "peak_rss_bytes": res.get("peak_rss"), "note": note}
        self.rows.append(row)
        self.log(f"  {contender:16} N={res['n']:<6} min {row['min_s']:.4f} s  median {row['median_s']:.4f} s  "
                 f"overhead {row['overhead_us_per_step']:.1f} us/step")

    # -- workloads
    def run_step_workloads(self) -> None:
        p = self.plan
        native = [c for c in ("stepflow", "floor") if c in self.contenders]
        heavy = [c for c in HEAVY if c in self.contenders]
        for workload in ("fanout-1k", "fanout-10k", "chain-1k", "sleep-200", "diamond-100"):
            if not self.wanted(workload):
                continue
            n = p.sizes[workload]
            self.log(f"\n{workload}: {DESCRIPTIONS[workload]}")
            extra = ["stepflow-result"] if workload in ("fanout-10k", "diamond-100") and "stepflow" in native else []
            for c in native + extra:
                res = self.measure(workload, c, n, p.reps_native, 600)
                if res:
                    note = "asyncio.run(stepflow.run(p)): RunResult is the main task's result" \
                        if c == "stepflow-result" else ""
                    self.add_row(workload, c, res, note)
            for c in heavy:
                hn, note = n, ""
                if workload == "fanout-10k":
                    hn = self.calibrate(c)
                    if hn is None:
                        continue
                    note = f"N calibrated for ~{TARGET_SECONDS:.0f} s per repetition" if hn < n else ""
                elif workload == "sleep-200" and c == "dagster":
                    hn = min(n, p.heavy_sleep_n)
                    note = "multiprocess executor (Dagster's only concurrency), max_concurrent=N"
                res = self.measure(workload, c, hn, p.reps_heavy, 1800)
                while res is None and workload == "fanout-10k" and hn > 1000:
                    failed, hn = hn, max(1000, hn // 2)  # it broke at that size: find one it survives
                    self.log(f"  {c} failed at N={failed}; retrying at N={hn}")
                    note = f"failed at N={failed} (see skipped); N halved"
                    res = self.measure(workload, c, hn, p.reps_heavy, 1800)
                if res:
                    self.add_row(workload, c, res, note)

    def calibrate(self, contender: str) -> int | None:
        """N for ~TARGET_SECONDS per fan-out repetition, from timed runs at N=100 and N=1000."""
        if contender in self.calibration:
            return int(self.calibration[contender]["n"])
        self.log(f"  calibrating {contender} fan-out size from N=100 and N=1000 ...")
        points = {}
        known = self.find("fanout-1k", contender)
        if known is not None:
            points[1000] = known["min_s"]
        for n in (100, 1000):
            if n in points:
                continue
            res = self.measure("fanout-10k", contender, n, 1, 900)
            if res is None:
                return None
            points[n] = min(res["times"])
        points = dict(sorted(points.items()))
        slope = max((points[1000] - points[100]) / 900, 1e-6)
        base = points[100] - 100 * slope
        raw = (TARGET_SECONDS - base) / slope
        digits = 10 ** max(0, int(math.log10(max(raw, 1))) - 1)
        n = int(max(1000, min(10_000, raw // digits * digits)))
        self.calibration[contender] = {"points_s": points, "per_step_s": slope, "fixed_s": base, "n": n,
                                       "extrapolated_100k_s": base + slope * 100_000}
        self.log(f"  {contender}: {slope * 1e3:.2f} ms/step + {base:.2f} s -> N={n}")
        return n

    def run_memory(self) -> None:
        if not self.wanted("memory-100k"):
            return
        n = self.plan.memory_n
        self.log(f"\nmemory-100k: {DESCRIPTIONS['memory-100k']} (N={n})")
        for c in ("stepflow", "floor"):
            if c not in self.contenders:
                continue
            res = self.measure("memory-100k", c, n, 1, 600)
            if res:
                m = res["memory"]
                self.rows.append({"workload": "memory-100k", "contender": c, "n": n, "steps": res["steps"],
                                  "bytes_per_step": m["tracemalloc_fanout_bytes_per_step"],
                                  "chain_bytes_per_step": m["tracemalloc_chain_bytes_per_step"],
                                  "rss_bytes_per_step": m["rss_bytes_per_step"], "peak_rss_bytes": res["peak_rss"]})
                self.log(f"  {c:16} tracemalloc {m['tracemalloc_fanout_bytes_per_step']:.0f} B/step (fan-out), "
                         f"{m['tracemalloc_chain_bytes_per_step']:.0f} B/step (chain), RSS "
                         f"{m['rss_bytes_per_step']:.0f} B/step")
        for c in HEAVY:
            if c in self.contenders:
                cal = self.calibration.get(c)
                eta = f"; one run would take ~{cal['extrapolated_100k_s'] / 60:.0f} min by the fan-out calibration" \
                    if cal else ""
                failed = [m for m in self.skipped if m.startswith(f"fanout-10k / {c}")]
                if failed:
                    eta += ", and it already failed at the calibrated fan-out size"
                self.skipped.append(f"memory-100k / {c}: not run at 100k steps (stepflow and the floor only){eta}")

    def run_remote(self) -> None:
        if not self.wanted("remote-1k"):
            return
        p = self.plan
        if importlib.util.find_spec("aiohttp") is None:
            self.skipped.append("remote-1k: aiohttp is not installed in this interpreter (it comes with "
                                "stepflow's dev extras: pip install -e '.[dev]')")
            self.log(f"\nremote-1k: SKIPPED, {self.skipped[-1]}")
            return
        self.log(f"\nremote-1k: {DESCRIPTIONS['remote-1k']} (N={p.remote_jobs})")
        for mode, throttle in p.remote_configs:
            with tempfile.TemporaryDirectory(prefix="stepflow-bench-") as tmp:
                cmd = [sys.executable, "-m", "benchmarks.remote_scale", "--jobs", str(p.remote_jobs), "--status", mode,
                       "--throttle", str(throttle), "--min-duration", str(p.remote_duration[0]),
                       "--max-duration", str(p.remote_duration[1])]
                proc = run_worker(cmd, self.env_for("stepflow", Path(tmp)), 900, f"remote-{mode}-{throttle}")
            if not proc.ok or proc.result is None:
                msg = f"remote-1k / {mode} / throttle {throttle}: {proc.error}"
                self.log(f"  FAILED {msg}")
                self.skipped.append(msg)
                continue
            r = proc.result
            ru = proc.rusage
            r["time_user_s"], r["time_sys_s"] = ru.ru_utime, ru.ru_stime  # what `time` reports for the process
            r["time_real_s"] = proc.seconds
            self.remote.append(r)
            self.log(f"  {mode:8} throttle {throttle:.0%}: {r['succeeded']}/{r['jobs']} ok, wall {r['wall_s']:.1f} s, "
                     f"orchestration CPU {r['cpu_orchestration_s']:.2f} s "
                     f"({r['cpu_orchestration_per_100_jobs_s']:.2f} s/100 jobs), peak RSS "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} MiB, status requests {r['status_requests']} in "
                     f"{r['poll_rounds']} rounds")

    def run_images(self) -> None:
        if not self.wanted("image-cache"):
            return
        if self.plan.quick:
            self.skipped.append("image-cache: not run with --quick (a cold build downloads the wheelhouse)")
            return
        self.log(f"\nimage-cache: {DESCRIPTIONS['image-cache']}")
        with tempfile.TemporaryDirectory(prefix="stepflow-bench-") as tmp:
            proc = run_worker([sys.executable, "-m", "benchmarks.image_cache"], self.env_for("stepflow", Path(tmp)),
                              1800, "image-cache")
        if not proc.ok or proc.result is None:
            self.skipped.append(f"image-cache: {proc.error}")
            self.log(f"  FAILED image-cache: {proc.error}")
            return
        if "skipped" in proc.result:
            self.skipped.append(f"image-cache: {proc.result['skipped']}")
            self.log(f"  SKIPPED: {proc.result['skipped']}")
            return
        self.images = proc.result
        self.log(f"  daemon: {proc.result.get('docker_host')}, registry {proc.result.get('registry_prefix')}")
        for ph in proc.result["phases"]:
            self.log(f"  {ph['phase']:18} {ph['seconds']:7.2f} s  builds {ph['builds']}  pushes {ph['pushes']}  "
                     f"wheels downloaded {ph['wheels_downloaded']} built {ph['wheels_built']} "
                     f"reused {ph['wheels_reused']}")

    def run_persisted(self) -> None:
        if not self.wanted("persisted-cli"):
            return
        self.log(f"\npersisted-cli: {DESCRIPTIONS['persisted-cli']}")
        with tempfile.TemporaryDirectory(prefix="stepflow-bench-") as tmp:
            out = Path(tmp) / "persisted.json"
            done = subprocess.run([sys.executable, str(HERE / "persisted_cli.py"), "--repeat",
                                   "3" if self.plan.quick else "5", "--json", str(out)],
                                  env=self.env_for("stepflow", Path(tmp)), capture_output=True, text=True, timeout=900)
            if done.returncode != 0 or not out.exists():
                self.skipped.append(f"persisted-cli: {done.stderr.strip()[-300:]}")
                self.log(f"  FAILED persisted-cli: {done.stderr.strip()[-300:]}")
                return
            self.persisted = json.loads(out.read_text())
        self.log("\n".join("  " + line for line in done.stdout.strip().splitlines()))

    # -- verdicts
    def find(self, workload: str, contender: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["workload"] == workload and r["contender"] == contender), None)

    def ratios(self) -> None:
        for r in self.rows:
            if "min_s" not in r:
                continue
            sf = self.find(r["workload"], "stepflow")
            if sf is None:
                continue
            r["overhead_ratio"] = (r["overhead_us_per_step"] / sf["overhead_us_per_step"]
                                   if sf["overhead_us_per_step"] > 0 else None)
            r["wall_ratio"] = r["min_s"] / sf["min_s"] if r["n"] == sf["n"] else None

    def targets(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []

        def add(name: str, value: Any, limit: str, ok: bool | None, detail: str = "") -> None:
            out.append({"target": name, "measured": value, "limit": limit, "met": ok, "detail": detail})

        sf, fl = self.find("fanout-10k", "stepflow"), self.find("fanout-10k", "floor")
        if sf and fl:
            ratio = sf["min_s"] / fl["min_s"]
            add("10k no-op fan-out vs raw-asyncio floor", f"{ratio:.2f}x ({sf['min_s']:.3f} s vs {fl['min_s']:.3f} s)",
                "<= 3x", ratio <= 3.0)
        for workload in ("fanout-10k", "fanout-1k"):
            base = self.find(workload, "stepflow")
            for c in HEAVY:
                row = self.find(workload, c)
                if base and row and base["overhead_us_per_step"] > 0:
                    ratio = row["overhead_us_per_step"] / base["overhead_us_per_step"]
                    add(f"per-step overhead, {c} / stepflow ({workload})",
                        f"{ratio:,.0f}x ({row['overhead_us_per_step']:,.0f} us at N={row['n']:,} vs "
                        f"{base['overhead_us_per_step']:.1f} us at N={base['n']:,})", ">= 100x", ratio >= 100)
        sl = self.find("sleep-200", "stepflow")
        if sl:
            add("200 x 0.5 s steps, wall (slowest rep)", f"{sl['max_s']:.3f} s", "<= 0.6 s", sl["max_s"] <= 0.6)
        mem = self.find("memory-100k", "stepflow")
        if mem:
            add(f"memory per step at {mem['n']:,} steps (tracemalloc, fan-out)", f"{mem['bytes_per_step']:.0f} B",
                "<= 2048 B", mem["bytes_per_step"] <= 2048)
        for r in self.remote:
            tag = f"{r['status_mode']} status, throttle {r['throttle']:.0%}"
            if r["throttle"] == 0:
                per100 = r["cpu_orchestration_per_100_jobs_s"]
                add(f"remote {r['jobs']} jobs ({tag}): orchestration CPU per 100 jobs", f"{per100:.2f} s",
                    "<= 1 s", per100 <= 1.0)
                if r["status_mode"] == "batch":
                    bound = r["jobs"] * r["poll_rounds"]
                    add(f"remote {r['jobs']} jobs ({tag}): status requests",
                        f"{r['status_requests']} in {r['poll_rounds']} rounds (jobs x rounds = {bound})",
                        "grows with rounds, << jobs x rounds", r["status_requests"] <= 0.05 * bound)
            else:
                add(f"remote {r['jobs']} jobs ({tag}): every job completes",
                    f"{r['succeeded']}/{r['jobs']} succeeded", "all", r["succeeded"] == r["jobs"],
                    "; ".join(f"{v} x {k}" for k, v in r["step_errors"].items()))
        if self.persisted:
            cli = self.persisted["cli_min_s"]
            add("persisted CLI run of 2,000 no-op steps (whole process)", f"{cli:.3f} s",
                f"<= {self.persisted['budget_cli_s']:g} s", cli <= self.persisted["budget_cli_s"],
                "every step's output recorded" if self.persisted["recorded_ok"] else "OUTPUTS MISSING")
        if self.images:
            ph = {p["phase"]: p for p in self.images["phases"]}
            warm = ph.get("warm (unchanged)")
            if warm:
                add("image cache: warm unchanged rerun", f"{warm['builds']} builds, {warm['pushes']} pushes, "
                    f"{warm['seconds']:.2f} s", "0 builds, 0 pushes", warm["builds"] == 0 and warm["pushes"] == 0)
        return out


# ------------------------------------------------------------------------------------ output


def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 10 else f"{v:.1f}"


def fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def fmt_ratio(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}x" if v < 10 else f"{v:,.0f}x"


def tables(suite: Suite, targets: list[dict[str, Any]]) -> tuple[str, str]:
    """(plain text, markdown) renderings of every result."""
    head = ["workload", "contender", "N", "min s", "median s", "overhead/step us", "overhead vs stepflow",
            "wall vs stepflow", "peak RSS MiB"]
    body = []
    for r in suite.rows:
        if "min_s" not in r:
            continue
        body.append([r["workload"], r["contender"], f"{r['n']:,}", fmt_s(r["min_s"]), fmt_s(r["median_s"]),
                     fmt_us(r["overhead_us_per_step"]), fmt_ratio(r.get("overhead_ratio")),
                     fmt_ratio(r.get("wall_ratio")),
                     f"{r['peak_rss_bytes'] / 2**20:,.0f}" if r.get("peak_rss_bytes") else "-"])
    mem_head = ["workload", "contender", "N", "B/step fan-out (tracemalloc)", "B/step chain (tracemalloc)",
                "B/step fan-out (RSS growth)"]
    mem_body = [[r["workload"], r["contender"], f"{r['n']:,}", f"{r['bytes_per_step']:.0f}",
                 f"{r['chain_bytes_per_step']:.0f}", f"{r['rss_bytes_per_step']:.0f}"]
                for r in suite.rows if r["workload"] == "memory-100k"]
    rem_head = ["status calls", "throttle", "succeeded", "wall s", "orchestration CPU s", "CPU s / 100 jobs",
                "process CPU s (`time`)", "peak RSS MiB", "status requests", "poll rounds", "submits", "HTTP 429"]
    rem_body = [[r["status_mode"], f"{r['throttle']:.0%}", f"{r['succeeded']}/{r['jobs']}", f"{r['wall_s']:.1f}",
                 f"{r['cpu_orchestration_s']:.2f}", f"{r['cpu_orchestration_per_100_jobs_s']:.2f}",
                 f"{r['time_user_s'] + r['time_sys_s']:.2f}", f"{r['peak_rss_bytes'] / 2**20:.0f}",
                 f"{r['status_requests']:,}", str(r["poll_rounds"]), str(r["requests"].get("POST /jobs", 0)),
                 str(sum(r["throttled"].values()))] for r in suite.remote]
    img_head = ["phase", "seconds", "builds", "pushes", "registry checks", "wheels downloaded", "wheels built",
                "wheels reused"]
    img_body = [[p["phase"], f"{p['seconds']:.2f}", str(p["builds"]), str(p["pushes"]), str(p["registry_checks"]),
                 str(p["wheels_downloaded"]), str(p["wheels_built"]), str(p["wheels_reused"])]
                for p in (suite.images or {}).get("phases", [])]
    tgt_head = ["target", "measured", "limit", "verdict"]
    tgt_body = [[t["target"], str(t["measured"]), t["limit"], "met" if t["met"] else "MISSED"] for t in targets]

    def plain(h: list[str], b: list[list[str]]) -> str:
        if not b:
            return ""
        widths = [max(len(h[i]), *(len(row[i]) for row in b)) for i in range(len(h))]
        lines = ["  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(h, widths, strict=True)))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths, strict=True)))
                  for row in b]
        return "\n".join(lines)

    def md(h: list[str], b: list[list[str]]) -> str:
        if not b:
            return ""
        return "\n".join(["| " + " | ".join(h) + " |", "|" + "|".join("---" for _ in h) + "|",
                          *("| " + " | ".join(row) + " |" for row in b)])

    sections = [("Step workloads", head, body), ("Memory per step", mem_head, mem_body),
                ("Remote-job scale (stepflow only)", rem_head, rem_body), ("Image cache (real dockerd)", img_head, img_body),
                ("Targets", tgt_head, tgt_body)]
    text = "\n\n".join(f"{t}\n{plain(h, b)}" for t, h, b in sections if b)
    mdown = "\n\n".join(f"#### {t}\n\n{md(h, b)}" for t, h, b in sections if b)
    if suite.skipped:
        text += "\n\nskipped / failed:\n" + "\n".join(f"- {s}" for s in suite.skipped)
        mdown += "\n\nSkipped / failed:\n\n" + "\n".join(f"- {s}" for s in suite.skipped)
    if suite.notes:
        text += "\n\nnotes:\n" + "\n".join(f"- {s}" for s in suite.notes)
        mdown += "\n\nNotes:\n\n" + "\n".join(f"- {s}" for s in suite.notes)
    return text, mdown


CONTENDER_ORDER = ("stepflow", "floor", "stepflow-result", "prefect", "dagster")


def row_order(r: dict[str, Any]) -> tuple[int, int]:
    w, c = r["workload"], r["contender"]
    return (WORKLOADS.index(w) if w in WORKLOADS else 99, CONTENDER_ORDER.index(c) if c in CONTENDER_ORDER else 99)


def load(suite: Suite, old: dict[str, Any]) -> None:
    """Everything of a results file into ``suite`` (for --render-only)."""
    suite.rows, suite.remote, suite.images = old.get("rows", []), old.get("remote", []), old.get("images")
    suite.persisted = old.get("persisted")
    suite.skipped, suite.notes = old.get("skipped", []), old.get("notes", [])
    suite.calibration, suite.versions = old.get("calibration", {}), old.get("versions", {})


def merge(suite: Suite, old: dict[str, Any]) -> str:
    """Keep the results of ``old`` for every workload not run now (``--update``); return its date."""
    ran = [w for w in WORKLOADS if suite.wanted(w)]
    rerun = set(suite.contenders) | ({"stepflow-result"} if "stepflow" in suite.contenders else set())
    rows = [r for r in old.get("rows", []) if r["workload"] not in ran or r["contender"] not in rerun] + suite.rows
    suite.rows = sorted(rows, key=row_order)
    if "remote-1k" not in ran:
        suite.remote = old.get("remote", [])
    if "image-cache" not in ran:
        suite.images = old.get("images")
    if "persisted-cli" not in ran:
        suite.persisted = old.get("persisted")

    def redone(msg: str) -> bool:
        head = msg.split(":", 1)[0]
        return any(msg.startswith(w) for w in ran) and (" / " not in head or any(c in head for c in rerun))

    suite.skipped = [s for s in old.get("skipped", []) if not redone(s)] + suite.skipped
    suite.notes = [*old.get("notes", []), *suite.notes]
    suite.calibration = {**old.get("calibration", {}), **suite.calibration}
    suite.versions = {**old.get("versions", {}), **suite.versions}
    return str(old.get("date", "?"))


def machine() -> dict[str, Any]:
    mem = 0
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_gib": round(mem / 2**30, 1),
            "platform": platform.platform(terse=True), "python": sys.version.split()[0]}


def chart(json_path: Path, png_path: Path, log: Callable[[str], None]) -> bool:
    python = ensure_venv("tools", log)
    if python is None:
        return False
    done = subprocess.run([str(python), str(HERE / "chart.py"), str(json_path), str(png_path)], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        log(f"chart failed: {done.stderr.strip()[-500:]}")
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small N, 1 repetition, no Prefect/Dagster (< 60 s)")
    ap.add_argument("--only", action="append", default=[], metavar="WORKLOAD",
                    help=f"run only this workload (repeatable; a prefix works): {', '.join(WORKLOADS)}")
    ap.add_argument("--contenders", default="stepflow,floor,prefect,dagster",
                    help="comma-separated subset of stepflow,floor,prefect,dagster")
    ap.add_argument("--reps", type=int, help="timed repetitions per workload (default 7 native, 3 Prefect/Dagster)")
    ap.add_argument("--no-chart", action="store_true", help="skip the PNG (no matplotlib venv)")
    ap.add_argument("--output", help="results name under benchmarks/results (default latest, or quick)")
    ap.add_argument("--update", action="store_true",
                    help="merge into the existing results file: replace only the workloads run now (with --only)")
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: rebuild the tables (.md) and chart (.png) of the existing results file")
    ap.add_argument("--note", action="append", default=[], help="a remark stored with the results (repeatable)")
    a = ap.parse_args(argv)
    if a.render_only:
        return render_only(a.output or ("quick" if a.quick else "latest"), a.note, a.no_chart)
    for o in a.only:
        if not any(w.startswith(o) for w in WORKLOADS):
            ap.error(f"--only {o}: no such workload (choose from {', '.join(WORKLOADS)})")
    contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    if a.quick:
        contenders = [c for c in contenders if c not in HEAVY]
        plan = Plan(True, a.reps or 1, a.reps or 1,
                    {"fanout-1k": 1000, "fanout-10k": 10_000, "chain-1k": 1000, "sleep-200": 200, "diamond-100": 100},
                    remote_jobs=200, remote_duration=(0.5, 2.0), remote_configs=[("batch", 0.0), ("batch", 0.2)],
                    memory_n=10_000)
    else:
        plan = Plan(False, a.reps or 7, a.reps or 3,
                    {"fanout-1k": 1000, "fanout-10k": 10_000, "chain-1k": 1000, "sleep-200": 200, "diamond-100": 100},
                    remote_jobs=1000, remote_duration=(2.0, 10.0),
                    remote_configs=[("batch", 0.0), ("per-job", 0.0), ("batch", 0.2), ("per-job", 0.2)],
                    memory_n=100_000)
    started = time.perf_counter()
    load_before = os.getloadavg()
    suite = Suite(plan, a.only, contenders)
    print(f"stepflow benchmark suite{' (--quick)' if a.quick else ''}: contenders {', '.join(contenders)}; "
          f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f}", flush=True)
    suite.log = lambda s: print(s, flush=True)
    suite.notes.extend(a.note)
    suite.setup()
    suite.run_step_workloads()
    suite.run_memory()
    suite.run_remote()
    suite.run_images()
    suite.run_persisted()
    elapsed = time.perf_counter() - started
    name = a.output or ("quick" if a.quick else "latest")
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, png_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.png", RESULTS / f"{name}.md"
    updated_from = None
    if a.update and json_path.exists():
        updated_from = merge(suite, json.loads(json_path.read_text()))
    suite.ratios()
    targets = suite.targets()
    text, mdown = tables(suite, targets)
    print("\n" + text)
    data = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "quick": a.quick, "machine": machine(),
            "load_average_before": load_before, "load_average_after": os.getloadavg(), "versions": suite.versions,
            "suite_seconds": elapsed, "plan": {"reps_native": plan.reps_native, "reps_heavy": plan.reps_heavy,
                                               "sizes": plan.sizes, "remote_jobs": plan.remote_jobs},
            "descriptions": DESCRIPTIONS, "calibration": suite.calibration, "rows": suite.rows,
            "remote": suite.remote, "images": suite.images, "persisted": suite.persisted, "targets": targets, "skipped": suite.skipped,
            "notes": suite.notes}
    if updated_from is not None:
        data["updated"] = {"workloads": [w for w in WORKLOADS if suite.wanted(w)], "previous_date": updated_from}
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(mdown + "\n")
    charted = False if a.no_chart else chart(json_path, png_path, suite.log)
    shutil.rmtree(RESULTS / "scratch", ignore_errors=True)
    print(f"\nwrote {json_path.relative_to(ROOT)}, {md_path.relative_to(ROOT)}"
          f"{', ' + str(png_path.relative_to(ROOT)) if charted else ''}; suite took {elapsed / 60:.1f} min")
    return 0


def render_only(name: str, notes: list[str], no_chart: bool) -> int:
    """Rebuild results/<name>.md and .png from results/<name>.json (targets recomputed, notes added)."""
    json_path = RESULTS / f"{name}.json"
    data = json.loads(json_path.read_text())
    suite = Suite(Plan(bool(data.get("quick")), 0, 0, {}, 0, (0.0, 0.0), [], 0), [], [])
    load(suite, data)
    suite.notes.extend(n for n in notes if n not in suite.notes)
    suite.rows.sort(key=row_order)
    suite.ratios()
    data.update(rows=suite.rows, targets=suite.targets(), notes=suite.notes)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    text, mdown = tables(suite, data["targets"])
    (RESULTS / f"{name}.md").write_text(mdown + "\n")
    print(text)
    if not no_chart:
        chart(json_path, RESULTS / f"{name}.png", print)
    return 0
