"""The run store: runs, steps, remote job handles and every event, in the embedded SQLite file."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import attrs

from stepflow._store.sqlite import Store
from stepflow.errors import NotFoundError
from stepflow.events import (
    Event,
    StepCancelled,
    StepEvent,
    StepFailed,
    StepQueued,
    StepSkipped,
    StepStarted,
    StepSucceeded,
    event_to_dict,
)

TERMINAL_RUN = ("succeeded", "failed", "cancelled")
#: A run whose runner (on another machine) has not written its heartbeat for this long is interrupted.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 3 * HEARTBEAT_S


def process_identity(pid: int | None = None) -> str:
    """``host|pid|start`` of a process: its start time (from /proc) tells a reused pid apart."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}|{pid}|{_start_ticks(pid)}"


def _start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def runner_alive(identity: str | None, heartbeat: float | None) -> bool:
    """Whether the process that recorded a run is still there (same host), or still beating (another host)."""
    host, _, rest = (identity or "").partition("|")
    pid_text, _, ticks = rest.partition("|")
    if host == socket.gethostname() and pid_text.isdigit():
        pid = int(pid_text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return not ticks or _start_ticks(pid) in ("", ticks)
    return heartbeat is not None and time.time() - heartbeat < STALE_AFTER_S


@attrs.frozen
class RunRecord:
    """A run as stored."""

    run_id: str
    pipeline: str
    target: str | None
    params: dict[str, Any]
    stack: str | None
    status: str
    started_at: float
    finished_at: float | None
    pid: int | None
    host: str | None
    step_count: int
    #: True when the run is recorded as running but its runner is gone (SIGKILL, a crash, a double Ctrl-C).
    interrupted: bool = False


@attrs.frozen
class StepRecord:
    """A step of a stored run."""

    step: str
    status: str
    operator: str | None
    attempts: int
    started_at: float | None
    finished_at: float | None
    error: dict[str, Any] | None
    output_uri: str | None


@attrs.frozen
class JobRecord:
    """A remote job handle, recorded before the runner waits for the job."""

    step: str
    attempt: int
    operator: str
    job_name: str
    job_id: str
    payload_uri: str | None
    status: str | None
    submitted_at: float
    #: What the operator needs to submit the same job again (JSON, no secrets); None for old records.
    spec: str | None = None


def _json(value: Any) -> str:
    return json.dumps(value, default=repr, sort_keys=True)


class RunStore:
    """Synchronous access; async callers use worker threads (the store serializes access)."""

    def __init__(self, store: Store | None = None) -> None:
        self.store = store or Store()

    # -- runs --------------------------------------------------------------------------
    def start_run(self, run_id: str, pipeline: str, target: str | None, params: dict[str, Any],
                  stack: str | None, step_count: int) -> None:
        with self.store.write() as db:
            db.execute(
                "INSERT INTO runs (run_id, pipeline, target, params, stack, status, started_at, pid, host, "
                "step_count, heartbeat, process) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(run_id) DO UPDATE SET status = 'running', finished_at = NULL, pid = excluded.pid, "
                "host = excluded.host, heartbeat = excluded.heartbeat, process = excluded.process",
                (run_id, pipeline, target, _json(params), stack, time.time(), os.getpid(),
                 socket.gethostname(), step_count, time.time(), process_identity()))

    def heartbeat(self, run_id: str) -> None:
        """The runner is alive (written every HEARTBEAT_S seconds while a run executes)."""
        with self.store.write() as db:
            db.execute("UPDATE runs SET heartbeat = ? WHERE run_id = ?", (time.time(), run_id))

    def finish_run(self, run_id: str, status: str) -> None:
        with self.store.write() as db:
            db.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?",
                       (status, time.time(), run_id))

    def get_run(self, run_id: str) -> RunRecord:
        rows = self.store.read("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            recent = [r.run_id for r in self.list_runs(5)]
            raise NotFoundError(f"no run with id '{run_id}'"
                                + (f"; recent runs: {', '.join(recent)}" if recent else "; no runs recorded yet")
                                + " (see `stepflow runs list`)")
        return _run(rows[0])

    def list_runs(self, limit: int = 20, pipeline: str | None = None) -> list[RunRecord]:
        if pipeline:
            rows = self.store.read("SELECT * FROM runs WHERE pipeline = ? ORDER BY started_at DESC LIMIT ?",
                                   (pipeline, limit))
        else:
            rows = self.store.read("SELECT * FROM runs ORDER BY started_at DESC LIMIT ?", (limit,))
        return [_run(r) for r in rows]

    # -- steps -------------------------------------------------------------------------
    def steps(self, run_id: str) -> list[StepRecord]:
        rows = self.store.read("SELECT * FROM steps WHERE run_id = ? ORDER BY COALESCE(started_at, 1e20), step",
                               (run_id,))
        return [StepRecord(r["step"], r["status"], r["operator"], r["attempts"], r["started_at"],
                           r["finished_at"], json.loads(r["error"]) if r["error"] else None, r["output_uri"])
                for r in rows]

    def set_outputs(self, run_id: str, rows: Sequence[tuple[str, bytes | None, str | None]]) -> None:
        """Record succeeded steps' outputs ``(step, inline envelope, or artifact URI)`` in one transaction."""
        with self.store.write() as db:
            db.executemany(
                "INSERT INTO steps (run_id, step, status, output, output_uri) VALUES (?, ?, 'succeeded', ?, ?) "
                "ON CONFLICT(run_id, step) DO UPDATE SET status = 'succeeded', output = excluded.output, "
                "output_uri = excluded.output_uri",
                [(run_id, step, inline, uri) for step, inline, uri in rows])

    def outputs(self, run_id: str) -> list[tuple[str, bytes | None, str | None]]:
        """``(step, inline envelope, artifact URI)`` of every step whose output was recorded."""
        rows = self.store.read("SELECT step, output, output_uri FROM steps WHERE run_id = ? AND "
                               "(output IS NOT NULL OR output_uri IS NOT NULL)", (run_id,))
        return [(r["step"], r["output"], r["output_uri"]) for r in rows]

    # -- jobs --------------------------------------------------------------------------
    def record_job(self, run_id: str, step: str, attempt: int, operator: str, job_name: str, job_id: str,
                   payload_uri: str | None, spec: str | None = None) -> None:
        """Record a job, before it is submitted (``job_id`` empty, status 'submitting') or after."""
        status = "submitted" if job_id else "submitting"
        with self.store.write() as db:
            db.execute("INSERT OR REPLACE INTO jobs (run_id, step, attempt, operator, job_name, job_id, payload_uri, "
                       "status, submitted_at, spec) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (run_id, step, attempt, operator, job_name, job_id, payload_uri, status, time.time(), spec))

    def set_job_id(self, run_id: str, step: str, attempt: int, job_id: str) -> None:
        """The backend accepted the job: its id, status 'submitted'."""
        with self.store.write() as db:
            db.execute("UPDATE jobs SET job_id = ?, status = CASE WHEN status = 'submitting' THEN 'submitted' "
                       "ELSE status END WHERE run_id = ? AND step = ? AND attempt = ?", (job_id, run_id, step, attempt))

    def update_job(self, run_id: str, step: str, attempt: int, status: str) -> None:
        with self.store.write() as db:
            db.execute("UPDATE jobs SET status = ? WHERE run_id = ? AND step = ? AND attempt = ?",
                       (status, run_id, step, attempt))

    def find_job(self, run_id: str, step: str, attempt: int) -> JobRecord | None:
        rows = self.store.read("SELECT * FROM jobs WHERE run_id = ? AND step = ? AND attempt = ?",
                               (run_id, step, attempt))
        return _job(rows[0]) if rows else None

    def jobs(self, run_id: str) -> list[JobRecord]:
        rows = self.store.read("SELECT * FROM jobs WHERE run_id = ? ORDER BY submitted_at", (run_id,))
        return [_job(r) for r in rows]

    # -- events ------------------------------------------------------------------------
    def write_events(self, events: Sequence[Event]) -> None:
        """Persist events and fold step events into the steps table, in one transaction."""
        rows = []
        step_updates: list[tuple[str, tuple[Any, ...]]] = []
        for ev in events:
            data = event_to_dict(ev)
            step = ev.step if isinstance(ev, StepEvent) else None
            rows.append((ev.run_id, ev.seq, ev.ts, data.pop("type"), step, _json(data)))
            update = _step_update(ev)
            if update is not None:
                step_updates.append(update)
        with self.store.write() as db:
            db.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?, ?, ?)", rows)
            for sql, params in step_updates:
                db.execute(sql, params)

    def last_seq(self, run_id: str) -> int:
        rows = self.store.read("SELECT MAX(seq) AS m FROM events WHERE run_id = ?", (run_id,))
        return int(rows[0]["m"] or 0)

    def events(self, run_id: str, *, step: str | None = None, types: Sequence[str] = ()) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events WHERE run_id = ?"
        params: list[Any] = [run_id]
        if step is not None:
            sql += " AND step = ?"
            params.append(step)
        if types:
            sql += f" AND type IN ({', '.join('?' for _ in types)})"
            params.extend(types)
        rows = self.store.read(sql + " ORDER BY seq", tuple(params))
        return [{"type": r["type"], "seq": r["seq"], "ts": r["ts"], "step": r["step"], **json.loads(r["data"])}
                for r in rows]


def _step_update(ev: Event) -> tuple[str, tuple[Any, ...]] | None:
    if isinstance(ev, StepQueued):
        return ("INSERT INTO steps (run_id, step, status, operator) VALUES (?, ?, 'queued', ?) "
                "ON CONFLICT(run_id, step) DO UPDATE SET status = 'queued', operator = excluded.operator",
                (ev.run_id, ev.step, ev.operator))
    if isinstance(ev, StepStarted):
        return ("INSERT INTO steps (run_id, step, status, operator, attempts, started_at) VALUES "
                "(?, ?, 'running', ?, ?, ?) ON CONFLICT(run_id, step) DO UPDATE SET status = 'running', "
                "attempts = excluded.attempts, operator = excluded.operator, "
                "started_at = COALESCE(steps.started_at, excluded.started_at)",
                (ev.run_id, ev.step, ev.operator, ev.attempt, ev.ts))
    if isinstance(ev, StepSucceeded):
        return ("UPDATE steps SET status = 'succeeded', finished_at = ?, error = NULL WHERE run_id = ? AND step = ?",
                (ev.ts, ev.run_id, ev.step))
    if isinstance(ev, StepFailed):
        error = _json({"type": ev.error_type, "message": ev.message, "traceback": ev.traceback})
        return ("UPDATE steps SET status = 'failed', finished_at = ?, error = ? WHERE run_id = ? AND step = ?",
                (ev.ts, error, ev.run_id, ev.step))
    if isinstance(ev, (StepSkipped, StepCancelled)):
        status = "skipped" if isinstance(ev, StepSkipped) else "cancelled"
        return (f"INSERT INTO steps (run_id, step, status, finished_at, error) VALUES (?, ?, '{status}', ?, ?) "
                f"ON CONFLICT(run_id, step) DO UPDATE SET status = '{status}', finished_at = excluded.finished_at, "
                "error = excluded.error",
                (ev.run_id, ev.step, ev.ts, _json({"reason": ev.reason})))
    return None


def _run(r: Any) -> RunRecord:
    status = r["status"]
    interrupted = status == "interrupted" or (status == "running" and not runner_alive(r["process"], r["heartbeat"]))
    return RunRecord(r["run_id"], r["pipeline"], r["target"], json.loads(r["params"]), r["stack"],
                     "interrupted" if interrupted else status, r["started_at"], r["finished_at"], r["pid"], r["host"],
                     r["step_count"], interrupted)


def _job(r: Any) -> JobRecord:
    return JobRecord(r["step"], r["attempt"], r["operator"], r["job_name"], r["job_id"], r["payload_uri"],
                     r["status"], r["submitted_at"], r["spec"])
