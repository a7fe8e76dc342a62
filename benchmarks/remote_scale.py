"""Remote-job scale: stepflow's shared Tracker and submit RetryPolicy over an in-process FakeJobBackend.

    python -m benchmarks.remote_scale                   # every measurement, one table against the budgets
    python -m benchmarks.remote_scale --profile         # and where the 10k-job run's CPU goes (cProfile)
    python -m benchmarks.remote_scale --outage          # and how long a transient outage takes to fail jobs

The backend is ``stepflow.testing.FakeJobBackend``: jobs are ``job_command`` specs simulated on the
event loop clock (no thread, no subprocess, no I/O), so the CPU measured is stepflow's own
(the fake's bookkeeping included: it is charged, not subtracted). Every job goes the way
``JobOperator`` takes it once its image and payload exist: submit through the operator's
``RetryPolicy`` (6 attempts), follow with the backend's shared ``Tracker`` (status and log loops),
wait, forget, cleanup. The fake's intervals are the docker backend's (poll 0.25 s, up to 2 s
when nothing changes; logs every 0.5 s).

Measurements and budgets:

1. scale: ``--jobs`` (10,000) concurrent jobs of ``--min/max-duration`` seconds, each printing two
   lines: process CPU seconds per 100 jobs (<= 0.3) and wall time.
2. failing at once: 1,000 running jobs whose status calls start being refused (expired
   credentials): seconds until every waiter got (and formatted) its own error (<= 10 s). Also
   1,000 jobs exiting non-zero at the same instant: seconds until every waiter saw it.
3. per-job status calls: 1,000 jobs on a backend without batch status (``batch_poll=False``,
   one call per job per round), 0% and 20% throttling: the most status calls any job received,
   divided by the status rounds run while it was followed (<= 2).
4. submissions under 20% throttling (plus 5% of first submits losing their answer after the
   job was created): no job created twice, every job created once unless all of its calls were
   refused (the policy gives up by design: about jobs * 0.2**attempts of them), at most
   ``attempts`` submit calls per job.

Prints the table and ``BENCH-RESULT {json}``: the scale run in the fields ``python -m benchmarks``
reads (``--jobs/--status/--throttle/--min-duration/--max-duration`` set it up, as the suite's
remote workload passes them), every measurement under ``measurements``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import io
import json
import pstats
import random
import resource
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import stepflow
from stepflow.errors import BackendError
from stepflow.remote import Job, JobConfig, JobState, RetryPolicy, job_name
from stepflow.remote._tracker import Tracker
from stepflow.testing import FakeJobBackend, job_command

BUDGET_CPU_PER_100 = 0.3
BUDGET_FAIL_SECONDS = 10.0
BUDGET_CALLS_PER_ROUND = 2.0
ATTEMPTS = JobConfig().submit_attempts  # what JobOperator's RetryPolicy gets by default


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def make_job(run_id: str, i: int, command: tuple[str, ...]) -> Job:
    name = job_name(run_id, f"remote_work_{i}", 1, FakeJobBackend.limits)
    return Job(name=name, image="127.0.0.1:5000/bench/fake-step:latest", command=command, env={"HOME": "/tmp"},
               labels={"stepflow.run": run_id, "stepflow.step": f"remote_work_{i}", "stepflow.attempt": "1"},
               run_id=run_id, step=f"remote_work_{i}", attempt=1, options=None)


class Fleet:
    """N jobs taken the operator's way (submit with retries, follow, wait, forget, cleanup)."""

    def __init__(self, backend: FakeJobBackend, run_id: str, *, max_failures: int = 20) -> None:
        self.backend = backend
        self.run_id = run_id
        self.tracker = Tracker(backend, max_failures=max_failures)
        self.policy = RetryPolicy(attempts=ATTEMPTS)
        self.submit_calls: collections.Counter[str] = collections.Counter()
        self.ids: list[str] = []
        self.outcomes: dict[str, Any] = {}
        self.done_at: dict[str, float] = {}
        self.rounds: dict[str, int] = {}
        self.lines = 0
        self.running = 0
        self.submit_errors: list[str] = []

    def round_count(self) -> int:
        stats = self.tracker.stats
        return stats.poll_rounds + stats.failed_rounds

    async def submit(self, job: Job) -> str | None:
        async def once() -> str:
            self.submit_calls[job.name] += 1
            return await self.backend.submit(job)

        try:
            return await self.policy.call(once, classify=self.backend.is_transient)
        except Exception as exc:
            self.submit_errors.append(f"{type(exc).__name__}: {exc}")
            return None

    async def follow(self, job_id: str, on_error: Callable[[BaseException], None] | None = None) -> None:
        tracker = self.tracker

        def on_state(state: JobState) -> None:
            if state.phase == "running":
                self.running += 1

        def on_lines(lines: Sequence[str]) -> None:
            self.lines += len(lines)

        first_round = self.round_count()
        watch = tracker.follow(job_id, on_state, on_lines)
        state: JobState | None = None
        try:
            state = await tracker.wait(watch)
            self.outcomes[job_id] = state
        except BackendError as exc:
            if on_error is not None:
                on_error(exc)
            self.outcomes[job_id] = exc
            with contextlib.suppress(Exception):  # what JobOperator._stop does: stop the job it no longer follows
                await self.policy.call(lambda: self.backend.cancel(job_id), classify=self.backend.is_transient)
        finally:
            self.done_at[job_id] = time.monotonic()
            self.rounds[job_id] = self.round_count() - first_round
            tracker.forget(job_id)
            with contextlib.suppress(Exception):  # a leftover is not worth failing the step
                await self.policy.call(lambda: self.backend.cleanup(job_id, state), classify=self.backend.is_transient)

    async def run(self, commands: Sequence[tuple[str, ...]],
                  on_error: Callable[[BaseException], None] | None = None) -> None:
        async def one(i: int, command: tuple[str, ...]) -> None:
            job_id = await self.submit(make_job(self.run_id, i, command))
            if job_id is None:
                return
            self.ids.append(job_id)
            await self.follow(job_id, on_error)

        await asyncio.gather(*(one(i, c) for i, c in enumerate(commands)))

    def summary(self) -> dict[str, Any]:
        states = [o for o in self.outcomes.values() if isinstance(o, JobState)]
        errors = collections.Counter(f"{type(o).__name__}: {str(o)[:90]}" for o in self.outcomes.values()
                                     if not isinstance(o, JobState))
        errors.update(self.submit_errors)
        stats = self.backend.stats
        return {"succeeded": sum(s.phase == "succeeded" for s in states),
                "failed": sum(s.phase == "failed" for s in states) + len(self.submit_errors)
                + sum(not isinstance(o, JobState) for o in self.outcomes.values()),
                "step_errors": dict(errors.most_common(3)), "poll_rounds": self.tracker.stats.poll_rounds,
                "failed_rounds": self.tracker.stats.failed_rounds, "log_rounds": self.tracker.stats.log_rounds,
                "poll_calls": stats.poll_calls, "ids_polled": stats.ids_polled, "log_calls": stats.log_calls,
                "log_ids": stats.log_ids,
                "submit_calls": stats.submit_calls, "jobs_created": stats.jobs_created,
                "created_twice": len(stats.created_twice()), "throttled": stats.throttled, "faults": stats.faults,
                "lost_answers": stats.lost_answers, "log_lines": self.lines}


