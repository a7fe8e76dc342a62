"""Payload and output envelopes and the in-container entrypoint, exercised as a job runs it.

The job knows its token (from its environment or a secrets file) and the sha256 its payload
was pinned to; the runner alone knows the master key the job's keys derive from. The tests
play the attacker too: with the token (readable from a job's description) and write access to
the store, nothing they change is run or accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stepflow import _envelope as envelope
from stepflow.errors import PayloadError
from stepflow.remote import _keys as keys

MASTER = bytes(range(32))
JOB = "sf-r1-s-1"


def derive(purpose: str) -> bytes:
    return hmac.new(MASTER, purpose.encode(), hashlib.sha256).digest()


JOB_KEYS = keys.JobKeys.derive(derive, JOB)


def double(x: int) -> int:
    return x * 2


def explode(x: int) -> int:
    raise ValueError(f"bad value {x}")


def write_marker(path: str) -> str:
    Path(path).write_text("ran")
    return "done"


def payload_bytes(fn: Any, *args: Any, job_keys: keys.JobKeys = JOB_KEYS, **header: Any) -> bytes:
    fields = {"run_id": "r1", "step": "s", "attempt": 1, "job": job_keys.job,
              "output_key": job_keys.wrapped_output_key(), **header}
    return envelope.encode("payload", {"fn": fn, "args": args, "kwargs": {}}, job_keys.payload_key, **fields)


def write_payload(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "job" / "payload.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run_entrypoint(payload: Path, *, pin: str | None = None, token: bytes | None = JOB_KEYS.token,
                   secrets_file: Path | None = None, failure_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPFLOW_")}
    if failure_file is not None:
        env[keys.FAILURE_FILE_ENV] = str(failure_file)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])
    if pin is not None:
        env[keys.PAYLOAD_SHA_ENV] = pin
    if secrets_file is not None:
        env[keys.SECRETS_FILE_ENV] = str(secrets_file)
    elif token is not None:
        env[keys.TOKEN_ENV] = token.hex()
    return subprocess.run([sys.executable, "-m", "stepflow.entrypoint", "--payload", str(payload), "--output",
                           str(payload.parent / "output.bin")], capture_output=True, text=True, env=env, timeout=60)


def run_pinned(tmp_path: Path, data: bytes, **kw: Any) -> tuple[Path, subprocess.CompletedProcess[str]]:
    payload = write_payload(tmp_path, data)
    return payload, run_entrypoint(payload, pin=hashlib.sha256(data).hexdigest(), **kw)


def read_output(payload: Path, job: str = JOB, step: str = "s") -> dict[str, Any]:
    """What the runner does: verify with the key only it (and the job) can know, for this job only."""
    _, body = envelope.decode((payload.parent / "output.bin").read_bytes(), JOB_KEYS.output_key, kind="output",
                              expect={"job": job, "run_id": "r1", "step": step, "attempt": 1})
    return dict(body)


def test_round_trip_and_entrypoint_success(tmp_path: Path) -> None:
    payload, out = run_pinned(tmp_path, payload_bytes(double, 21))
    assert out.returncode == 0, out.stderr
    assert "running step 's' (run r1, attempt 1)" in out.stdout
    assert read_output(payload)["value"] == 42


def test_the_token_can_come_from_a_secrets_file(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({keys.TOKEN_SECRET: JOB_KEYS.token.hex()}))
    payload, out = run_pinned(tmp_path, payload_bytes(double, 4), secrets_file=secrets)
    assert out.returncode == 0, out.stderr
    assert read_output(payload)["value"] == 8


def test_remote_exception_comes_back_with_its_traceback(tmp_path: Path) -> None:
    payload, out = run_pinned(tmp_path, payload_bytes(explode, 7))
    assert out.returncode == 1
    body = read_output(payload)
    assert body["ok"] is False and body["type"] == "ValueError" and body["message"] == "bad value 7"
    assert 'raise ValueError(f"bad value {x}")' in body["traceback"]


def leak(secret: str) -> None:
    raise RuntimeError(f"cannot log in with {secret}: " + "x" * 3000)


def test_a_failure_goes_to_the_services_failure_file_trimmed_and_with_secrets_masked(tmp_path: Path) -> None:
    failure = tmp_path / "ml" / "output" / "failure"
    secrets = tmp_path / "secrets.json"
    storage_key = "storage-secret-key-123"
    secrets.write_text(json.dumps({keys.TOKEN_SECRET: JOB_KEYS.token.hex(), keys.STORAGE_SECRET: {"key": storage_key}}))
    _, out = run_pinned(tmp_path, payload_bytes(explode, 7), failure_file=failure)
    assert out.returncode == 1 and failure.read_text() == "ValueError: bad value 7 (step s)"
    _, out = run_pinned(tmp_path, payload_bytes(leak, storage_key), secrets_file=secrets, failure_file=failure)
    text = failure.read_text()
    assert out.returncode == 1 and storage_key not in text and JOB_KEYS.token.hex() not in text
    assert text.startswith("RuntimeError: cannot log in with ***: xxx") and text.endswith("... (step s)")
    assert len(text) == 1024
    # A refused payload says so too.
    out = run_entrypoint(write_payload(tmp_path, payload_bytes(double, 1)), pin="0" * 64, failure_file=failure)
    assert out.returncode == 2 and failure.read_text().startswith("PayloadError: payload refused: the payload does not")


def test_a_payload_changed_after_submission_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    data = payload_bytes(write_marker, str(marker))
    pin = hashlib.sha256(data).hexdigest()
    tampered = bytearray(data)
    tampered[-5] ^= 0x01  # flip one bit of the pickled body
    payload = write_payload(tmp_path, bytes(tampered))
    out = run_entrypoint(payload, pin=pin)
    assert out.returncode == 2
    assert "payload refused" in out.stderr and "does not match the sha256 its job was started with" in out.stderr
    assert not marker.exists()


def test_the_token_from_a_job_description_cannot_sign_a_payload_that_runs(tmp_path: Path) -> None:
    """An attacker reads the job's env (token and pin), writes their own payload, signed properly."""
    marker = tmp_path / "marker"
    honest = payload_bytes(double, 1)
    forged = payload_bytes(write_marker, str(marker))  # signed with the token-derived key, like the real one
    payload = write_payload(tmp_path, forged)
    out = run_entrypoint(payload, pin=hashlib.sha256(honest).hexdigest())
    assert out.returncode == 2 and "does not match the sha256" in out.stderr
    assert not marker.exists()


