"""Run one step inside a job: ``python -m stepflow.entrypoint --payload URI --output URI``.

Before anything is unpickled the payload is checked twice: its sha256 must equal
``$STEPFLOW_PAYLOAD_SHA256`` (the job runs exactly the bytes the runner wrote), and its
signature must verify with the key derived from the job's token. The token comes from the
secrets file named by ``$STEPFLOW_SECRETS_FILE`` when the backend delivers one, else from
``$STEPFLOW_JOB_TOKEN``. The step then runs, and its output, or its error with the full
traceback, is written as an envelope signed with the job's output key (unwrapped from the
payload with the token). When ``$STEPFLOW_FAILURE_FILE`` names where the job's service reads a
failure message, a failed step's ``Type: message (step name)`` goes there too, trimmed and with
the job's secrets masked. Exit status: 0 success, 1 the step raised, 2 the payload was refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import inspect
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from stepflow import _envelope as envelope
from stepflow._engine.context import running_step
from stepflow.errors import PayloadError
from stepflow.remote import _keys as keys
from stepflow.remote._io import read_uri, storage_options, write_uri

EXIT_OK, EXIT_STEP_FAILED, EXIT_REFUSED = 0, 1, 2
#: The longest failure message a service shows (SageMaker's FailureReason limit).
FAILURE_LIMIT = 1024


def _secret_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if len(value) >= 6 else []
    if isinstance(value, dict):
        return [s for v in value.values() for s in _secret_strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _secret_strings(v)]
    return []


def _report_failure(kind: str, message: str, step: Any, secrets: dict[str, Any]) -> None:
    """Write the failure where the job's service reads it (``$STEPFLOW_FAILURE_FILE``), if it has such a place."""
    path = os.environ.get(keys.FAILURE_FILE_ENV)
    if not path:
        return
    for secret in sorted(_secret_strings(secrets), key=len, reverse=True):
        message = message.replace(secret, "***")
    suffix = f" (step {step})" if step else ""
    head = f"{kind}: "
    room = FAILURE_LIMIT - len(head) - len(suffix)
    text = head + (message if len(message) <= room else message[:room - 3] + "...") + suffix
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as exc:  # the output envelope still carries the failure
        print(f"stepflow: could not write the failure file {path}: {exc}", file=sys.stderr, flush=True)


def _secrets() -> dict[str, Any]:
    path = os.environ.get(keys.SECRETS_FILE_ENV)
    if path:
        try:
            return dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise PayloadError(f"cannot read the job's secrets file {path}: {exc}") from None
    token = os.environ.get(keys.TOKEN_ENV)
    return {keys.TOKEN_SECRET: token} if token else {}


def _token(secrets: dict[str, Any]) -> bytes:
    raw = secrets.get(keys.TOKEN_SECRET)
    if not raw:
        raise PayloadError(f"the job has no token (neither {keys.SECRETS_FILE_ENV} nor {keys.TOKEN_ENV}); "
                           "it was not started by a stepflow operator: refusing to run anything")
    return bytes.fromhex(str(raw))


def _check_pinned(raw: bytes) -> None:
    pinned = os.environ.get(keys.PAYLOAD_SHA_ENV, "")
    if not pinned:
        raise PayloadError(f"{keys.PAYLOAD_SHA_ENV} is not set: the job does not pin its payload, refusing to run it")
    if not hmac.compare_digest(hashlib.sha256(raw).hexdigest(), pinned.strip().lower()):
        raise PayloadError("the payload does not match the sha256 its job was started with: it was replaced or "
                           "modified after submission; refusing to unpickle it, nothing was executed")


def _resolve_refs(value: Any, options: dict[str, Any]) -> Any:
    if isinstance(value, envelope.ArtifactRef):
        data = read_uri(value.uri, options)
        if envelope.sha256(data) != value.sha256:
            raise PayloadError(f"input artifact {value.uri} does not match its recorded sha256: "
                               "it was modified after the payload was signed")
        import pickle

        return pickle.loads(data)
    if isinstance(value, tuple):
        return tuple(_resolve_refs(v, options) for v in value)
    if isinstance(value, list):
        return [_resolve_refs(v, options) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_refs(v, options) for k, v in value.items()}
    return value


class _Job:
    """What the entrypoint learned about its job, step by step (for error reporting)."""

    def __init__(self) -> None:
        self.output_key: bytes | None = None
        self.meta: dict[str, Any] = {}
        self.options: dict[str, Any] = {}

    def write(self, uri: str, body: dict[str, Any]) -> None:
        if self.output_key is None:
            return  # without the output key nothing written here could be trusted by the runner
        write_uri(uri, envelope.encode("output", body, self.output_key, **self.meta), self.options)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m stepflow.entrypoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payload", required=True, help="URI of the step payload")
    parser.add_argument("--output", required=True, help="URI to write the output envelope to")
    args = parser.parse_args(argv)
    job = _Job()
    secrets: dict[str, Any] = {}
    try:
        secrets = _secrets()
        token = _token(secrets)
        job.options = storage_options(secrets.get(keys.STORAGE_SECRET))
        raw = read_uri(args.payload, job.options)
        _check_pinned(raw)
        header, body_bytes = envelope.verify(raw, keys.payload_key(token), kind="payload")
        job.meta = {k: header.get(k) for k in ("run_id", "step", "attempt", "job")}
        job.output_key = keys.unwrap_output_key(token, str(header.get("output_key", "")), str(header.get("job")))
        envelope.check_versions(header, "payload")
        import pickle

        body = pickle.loads(body_bytes)
        fn = envelope.resolve_function(body["fn_ref"]) if "fn_ref" in body else body["fn"]
        call_args = _resolve_refs(body["args"], job.options)
        call_kwargs = _resolve_refs(body["kwargs"], job.options)
    except Exception as exc:  # refused: nothing of the payload ran
        print(f"stepflow: payload refused: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        _report_failure(type(exc).__name__, f"payload refused: {exc}", job.meta.get("step"), secrets)
        try:
            job.write(args.output, {"ok": False, "type": type(exc).__name__, "message": str(exc),
                                    "traceback": traceback.format_exc(), "refused": True})
        except Exception as write_exc:  # the runner will report the missing output
            print(f"stepflow: could not write the output envelope: {write_exc}", file=sys.stderr)
        return EXIT_REFUSED
    meta = job.meta
    print(f"stepflow: running step {meta['step']!r} (run {meta['run_id']}, attempt {meta['attempt']})", flush=True)
    started = time.time()
    try:
        with running_step(str(meta["run_id"]), str(meta["step"]), int(meta["attempt"] or 1)):
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
        _report_failure(type(exc).__name__, str(exc), meta["step"], secrets)
    try:
        job.write(args.output, out)
    except Exception as exc:
        tb = traceback.format_exc()
        print(f"stepflow: could not write the step output: {type(exc).__name__}: {exc}\n{tb}",
              file=sys.stderr, flush=True)
        message = f"step {meta['step']!r} returned a value that cannot be stored: {exc}"
        _report_failure(type(exc).__name__, message, meta["step"], secrets)
        with contextlib.suppress(Exception):  # e.g. an unpicklable return value: report that instead
            job.write(args.output, {"ok": False, "type": type(exc).__name__, "message": message, "traceback": tb})
        return EXIT_STEP_FAILED
    print(f"stepflow: step {meta['step']!r} {'succeeded' if code == 0 else 'failed'} in "
          f"{time.time() - started:.2f}s", flush=True)
    return code


async def _await(awaitable: Any) -> Any:
    return await awaitable


if __name__ == "__main__":
    sys.exit(main())
