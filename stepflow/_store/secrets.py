"""Component secrets at rest: secret option values are stored encrypted, never in plain text.

A value is sealed with AES-GCM under ``derive(master_key(home), "component-secrets")`` (see
:mod:`stepflow._store.keys`; the master key never enters the store), a random 12-byte nonce and,
as associated data, the component's kind and name and the option's name: a ciphertext copied to
another option or component fails to decrypt instead of leaking there. The stored form is
self-describing, ``enc:v1:<base64 of nonce + ciphertext and tag>``, and holds the JSON encoding
of the value, so its type survives.

``{{env.VAR}}`` references are not secrets and are stored as typed; they are the better choice
since the value then never reaches the store at all.

``cryptography`` is imported only when a value is sealed or opened, keeping ``import stepflow``
and the commands that touch no secret fast.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepflow._config.options import is_env_ref
from stepflow._store import keys
from stepflow.errors import StepflowError, StoreError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from stepflow._store.sqlite import Store

PREFIX = "enc:v1:"
PURPOSE = "component-secrets"
NONCE_BYTES = 12
_TAG_BYTES = 16

#: ``meta`` key of the pass encrypting secrets stored in plain text by older versions:
#: ``done``, ``*`` (every component still to check) or a JSON list of ``[kind, name]`` pairs.
MIGRATION_KEY = "secrets_at_rest"
DONE = "done"
ALL = "*"


class SecretDecryptError(StepflowError):
    """A stored secret cannot be decrypted: wrong master key, or the stored text was damaged."""

    def __init__(self, option: str, reason: str) -> None:
        self.option = option
        self.reason = reason
        super().__init__(f"option '{option}': {reason}")


def is_encrypted(value: Any) -> bool:
    """Whether a stored value is a sealed secret (``enc:v1:...``)."""
    return isinstance(value, str) and value.startswith(PREFIX)


def should_encrypt(value: Any) -> bool:
    """Whether a secret option's plain value must be sealed before it is stored.

    Nothing to hide in an unset or empty value; a whole ``{{env.VAR}}`` reference is kept as
    typed. Text that merely contains a reference ("Bearer {{env.T}}") may hide a secret: sealed.
    """
    return value is not None and value != "" and not is_env_ref(value)


def _aad(kind: str, name: str, option: str) -> bytes:
    # JSON keeps the three parts unambiguous whatever characters they hold.
    return json.dumps(["stepflow-component-secret", kind, name, option]).encode()


def _aead(home: Path) -> AESGCM:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:  # a broken install: cryptography is a dependency
        raise StoreError(f"encrypting component secrets needs the 'cryptography' package ({exc}); "
                         "pip install 'cryptography>=42'") from None
    return AESGCM(keys.derive(keys.master_key(home), PURPOSE))


def encrypt(home: Path, kind: str, name: str, option: str, value: Any) -> str:
    """Seal ``value`` (any JSON value) for option ``option`` of component ``kind``/``name``."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = _aead(home).encrypt(nonce, json.dumps(value).encode(), _aad(kind, name, option))
    return PREFIX + base64.b64encode(nonce + sealed).decode("ascii")


def decrypt(home: Path, kind: str, name: str, option: str, stored: str) -> Any:
    """Open a value sealed by :func:`encrypt` for the same component and option."""
    aead = _aead(home)
    from cryptography.exceptions import InvalidTag  # importable: _aead checked the package

    try:
        raw = base64.b64decode(stored[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) < NONCE_BYTES + _TAG_BYTES:
        raise SecretDecryptError(option, "the stored value is damaged")
    try:
        plain = aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad(kind, name, option))
    except InvalidTag:
        raise SecretDecryptError(option, "wrong master key") from None
    return json.loads(plain)


