"""Run one step inside a job: ``python -m stepflow.entrypoint --payload URI``.

The payload is verified (HMAC with ``$STEPFLOW_PAYLOAD_KEY``) before anything is unpickled,
then the step runs and its output, or its error with the full traceback, is written as a
signed envelope next to the payload (``output.bin``). Exit status: 0 success, 1 the step
raised, 2 the payload was refused or unreadable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import os
import sys
import time
import traceback
from typing import Any

from stepflow.remote import _envelope as envelope
from stepflow.remote._io import read_uri, sibling, write_uri

EXIT_OK, EXIT_STEP_FAILED, EXIT_REFUSED = 0, 1, 2


def _key() -> bytes:
    raw = os.environ.get(envelope.KEY_ENV)
    if not raw:
        raise envelope.PayloadError(f"{envelope.KEY_ENV} is not set in the job's environment; "
                                    "the operator must pass the artifact store's payload key")
    return bytes.fromhex(raw)


def _resolve_refs(value: Any) -> Any:
    if isinstance(value, envelope.ArtifactRef):
        data = read_uri(value.uri)
        if envelope.sha256(data) != value.sha256:
            raise envelope.PayloadError(f"input artifact {value.uri} does not match its recorded sha256: "
                                        "it was modified after the payload was signed")
        import pickle

        return pickle.loads(data)
    if isinstance(value, tuple):
        return tuple(_resolve_refs(v) for v in value)
    if isinstance(value, list):
        return [_resolve_refs(v) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_refs(v) for k, v in value.items()}
    return value


def _write_output(uri: str, key: bytes | None, body: dict[str, Any], header: dict[str, Any]) -> None:
    if key is None:
        return  # without the key nothing we write could be trusted by the runner
    write_uri(uri, envelope.encode("output", body, key, **header))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m stepflow.entrypoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payload", required=True, help="URI of the signed step payload")
    parser.add_argument("--output", help="URI for the output envelope (default: output.bin beside the payload)")
    args = parser.parse_args(argv)
    output_uri = args.output or sibling(args.payload, "output.bin")
    key: bytes | None = None
    header: dict[str, Any] = {}
    try:
        key = _key()
        raw = read_uri(args.payload)
        header, body = envelope.decode(raw, key, kind="payload")
        fn = envelope.resolve_function(body["fn_ref"]) if "fn_ref" in body else body["fn"]
        call_args = _resolve_refs(body["args"])
        call_kwargs = _resolve_refs(body["kwargs"])
    except Exception as exc:  # refused: nothing of the payload ran
        print(f"stepflow: payload refused: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        try:
            _write_output(output_uri, key, {"ok": False, "type": type(exc).__name__, "message": str(exc),
                                            "traceback": traceback.format_exc(), "refused": True}, header)
        except Exception as write_exc:  # the runner will report the missing output
            print(f"stepflow: could not write the output envelope: {write_exc}", file=sys.stderr)
        return EXIT_REFUSED
    meta = {k: header.get(k) for k in ("run_id", "step", "attempt")}
    print(f"stepflow: running step {meta['step']!r} (run {meta['run_id']}, attempt {meta['attempt']})",
          flush=True)
    started = time.time()
    try:
        result = fn(*call_args, **call_kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        out = {"ok": True, "value": result, "duration": time.time() - started}
        code = EXIT_OK
    except BaseException as exc:  # report everything, including SystemExit from the step
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        out = {"ok": False, "type": type(exc).__name__, "message": str(exc), "traceback": tb,
               "duration": time.time() - started}
        code = EXIT_STEP_FAILED
    try:
        _write_output(output_uri, key, out, meta)
    except Exception as exc:
        tb = traceback.format_exc()
        print(f"stepflow: could not write the step output: {type(exc).__name__}: {exc}\n{tb}",
              file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):  # e.g. an unpicklable return value: report that instead
            _write_output(output_uri, key, {"ok": False, "type": type(exc).__name__,
                                            "message": f"step {meta['step']!r} returned a value that cannot be "
                                                       f"stored: {exc}", "traceback": tb}, meta)
        return EXIT_STEP_FAILED
    print(f"stepflow: step {meta['step']!r} {'succeeded' if code == 0 else 'failed'} in "
          f"{time.time() - started:.2f}s", flush=True)
    return code


async def _await(awaitable: Any) -> Any:
    return await awaitable


if __name__ == "__main__":
    sys.exit(main())
