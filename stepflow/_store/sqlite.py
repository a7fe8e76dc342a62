"""The embedded store: one SQLite file under ``$STEPFLOW_HOME`` (default ``~/.stepflow``).

WAL mode plus ``BEGIN IMMEDIATE`` for writes and a busy timeout make concurrent CLI calls
safe: writers queue instead of failing. Schema changes are numbered migrations recorded in
``PRAGMA user_version``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stepflow.errors import StoreError

#: Seconds a writer waits for another process holding the lock ($STEPFLOW_STORE_TIMEOUT).
BUSY_TIMEOUT_S = float(os.environ.get("STEPFLOW_STORE_TIMEOUT", "15"))

MIGRATIONS: list[str] = [
    # 1: stack components and stacks
    """
    CREATE TABLE components (
        kind TEXT NOT NULL, name TEXT NOT NULL, flavor TEXT NOT NULL, config TEXT NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (kind, name));
    CREATE TABLE stacks (name TEXT PRIMARY KEY, created_at REAL NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE stack_members (
        stack TEXT NOT NULL REFERENCES stacks(name) ON DELETE CASCADE, kind TEXT NOT NULL,
        component TEXT NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (stack, kind, component));
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: runs, steps, remote jobs, events, payload keys
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, target TEXT, params TEXT NOT NULL,
        stack TEXT, status TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL,
        pid INTEGER, host TEXT, step_count INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE steps (
        run_id TEXT NOT NULL, step TEXT NOT NULL, status TEXT NOT NULL, operator TEXT,
        attempts INTEGER NOT NULL DEFAULT 0, started_at REAL, finished_at REAL, error TEXT,
        output_uri TEXT, PRIMARY KEY (run_id, step));
    CREATE TABLE jobs (
        run_id TEXT NOT NULL, step TEXT NOT NULL, attempt INTEGER NOT NULL, operator TEXT NOT NULL,
        job_name TEXT NOT NULL, job_id TEXT NOT NULL, payload_uri TEXT, status TEXT,
        submitted_at REAL NOT NULL, PRIMARY KEY (run_id, step, attempt));
    CREATE TABLE events (
        run_id TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, type TEXT NOT NULL,
        step TEXT, data TEXT NOT NULL, PRIMARY KEY (run_id, seq));
    CREATE INDEX events_by_step ON events (run_id, step, type);
    CREATE TABLE secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 3: secrets at rest. Payload signing keys now derive from the master key (kept outside this
    # file): drop the plain-text ones. Secret option values stored in plain text are encrypted by
    # a Python pass (stepflow._store.secrets.encrypt_plaintext: it needs the flavors to know which
    # options are secret), run lazily when a Client opens the store; this marks it as due for a
    # store holding anything secret (it also scrubs the deleted keys' old pages from the file).
    """
    INSERT OR REPLACE INTO meta (key, value) VALUES ('secrets_at_rest',
        CASE WHEN EXISTS (SELECT 1 FROM components WHERE config != '{}') OR EXISTS (SELECT 1 FROM secrets)
        THEN '*' ELSE 'done' END);
    DELETE FROM secrets WHERE name LIKE 'payload-key:%';
    """,
    # 4: the job spec recorded before submission (resume re-submits it idempotently), run
    # liveness (heartbeat, process identity), signed inline outputs of steps
    """
    ALTER TABLE jobs ADD COLUMN spec TEXT;
    ALTER TABLE runs ADD COLUMN heartbeat REAL;
    ALTER TABLE runs ADD COLUMN process TEXT;
    ALTER TABLE steps ADD COLUMN output BLOB;
    """,
    # 5: a stack's alias for a step operator (-s trainer=vertex): one pipeline runs on any stack
    """
    ALTER TABLE stack_members ADD COLUMN alias TEXT;
    """,
]


def stepflow_home() -> Path:
    """``$STEPFLOW_HOME`` or ``~/.stepflow``."""
    return Path(os.environ.get("STEPFLOW_HOME") or Path.home() / ".stepflow").expanduser()


class Store:
    """Thin, synchronous access to the SQLite file; every public method is one transaction."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else stepflow_home()
        self.path = self.home / "stepflow.db"
        self._conn: sqlite3.Connection | None = None
        # One connection shared by the loop thread and worker threads: serialize its use.
        self.lock = threading.RLock()

    # -- connection --------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the stepflow home {self.home}: {exc}. Set "
                             "STEPFLOW_HOME to a writable directory.") from None
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            # Deleted or overwritten content is zeroed, not left in free space: the store has held
            # secrets in plain text (older versions) and must not keep them once replaced.
            conn.execute("PRAGMA secure_delete = ON")
            self._conn = conn
            self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            self._conn = None
            raise self._explain(exc) from None
        return conn

    def _explain(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return StoreError(
                f"the stepflow store {self.path} stayed locked by another process for more than "
                f"{BUSY_TIMEOUT_S:g} s ({text}); retry, or find the process holding it "
                f"(e.g. `fuser {self.path}`)"
            )
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return StoreError(
                f"the stepflow store {self.path} is corrupt or not a stepflow database ({text}). "
                f"Move it aside to start afresh (mv {self.path} {self.path}.bak) or point "
                "STEPFLOW_HOME elsewhere."
            )
        return StoreError(f"stepflow store {self.path}: {text}")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(f"the stepflow store {self.path} was written by a newer stepflow "
                             f"(schema {version} > {len(MIGRATIONS)}); upgrade stepflow")
        if version == len(MIGRATIONS):
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # re-read under the lock
            for number in range(version, len(MIGRATIONS)):
                # Statement by statement: executescript() would commit the open transaction.
                for statement in filter(None, (s.strip() for s in MIGRATIONS[number].split(";"))):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the connection (reopened on next use)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def checkpoint(self) -> bool:
        """Copy the WAL into the database file and truncate it; False when readers kept it busy."""
        with self.lock:
            conn = self._connect()
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                raise self._explain(exc) from None
            return not busy

    def scrub(self) -> bool:
        """Rewrite the file without free space (VACUUM), then empty the WAL.

        For content deleted before ``secure_delete`` was on (older versions): it may linger in
        free pages or free space inside pages, which only a rebuild of the file drops.
        False when other connections kept the WAL from being emptied.
        """
        with self.lock:
            conn = self._connect()
            try:
                conn.execute("VACUUM")
            except sqlite3.DatabaseError as exc:
                raise self._explain(exc) from None
        return self.checkpoint()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``: concurrent writers wait their turn)."""
        with self.lock:
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise self._explain(exc) from None
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                try:
                    conn.execute("COMMIT")
                except sqlite3.DatabaseError as exc:
                    raise self._explain(exc) from None

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Run one query and return every row."""
        with self.lock:
            conn = self._connect()
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise self._explain(exc) from None

    # -- meta --------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self.read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    @staticmethod
    def now() -> float:
        return time.time()

    @staticmethod
    def dumps(value: Any) -> str:
        return json.dumps(value, sort_keys=True)

    @staticmethod
    def loads(text: str) -> Any:
        return json.loads(text)
