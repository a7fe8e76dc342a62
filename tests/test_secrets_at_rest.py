"""Secret options at rest: encrypted in the store, opened at instantiate, migrated from plain text.

Real SQLite files and the real CLI in subprocesses (as a user types it); the store's bytes are
read raw to check that no secret value is written in plain text anywhere.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent
from typing import Any

import attrs
import pytest

from stepflow._config import options
from stepflow._stack.client import Client
from stepflow._store import keys
from stepflow._store.sqlite import MIGRATIONS
from stepflow.errors import ConfigError
from stepflow.interfaces import option
from tests.test_cli_stack import err, ok

PASSWORD = "S3cr3t-Value-123"
S3_SECRET = "Aws-Secret-Key-456/xyz"
PAYLOAD_KEY = "ab" * 32
FILES = ("stepflow.db", "stepflow.db-wal", "stepflow.db-shm")

PIPE = dedent(
    """
    from stepflow import pipeline, step

    @step
    def one() -> int:
        return 1

    @pipeline
    def flow():
        return one()
    """
)


@pytest.fixture
def env(cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The CLI environment, with the master key in the home's key file (never a keyring)."""
    cli_env = {**cli_env, "STEPFLOW_KEYRING": "0"}
    cli_env.pop(keys.ENV_KEY, None)
    monkeypatch.setenv("STEPFLOW_KEYRING", "0")
    monkeypatch.delenv(keys.ENV_KEY, raising=False)
    keys.forget_cached()
    yield cli_env
    keys.forget_cached()


def home_of(env: dict[str, str]) -> Path:
    return Path(env["STEPFLOW_HOME"])


def raw_store_bytes(home: Path) -> dict[str, bytes]:
    """Every file of the store as it is on disk."""
    return {name: (home / name).read_bytes() for name in FILES if (home / name).exists()}


def assert_absent(home: Path, *values: str) -> None:
    """None of ``values`` is in the store's files, before and after a checkpoint."""
    for when in ("as left", "after checkpoint"):
        found = raw_store_bytes(home)
        assert "stepflow.db" in found
        for name, data in found.items():
            for value in values:
                assert value.encode() not in data, f"{value!r} in {name} ({when})"
        if when == "as left":
            conn = sqlite3.connect(home / "stepflow.db")
            try:
                conn.execute("PRAGMA wal_checkpoint").fetchall()
            finally:
                conn.close()


def stored_config(home: Path, kind: str, name: str) -> dict[str, Any]:
    conn = sqlite3.connect(home / "stepflow.db")
    try:
        row = conn.execute("SELECT config FROM components WHERE kind = ? AND name = ?", (kind, name)).fetchone()
    finally:
        conn.close()
    assert row is not None
    return dict(json.loads(row[0]))


def register_secret_components(env: dict[str, str]) -> str:
    """A registry with a password and an s3 store with a secret key; returns the register output."""
    out = ok(["container-registry", "register", "r", "--type=default", "--uri=127.0.0.1:5000",
              "--username=u", f"--password={PASSWORD}"], env)
    out += ok(["artifact-store", "register", "s3", "--type=s3", "--path=s3://bucket/runs", "--key=AKIAEXAMPLE",
               f"--secret={S3_SECRET}"], env)
    return out


