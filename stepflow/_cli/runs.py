"""``stepflow runs list|show``, ``stepflow logs`` and ``stepflow resume``."""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

import anyio
import click

from stepflow.errors import StepflowError


def _when(ts: float | None) -> str:
    return "" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _dur(start: float | None, end: float | None) -> str:
    return "" if start is None or end is None else f"{end - start:.2f}s"


def _runs() -> Any:
    from stepflow._store.runs import RunStore

    return RunStore()


def register_run_commands(cli: click.Group) -> None:
    """Attach the run-history commands to the ``stepflow`` group."""
    from stepflow._cli.common import fail

    @cli.group("runs")
    def runs_group() -> None:
        """Runs recorded in the store: `stepflow runs list`, `stepflow runs show RUN_ID`."""

    @runs_group.command("list")
    @click.option("-n", "--limit", type=click.IntRange(min=1), default=20, show_default=True,
                  help="How many of the most recent runs to show.")
    @click.option("--pipeline", default=None, help="Only runs of this pipeline.")
    def runs_list(limit: int, pipeline: str | None) -> None:
        """List recent runs, newest first."""
        from rich.table import Table

        from stepflow._cli.progress import make_console

        try:
            runs = _runs().list_runs(limit, pipeline)
        except StepflowError as exc:
            fail(str(exc))
        table = Table(show_edge=False, header_style="bold")
        for col in ("run id", "pipeline", "status", "stack", "started", "duration", "steps"):
            table.add_column(col, no_wrap=col in ("run id", "started"))
        for r in runs:
            table.add_row(r.run_id, r.pipeline, r.status, r.stack or "", _when(r.started_at),
                          _dur(r.started_at, r.finished_at), str(r.step_count))
        console = make_console()
        console.print(table if runs else "no runs recorded yet (runs started with `stepflow run` are)")
        broken = [r.run_id for r in runs if r.interrupted]
        if broken:
            console.print(f"\n{len(broken)} interrupted run{'s' if len(broken) > 1 else ''} (the runner died): "
                          f"`stepflow resume {broken[0]}` finishes it, `stepflow runs stop {broken[0]}` stops jobs "
                          "it left running", markup=False, soft_wrap=True)

    @runs_group.command("show")
    @click.argument("run_id")
    def runs_show(run_id: str) -> None:
        """Show a run: its steps with status, durations, attempts and where each ran."""
        from rich.table import Table

        from stepflow._cli.progress import make_console

        try:
            store = _runs()
            run = store.get_run(run_id)
            steps = store.steps(run_id)
            jobs = {(j.step, j.attempt): j for j in store.jobs(run_id)}
        except StepflowError as exc:
            fail(str(exc))
        console = make_console()
        console.print(f"run [bold]{run.run_id}[/] of [bold]{run.pipeline}[/]: {run.status}")
        console.print(f"  stack {run.stack or '-'}   started {_when(run.started_at)}   "
                      f"duration {_dur(run.started_at, run.finished_at) or '-'}   target {run.target or '-'}")
        if run.params:
            console.print(f"  params {run.params}", markup=False)
        table = Table(show_edge=False, header_style="bold")
        for col in ("step", "status", "where", "attempts", "duration", "job"):
            table.add_column(col, no_wrap=col in ("step", "job"))
        for s in steps:
            job = jobs.get((s.step, s.attempts))
            table.add_row(s.step, s.status, s.operator or "", str(s.attempts or ""),
                          _dur(s.started_at, s.finished_at), job.job_name if job else "")
        console.print(table)
        left = [j for j in jobs.values() if j.status in ("submitting", "submitted", "pending", "running")]
        if run.interrupted:
            console.print(f"\nthe runner of this run died: `stepflow resume {run.run_id}` finishes it"
                          + (f"; {len(left)} job(s) may still run on their backends: "
                             + ", ".join(f"{j.job_name} ({j.operator})" for j in left)
                             + f" (`stepflow runs stop {run.run_id}` stops them)" if left else ""), markup=False,
                          soft_wrap=True)
        for s in steps:
            if s.status == "failed" and s.error:
                console.print(f"\n[red]{s.step}[/]: {s.error.get('type')}: {s.error.get('message')}")
                tail = str(s.error.get("traceback", "")).rstrip().splitlines()[-12:]
                console.print("\n".join(tail), markup=False)

    @runs_group.command("stop")
    @click.argument("run_id")
    def runs_stop(run_id: str) -> None:
        """Stop the remote jobs an interrupted run left running, and mark the run cancelled.

        For a run whose runner died (SIGKILL, a crash, a second Ctrl-C): each job it recorded and
        that has not ended is stopped on its backend, through the step operators of the run's
        stack. A run still running in a live process is refused: interrupt that process instead.
        """
        from stepflow._cli.progress import make_console

        try:
            stopped = anyio.run(_stop_jobs, run_id)
        except StepflowError as exc:
            fail(str(exc))
        console = make_console()
        for line in stopped:
            console.print(line, markup=False)
        console.print(f"run {run_id}: cancelled ({len(stopped)} job(s) handled)", markup=False)

    @cli.command("logs")
    @click.argument("run_id")
    @click.argument("step", required=False)
    def logs_cmd(run_id: str, step: str | None) -> None:
        """Print the log lines a run's steps produced (remote job output), optionally of one STEP."""
        try:
            store = _runs()
            store.get_run(run_id)
            lines = store.events(run_id, step=step, types=("LogLine",))
            if step is not None and not lines:
                known = [s.step for s in store.steps(run_id)]
                if step not in known:
                    fail(f"run {run_id} has no step '{step}'; its steps: {', '.join(known)}")
        except StepflowError as exc:
            fail(str(exc))
        for ev in lines:
            prefix = "" if step is not None else f"{ev['step']} | "
            click.echo(f"{prefix}{ev.get('line', '')}")

    @cli.command("resume")
    @click.argument("run_id")
    @click.option("--progress/--no-progress", default=None, help="Live display (default: on a terminal).")
    @click.option("--debug", is_flag=True, help="Show failures with every traceback frame.")
    def resume_cmd(run_id: str, progress: bool | None, debug: bool) -> None:
        """Finish an interrupted run (e.g. after the runner was killed).

        Steps that finished keep their stored outputs and are not run again; remote steps
        whose jobs were submitted are re-attached (never submitted twice); the rest run.
        """
        from stepflow._cli.execute import execute_with_display
        from stepflow._engine.run import prepare_resume

        def prepare(bus: Any) -> Any:
            return prepare_resume(run_id, event_bus=bus)

        sys.exit(anyio.run(execute_with_display, prepare, None, progress, "lines", "resuming", debug))


