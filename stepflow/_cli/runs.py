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
        make_console().print(table if runs else "no runs recorded yet (runs started with `stepflow run` are)")

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
        for s in steps:
            if s.status == "failed" and s.error:
                console.print(f"\n[red]{s.step}[/]: {s.error.get('type')}: {s.error.get('message')}")
                tail = str(s.error.get("traceback", "")).rstrip().splitlines()[-12:]
                console.print("\n".join(tail), markup=False)

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
    def resume_cmd(run_id: str, progress: bool | None) -> None:
        """Finish an interrupted run (e.g. after the runner was killed).

        Steps that finished keep their stored outputs and are not run again; remote steps
        whose jobs were submitted are re-attached (never submitted twice); the rest run.
        """
        from stepflow._cli.execute import execute_with_display
        from stepflow._engine.run import prepare_resume

        def prepare(bus: Any) -> Any:
            return prepare_resume(run_id, event_bus=bus)

        sys.exit(anyio.run(execute_with_display, prepare, None, progress, "lines", "resuming"))