# -- new components ---------------------------------------------------------------------------
def test_secret_values_never_reach_the_store_files(env: dict[str, str]) -> None:
    home = home_of(env)
    ok(["stack", "list"], env)  # creates the store
    # An open connection keeps the WAL and shared-memory files in place while the CLI writes.
    holder = sqlite3.connect(home / "stepflow.db")
    holder.execute("SELECT count(*) FROM meta").fetchall()  # attaches to the WAL
    try:
        out = register_secret_components(env)
        assert (home / "stepflow.db-wal").exists()
        assert_absent(home, PASSWORD, S3_SECRET)
        ok(["container-registry", "update", "r", "--password=An0ther-Secret-789"], env)
        assert_absent(home, PASSWORD, S3_SECRET, "An0ther-Secret-789")
    finally:
        holder.close()
    assert PASSWORD not in out and S3_SECRET not in out
    # The output recommends environment references over stored secrets.
    assert "stored encrypted" in out and "--password='{{env.VAR}}'" in out

    reg = stored_config(home, "container_registry", "r")
    assert reg["password"].startswith("enc:v1:") and reg["username"] == "u"
    s3 = stored_config(home, "artifact_store", "s3")
    assert s3["secret"].startswith("enc:v1:") and s3["key"] == "AKIAEXAMPLE"  # only secrets are sealed
    key_file = home / keys.KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text().strip() not in b"".join(raw_store_bytes(home).values()).decode("latin-1")


async def test_instantiate_gives_the_decrypted_values(env: dict[str, str]) -> None:
    register_secret_components(env)
    client = Client()
    reg = client.instantiate("container_registry", "r")
    assert await reg.credentials() == ("u", PASSWORD)
    store = client.instantiate("artifact_store", "s3")
    assert store.storage_options()["secret"] == S3_SECRET and store.storage_options()["key"] == "AKIAEXAMPLE"


def test_describe_says_how_each_secret_is_kept(env: dict[str, str]) -> None:
    home = home_of(env)
    register_secret_components(env)
    ok(["container-registry", "register", "ref", "--type=default", "--uri=r:5000",
        "--password={{env.REG_TOKEN}}"], env)
    key_file = home / keys.KEY_FILE

    described = ok(["container-registry", "describe", "r"], env)
    assert PASSWORD not in described
    assert "password  ********" in described and "username  u" in described
    assert "  secrets\n" in described
    assert f"password  encrypted (key: {key_file})" in described
    s3 = ok(["artifact-store", "describe", "s3"], env)
    assert "secret        ********" in s3 and f"secret  encrypted (key: {key_file})" in s3
    assert S3_SECRET not in s3
    ref = ok(["container-registry", "describe", "ref"], env)
    assert "password  {{env.REG_TOKEN}}" in ref
    assert "password  environment reference {{env.REG_TOKEN}}" in ref
    assert S3_SECRET not in ok(["stack", "register", "st", "-a", "s3", "-c", "r"], env)
    assert "password = ********" in ok(["stack", "describe", "st"], env)

    info = Client().describe_component("container_registry", "r")
    assert info["config"]["password"] == options.REDACTED
    assert info["secrets"] == {"password": f"encrypted (key: {key_file})"}
    assert Client().describe_component("container_registry", "ref")["secrets"] == {
        "password": "environment reference {{env.REG_TOKEN}}"}


async def test_update_keeps_sealed_values_and_seals_new_ones(env: dict[str, str]) -> None:
    home = home_of(env)
    register_secret_components(env)
    before = stored_config(home, "container_registry", "r")["password"]
    ok(["container-registry", "update", "r", "--username=v"], env)
    after = stored_config(home, "container_registry", "r")
    assert after["password"] == before and after["username"] == "v"  # kept as it was, not re-encrypted

    out = ok(["container-registry", "update", "r", "--password=N3w-Secret-000"], env)
    assert "N3w-Secret-000" not in out
    sealed = stored_config(home, "container_registry", "r")["password"]
    assert sealed.startswith("enc:v1:") and sealed != before
    reg = Client().instantiate("container_registry", "r")
    assert await reg.credentials() == ("v", "N3w-Secret-000")  # opened once gives the value: sealed once

    ok(["container-registry", "update", "r", "--password={{env.REG_TOKEN}}"], env)
    assert stored_config(home, "container_registry", "r")["password"] == "{{env.REG_TOKEN}}"
    assert_absent(home, PASSWORD, "N3w-Secret-000")


