"""The ``subprocess`` step operator: one fresh Python process per step attempt.

For each attempt: write a signed payload in a fresh temporary directory, start
``python -m stepflow_subprocess.entrypoint`` on it, stream its stdout/stderr as ``LogLine``
events, wait for it, and read its signed result. The scheduler owns retries, timeouts and step
events; a timeout or a cancelled run arrives here as cancellation, which stops the process
(SIGTERM, then SIGKILL after ``kill_grace_s``) before it propagates.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import anyio
import cloudpickle
from anyio.abc import ByteReceiveStream, Process

from stepflow.events import JobStatusChanged, JobSubmitted, LogLine
from stepflow.interfaces import Invocation, StepOperator
from stepflow_subprocess import envelope
from stepflow_subprocess.errors import (
    ChildProcessDiedError,
    PayloadRefusedError,
    RemoteNonRetryableError,
    RemoteStepError,
    SubprocessOperatorError,
    SubprocessStartError,
    TamperedResultError,
)
from stepflow_subprocess.flavor import SubprocessOperatorConfig, SubprocessSettings

#: stderr lines kept to explain a process that died without a result.
STDERR_TAIL = 20
#: Longest line emitted as one LogLine; longer output is split.
MAX_LINE = 64 * 1024
#: After the process exits, how long to keep reading pipes a grandchild may still hold open.
PIPE_DRAIN_S = 2.0


class SubprocessStepOperator(StepOperator):
    """Runs each step attempt in a fresh Python subprocess of this machine."""

    flavor: ClassVar[str] = "subprocess"
    requires_pickling: ClassVar[bool] = True
    settings_class: ClassVar[type] = SubprocessSettings

    def __init__(self, name: str = "subprocess", config: SubprocessOperatorConfig | None = None) -> None:
        self.name = name
        self.config = config or SubprocessOperatorConfig()
        self.max_concurrency = self.config.max_concurrency

    # -- one attempt ---------------------------------------------------------------------
    async def launch(self, invocation: Invocation) -> Any:
        """Run one attempt in a new process and return its value (or raise its error)."""
        settings = _coerce_settings(invocation.settings)
        key = envelope.new_key()
        tmp = Path(tempfile.mkdtemp(prefix="stepflow-subprocess-"))
        try:
            payload, result = tmp / "payload.bin", tmp / "result.bin"
            # Pickling large inputs and writing them must not block the event loop.
            await anyio.to_thread.run_sync(self._prepare, invocation, settings, key, payload)
            returncode, tail = await self._run_child(invocation, settings, key, payload, result)
            return await self._outcome(invocation, key, result, returncode, tail)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _prepare(self, inv: Invocation, settings: SubprocessSettings, key: bytes, path: Path) -> None:
        data = {
            "format": envelope.FORMAT, **envelope.runtime_versions(),
            "run_id": inv.run_id, "pipeline": inv.pipeline, "step": inv.step, "attempt": inv.attempt,
            "is_async": inv.is_async, "nice": settings.nice,
            "fn": _dumps(inv.fn), "fn_file": getattr(getattr(inv.fn, "__code__", None), "co_filename", ""),
            "args": _dumps(tuple(inv.args)), "kwargs": _dumps(dict(inv.kwargs)),
        }
        self._write_payload(path, data, key)

    def _write_payload(self, path: Path, data: dict[str, Any], key: bytes) -> None:
        """Sign and write the payload (a separate method so tests can tamper with the file)."""
        envelope.write(path, envelope.PAYLOAD, data, key)

    async def _run_child(self, inv: Invocation, settings: SubprocessSettings, key: bytes,
                         payload: Path, result: Path) -> tuple[int, list[str]]:
        python = self.config.python or sys.executable
        command = [python, "-m", "stepflow_subprocess.entrypoint", "--payload", str(payload),
                   "--result", str(result)]
        try:
            # Shielded: a cancellation arriving mid-spawn is delivered at the next await below,
            # where the child is stopped, instead of leaving a process we hold no handle to.
            # A session of its own: Ctrl-C in a terminal reaches the runner only (which then
            # cancels us), and stopping the process group also stops what the step started.
            with anyio.CancelScope(shield=True):
                process = await anyio.open_process(
                    command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    cwd=self.config.workdir, env=self._environment(settings, key), start_new_session=True,
                )
        except OSError as exc:
            raise SubprocessStartError(
                f"step-operator '{self.name}' could not start the step's interpreter {python!r}"
                f"{f' in {self.config.workdir!r}' if self.config.workdir else ''}: {exc}. Check its "
                "`python` and `workdir` options."
            ) from exc
        inv.emit(JobSubmitted, operator=self.name, job_id=str(process.pid), attempt=inv.attempt)
        tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_pump, process.stdout, "stdout", inv.emit, None)
                tg.start_soon(_pump, process.stderr, "stderr", inv.emit, tail)
                await process.wait()
                # Normally the pumps end at EOF right away; bound the wait in case a grandchild
                # inherited the pipes and outlives the step.
                tg.cancel_scope.deadline = anyio.current_time() + PIPE_DRAIN_S
        except BaseException:  # cancelled (run cancelled, timeout, fail-fast) or a pump failed
            with anyio.CancelScope(shield=True):
                await self._stop(process)
                inv.emit(JobStatusChanged, job_id=str(process.pid), status="stopped",
                         detail="(step cancelled)")
                await process.aclose()
            raise
        with anyio.CancelScope(shield=True):
            await process.aclose()
        code = process.returncode
        assert code is not None
        inv.emit(JobStatusChanged, job_id=str(process.pid), status="exited", detail=f"with code {code}")
        return code, list(tail)

    async def _stop(self, process: Process) -> None:
        """SIGTERM the process group, SIGKILL it after ``kill_grace_s``, and reap the child."""
        if process.returncode is not None:
            return
        _signal_group(process, signal.SIGTERM)
        with anyio.move_on_after(self.config.kill_grace_s):
            await process.wait()
            return
        _signal_group(process, signal.SIGKILL)
        await process.wait()

    async def _outcome(self, inv: Invocation, key: bytes, path: Path, returncode: int,
                       tail: list[str]) -> Any:
        if not path.exists():
            raise ChildProcessDiedError(
                f"step '{inv.step}' on step-operator '{self.name}': its process {_describe_exit(returncode)} "
                "without writing a result" + (
                    "; last stderr lines:\n" + "\n".join(f"  {line}" for line in tail) if tail
                    else " (nothing on stderr)"),
                returncode=returncode, stderr_tail=tail,
            )
        try:
            data = await anyio.to_thread.run_sync(envelope.read, path, envelope.RESULT, key)
        except envelope.TamperedError as exc:
            raise TamperedResultError(f"step '{inv.step}': {exc}") from None
        status = data.get("status")
        if status == "refused":
            raise PayloadRefusedError(str(data["message"]), reason=str(data.get("reason")))
        if status == "error":
            raise _remote_error(data)
        if status != "ok":
            raise SubprocessOperatorError(f"step '{inv.step}': unexpected result status {status!r}")
        try:
            return cloudpickle.loads(data["value"])
        except Exception as exc:
            raise SubprocessOperatorError(
                f"step '{inv.step}' succeeded in its process but its output cannot be loaded in the "
                f"runner: {type(exc).__name__}: {exc}"
            ) from exc

    # -- environment -----------------------------------------------------------------------
    def _environment(self, settings: SubprocessSettings, key: bytes) -> dict[str, str]:
        env = dict(os.environ) if self.config.inherit_env else {}
        extra = {**self.config.env, **settings.env}
        env.update(extra)
        # The child must import the step's module the way the runner did: the runner's
        # sys.path goes first-after-user-entries onto PYTHONPATH.
        paths = [*_split(extra.get("PYTHONPATH")), *_runner_path()]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env["PYTHONUNBUFFERED"] = "1"  # lines reach the runner as they are printed
        env.setdefault("PYTHONIOENCODING", "utf-8")
        env[envelope.KEY_ENV] = key.hex()
        return env


class _StepPickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle is untyped
    """cloudpickle, except that a module-level ``@step``'s function goes by reference.

    cloudpickle sends a function by value unless its module attribute *is* that function; for
    a step the attribute is the ``Step`` wrapper, so without this every step would travel by
    value (losing its file name in tracebacks) instead of being imported by the child.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType):
            ref = _module_step_reference(obj)
            if ref is not None:
                return envelope.load_step_function, ref
        return super().reducer_override(obj)