def test_the_token_alone_cannot_forge_an_output_the_runner_accepts(tmp_path: Path) -> None:
    """With the token but not the payload (no store read access), the output key stays unknown."""
    payload = write_payload(tmp_path, payload_bytes(double, 1))
    for guess in (JOB_KEYS.token, keys.payload_key(JOB_KEYS.token), hashlib.sha256(JOB_KEYS.token).digest()):
        forged = envelope.encode("output", {"ok": True, "value": "attacker"}, guess, run_id="r1", step="s",
                                 attempt=1, job=JOB)
        (payload.parent / "output.bin").write_bytes(forged)
        with pytest.raises(PayloadError, match="signature mismatch"):
            read_output(payload)


def test_an_output_of_another_job_is_refused(tmp_path: Path) -> None:
    payload, out = run_pinned(tmp_path, payload_bytes(double, 21))
    assert out.returncode == 0
    with pytest.raises(PayloadError, match="belongs to step 's', not 'other'"):
        read_output(payload, step="other")
    other = keys.JobKeys.derive(derive, "sf-r1-other-1")  # its key cannot verify this job's output
    with pytest.raises(PayloadError, match="signature mismatch"):
        envelope.decode((payload.parent / "output.bin").read_bytes(), other.output_key, kind="output")


def test_a_wrong_token_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    _, out = run_pinned(tmp_path, payload_bytes(write_marker, str(marker)), token=b"\x01" * 32)
    assert out.returncode == 2 and "signature mismatch" in out.stderr and not marker.exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("python", "3.9.1", "written by Python 3.9.1 but this is Python 3.11"),
    ("cloudpickle", "1.6.0", "written with cloudpickle 1.6.0 but this process has cloudpickle"),
    ("format", 99, "envelope format 99 is not supported"),
])
def test_version_mismatch_names_both_versions(tmp_path: Path, field: str, value: object, message: str) -> None:
    magic, head, _mac, body = envelope._split(payload_bytes(double, 1))
    header = json.loads(head)
    header[field] = value
    head = json.dumps(header, sort_keys=True).encode() + b"\n"
    data = magic + head + envelope.sign(JOB_KEYS.payload_key, magic, head, body).encode() + b"\n" + body
    payload, out = run_pinned(tmp_path, data)
    assert out.returncode == 2
    assert message in out.stderr
    assert read_output(payload)["refused"]  # the runner hears why, in a verified envelope


def test_garbage_and_truncated_envelopes() -> None:
    with pytest.raises(PayloadError, match="bad magic"):
        envelope.decode(b"hello", JOB_KEYS.payload_key, kind="payload")
    with pytest.raises(PayloadError, match="truncated"):
        envelope.decode(envelope.MAGIC + b"{}", JOB_KEYS.payload_key, kind="payload")


def test_large_inputs_travel_by_verified_reference(tmp_path: Path) -> None:
    blob = os.urandom(envelope.REF_THRESHOLD + 10)
    ref_path = tmp_path / "inputs" / "blob.pkl"
    ref_path.parent.mkdir()
    data = envelope.pickle_input(blob)
    ref_path.write_bytes(data)
    ref = envelope.ArtifactRef(str(ref_path), envelope.sha256(data), len(data))
    payload, out = run_pinned(tmp_path, payload_bytes(len, ref))
    assert out.returncode == 0, out.stderr
    assert read_output(payload)["value"] == len(blob)
    ref_path.write_bytes(envelope.pickle_input(b"other"))  # modified after signing
    out = run_entrypoint(payload, pin=hashlib.sha256(payload.read_bytes()).hexdigest())
    assert out.returncode == 2 and "does not match its recorded sha256" in out.stderr


def test_missing_token_or_pin_is_explained(tmp_path: Path) -> None:
    payload, out = run_pinned(tmp_path, payload_bytes(double, 1), token=None)
    assert out.returncode == 2 and "the job has no token" in out.stderr
    out = run_entrypoint(payload)  # no pin
    assert out.returncode == 2 and f"{keys.PAYLOAD_SHA_ENV} is not set" in out.stderr


def where_am_i() -> tuple[str, str, int]:
    import stepflow

    ctx = stepflow.current_step()
    assert ctx is not None
    return ctx.run_id, ctx.step, ctx.attempt


def test_current_step_answers_inside_the_job(tmp_path: Path) -> None:
    payload, out = run_pinned(tmp_path, payload_bytes(where_am_i))
    assert out.returncode == 0, out.stderr
    assert read_output(payload)["value"] == ("r1", "s", 1)
