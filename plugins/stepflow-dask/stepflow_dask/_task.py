"""What runs on a Dask worker for one step attempt (imported there by reference).

The task loads the step from its cloudpickle payload, runs it with ``current_step()`` set,
and returns ``{"ok": True, "value": ...}`` or the error as plain data (type, message,
traceback), with the worker's address, so the runner reports the step's own traceback. While it
runs, the step's prints and log records are sent to the runner as Dask events on :data:`TOPIC`.
A step still running after ``announce_after`` seconds also sends a ``start`` event naming its
worker (a second one for the same key means Dask rescheduled it). Short steps send none: an
event per task costs the scheduler about as much as the task itself.

Workers run several tasks in threads of one process, so output is captured per thread:
``sys.stdout``/``sys.stderr`` are replaced once per process by proxies that route a thread's
writes to its step while it runs, and everything else to the original streams.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import importlib
import inspect
import io
import logging
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

#: Dask event topic of every stepflow message (start, log lines).
TOPIC = "stepflow"
#: Longest line sent as one event; longer output is split.
MAX_LINE = 16 * 1024

_lock = threading.Lock()
_running: dict[str, Callable[[], object]] = {}  # task key -> how to stop its step, for cancellation
_interrupted: set[str] = set()
_tokens: dict[str, object] = {}  # task key -> its current run on this worker
_sinks: dict[int, Callable[[str, str], None]] = {}  # thread ident -> line sink while a step runs
_installed = False


class StepInterrupted(BaseException):
    """Raised inside a step's thread when the runner cancelled it (BaseException: steps rarely catch it)."""


class _ThreadRouter(io.TextIOBase):
    """A process-wide stdout/stderr that hands each step thread's lines to that step."""

    def __init__(self, original: Any, stream: str) -> None:
        self.original = original
        self.stream = stream
        self.partial: dict[int, str] = {}

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        ident = threading.get_ident()
        sink = _sinks.get(ident)
        if sink is None:
            return int(self.original.write(text))
        buffered = self.partial.pop(ident, "") + text
        *lines, rest = buffered.split("\n")
        for line in lines:
            sink(line, self.stream)
        if rest:
            self.partial[ident] = rest
        return len(text)

    def flush_thread(self, ident: int) -> None:
        rest = self.partial.pop(ident, "")
        sink = _sinks.get(ident)
        if rest and sink is not None:
            sink(rest, self.stream)

    def flush(self) -> None:
        if threading.get_ident() not in _sinks:
            self.original.flush()

    def fileno(self) -> int:
        return int(self.original.fileno())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.original, "encoding", "utf-8"))


class _LogHandler(logging.Handler):
    """Sends log records emitted by a step's thread to that step."""

    def emit(self, record: logging.LogRecord) -> None:
        sink = _sinks.get(threading.get_ident())
        if sink is not None:
            try:
                sink(self.format(record), "log")
            except Exception:  # a broken record must not fail the step
                self.handleError(record)


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        sys.stdout = _ThreadRouter(sys.stdout, "stdout")
        sys.stderr = _ThreadRouter(sys.stderr, "stderr")
        handler = _LogHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        _installed = True


