"""Signed, versioned envelopes for step payloads (runner -> job) and outputs (job -> runner).

Who holds which key is the business of :mod:`stepflow.remote._keys`. Wire format, chosen so
nothing is unpickled before it is authenticated::

    line 1  STEPFLOW-ENVELOPE 1
    line 2  {json header: kind, format, python, cloudpickle, run_id, step, attempt, job}
    line 3  hex HMAC-SHA256 over the two lines above and the body
    rest    cloudpickle body

The reader checks the HMAC first (tampered or foreign envelopes are refused untouched), then
the format and the Python / cloudpickle versions from the JSON header, and only then
unpickles. Inputs larger than ``REF_THRESHOLD`` bytes travel as separate content-addressed
artifacts; their sha256 sits inside the signed body, so they are verified too.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import pickle
import platform
import sys
from typing import Any

import attrs

from stepflow.errors import PayloadError, VersionMismatchError

MAGIC = b"STEPFLOW-ENVELOPE 1\n"
FORMAT = 1
#: Arguments whose pickle is bigger than this are stored as separate artifacts.
REF_THRESHOLD = 256 * 1024


def _cloudpickle_version() -> str:
    import cloudpickle

    return str(cloudpickle.__version__)


def runtime_versions() -> dict[str, str]:
    """Python and cloudpickle versions of this process."""
    return {"python": platform.python_version(), "cloudpickle": _cloudpickle_version()}


@attrs.frozen
class ArtifactRef:
    """A large input stored beside the payload, by content hash."""

    uri: str
    sha256: str
    size: int


def sign(key: bytes, *parts: bytes) -> str:
    """HMAC-SHA256 of the concatenated parts, hex."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.hexdigest()


def encode(kind: str, body_obj: Any, key: bytes, **header: Any) -> bytes:
    """Pickle ``body_obj`` (cloudpickle) into a signed envelope of ``kind``."""
    import cloudpickle

    body = cloudpickle.dumps(body_obj, protocol=pickle.HIGHEST_PROTOCOL)
    head = json.dumps({"kind": kind, "format": FORMAT, **runtime_versions(), **header},
                      sort_keys=True).encode() + b"\n"
    return MAGIC + head + sign(key, MAGIC, head, body).encode() + b"\n" + body


def read_header(data: bytes) -> dict[str, Any]:
    """The JSON header of an envelope, without verifying anything (for diagnostics)."""
    _, head, _, _ = _split(data)
    return dict(json.loads(head))


def _split(data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    if not data.startswith(MAGIC):
        raise PayloadError("not a stepflow envelope (bad magic): refusing to load it")
    rest = data[len(MAGIC):]
    head, sep1, rest = rest.partition(b"\n")
    mac, sep2, body = rest.partition(b"\n")
    if not sep1 or not sep2:
        raise PayloadError("truncated stepflow envelope: refusing to load it")
    return MAGIC, head + b"\n", mac, body


def verify(data: bytes, key: bytes, *, kind: str, expect: dict[str, Any] | None = None) -> tuple[dict[str, Any], bytes]:
    """Check an envelope's signature, kind and header fields; return ``(header, pickled body)``.

    Nothing is unpickled. ``expect`` maps header fields to the values they must have (the run,
    step, attempt and job an output must belong to), so an envelope cannot be replayed
    elsewhere.
    """
    magic, head, mac, body = _split(data)
    expected = sign(key, magic, head, body)
    if not hmac.compare_digest(expected.encode(), mac.strip()):
        raise PayloadError(
            f"{kind} signature mismatch: the envelope was modified after it was written, or signed with "
            "another key; refusing to unpickle it, nothing was executed"
        )
    header: dict[str, Any] = json.loads(head)
    if header.get("kind") != kind:
        raise PayloadError(f"expected a {kind} envelope, got {header.get('kind')!r}; refusing to load it")
    for field, value in (expect or {}).items():
        if header.get(field) != value:
            raise PayloadError(f"{kind} envelope belongs to {field} {header.get(field)!r}, not {value!r}: "
                               "refusing to load it, nothing was executed")
    return header, body


def check_versions(header: dict[str, Any], kind: str) -> None:
    """VersionMismatchError when the envelope's format, Python or cloudpickle cannot load here."""
    if header.get("format") != FORMAT:
        raise VersionMismatchError(f"{kind} envelope format {header.get('format')} is not supported by this "
                                   f"stepflow (format {FORMAT}); use the same stepflow version on both sides")
    here = runtime_versions()
    theirs_py, ours_py = str(header.get("python", "?")), here["python"]
    if theirs_py.split(".")[:2] != ours_py.split(".")[:2]:
        raise VersionMismatchError(
            f"{kind} was written by Python {theirs_py} but this is Python {ours_py}: pickled code "
            "only loads on the same Python minor version; use a base image with the runner's "
            "Python (or run the runner on the image's Python)"
        )
    theirs_cp, ours_cp = str(header.get("cloudpickle", "?")), here["cloudpickle"]
    if theirs_cp.split(".")[:2] != ours_cp.split(".")[:2]:
        raise VersionMismatchError(
            f"{kind} was written with cloudpickle {theirs_cp} but this process has cloudpickle "
            f"{ours_cp}; install the same version on both sides"
        )


def decode(data: bytes, key: bytes, *, kind: str, expect: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    """Verify, then unpickle an envelope; return ``(header, body object)``.

    Raises PayloadError when the signature does not match (tampered, or signed with another
    key) or the header names another run/step/job than ``expect``, and VersionMismatchError
    when Python or cloudpickle differ in a way that breaks unpickling.
    """
    header, body = verify(data, key, kind=kind, expect=expect)
    check_versions(header, kind)
    return header, pickle.loads(body)


def pickle_input(value: Any) -> bytes:
    """Pickle one input with cloudpickle (used to decide whether it travels by reference)."""
    import cloudpickle

    buf = io.BytesIO()
    cloudpickle.dump(value, buf, protocol=pickle.HIGHEST_PROTOCOL)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    """Hex sha256."""
    return hashlib.sha256(data).hexdigest()


def python_tag() -> str:
    """``3.11`` for error messages."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def function_ref(fn: Any) -> tuple[str, str] | None:
    """``(module, qualname)`` when ``fn`` (or the @step wrapping it) can be imported by name."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qualname:
        return None
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if obj is fn or getattr(obj, "fn", None) is fn:
        return module, qualname
    return None


def resolve_function(ref: tuple[str, str]) -> Any:
    """Import what :func:`function_ref` named; unwrap a @step to its function."""
    import importlib

    module, qualname = ref
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    from stepflow._dsl.step import Step

    return obj.fn if isinstance(obj, Step) else obj
