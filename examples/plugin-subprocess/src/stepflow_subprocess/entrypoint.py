"""Run one step attempt from a signed payload: ``python -m stepflow_subprocess.entrypoint``.

Started by the ``subprocess`` step operator, one process per attempt. It verifies the payload
(signature, then versions) before unpickling anything, runs the step (``asyncio.run`` for async
ones), and writes a signed result: the value, the error with its traceback, or why the payload
was refused. Standard output and error are the step's own and are streamed to the runner.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from stepflow_subprocess import envelope

EXIT_OK, EXIT_STEP_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3

_EPILOG = f"""\
The signing key (hex) is read from ${envelope.KEY_ENV}, never from the command line.
Exit status: {EXIT_OK} the step succeeded, {EXIT_STEP_FAILED} the step raised, {EXIT_USAGE} bad usage (no result
written), {EXIT_REFUSED} the payload was refused (tampered, or written by another Python/cloudpickle).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stepflow_subprocess.entrypoint",
        description="Run one stepflow step attempt from a signed payload and write a signed result.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--payload", required=True, type=Path, metavar="PATH",
                        help="signed payload written by the subprocess step operator")
    parser.add_argument("--result", required=True, type=Path, metavar="PATH",
                        help="where to write the signed result")
    return parser


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the step's own frames down (this module and asyncio.run stripped)."""
    import asyncio

    skip = (os.path.abspath(__file__), os.path.dirname(os.path.abspath(asyncio.__file__)))
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and \
            os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(skip):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _error(exc: BaseException, *, message: str | None = None) -> dict[str, Any]:
    import cloudpickle

    cls = type(exc)
    # Only a step that imported stepflow can raise its NonRetryableError: no import needed here.
    errors = sys.modules.get("stepflow.errors")
    try:
        blob: bytes | None = cloudpickle.dumps(exc)
    except Exception:  # an unpicklable exception still reports type, message and traceback
        blob = None
    return {
        "status": "error", "type": f"{cls.__module__}.{cls.__qualname__}", "name": cls.__name__,
        "message": str(exc) if message is None else message, "traceback": _user_traceback(exc),
        "non_retryable": errors is not None and isinstance(exc, errors.NonRetryableError),
        "exception": blob,
    }


_STEP: Any = None


def _set_step_context(payload: dict[str, Any]) -> None:
    """Make ``stepflow.current_step()`` work inside the step, as it does in-process."""
    from stepflow import running_step

    # The whole child process is this one step: entered, never left (kept referenced: a collected
    # context manager would reset the context when its generator is finalized).
    global _STEP
    _STEP = running_step(payload["run_id"], payload["step"], payload["attempt"], payload.get("pipeline", ""))
    _STEP.__enter__()


def _run(payload: dict[str, Any]) -> dict[str, Any]:
    import cloudpickle

    try:
        fn = cloudpickle.loads(payload["fn"])
        args = cloudpickle.loads(payload["args"])
        kwargs = cloudpickle.loads(payload["kwargs"])
        envelope.restore_filename(fn, str(payload.get("fn_file") or ""))
    except Exception as exc:
        return _error(exc, message=(
            f"cannot load step '{payload['step']}' in the subprocess: {type(exc).__name__}: {exc} "
            "(is the module defining it importable here? PYTHONPATH carries the runner's sys.path)"))
    nice = int(payload.get("nice") or 0)
    if nice:
        os.nice(nice)
    _set_step_context(payload)
    try:
        if payload["is_async"]:
            import asyncio

            value = asyncio.run(fn(*args, **kwargs))
        else:
            value = fn(*args, **kwargs)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: always leave a result
        return _error(exc)
    try:
        return {"status": "ok", "value": cloudpickle.dumps(value)}
    except Exception as exc:
        return _error(exc, message=(
            f"step '{payload['step']}' returned a {type(value).__module__}.{type(value).__qualname__} "
            f"that cannot be pickled to send it back to the runner: {type(exc).__name__}: {exc}"))


def main(argv: list[str] | None = None) -> int:
    """Run the attempt described by ``--payload`` and write ``--result``; return the exit status."""
    args = _parser().parse_args(argv)
    # Pop the key so the step (and anything it starts) never sees it.
    key_hex = os.environ.pop(envelope.KEY_ENV, "")
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        key = b""
    if not key:
        print(f"stepflow-subprocess: no signing key in ${envelope.KEY_ENV}; this entry point is "
              "started by the subprocess step operator, which sets it", file=sys.stderr)
        return EXIT_USAGE
    try:
        payload = envelope.read(args.payload, envelope.PAYLOAD, key)
        envelope.check_versions(payload)
    except envelope.EnvelopeError as exc:
        print(f"stepflow-subprocess: {exc}", file=sys.stderr)
        envelope.write(args.result, envelope.RESULT, {
            "format": envelope.FORMAT, "status": "refused", "reason": exc.reason, "message": str(exc),
        }, key)
        return EXIT_REFUSED
    except OSError as exc:
        print(f"stepflow-subprocess: cannot read the payload: {exc}", file=sys.stderr)
        return EXIT_USAGE
    result = _run(payload)
    result["format"] = envelope.FORMAT
    sys.stdout.flush()
    sys.stderr.flush()
    envelope.write(args.result, envelope.RESULT, result, key)
    return EXIT_OK if result["status"] == "ok" else EXIT_STEP_FAILED


if __name__ == "__main__":
    sys.exit(main())
