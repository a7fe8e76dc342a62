"""Per-job keys: what a job may know, and what only the runner knows.

The runner holds the home's master key (never shipped). For each job it derives:

- a **token**, the job's one secret. It reaches the job privately where the backend can (a file
  put into the container on Docker) and otherwise through the job's environment, where anyone
  who may describe the job can read it;
- an **output key**, with which the job signs its output envelope. The job learns it only by
  unwrapping the copy inside its payload with its token, so it takes *both* the job's
  description *and* read access to the artifact store to learn it, and it signs outputs of
  that one job only.

The payload itself is pinned by its sha256 in the job's environment: a job runs only the exact
bytes the runner wrote, whoever can write to the store. Values the runner stores for itself
(outputs of in-process steps, for resume) are signed with a key that never leaves the runner.
"""

from __future__ import annotations

import hashlib
import hmac

import attrs

TOKEN_ENV = "STEPFLOW_JOB_TOKEN"
PAYLOAD_SHA_ENV = "STEPFLOW_PAYLOAD_SHA256"
#: Path of a JSON file holding the job's secrets, when the backend delivers them as a file.
SECRETS_FILE_ENV = "STEPFLOW_SECRETS_FILE"
#: Path inside the job where its service reads a failure message (set for backends that have one).
FAILURE_FILE_ENV = "STEPFLOW_FAILURE_FILE"
#: Key of the job token and of the storage credentials in the job's secrets.
TOKEN_SECRET = "token"
STORAGE_SECRET = "storage"


def _mac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


@attrs.frozen
class JobKeys:
    """The keys of one job, derived from the runner's master key and the job's name."""

    job: str
    token: bytes = attrs.field(repr=False)
    output_key: bytes = attrs.field(repr=False)

    @classmethod
    def derive(cls, derive_key: object, job: str) -> JobKeys:
        """Keys of ``job``; ``derive_key(purpose)`` derives from the master key (deterministic)."""
        assert callable(derive_key)
        return cls(job, derive_key(f"job-token|{job}"), derive_key(f"job-output|{job}"))

    @property
    def payload_key(self) -> bytes:
        """The key the payload envelope is signed with (the job re-derives it from its token)."""
        return payload_key(self.token)

    def wrapped_output_key(self) -> str:
        """The output key, encrypted for the job (a one-time pad from its token), hex."""
        return _xor(self.output_key, _mac(self.token, f"wrap|{self.job}")).hex()


def payload_key(token: bytes) -> bytes:
    """The payload signing key of the job whose token is ``token``."""
    return _mac(token, "payload")


def unwrap_output_key(token: bytes, wrapped_hex: str, job: str) -> bytes:
    """Inside the job: the output key from the payload's wrapped copy and the job's token."""
    return _xor(bytes.fromhex(wrapped_hex), _mac(token, f"wrap|{job}"))


def stored_value_key(derive_key: object) -> bytes:
    """The key of values the runner stores for itself (outputs kept for resume)."""
    assert callable(derive_key)
    key: bytes = derive_key("stored-values")
    return key
