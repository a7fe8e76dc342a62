"""The signed files the runner and the step's process exchange: the payload and the result.

File layout: a magic line, a 32-byte HMAC-SHA256 of (magic + body), then the body. The body is a
pickle of plain data only (str, int, bytes, dicts), unpickled with a loader that refuses every
class, and the step's function and arguments inside it are separate cloudpickle blobs. So the
child checks, in order: the signature (nothing is unpickled before it verifies), the format,
Python and cloudpickle versions, and only then loads user code.

The key is random per launch and reaches the child only through the ``STEPFLOW_SUBPROCESS_KEY``
environment variable (never the command line, which other users can read in ``ps``).

This module imports only the standard library (cloudpickle lazily), so the child starts fast.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import pickle
import platform
import secrets
from pathlib import Path
from typing import Any

#: Version of the envelope layout; both sides must agree.
FORMAT = 1
#: Environment variable carrying the per-launch signing key (hex) to the child.
KEY_ENV = "STEPFLOW_SUBPROCESS_KEY"
PAYLOAD = b"stepflow-subprocess payload\n"
RESULT = b"stepflow-subprocess result\n"
_MAC_SIZE = hashlib.sha256().digest_size


class EnvelopeError(Exception):
    """A payload or result cannot be used. ``reason`` is a short machine-readable code."""

    reason = "invalid"


class TamperedError(EnvelopeError):
    """The signature does not verify: the file changed after it was written, or is not ours."""

    reason = "tampered"


class VersionMismatchError(EnvelopeError):
    """Writer and reader differ in envelope format, Python (major.minor) or cloudpickle version."""

    reason = "version"


def new_key() -> bytes:
    """A fresh random signing key (one per launch)."""
    return secrets.token_bytes(32)


def runtime_versions() -> dict[str, str]:
    """The versions that must match between writer and reader of a payload."""
    import cloudpickle

    return {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__}


def _mac(key: bytes, magic: bytes, body: bytes) -> bytes:
    return hmac.new(key, magic + body, hashlib.sha256).digest()


def seal(magic: bytes, data: dict[str, Any], key: bytes) -> bytes:
    """Serialize plain ``data`` and sign it."""
    body = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
    return magic + _mac(key, magic, body) + body


class _PlainUnpickler(pickle.Unpickler):
    """Loads plain data only: any class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an envelope")


def unseal(magic: bytes, blob: bytes, key: bytes) -> dict[str, Any]:
    """Verify ``blob`` and return its data; TamperedError if the signature does not verify."""
    what = magic.decode().split()[-1]
    if not blob.startswith(magic) or len(blob) < len(magic) + _MAC_SIZE:
        raise TamperedError(f"tampered {what} refused: not a stepflow-subprocess {what} file; "
                            "nothing was unpickled")
    mac = blob[len(magic):len(magic) + _MAC_SIZE]
    body = blob[len(magic) + _MAC_SIZE:]
    if not hmac.compare_digest(mac, _mac(key, magic, body)):
        raise TamperedError(f"tampered {what} refused: its signature does not verify (it changed after "
                            "it was written, or was signed with another key); nothing was unpickled")
    data = _PlainUnpickler(io.BytesIO(body)).load()
    if not isinstance(data, dict):
        raise TamperedError(f"tampered {what} refused: unexpected content")
    return data


def write(path: str | os.PathLike[str], magic: bytes, data: dict[str, Any], key: bytes) -> None:
    """Sign ``data`` and write it to ``path`` atomically, readable by the owner only."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(seal(magic, data, key))
    os.replace(tmp, path)  # the reader never sees a half-written file


def read(path: str | os.PathLike[str], magic: bytes, key: bytes) -> dict[str, Any]:
    """Read and verify the envelope at ``path`` (see :func:`unseal`)."""
    return unseal(magic, Path(path).read_bytes(), key)


def load_step_function(module: str, qualname: str) -> Any:
    """Import a module-level ``@step``'s function by name (what the payload refers to)."""
    import importlib

    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "fn", obj)


def restore_filename(fn: Any, filename: str) -> None:
    """Give a function pickled by value its source file back, for readable tracebacks.

    cloudpickle replaces ``co_filename`` with ``<dynamic-code>``; the line numbers survive, so
    with the file name restored the traceback shows the source lines again.
    """
    import types

    def fix(code: types.CodeType) -> types.CodeType:
        consts = tuple(fix(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
        return code.replace(co_filename=filename, co_consts=consts)

    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType) and code.co_filename == "<dynamic-code>" and filename:
        fn.__code__ = fix(code)


def check_versions(data: dict[str, Any]) -> None:
    """Raise VersionMismatchError unless ``data`` was written by a compatible runtime.

    Python must match in major.minor (pickled code objects change between minor versions) and
    cloudpickle exactly (it only guarantees loading what the same version wrote).
    """
    ours = runtime_versions()
    if data.get("format") != FORMAT:
        raise VersionMismatchError(
            f"version mismatch: the payload uses envelope format {data.get('format')!r} but this "
            f"stepflow-subprocess reads format {FORMAT}; install the same stepflow-subprocess for "
            "the runner and the step interpreter"
        )
    theirs_py, theirs_cp = str(data.get("python")), str(data.get("cloudpickle"))
    if theirs_py.split(".")[:2] != ours["python"].split(".")[:2] or theirs_cp != ours["cloudpickle"]:
        raise VersionMismatchError(
            f"version mismatch: the runner wrote this payload with Python {theirs_py} and cloudpickle "
            f"{theirs_cp}, but the step interpreter has Python {ours['python']} and cloudpickle "
            f"{ours['cloudpickle']}; use the same Python (major.minor) and cloudpickle version on both "
            "sides (the operator's `python` option chooses the step interpreter); nothing was unpickled"
        )