def reveal(home: Path, kind: str, name: str, config: Mapping[str, Any],
           only: set[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """``config`` with its sealed values opened (all, or those in ``only``), and the options that failed."""
    out = dict(config)
    failed: list[str] = []
    for option, value in config.items():
        if (only is None or option in only) and is_encrypted(value):
            try:
                out[option] = decrypt(home, kind, name, option, value)
            except SecretDecryptError:
                failed.append(option)
    return out, failed


def seal(home: Path, kind: str, name: str, values: Mapping[str, Any], secret: set[str],
         kept: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The stored form of ``values``: secret options sealed, ``kept`` ciphertexts reused unchanged."""
    kept = kept or {}
    out: dict[str, Any] = {}
    for option, value in values.items():
        if option in kept:
            out[option] = kept[option]  # unchanged: no needless re-encryption
        elif option in secret and should_encrypt(value):
            out[option] = encrypt(home, kind, name, option, value)
        else:
            out[option] = value
    return out


# -- migration of plain-text secrets ------------------------------------------------------------
def migration_pending(state: str | None) -> bool:
    """Whether the ``meta`` state of the migration pass leaves work to do."""
    return state not in (None, DONE)


def encrypt_plaintext(store: Store, secret_options: Callable[[str, str], set[str]]) -> list[tuple[str, str]]:
    """Encrypt the secret values older versions stored in plain text; return the components left pending.

    ``secret_options(kind, flavor)`` names a flavor's secret options (it loads the flavor). A
    component whose flavor cannot be loaded (plugin missing or broken) is left untouched and
    stays pending for a later open; the others are sealed in one transaction. Idempotent, and
    safe when several processes open an old store at once: the state is re-read under the lock.
    """
    state = store.get_meta(MIGRATION_KEY)
    if not migration_pending(state):
        return []
    # Flavors are loaded and the master key fetched before the write lock is taken: plugin
    # imports and keyring calls may be slow, and other processes would queue behind them.
    rows = store.read("SELECT kind, name, flavor, config FROM components")
    wanted = _targets(state, rows)
    secret_by: dict[tuple[str, str, str], set[str]] = {}
    needs_key = False
    for row in rows:
        config = json.loads(row["config"])
        if (row["kind"], row["name"]) not in wanted or not _candidates(config):
            continue  # nothing that could be a plain-text secret: no need to load the flavor
        try:
            names = secret_options(row["kind"], row["flavor"])
        except Exception:  # one broken plugin must not stop the store: retried on a later open
            continue
        secret_by[(row["kind"], row["name"], row["flavor"])] = names
        needs_key = needs_key or bool(names & _candidates(config))
    if needs_key:
        keys.master_key(store.home)
    with store.write() as db:
        current = db.execute("SELECT value FROM meta WHERE key = ?", (MIGRATION_KEY,)).fetchone()
        if current is None or not migration_pending(current["value"]):
            return []  # another process finished it meanwhile
        first = current["value"] == ALL  # first pass over a store written by an older version
        rows = db.execute("SELECT kind, name, flavor, config FROM components").fetchall()
        wanted = _targets(current["value"], rows)
        pending: list[tuple[str, str]] = []
        sealed_any = False
        for row in rows:
            ident = (row["kind"], row["name"])
            config = json.loads(row["config"])
            candidates = _candidates(config)
            if ident not in wanted or not candidates:
                continue
            secret = secret_by.get((*ident, row["flavor"]))
            if secret is None:  # flavor not loadable (or changed meanwhile): keep for later
                pending.append(ident)
                continue
            plain = {n: config[n] for n in secret & candidates}
            if plain:
                sealed_any = True
                config.update(seal(store.home, *ident, plain, set(plain)))
                db.execute("UPDATE components SET config = ? WHERE kind = ? AND name = ?",
                           (json.dumps(config, sort_keys=True), *ident))
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                   (MIGRATION_KEY, json.dumps(sorted(pending)) if pending else DONE))
    if sealed_any or first:
        # The replaced values (and the payload keys deleted by the SQL migration) were zeroed in
        # their pages (secure_delete), but older versions may have left earlier ones in free space,
        # and the file or WAL may still hold earlier page images: rebuild the file, empty the WAL.
        store.scrub()
    return pending


def _candidates(config: Mapping[str, Any]) -> set[str]:
    """Options whose value would be a plain-text secret if the option is secret."""
    return {k for k, v in config.items() if should_encrypt(v) and not is_encrypted(v)}


def _targets(state: str | None, rows: list[Any]) -> set[tuple[str, str]]:
    if state == ALL:
        return {(r["kind"], r["name"]) for r in rows}
    try:
        return {(str(k), str(n)) for k, n in json.loads(state or "[]")}
    except (ValueError, TypeError):  # unreadable state: check everything again (idempotent)
        return {(r["kind"], r["name"]) for r in rows}