# ---------------------------------------------------------------- 1. scale


async def scale(jobs: int, batch: bool, throttle: float, duration: tuple[float, float], seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    backend = FakeJobBackend("bench", throttle_rate=throttle, batch_poll=batch, seed=seed)
    fleet = Fleet(backend, f"scale-{seed}")
    commands = [job_command(seconds=rng.uniform(*duration), lines=(f"job {i} starts", f"job {i} done"))
                for i in range(jobs)]
    c0, t0 = cpu(), time.perf_counter()
    await fleet.run(commands)
    wall, used = time.perf_counter() - t0, cpu() - c0
    out = fleet.summary()
    out.update(jobs=jobs, status_mode="batch" if batch else "per-job", throttle=throttle, job_seconds=list(duration),
               wall_s=wall, cpu_s=used, cpu_per_100_jobs_s=used / jobs * 100)
    return out


# ---------------------------------------------------------------- 2. failing at once


async def refused_at_once(jobs: int, seed: int) -> dict[str, Any]:
    """Running jobs whose status calls start being refused for good (credentials expired)."""
    backend = FakeJobBackend("bench", seed=seed)
    fleet = Fleet(backend, f"refused-{seed}")
    got_error: list[float] = []
    formatted = 0

    def on_error(exc: BaseException) -> None:
        nonlocal formatted
        formatted += len("".join(traceback.format_exception(exc)))  # what recording a step's error costs
        got_error.append(time.monotonic())

    c0 = t0 = 0.0

    async def expire() -> None:
        nonlocal c0, t0
        while fleet.running < jobs:  # every job followed and seen running
            await asyncio.sleep(0.05)
        c0, t0 = cpu(), time.monotonic()
        backend.refuse("poll", lambda: BackendError("ExpiredTokenException: the security token included in the "
                                                    "request is expired"))

    await asyncio.gather(fleet.run([job_command(seconds=3600) for _ in range(jobs)], on_error), expire())
    errors = [o for o in fleet.outcomes.values() if isinstance(o, BaseException)]
    return {"jobs": jobs, "errors": len(errors), "distinct_exceptions": len({id(e) for e in errors}),
            "seconds_to_all_errors": max(got_error) - t0 if got_error else None,
            "seconds_to_all_stopped": max(fleet.done_at.values()) - t0, "cpu_s": cpu() - c0,
            "traceback_chars": formatted, "message": str(errors[0]) if errors else ""}


async def exit_at_once(jobs: int, seed: int) -> dict[str, Any]:
    """Jobs that all exit non-zero at the same instant (submitted in one loop iteration)."""
    backend = FakeJobBackend("bench", seed=seed, remove_on_cleanup=False)  # keep the records: their end times
    fleet = Fleet(backend, f"exit-{seed}")
    c0 = cpu()
    await fleet.run([job_command(seconds=3.0, exit_code=1) for _ in range(jobs)])
    last_end = max(rec.end_at for rec in backend.service.jobs.values())  # loop clock = time.monotonic()
    failed = [o for o in fleet.outcomes.values() if isinstance(o, JobState) and o.phase == "failed"]
    return {"jobs": jobs, "failed": len(failed), "cpu_s": cpu() - c0,
            "end_spread_s": last_end - min(rec.end_at for rec in backend.service.jobs.values()),
            "seconds_to_all_seen": max(fleet.done_at.values()) - last_end}


async def outage(jobs: int, seed: int) -> dict[str, Any]:
    """Running jobs whose status calls all fail transiently (5xx) from now on: the tracker gives up."""
    backend = FakeJobBackend("bench", seed=seed)
    fleet = Fleet(backend, f"outage-{seed}")
    got_error: list[float] = []
    c0 = t0 = 0.0

    async def break_down() -> None:
        nonlocal c0, t0
        while fleet.running < jobs:
            await asyncio.sleep(0.05)
        c0, t0 = cpu(), time.monotonic()
        backend.fault_rate = 1.0

    await asyncio.gather(fleet.run([job_command(seconds=3600) for _ in range(jobs)],
                                   lambda exc: got_error.append(time.monotonic())), break_down())
    return {"jobs": jobs, "errors": len(got_error), "seconds_to_all_errors": max(got_error) - t0,
            "failed_rounds": fleet.tracker.stats.failed_rounds, "cpu_s": cpu() - c0}


# ---------------------------------------------------------------- 3. per-job status calls


async def per_job_calls(jobs: int, throttle: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    backend = FakeJobBackend("bench", batch_poll=False, throttle_rate=throttle, seed=seed)
    fleet = Fleet(backend, f"calls-{seed}")
    await fleet.run([job_command(seconds=rng.uniform(1.0, 5.0)) for _ in range(jobs)])
    polls = backend.stats.polls_by_id
    ratios = [polls[j] / max(1, fleet.rounds[j]) for j in fleet.ids]
    out = fleet.summary()
    out.update(jobs=jobs, throttle=throttle, max_ratio=max(ratios), mean_ratio=sum(ratios) / len(ratios),
               max_calls_per_job=max(polls[j] for j in fleet.ids))
    return out


# ---------------------------------------------------------------- 4. submissions


async def submissions(jobs: int, throttle: float, lost: float, seed: int) -> dict[str, Any]:
    backend = FakeJobBackend("bench", throttle_rate=throttle, fail_submit_after_create=lost, seed=seed)
    fleet = Fleet(backend, f"submit-{seed}")
    t0 = time.perf_counter()
    ids = await asyncio.gather(*(fleet.submit(make_job(fleet.run_id, i, job_command(seconds=1))) for i in range(jobs)))
    stats = backend.stats
    created = stats.created_by_name
    names = [make_job(fleet.run_id, i, ()).name for i in range(jobs)]
    failed = [n for n, i in zip(names, ids, strict=True) if i is None]
    return {"jobs": jobs, "throttle": throttle, "lost_answer_rate": lost, "attempts": ATTEMPTS,
            "submitted": sum(i is not None for i in ids), "created_once": sum(created[n] == 1 for n in names),
            # A submit refused on every attempt gives up by design (expected jobs * throttle**attempts);
            # one whose job exists although the caller got an error is an orphan the run store resumes.
            "gave_up": sum(created[n] == 0 for n in failed), "orphans": sum(created[n] > 0 for n in failed),
            "expected_gave_up": jobs * throttle ** ATTEMPTS,
            "created_twice": len(stats.created_twice()), "submit_calls": stats.submit_calls,
            "max_calls_per_job": max(fleet.submit_calls.values()), "throttled": stats.throttled,
            "lost_answers": stats.lost_answers, "wall_s": time.perf_counter() - t0,
            "submit_errors": fleet.submit_errors[:3]}


# ---------------------------------------------------------------- the table


def row(name: str, measured: float, budget: float | None, unit: str, detail: str, *, ok: bool | None = None,
        fmt: str = "{:.3f}") -> dict[str, Any]:
    ratio = measured / budget if budget else None
    met = ok if ok is not None else (None if budget is None else measured <= budget)
    return {"measurement": name, "measured": measured, "unit": unit, "budget": budget, "ratio": ratio, "met": met,
            "detail": detail, "text": fmt.format(measured) + (f" {unit}" if unit else "")}


def table(rows: list[dict[str, Any]]) -> str:
    head = ["measurement", "measured", "budget", "ratio", "verdict", "detail"]
    body = [[r["measurement"], r["text"], "-" if r["budget"] is None else f"<= {r['budget']:g} {r['unit']}".rstrip(),
             "-" if r["ratio"] is None else f"{r['ratio']:.2f}",
             {True: "met", False: "MISSED", None: "info"}[r["met"]], r["detail"]] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.ljust(w) for x, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def profile_scale(jobs: int, batch: bool, throttle: float, duration: tuple[float, float], seed: int) -> str:
    prof = cProfile.Profile(time.process_time)  # CPU, not the loop's idle waits
    prof.enable()
    asyncio.run(scale(jobs, batch, throttle, duration, seed))
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    by_file: collections.Counter[str] = collections.Counter()
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        key = ("stepflow/remote/_tracker.py" if filename.endswith("_tracker.py") else
               "stepflow/testing/_fake_backend.py" if filename.endswith("_fake_backend.py") else
               "stepflow/remote/_retry.py" if filename.endswith("_retry.py") else
               "benchmarks/remote_scale.py (the harness)" if filename.endswith("remote_scale.py") else
               "asyncio" if "asyncio" in filename else "attrs-generated (JobState/LogBatch/Job)"
               if filename.startswith("<attrs generated") else "other")
        by_file[key] += tottime
    total = sum(by_file.values())
    buf.write(f"cProfile (CPU time) of the scale run ({jobs:,} jobs), own time by where it is spent ({total:.2f} "
              "CPU-s under the profiler):\n")
    for key, seconds in by_file.most_common():
        buf.write(f"  {seconds:7.2f} s  {seconds / total:5.1%}  {key}\n")
    buf.write("\ntop functions by own time:\n")
    stats.sort_stats("tottime").print_stats(15)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000, help="jobs of the scale run and of the submissions")
    ap.add_argument("--status", choices=("batch", "per-job"), default="batch", help="status calls of the scale run")
    ap.add_argument("--throttle", type=float, default=0.0, help="fraction of calls throttled in the scale run")
    ap.add_argument("--min-duration", type=float, default=2.0, help="shortest job of the scale run, seconds")
    ap.add_argument("--max-duration", type=float, default=10.0, help="longest job of the scale run, seconds")
    ap.add_argument("--fail-jobs", type=int, default=1000, help="jobs of the failing-at-once runs")
    ap.add_argument("--calls-jobs", type=int, default=1000, help="jobs of the per-job status calls runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="also profile the scale run (a second run, cProfile)")
    ap.add_argument("--outage", action="store_true",
                    help="also time how long a transient outage of every status call takes to fail the jobs "
                         "(about a minute: the tracker rides out 20 failed rounds)")
    a = ap.parse_args()
    random.seed(a.seed)  # the retry policy's jitter
    duration = (a.min_duration, a.max_duration)
    batch = a.status == "batch"

    s = asyncio.run(scale(a.jobs, batch, a.throttle, duration, a.seed))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    refused = asyncio.run(refused_at_once(a.fail_jobs, a.seed))
    exited = asyncio.run(exit_at_once(a.fail_jobs, a.seed))
    calls = [asyncio.run(per_job_calls(a.calls_jobs, t, a.seed)) for t in (0.0, 0.2)]
    subs = asyncio.run(submissions(a.jobs, 0.2, 0.05, a.seed))
    down = asyncio.run(outage(a.fail_jobs, a.seed)) if a.outage else None

    tag = f"{s['status_mode']} status, {s['throttle']:.0%} throttled"
    rows = [
        row(f"{a.jobs:,} concurrent jobs ({tag}): CPU per 100 jobs", s["cpu_per_100_jobs_s"], BUDGET_CPU_PER_100, "s",
            f"{s['cpu_s']:.2f} CPU-s, wall {s['wall_s']:.1f} s for jobs of {duration[0]:g}-{duration[1]:g} s, "
            f"{s['succeeded']}/{a.jobs} succeeded, {s['poll_calls']} status calls in {s['poll_rounds']} rounds, "
            f"{s['log_calls']} log calls ({s['log_ids']:,} job logs read), peak RSS {peak_rss / 2**20:.0f} MiB",
            ok=s["cpu_per_100_jobs_s"] <= BUDGET_CPU_PER_100 and s["succeeded"] == a.jobs),
        row(f"{a.jobs:,} concurrent jobs: wall time", s["wall_s"], None, "s",
            f"longest job {duration[1]:g} s; the rest is the last poll interval and the final log rounds",
            fmt="{:.1f}"),
        row(f"{a.fail_jobs:,} jobs failing at once (status refused: expired credentials): until every waiter "
            "got its error", refused["seconds_to_all_errors"], BUDGET_FAIL_SECONDS, "s",
            f"{refused['errors']} errors, {refused['distinct_exceptions']} distinct exception objects, "
            f"{refused['cpu_s']:.2f} CPU-s incl. formatting every traceback ({refused['traceback_chars']:,} chars); "
            f"all jobs stopped after {refused['seconds_to_all_stopped']:.2f} s",
            ok=refused["errors"] == a.fail_jobs and refused["distinct_exceptions"] == a.fail_jobs
            and refused["seconds_to_all_errors"] <= BUDGET_FAIL_SECONDS, fmt="{:.2f}"),
        row(f"{a.fail_jobs:,} jobs exiting 1 at once: until every waiter saw it", exited["seconds_to_all_seen"],
            BUDGET_FAIL_SECONDS, "s", f"{exited['failed']} failed states; the jobs' ends spread over "
            f"{exited['end_spread_s'] * 1000:.0f} ms; {exited['cpu_s']:.2f} CPU-s for the whole run",
            ok=exited["failed"] == a.fail_jobs and exited["seconds_to_all_seen"] <= BUDGET_FAIL_SECONDS,
            fmt="{:.2f}"),
    ]
    for c in calls:
        rows.append(row(f"per-job status calls / status rounds ({a.calls_jobs:,} jobs, batch_poll off, "
                        f"{c['throttle']:.0%} throttled), worst job", c["max_ratio"], BUDGET_CALLS_PER_ROUND, "",
                        f"mean {c['mean_ratio']:.2f}; {c['poll_calls']:,} status calls, {c['poll_rounds']} rounds "
                        f"(+{c['failed_rounds']} failed), most calls for one job {c['max_calls_per_job']}; "
                        f"{c['succeeded']}/{a.calls_jobs} succeeded",
                        ok=c["max_ratio"] <= BUDGET_CALLS_PER_ROUND and c["succeeded"] == a.calls_jobs, fmt="{:.2f}"))
    rows.append(row(f"submissions under 20% throttling + 5% lost answers ({a.jobs:,} jobs): most submit calls for "
                    "one job", subs["max_calls_per_job"], float(ATTEMPTS), "",
                    f"created exactly once: {subs['created_once']:,}/{a.jobs:,} (twice: {subs['created_twice']}); "
                    f"{subs['submit_calls']:,} submit calls ({subs['submit_calls'] / a.jobs:.2f} per job, "
                    f"<= {ATTEMPTS} allowed), {subs['throttled']:,} throttled, {subs['lost_answers']} answers lost, "
                    f"{subs['submitted']:,} submitted, {subs['gave_up']} gave up after {ATTEMPTS} throttled calls "
                    f"(expected {subs['expected_gave_up']:.2f}), {subs['orphans']} orphans, wall {subs['wall_s']:.1f} s",
                    ok=subs["created_twice"] == 0 and subs["created_once"] + subs["gave_up"] == a.jobs
                    and subs["max_calls_per_job"] <= ATTEMPTS and subs["submit_calls"] <= ATTEMPTS * a.jobs,
                    fmt="{:.0f}"))
    if down is not None:
        rows.append(row(f"{a.fail_jobs:,} jobs, every status call failing transiently (5xx): until every waiter "
                        "got its error", down["seconds_to_all_errors"], None, "s",
                        f"{down['errors']} errors after {down['failed_rounds']} failed rounds with backoff "
                        f"(the tracker's outage tolerance), {down['cpu_s']:.2f} CPU-s", fmt="{:.1f}"))

    print(f"remote scale: stepflow {stepflow.__version__}, Python {sys.version.split()[0]}, "
          f"FakeJobBackend (poll {FakeJobBackend.poll_interval:g}-{FakeJobBackend.max_poll_interval:g} s, "
          f"logs {FakeJobBackend.log_interval:g} s), submit attempts {ATTEMPTS}\n")
    print(table(rows))
    met = all(r["met"] is not False for r in rows)
    print(f"\nbudgets {'all met' if met else 'MISSED: see the rows marked MISSED'}")
    if a.profile:
        print("\n" + profile_scale(a.jobs, batch, a.throttle, duration, a.seed))

    # The scale run in the fields `python -m benchmarks` reads, every measurement beside it.
    result = {
        "jobs": a.jobs, "job_seconds": list(duration), "status_mode": s["status_mode"], "throttle": a.throttle,
        "run_status": "succeeded" if s["succeeded"] == a.jobs else "failed", "succeeded": s["succeeded"],
        "failed": s["failed"], "step_errors": s["step_errors"], "wall_s": s["wall_s"], "cpu_process_s": s["cpu_s"],
        "cpu_backend_s": 0.0, "cpu_orchestration_s": s["cpu_s"], "cpu_orchestration_per_100_jobs_s":
        s["cpu_per_100_jobs_s"], "peak_rss_bytes": peak_rss,
        "requests": {"POST /jobs": s["submit_calls"], "status": s["poll_calls"], "logs": s["log_calls"]},
        "throttled": {"all": s["throttled"]}, "status_requests": s["poll_calls"], "poll_rounds": s["poll_rounds"],
        "submitted": s["jobs_created"], "backend": "stepflow.testing.FakeJobBackend (in-process)",
        "budgets_met": met, "measurements": [{k: v for k, v in r.items() if k != "text"} for r in rows],
        "details": {"scale": s, "refused_at_once": refused, "exit_at_once": exited, "per_job_calls": calls,
                    "submissions": subs, "outage": down},
        "stepflow": stepflow.__version__, "python": sys.version.split()[0],
    }
    sys.stdout.write("BENCH-RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