def test_a_ciphertext_only_opens_for_its_own_option(env: dict[str, str]) -> None:
    home = home_of(env)
    register_secret_components(env)
    ok(["container-registry", "register", "other", "--type=default", "--uri=r:5000", "--password=x"], env)
    moved = stored_config(home, "container_registry", "r")["password"]
    conn = sqlite3.connect(home / "stepflow.db")
    with conn:
        conn.execute("UPDATE components SET config = ? WHERE name = 'other'",
                     (json.dumps({"uri": "r:5000", "password": moved}),))
    conn.close()
    with pytest.raises(ConfigError, match=r"container-registry 'other' .*cannot decrypt secret option 'password'"):
        Client().instantiate("container_registry", "other")


def test_import_does_not_load_cryptography(env: dict[str, str]) -> None:
    register_secret_components(env)
    code = ("import sys, stepflow\n"
            "from stepflow._stack.client import Client\n"
            "c = Client()\n"
            "c.list_components()\n"
            "c.describe_component('container-registry', 'r')\n"
            "print('cryptography' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# -- a lost or replaced master key ----------------------------------------------------------
async def test_a_replaced_master_key_gives_a_clear_error(env: dict[str, str], tmp_path: Path) -> None:
    home = home_of(env)
    register_secret_components(env)
    ok(["stack", "register", "st", "-a", "s3", "-c", "r"], env)
    key_file = home / keys.KEY_FILE
    key_file.write_text(secrets.token_hex(32) + "\n")
    keys.forget_cached()

    with pytest.raises(ConfigError) as caught:
        Client().instantiate("container_registry", "r")
    message = str(caught.value)
    assert "container-registry 'r' (flavor default): cannot decrypt secret option 'password'" in message
    assert f"the master key at {key_file} does not match" in message
    assert "`stepflow container-registry update r --password=...`" in message
    assert PASSWORD not in message

    (tmp_path / "onestep.py").write_text(PIPE)
    out = subprocess.run([sys.executable, "-m", "stepflow", "run", "onestep:flow", "--stack", "st"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "artifact-store 's3' (flavor s3): cannot decrypt secret option 'secret'" in out.stderr
    assert f"the master key at {key_file} does not match" in out.stderr
    assert "stepflow artifact-store update s3 --secret=..." in out.stderr

    # describe needs no key; an update that keeps the unreadable secret asks for it again.
    assert "password  ********" in ok(["container-registry", "describe", "r"], env)
    stderr = err(["container-registry", "update", "r", "--username=w"], env)
    assert "cannot decrypt secret option 'password'" in stderr and "give it again in this update" in stderr
    # The fix the message gives works.
    ok(["container-registry", "update", "r", "--password=Re-Set-111"], env)
    keys.forget_cached()
    reg = Client().instantiate("container_registry", "r")
    assert await reg.credentials() == ("u", "Re-Set-111")


# -- {{env.X}} references ---------------------------------------------------------------------
def test_env_references_are_stored_as_is_and_resolved_before_validation(
        env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    home = home_of(env)
    ok(["artifact-store", "register", "s3ref", "--type=s3", "--path={{env.ART_PATH}}",
        "--secret={{env.S3_SECRET}}"], env)
    stored = stored_config(home, "artifact_store", "s3ref")
    assert stored == {"path": "{{env.ART_PATH}}", "secret": "{{env.S3_SECRET}}"}
    described = ok(["artifact-store", "describe", "s3ref"], env)
    assert "path          {{env.ART_PATH}}" in described
    assert "secret  environment reference {{env.S3_SECRET}}" in described

    client = Client()
    with pytest.raises(ConfigError, match=r"refers to \{\{env.ART_PATH\}\}, but it is not set"):
        client.instantiate("artifact_store", "s3ref")
    monkeypatch.setenv("S3_SECRET", S3_SECRET)
    # The resolved path is what the config class's validator checks.
    monkeypatch.setenv("ART_PATH", "http://not-a-bucket/x")
    with pytest.raises(ConfigError, match=r"artifact-store 's3ref' \(flavor s3\): s3 artifact store path must "
                                          r"start with s3://, got 'http://not-a-bucket/x'"):
        client.instantiate("artifact_store", "s3ref")
    monkeypatch.setenv("ART_PATH", "s3://bucket/from-env")
    store = client.instantiate("artifact_store", "s3ref")
    assert store.root == "s3://bucket/from-env" and store.storage_options()["secret"] == S3_SECRET
    assert_absent(home, S3_SECRET)


@attrs.frozen
class _RecordingSinkConfig:
    """A jsonl sink config whose path validator records every value it is shown."""

    path: str = option(doc="File to append events to.")

    @path.validator
    def _record(self, attribute: Any, value: str) -> None:
        _seen.append(value)
        if "{{" not in value and not value.endswith(".jsonl"):
            raise ValueError(f"path must end in .jsonl, got {value!r}")


_seen: list[str] = []


def test_validators_see_only_resolved_values_at_instantiate(env: dict[str, str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from stepflow._flavors.builtin import JsonlSinkFlavor

    monkeypatch.setattr(JsonlSinkFlavor, "config_class", _RecordingSinkConfig)
    client = Client()
    client.register_component("event_sink", "ev", "jsonl", {"path": "{{env.EV_PATH}}"})
    _seen.clear()
    monkeypatch.setenv("EV_PATH", str(tmp_path / "events.jsonl"))
    sink = client.instantiate("event_sink", "ev")
    assert _seen == [str(tmp_path / "events.jsonl")]  # never the reference itself
    assert sink.name == "ev"
    monkeypatch.setenv("EV_PATH", str(tmp_path / "events.txt"))
    with pytest.raises(ConfigError, match=r"event-sink 'ev' .*path must end in \.jsonl"):
        client.instantiate("event_sink", "ev")


# -- stores written by older versions -------------------------------------------------------------
def make_old_store(home: Path, components: list[tuple[str, str, str, dict[str, Any]]]) -> None:
    """A store as the previous version left it: schema 2, secrets in plain text, a payload key row."""
    home.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(home / "stepflow.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    for script in MIGRATIONS[:2]:
        for statement in filter(None, (s.strip() for s in script.split(";"))):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    now = 1700000000.0
    rows = [("artifact_store", "default", "local", {}), ("step_operator", "local", "local", {}), *components]
    for kind, name, flavor, config in rows:
        conn.execute("INSERT INTO components VALUES (?, ?, ?, ?, ?, ?)",
                     (kind, name, flavor, json.dumps(config, sort_keys=True), now, now))
    conn.execute("INSERT INTO stacks VALUES ('default', ?, ?)", (now, now))
    conn.execute("INSERT INTO stack_members VALUES ('default', 'artifact_store', 'default', 0)")
    conn.execute("INSERT INTO stack_members VALUES ('default', 'step_operator', 'local', 1)")
    conn.execute("INSERT INTO meta VALUES ('active_stack', 'default')")
    conn.execute("INSERT INTO meta VALUES ('bootstrapped', '1')")
    conn.execute("INSERT INTO secrets VALUES ('payload-key:default', ?)", (PAYLOAD_KEY,))
    conn.execute("INSERT INTO secrets VALUES ('other-secret', 'kept')")
    conn.execute("COMMIT")
    conn.close()
    assert PASSWORD.encode() in (home / "stepflow.db").read_bytes()  # the starting point: plain text


def meta(home: Path, key: str) -> str | None:
    conn = sqlite3.connect(home / "stepflow.db")
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    finally:
        conn.close()
    return None if row is None else str(row[0])


async def test_an_old_store_is_migrated_on_first_open(env: dict[str, str]) -> None:
    home = home_of(env)
    make_old_store(home, [
        ("container_registry", "r", "default", {"uri": "127.0.0.1:5000", "username": "u", "password": PASSWORD}),
        ("container_registry", "ref", "default", {"uri": "r:5000", "password": "{{env.REG_TOKEN}}"}),
        ("artifact_store", "s3", "s3", {"path": "s3://bucket/runs", "secret": S3_SECRET}),
    ])
    listing = ok(["container-registry", "list"], env)
    assert " r " in listing and " ref " in listing

    assert_absent(home, PASSWORD, S3_SECRET, PAYLOAD_KEY)
    conn = sqlite3.connect(home / "stepflow.db")
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert [r[0] for r in conn.execute("SELECT name FROM secrets")] == ["other-secret"]
    finally:
        conn.close()
    assert meta(home, "secrets_at_rest") == "done"
    assert stored_config(home, "container_registry", "r")["password"].startswith("enc:v1:")
    assert stored_config(home, "artifact_store", "s3")["secret"].startswith("enc:v1:")
    assert stored_config(home, "container_registry", "ref")["password"] == "{{env.REG_TOKEN}}"
    assert "password  encrypted (key: " in ok(["container-registry", "describe", "r"], env)

    reg = Client().instantiate("container_registry", "r")
    assert await reg.credentials() == ("u", PASSWORD)
    assert Client().instantiate("artifact_store", "s3").storage_options()["secret"] == S3_SECRET

    # Idempotent: later opens change nothing.
    before = stored_config(home, "container_registry", "r")
    ok(["stack", "list"], env)
    assert stored_config(home, "container_registry", "r") == before


GHOST_EP = """\
[stepflow.container_registries]
ghost = ghost_flavor_mod:GhostFlavor
"""

GHOST_MODULE = dedent(
    """
    import attrs
    from stepflow.interfaces import option
    from stepflow.interfaces.flavor import Flavor


    @attrs.frozen
    class GhostConfig:
        uri: str = option(doc="Registry.")
        token: str | None = option(None, doc="Token.", secret=True)


    class GhostFlavor(Flavor):
        kind = "container_registry"
        name = "ghost"
        description = "A registry from a plugin."
        config_class = GhostConfig
        implementation = "stepflow._components.registry:DefaultContainerRegistry"
    """
)


def test_a_flavor_that_cannot_load_is_migrated_on_a_later_open(env: dict[str, str], tmp_path: Path) -> None:
    home = home_of(env)
    dist = tmp_path / "stepflow_ghost-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: stepflow-ghost\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(GHOST_EP)
    (tmp_path / "ghost_flavor_mod.py").write_text("import a_module_that_is_not_installed\n")
    make_old_store(home, [
        ("container_registry", "r", "default", {"uri": "127.0.0.1:5000", "password": PASSWORD}),
        ("container_registry", "g", "ghost", {"uri": "g:5000", "token": "Ghost-Token-789"}),
    ])

    # The broken plugin neither stops the store nor the other component's migration.
    assert " g " in ok(["container-registry", "list"], env)
    assert stored_config(home, "container_registry", "r")["password"].startswith("enc:v1:")
    assert stored_config(home, "container_registry", "g") == {"uri": "g:5000", "token": "Ghost-Token-789"}
    assert json.loads(meta(home, "secrets_at_rest") or "") == [["container_registry", "g"]]
    assert "flavor failed to load" in ok(["container-registry", "describe", "g"], env)
    assert_absent(home, PASSWORD, PAYLOAD_KEY)

    (tmp_path / "ghost_flavor_mod.py").write_text(GHOST_MODULE)
    ok(["stack", "list"], env)
    assert stored_config(home, "container_registry", "g")["token"].startswith("enc:v1:")
    assert meta(home, "secrets_at_rest") == "done"
    assert_absent(home, PASSWORD, PAYLOAD_KEY, "Ghost-Token-789")
    described = ok(["container-registry", "describe", "g"], env)
    assert "token  ********" in described and "token  encrypted (key: " in described