def _module_step_reference(fn: types.FunctionType) -> tuple[str, str] | None:
    module = sys.modules.get(fn.__module__ or "")
    if module is None or fn.__module__ == "__main__" or "<locals>" in fn.__qualname__:
        return None
    target: Any = module
    for part in fn.__qualname__.split("."):
        target = getattr(target, part, None)
    if target is not fn and getattr(target, "fn", None) is fn:
        return fn.__module__, fn.__qualname__
    return None


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _StepPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _coerce_settings(raw: Mapping[str, Any]) -> SubprocessSettings:
    """Typed settings; run() validated them already against the settings class."""
    env = raw.get("env") or {}
    return SubprocessSettings(env={str(k): str(v) for k, v in dict(env).items()},
                              nice=int(raw.get("nice", 0)))


def _split(value: str | None) -> list[str]:
    return [p for p in (value or "").split(os.pathsep) if p]


def _runner_path() -> list[str]:
    """The runner's sys.path without the standard library (another interpreter has its own)."""
    paths = sysconfig.get_paths()
    stdlib = tuple(os.path.normpath(paths[k]) for k in ("stdlib", "platstdlib"))
    out = []
    for entry in sys.path:
        path = os.path.abspath(entry or os.getcwd())  # '' is the runner's working directory
        if path.startswith(stdlib) or (path.endswith(".zip") and "python" in os.path.basename(path)):
            continue
        out.append(path)
    return out


def _signal_group(process: Process, sig: signal.Signals) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(process.pid, sig)  # the step's own children too
        else:  # pragma: no cover - Windows
            process.kill() if sig == getattr(signal, "SIGKILL", None) else process.terminate()
    except ProcessLookupError:
        pass


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"


def _remote_error(data: Mapping[str, Any]) -> RemoteStepError:
    original: BaseException | None = None
    if data.get("exception"):
        try:
            original = cloudpickle.loads(data["exception"])
        except Exception:  # e.g. a custom exception whose __init__ needs other arguments
            original = None
    cls = RemoteNonRetryableError if data.get("non_retryable") else RemoteStepError
    error = cls(str(data["type"]), str(data["message"]), str(data["traceback"]), original)
    error.__cause__ = original
    return error


async def _pump(stream: ByteReceiveStream | None, name: str, emit: Callable[..., None],
                tail: collections.deque[str] | None) -> None:
    """Emit every line of ``stream`` as a LogLine (and keep the last ones in ``tail``)."""
    if stream is None:
        return

    def line(raw: bytes) -> None:
        text = raw.rstrip(b"\r").decode("utf-8", "replace")
        if tail is not None:
            tail.append(text)
        emit(LogLine, line=text, stream=name)

    buf = b""
    async for chunk in stream:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line(raw)
        while len(buf) > MAX_LINE:
            line(buf[:MAX_LINE])
            buf = buf[MAX_LINE:]
    if buf:
        line(buf)
