"""Signed payload envelopes and the in-container entrypoint, exercised as a job would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepflow.remote import _envelope as envelope

KEY = bytes(range(32))


def double(x: int) -> int:
    return x * 2


def explode(x: int) -> int:
    raise ValueError(f"bad value {x}")


def write_marker(path: str) -> str:
    Path(path).write_text("ran")
    return "done"


def run_entrypoint(payload: Path, key: bytes = KEY) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, envelope.KEY_ENV: key.hex(),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "stepflow.entrypoint", "--payload", str(payload)],
                          capture_output=True, text=True, env=env, timeout=60)


def make_payload(tmp_path: Path, fn, *args, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / "job" / "payload.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(envelope.encode("payload", {"fn": fn, "args": args, "kwargs": kwargs}, KEY,
                                     run_id="r1", step="s", attempt=1))
    return path


def read_output(payload: Path, key: bytes = KEY) -> dict:
    _, body = envelope.decode((payload.parent / "output.bin").read_bytes(), key, kind="output")
    return dict(body)


def test_round_trip_and_entrypoint_success(tmp_path: Path) -> None:
    payload = make_payload(tmp_path, double, 21)
    out = run_entrypoint(payload)
    assert out.returncode == 0, out.stderr
    assert "running step 's' (run r1, attempt 1)" in out.stdout
    assert read_output(payload)["value"] == 42


def test_remote_exception_comes_back_with_its_traceback(tmp_path: Path) -> None:
    payload = make_payload(tmp_path, explode, 7)
    out = run_entrypoint(payload)
    assert out.returncode == 1
    body = read_output(payload)
    assert body["ok"] is False and body["type"] == "ValueError" and body["message"] == "bad value 7"
    assert 'raise ValueError(f"bad value {x}")' in body["traceback"]


def test_tampered_payload_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload = make_payload(tmp_path, write_marker, str(marker))
    data = bytearray(payload.read_bytes())
    data[-5] ^= 0x01  # flip one bit of the pickled body
    payload.write_bytes(bytes(data))
    out = run_entrypoint(payload)
    assert out.returncode == 2
    assert "payload refused" in out.stderr and "signature mismatch" in out.stderr
    assert not marker.exists()
    body = read_output(payload)
    assert body["refused"] and body["type"] == "PayloadError"


def test_wrong_key_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload = make_payload(tmp_path, write_marker, str(marker))
    out = run_entrypoint(payload, key=b"\x01" * 32)
    assert out.returncode == 2 and "signature mismatch" in out.stderr and not marker.exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("python", "3.9.1", "written by Python 3.9.1 but this is Python 3.11"),
    ("cloudpickle", "1.6.0", "written with cloudpickle 1.6.0 but this process has cloudpickle"),
    ("format", 99, "envelope format 99 is not supported"),
])
def test_version_mismatch_names_both_versions(tmp_path: Path, field: str, value: object, message: str) -> None:
    payload = make_payload(tmp_path, double, 1)
    magic, head, _mac, body = envelope._split(payload.read_bytes())
    header = json.loads(head)
    header[field] = value
    head = json.dumps(header, sort_keys=True).encode() + b"\n"
    payload.write_bytes(magic + head + envelope.sign(KEY, magic, head, body).encode() + b"\n" + body)
    out = run_entrypoint(payload)
    assert out.returncode == 2
    assert message in out.stderr


def test_garbage_and_truncated_envelopes() -> None:
    with pytest.raises(envelope.PayloadError, match="bad magic"):
        envelope.decode(b"hello", KEY, kind="payload")
    with pytest.raises(envelope.PayloadError, match="truncated"):
        envelope.decode(envelope.MAGIC + b"{}", KEY, kind="payload")


def test_large_inputs_travel_by_verified_reference(tmp_path: Path) -> None:
    blob = os.urandom(envelope.REF_THRESHOLD + 10)
    ref_path = tmp_path / "inputs" / "blob.pkl"
    ref_path.parent.mkdir()
    data = envelope.pickle_input(blob)
    ref_path.write_bytes(data)
    ref = envelope.ArtifactRef(str(ref_path), envelope.sha256(data), len(data))
    payload = make_payload(tmp_path, len, ref)
    out = run_entrypoint(payload)
    assert out.returncode == 0, out.stderr
    assert read_output(payload)["value"] == len(blob)
    ref_path.write_bytes(envelope.pickle_input(b"other"))  # modified after signing
    out = run_entrypoint(payload)
    assert out.returncode == 2 and "does not match its recorded sha256" in out.stderr


def test_missing_key_is_explained(tmp_path: Path) -> None:
    payload = make_payload(tmp_path, double, 1)
    env = {k: v for k, v in os.environ.items() if k != envelope.KEY_ENV}
    out = subprocess.run([sys.executable, "-m", "stepflow.entrypoint", "--payload", str(payload)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "STEPFLOW_PAYLOAD_KEY is not set" in out.stderr