async def _stop_jobs(run_id: str) -> list[str]:
    """Stop every unfinished job of ``run_id``; one line per job saying what happened."""
    from stepflow._stack.client import Client

    store = _runs()
    run = store.get_run(run_id)
    if run.status == "running":
        raise StepflowError(f"run {run_id} is still running in process {run.pid} on {run.host}: interrupt it there "
                            "(Ctrl-C cancels its jobs), or wait")
    client = Client()
    operators: dict[str, Any] = {}
    lines: list[str] = []
    try:
        for job in store.jobs(run_id):
            if job.status not in ("submitting", "submitted", "pending", "running"):
                continue
            op = operators.get(job.operator)
            if op is None:
                op = operators[job.operator] = client.instantiate("step_operator", job.operator)
            backend = getattr(op, "backend", None)
            if backend is None:
                lines.append(f"{job.job_name}: operator '{job.operator}' cannot stop jobs by id; stop it yourself")
                continue
            job_id = job.job_id or await backend.find(job.job_name)
            if not job_id:
                lines.append(f"{job.job_name}: never reached the backend")
            else:
                await backend.cancel(job_id)
                lines.append(f"{job.job_name}: stop requested on {job.operator}")
            store.update_job(run_id, job.step, job.attempt, "stopped")
    finally:
        for op in operators.values():
            await op.aclose()
    store.finish_run(run_id, "cancelled")
    return lines
