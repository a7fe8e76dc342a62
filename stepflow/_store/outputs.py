"""Step outputs kept for resume: signed, group-committed, verified before they are loaded.

Every succeeded step of a persisted run has its output recorded *before* its dependents start,
so a resumed run never runs a finished step again, however fast it was. Recording is a group
commit: the steps that finish while one batch is being written wait for the next, which
carries all of them in one transaction (2,000 no-op steps cost a handful of commits, not 2,000).

Each value is a signed envelope (kind ``stored-value``, header naming the run and the step)
under a key that never leaves the runner: small ones inline in the ``steps`` table, large ones
in the artifact store. Loading verifies the signature and the run/step before unpickling, so a
value replaced in the store or the database is refused and nothing of it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import anyio

from stepflow import _envelope as envelope
from stepflow.errors import PayloadError, StepflowError

KIND = "stored-value"
#: Values whose envelope is larger than this go to the artifact store instead of the database.
INLINE_LIMIT = 256 * 1024


class OutputRecorder:
    """Records the outputs of one run's steps (see the module docstring)."""

    def __init__(self, runs: Any, run_id: str, key: bytes, artifact_store: Any = None) -> None:
        self.runs = runs
        self.run_id = run_id
        self.key = key
        self.store = artifact_store
        self._pending: list[tuple[str, Any, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0

    async def record(self, step: str, value: Any) -> None:
        """Return once ``step``'s output is durable (in the same commit as its batch)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((step, value, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain())
        await asyncio.shield(future)

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                with anyio.CancelScope(shield=True):  # a batch half-written helps nobody
                    await self._write(batch)
            except Exception as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(StepflowError(f"could not record the step's output for resume: "
                                                           f"{type(exc).__name__}: {exc}"))
                continue
            for _, _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _write(self, batch: list[tuple[str, Any, asyncio.Future[None]]]) -> None:
        run_id, key = self.run_id, self.key

        def seal() -> list[bytes | Exception]:
            out: list[bytes | Exception] = []
            for step, value, _ in batch:
                try:
                    out.append(envelope.encode(KIND, value, key, run_id=run_id, step=step))
                except Exception as exc:  # this step alone fails; the rest of the batch is recorded
                    out.append(exc)
            return out

        sealed = await anyio.to_thread.run_sync(seal)
        rows: list[tuple[str, bytes | None, str | None]] = []
        for (step, _, future), data in zip(batch, sealed, strict=True):
            if isinstance(data, Exception):
                future.set_exception(StepflowError(f"step '{step}': its output cannot be recorded for resume "
                                                   f"({type(data).__name__}: {data})"))
                continue
            if len(data) <= INLINE_LIMIT or self.store is None:
                rows.append((step, data, None))
                continue
            uri = f"{self.store.root.rstrip('/')}/runs/{run_id}/{step}/output.bin"
            await self.store.write_bytes(uri, data)
            rows.append((step, None, uri))
        await anyio.to_thread.run_sync(self.runs.set_outputs, run_id, rows)
        self.batches += 1

    async def aclose(self) -> None:
        """Wait for what is being written."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer


def load_outputs(runs: Any, run_id: str, key: bytes, read_uri: Callable[[str], bytes]) -> dict[str, Any]:
    """Every recorded output of ``run_id``, verified; PayloadError naming the step when one was tampered with."""
    out: dict[str, Any] = {}
    for step, inline, uri in runs.outputs(run_id):
        where = "the run store" if inline is not None else uri
        try:
            data = inline if inline is not None else read_uri(uri)
        except FileNotFoundError:
            continue  # gone from the artifact store: the step simply runs again
        try:
            _, value = envelope.decode(bytes(data), key, kind=KIND, expect={"run_id": run_id, "step": step})
        except PayloadError as exc:
            raise PayloadError(f"run {run_id}: the recorded output of step '{step}' ({where}) was refused: {exc}. "
                               "Someone with write access to the store changed it; start a new run (or delete "
                               "that output to run the step again)") from None
        out[step] = value
    return out