def run_step(payload: bytes, key: str, run_id: str, step: str, attempt: int, pipeline: str,
             announce_after: float = 0.5) -> dict[str, Any]:
    """Run one step attempt on this worker; the result (or the error) as plain data."""
    from distributed import get_worker

    from stepflow import NonRetryableError, running_step

    worker = get_worker()
    _install()

    def send(line: str, stream: str) -> None:
        for start in range(0, max(len(line), 1), MAX_LINE):
            worker.log_event(TOPIC, {"key": key, "kind": "log", "line": line[start:start + MAX_LINE],
                                     "stream": stream})

    ident = threading.get_ident()
    with _lock:
        _running[key] = functools.partial(_raise_in_thread, ident)
        _interrupted.discard(key)
    token = _tokens[key] = object()
    worker.loop.add_callback(_arm, worker, key, token, announce_after)
    _sinks[ident] = send
    try:
        try:
            target, args, kwargs = cloudpickle.loads(payload)
            fn = resolve(target) if isinstance(target, tuple) else target
        except Exception as exc:
            return {"ok": False, "type": "StepLoadError", "nonretryable": True, "traceback": "",
                    "worker": worker.address,
                    "message": f"the worker {worker.address} cannot load step '{step}': {type(exc).__name__}: {exc} "
                               "(install the step's module and its dependencies on the workers, at the versions "
                               "the runner has)"}
        try:
            with running_step(run_id, step, attempt, pipeline):
                if inspect.iscoroutinefunction(fn):
                    value = asyncio.run(_run_async(key, fn, args, kwargs))
                else:
                    value = fn(*args, **kwargs)
            return {"ok": True, "value": value, "worker": worker.address}
        except Exception as exc:
            tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # drop this frame
            return {"ok": False, "type": type(exc).__name__, "message": str(exc),
                    "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
                    "nonretryable": isinstance(exc, NonRetryableError), "worker": worker.address}
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _ThreadRouter):
                stream.flush_thread(ident)
        _sinks.pop(ident, None)
        with _lock:
            _running.pop(key, None)
            if _tokens.get(key) is token:
                del _tokens[key]
            stopped = key in _interrupted
            _interrupted.discard(key)
        if stopped:  # an interruption may still be pending for this thread: take it here
            _absorb()


def _arm(worker: Any, key: str, token: object, delay: float) -> None:
    """On the worker's event loop: announce the step if it still runs after ``delay`` seconds."""

    def announce() -> None:
        if _tokens.get(key) is token:  # the same run of this key, still going
            worker.log_event(TOPIC, {"key": key, "kind": "start", "worker": worker.address})

    worker.loop.call_later(delay, announce)


def function_ref(fn: Callable[..., Any]) -> tuple[str, str] | None:
    """``(module, qualname)`` when the workers can import ``fn`` (or the step wrapping it), else None.

    By reference, the step's module is imported on the worker as it was in the runner (its
    module-level set-up runs, tracebacks show real files); by value, cloudpickle rebuilds the
    function alone.
    """
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    qualname = getattr(fn, "__qualname__", "")
    if module is None or module.__name__ == "__main__" or "<" in qualname:
        return None
    try:
        found = _lookup(module, qualname)
    except AttributeError:
        return None
    return (module.__name__, qualname) if found is fn else None


def resolve(ref: tuple[str, str]) -> Callable[..., Any]:
    """The function named by :func:`function_ref`, imported on this worker."""
    module, qualname = ref
    return _lookup(importlib.import_module(module), qualname)


def _lookup(module: Any, qualname: str) -> Callable[..., Any]:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    inner = getattr(obj, "fn", None)  # a @step: the function it wraps
    return inner if callable(inner) and not isinstance(obj, type) else obj  # type: ignore[no-any-return]


async def _run_async(key: str, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Run an async step; a cancellation from the runner cancels its task (its loop keeps the thread)."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    with _lock:
        _running[key] = functools.partial(loop.call_soon_threadsafe, task.cancel)
    try:
        return await fn(*args, **kwargs)
    except asyncio.CancelledError:
        if key in _interrupted:
            raise StepInterrupted(f"step task {key} was cancelled by the runner") from None
        raise


def _raise_in_thread(ident: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(StepInterrupted))


def _absorb() -> None:
    try:
        for _ in range(100):
            pass
    except StepInterrupted:
        pass


def interrupt(keys: list[str]) -> list[str]:
    """Stop the steps running ``keys`` on this worker (run there by ``client.run``).

    A cancelled Dask task keeps its thread until the function returns. An async step's task is
    cancelled; a sync step gets :class:`StepInterrupted` raised in its thread at its next
    bytecode (a step blocked inside one long C call ends when that call returns).
    """
    done = []
    with _lock:
        for key in keys:
            stop = _running.get(key)
            if stop is None:
                continue
            _interrupted.add(key)
            stop()
            done.append(key)
    return done
