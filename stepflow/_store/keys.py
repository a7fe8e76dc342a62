"""The home's master key: kept outside the store file, never shipped, never in a job.

One random 32-byte key per ``$STEPFLOW_HOME``. Every other key is derived from it for one
purpose (``derive(master, "secrets")``, ``derive(master, "job-token|<job>")`` ...), so a key
that leaks serves that purpose only.

Where it lives, first match wins:

1. ``$STEPFLOW_MASTER_KEY`` (64 hex digits), for machines that inject secrets as environment;
2. the OS keyring through ``keyring``, when it is installed, a real backend is available and
   ``STEPFLOW_KEYRING`` is not ``0`` (service ``stepflow``, user = the home's absolute path);
3. ``$STEPFLOW_HOME/stepflow.key``, created with mode 0600 beside the store, never inside it.

The store file (``stepflow.db``) holds no key: copying it alone reveals no secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path

from stepflow.errors import StoreError

KEY_FILE = "stepflow.key"
ENV_KEY = "STEPFLOW_MASTER_KEY"
KEYRING_SERVICE = "stepflow"

_cache: dict[str, tuple[bytes, str]] = {}
_lock = threading.Lock()


def derive(master: bytes, purpose: str) -> bytes:
    """A 32-byte key for one ``purpose`` (HMAC-SHA256 of the purpose under the master key)."""
    return hmac.new(master, b"stepflow-key|" + purpose.encode(), hashlib.sha256).digest()


def master_key(home: Path) -> bytes:
    """The master key of ``home`` (created on first use)."""
    return _load(home)[0]


def key_location(home: Path) -> str:
    """Where the master key of ``home`` is kept, for ``describe`` and docs ("keyring", a path, ...)."""
    return _load(home)[1]


def _load(home: Path) -> tuple[bytes, str]:
    home = Path(home).expanduser().absolute()
    cache_key = str(home)
    with _lock:
        hit = _cache.get(cache_key)
        if hit is not None:
            return hit
        found = _from_env() or _from_keyring(home) or _from_file(home)
        _cache[cache_key] = found
        return found


def _from_env() -> tuple[bytes, str] | None:
    raw = os.environ.get(ENV_KEY)
    if not raw:
        return None
    try:
        key = bytes.fromhex(raw.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise StoreError(f"{ENV_KEY} must be 64 hexadecimal digits (32 bytes); generate one with "
                         "`python -c 'import secrets; print(secrets.token_hex(32))'`")
    return key, f"environment variable {ENV_KEY}"


def _from_keyring(home: Path) -> tuple[bytes, str] | None:
    if os.environ.get("STEPFLOW_KEYRING", "1") == "0":
        return None
    try:
        import keyring
        from keyring.backends import fail
    except Exception:  # not installed, or broken: the key file serves
        return None
    try:
        backend = keyring.get_keyring()
        if isinstance(backend, fail.Keyring) or getattr(backend, "priority", 0) <= 0:
            return None  # no usable OS keyring (headless Linux, CI)
        stored = keyring.get_password(KEYRING_SERVICE, str(home))
        if stored is None:
            stored = secrets.token_hex(32)
            keyring.set_password(KEYRING_SERVICE, str(home), stored)
        return bytes.fromhex(stored), f"OS keyring ({type(backend).__name__}, service '{KEYRING_SERVICE}')"
    except Exception:
        return None


def _from_file(home: Path) -> tuple[bytes, str]:
    path = home / KEY_FILE
    try:
        home.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _create_key_file(path)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, 0o600)  # someone loosened it: only the owner may read the key
        text = _read_key_text(path)
    except OSError as exc:
        raise StoreError(f"cannot read or create the master key {path}: {exc}. Set STEPFLOW_HOME to a "
                         f"writable directory or provide {ENV_KEY}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise StoreError(f"the master key file {path} is damaged (expected 64 hexadecimal digits). Restore it "
                         "from a backup; without it, encrypted component secrets cannot be read (register them "
                         "again after moving the file aside)")
    return key, str(path)


def _create_key_file(path: Path) -> None:
    """Create ``path`` holding a new key, atomically: concurrent first uses all end up with one key.

    The key is written and synced under a temporary name, then hard-linked into place, so no
    process can ever read a half-written file; the first link wins and the others read its key.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # losing the key means losing every encrypted secret
        try:
            os.link(tmp, path)
        except FileExistsError:
            return  # another process created it first: use theirs
        except OSError:  # no hard links on this file system: exclusive create instead
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return
            with os.fdopen(out, "w") as fh:
                fh.write(tmp.read_text())
                fh.flush()
                os.fsync(fh.fileno())
        _sync_dir(path.parent)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _read_key_text(path: Path) -> str:
    # Only the exclusive-create fallback can expose a file still being written: wait a moment.
    text = path.read_text().strip()
    for _ in range(50):
        if text:
            break
        time.sleep(0.01)
        text = path.read_text().strip()
    return text


def _sync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the file itself is synced
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def forget_cached() -> None:
    """Drop cached keys (tests that delete or replace a home)."""
    with _lock:
        _cache.clear()
