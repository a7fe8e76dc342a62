"""Component, stack and flavor commands, exercised as a user types them (real subprocesses)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from textwrap import dedent

import pytest

from stepflow import read_jsonl
from stepflow._stack.client import Client
from stepflow.events import RunFinished, RunStarted, StepSucceeded

PIPE = dedent(
    '''
    from stepflow import pipeline, step

    @step(step_operator="trainer")
    def train() -> int:
        return 41

    @step
    def report(x: int) -> int:
        return x + 1

    @pipeline
    def flow():
        return report(train())
    '''
)


def sf(args: list[str], env: dict[str, str], cwd: Path | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stepflow", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(args: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    out = sf(args, env, cwd)
    assert out.returncode == 0, f"{args}: {out.stdout}{out.stderr}"
    return out.stdout + out.stderr


def err(args: list[str], env: dict[str, str]) -> str:
    """Run a command that must fail with exit 2 and a one-line-style error, no traceback."""
    out = sf(args, env)
    assert out.returncode == 2, f"{args}: {out.stdout}{out.stderr}"
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") or out.stderr.startswith("Usage: "), out.stderr
    return out.stderr


def test_seed_flow_end_to_end(tmp_path: Path, cli_env: dict[str, str]) -> None:
    (tmp_path / "tinypipe.py").write_text(PIPE)
    events = tmp_path / "sink" / "events.jsonl"
    ok(["step-operator", "register", "trainer", "--type=local", "--max_threads=4"], cli_env)
    ok(["container-registry", "register", "reg", "--type=default", "--uri=127.0.0.1:5000"], cli_env)
    ok(["artifact-store", "register", "store", "--type=local", f"--path={tmp_path / 'art'}"], cli_env)
    assert "registered event-sink 'ev' (flavor jsonl)" in ok(
        ["event-sink", "register", "ev", "--type=jsonl", f"--path={events}"], cli_env)

    out = sf(["stack", "register", "sm_stack", "-m", "local_metadata_store", "-o", "local_orchestrator",
              "-c", "reg", "-a", "store", "-s", "trainer", "-e", "ev"], cli_env)
    assert out.returncode == 0, out.stderr
    assert "registered stack 'sm_stack'" in out.stdout
    assert "orchestrator is built in" in out.stderr and "local_orchestrator is ignored" in out.stderr
    assert "local_metadata_store is ignored" in out.stderr
    assert "stack 'sm_stack' is now active" in ok(["stack", "set", "sm_stack"], cli_env)

    listing = ok(["stack", "list"], cli_env)
    row = next(line for line in listing.splitlines() if "sm_stack" in line)
    assert "*" in row and all(name in row for name in ("store", "reg", "trainer", "ev"))
    assert "*" not in next(line for line in listing.splitlines() if " default " in line)

    current = ok(["stack", "current"], cli_env).splitlines()
    assert current[0] == "sm_stack"
    assert any("container-registry" in line and "reg" in line for line in current)

    described = ok(["stack", "describe"], cli_env)
    for text in ("stack sm_stack (active)", "trainer (flavor local)", "max_threads = 4",
                 "reg (flavor default)", "uri = 127.0.0.1:5000", f"path = {events}"):
        assert text in described
    assert "sm_stack" in ok(["step-operator", "list"], cli_env)

    assert "\x1b[" not in listing + described  # no colour codes when not a terminal
    run = ok(["run", "tinypipe:flow"], cli_env, cwd=tmp_path)
    assert "on stack sm_stack" in run and "succeeded" in run
    evs = read_jsonl(events)
    assert isinstance(evs[0], RunStarted) and evs[0].stack == "sm_stack"
    assert {e.step for e in evs if isinstance(e, StepSucceeded)} == {"train", "report"}
    assert isinstance(evs[-1], RunFinished) and evs[-1].status == "succeeded"


def test_help_on_every_group_and_command(cli_env: dict[str, str]) -> None:
    top = ok(["--help"], cli_env)
    groups = {"step-operator": ["register", "list", "describe", "update", "delete"],
              "artifact-store": ["register"], "container-registry": ["register"],
              "image-builder": ["register"], "event-sink": ["register", "update"],
              "stack": ["register", "set", "list", "describe", "update", "delete", "current"],
              "flavor": ["list"]}
    for group, commands in groups.items():
        assert group in top
        assert "Example" in ok([group, "--help"], cli_env)
        for command in commands:
            text = ok([group, command, "--help"], cli_env)
            assert "Example" in text and f"stepflow {group} {command}" in text
    register = ok(["step-operator", "register", "--help"], cli_env)
    assert "--instance-type x" in register and "--type" in register and "{{env.VAR}}" in register
    for flag in ("--artifact-store", "--container-registry", "--step-operator", "--image-builder",
                 "--event-sink", "--orchestrator", "--metadata-store"):
        assert flag in ok(["stack", "register", "--help"], cli_env)


@pytest.mark.parametrize("args", [
    ["--type=local", "--max_threads=3"],
    ["--type", "local", "--max-threads=3"],
    ["-t", "local", "--max-threads", "3"],
    ["--max-threads", "3", "--type=local"],
])
def test_option_spellings(cli_env: dict[str, str], args: list[str]) -> None:
    ok(["step-operator", "register", "op", *args], cli_env)
    described = ok(["step-operator", "describe", "op"], cli_env)
    assert "max_threads      3" in described and "max_concurrency  -  (default)" in described


def test_name_after_options_and_bare_flags(cli_env: dict[str, str]) -> None:
    ok(["step-operator", "register", "--max_threads=5", "late", "--type=local"], cli_env)
    assert "max_threads      5" in ok(["step-operator", "describe", "late"], cli_env)
    # A bare option means true; update keeps the options not given.
    ok(["event-sink", "register", "con", "--type=console", "--show-logs=false"], cli_env)
    assert "show_logs  false" in ok(["event-sink", "describe", "con"], cli_env)
    assert "updated event-sink 'con': show_logs" in ok(["event-sink", "update", "con", "--show_logs"], cli_env)
    assert "show_logs  true" in ok(["event-sink", "describe", "con"], cli_env)


def test_update_component(cli_env: dict[str, str]) -> None:
    ok(["step-operator", "register", "op", "--type=local", "--max_concurrency=2"], cli_env)
    ok(["step-operator", "update", "op", "--max-threads", "9"], cli_env)
    described = ok(["step-operator", "describe", "op"], cli_env)
    assert "max_threads      9" in described and "max_concurrency  2" in described
    assert "expects int" in err(["step-operator", "update", "op", "--max_threads=lots"], cli_env)
    assert "max_threads      9" in ok(["step-operator", "describe", "op"], cli_env)


def test_secrets_never_printed_and_env_refs_kept(cli_env: dict[str, str]) -> None:
    outputs = [
        ok(["container-registry", "register", "reg", "--type=default", "--uri=127.0.0.1:5000",
            "--username=bob", "--password=hunter2"], cli_env),
        ok(["container-registry", "list"], cli_env),
        ok(["container-registry", "describe", "reg"], cli_env),
        ok(["stack", "register", "s", "-a", "default", "-c", "reg"], cli_env),
        ok(["stack", "list"], cli_env),
        ok(["stack", "describe", "s"], cli_env),
        ok(["container-registry", "update", "reg", "--password=hunter2"], cli_env),
        ok(["flavor", "list", "container-registry"], cli_env),
        err(["container-registry", "register", "reg2", "--type=default", "--password=hunter2"], cli_env),
        err(["container-registry", "register", "reg", "--type=default", "--uri=x", "--password=hunter2"],
            cli_env),
    ]
    assert all("hunter2" not in text for text in outputs), outputs
    assert "password  ********" in outputs[2] and "username  bob" in outputs[2]
    assert "password = ********" in outputs[5]

    ok(["container-registry", "register", "reg3", "--type=default", "--uri=r:5000",
        "--password={{env.REG_TOKEN}}"], cli_env)
    assert "password  {{env.REG_TOKEN}}" in ok(["container-registry", "describe", "reg3"], cli_env)


def test_delete_refused_while_used_then_allowed(cli_env: dict[str, str]) -> None:
    for name in ("a", "b"):
        ok(["step-operator", "register", name, "--type=local"], cli_env)
    ok(["container-registry", "register", "reg", "--type=default", "--uri=r:5000"], cli_env)
    ok(["stack", "register", "s", "--artifact-store", "default", "--step-operator", "a",
        "--step-operator", "b", "--container-registry", "reg"], cli_env)

    assert "step-operator 'a' is used by stack 's'" in err(["step-operator", "delete", "a"], cli_env)
    assert "container-registry 'reg' is used by stack 's'" in err(["container-registry", "delete", "reg"], cli_env)
    ok(["stack", "update", "s", "-s", "b", "-c", ""], cli_env)
    assert "deleted step-operator 'a'" in ok(["step-operator", "delete", "a"], cli_env)
    ok(["container-registry", "delete", "reg"], cli_env)
    assert "step-operator 'b' is used by stack 's'" in err(["step-operator", "delete", "b"], cli_env)
    assert "deleted stack 's'" in ok(["stack", "delete", "s"], cli_env)
    ok(["step-operator", "delete", "b"], cli_env)
    listing = ok(["step-operator", "list"], cli_env)
    assert " a " not in listing and " b " not in listing and "local" in listing


def _with_stack(active: bool) -> Callable[[], None]:
    def setup() -> None:
        client = Client()
        client.register_component("step_operator", "op1", "local")
        client.register_stack("s", artifact_store="default", step_operators=["op1"])
        if active:
            client.set_active_stack("s")
        client.store.close()

    return setup


def _with_op() -> None:
    client = Client()
    client.register_component("step_operator", "op1", "local")
    client.store.close()


@pytest.mark.parametrize(
    ("setup", "args", "messages"),
    [
        (None, ["step-operator", "register", "x", "--type=nonexistent"],
         ["unknown step-operator flavor 'nonexistent'; available: ", "local", "stepflow flavor list step-operator"]),
        (None, ["container-registry", "register", "x", "--type=local"],
         ["unknown container-registry flavor 'local'; available: ", "default"]),
        (None, ["step-operator", "register", "x"], ["--type FLAVOR is required", "available: ", "local"]),
        (None, ["step-operator", "register", "x", "--type=local", "--instance_type=ml.m5.large"],
         ["unknown option 'instance_type'", "Valid options: --max_threads (int), --max_concurrency"]),
        (None, ["container-registry", "register", "r", "--type=default"], ["missing required option 'uri'"]),
        (None, ["step-operator", "register", "x", "--type=local", "--max_thread=4"],
         ["unknown option 'max_thread' (did you mean --max_threads?)"]),
        (None, ["step-operator", "register", "x", "--type=local", "--max_threads=abc"],
         ["option 'max_threads' expects int, got 'abc' (expected an integer)"]),
        (None, ["step-operator", "register", "bad/name", "--type=local"], ["invalid step-operator name 'bad/name'"]),
        (None, ["step-operator", "register", "x", "y", "--type=local"], ["unexpected argument(s) 'y'"]),
        (_with_op, ["step-operator", "register", "op1", "--type=local"],
         ["a step-operator named 'op1' already exists", "stepflow step-operator update op1"]),
        (_with_stack(False), ["step-operator", "delete", "op1"],
         ["step-operator 'op1' is used by stack 's'", "stepflow stack update"]),
        (None, ["step-operator", "describe", "nope"], ["no step-operator named 'nope'; registered: local"]),
        (None, ["step-operator", "update", "local"], ["nothing to update"]),
        (_with_stack(False), ["stack", "set", "nope"], ["no stack named 'nope'; registered stacks: default, s"]),
        (None, ["stack", "register", "s2", "-a", "default", "-s", "ghost", "-e", "gone"],
         ["stack 's2' is invalid", "no step-operator named 'ghost'; registered: local",
          "no event-sink named 'gone'; registered: none"]),
        (None, ["stack", "register", "s2", "-s", "local"], ["a stack needs an artifact store (-a NAME)"]),
        (_with_stack(False), ["stack", "register", "s", "-a", "default"], ["a stack named 's' already exists"]),
        (_with_stack(False), ["stack", "update", "s", "-c", "ghost"], ["no container-registry named 'ghost'"]),
        (None, ["stack", "delete", "default"], ["the default stack cannot be deleted"]),
        (_with_stack(True), ["stack", "delete", "s"], ["stack 's' is active; `stepflow stack set default` first"]),
        (None, ["stack", "describe", "nope"], ["no stack named 'nope'; registered stacks: default"]),
        (None, ["flavor", "list", "widget"], ["unknown component kind 'widget'; kinds: step-operator"]),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(cli_env: dict[str, str], setup: Callable[[], None] | None,
                                                args: list[str], messages: list[str]) -> None:
    if setup is not None:
        setup()
    stderr = err(args, cli_env)
    for message in messages:
        assert message in stderr
    # One short answer: the valid options are listed only for an unknown option with no close match.
    assert ("Valid options:" in stderr) == any(m.startswith("unknown option") and "did you mean" not in m
                                               for m in messages)


def test_corrupt_store(cli_env: dict[str, str]) -> None:
    db = Path(cli_env["STEPFLOW_HOME"]) / "stepflow.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not sqlite \x00\xff" * 300)
    for args in (["stack", "list"], ["step-operator", "register", "x", "--type=local"]):
        stderr = err(args, cli_env)
        assert f"the stepflow store {db} is corrupt" in stderr
        assert f"mv {db} {db}.bak" in stderr and "STEPFLOW_HOME" in stderr
    assert "local" in ok(["flavor", "list", "step-operator"], cli_env)  # needs no store


def test_locked_store(cli_env: dict[str, str]) -> None:
    ok(["stack", "list"], cli_env)  # creates the store
    db = Path(cli_env["STEPFLOW_HOME"]) / "stepflow.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "c.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(8)\n", str(db)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        env = {**cli_env, "STEPFLOW_STORE_TIMEOUT": "1"}
        t0 = time.monotonic()
        stderr = err(["step-operator", "register", "x", "--type=local"], env)
        assert time.monotonic() - t0 < 6
        assert f"the stepflow store {db} stayed locked" in stderr and "more than 1 s" in stderr
        # Reads do not wait for writers (WAL): listing still works while the lock is held.
        assert "default" in ok(["stack", "list"], env)
    finally:
        holder.kill()
        holder.wait()
    ok(["step-operator", "register", "x", "--type=local"], cli_env)


def test_concurrent_registrations(cli_env: dict[str, str]) -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "stepflow", "step-operator", "register", f"op{i}",
                               "--type=local"], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(8)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    listing = ok(["step-operator", "list"], cli_env)
    assert all(f" op{i} " in listing for i in range(8)), listing


BROKEN_PLUGIN_EP = """\
[stepflow.step_operators]
broken = broken_flavor_mod:BrokenFlavor
"""


def test_flavor_list(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = ok(["flavor", "list"], cli_env)
    for kind in ("step-operator", "artifact-store", "container-registry", "image-builder", "event-sink"):
        assert kind in out
    for text in ("local (from stepflow)", "max_threads", "128", "Most sync steps", "default (from stepflow)",
                 "jsonl (from stepflow)", "console (from stepflow)"):
        assert text in out
    registry = out[out.index("default (from stepflow)"):].splitlines()
    assert "yes" in next(line for line in registry if " password " in line)  # secret
    assert "yes" in next(line for line in registry if " uri " in line)  # required
    only = ok(["flavor", "list", "event-sink"], cli_env)
    assert "jsonl" in only and "max_threads" not in only

    # A plugin that fails to import is reported with its distribution; the rest is still listed.
    dist = tmp_path / "stepflow_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: stepflow-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(BROKEN_PLUGIN_EP)
    (tmp_path / "broken_flavor_mod.py").write_text("import boto3_that_is_not_installed\n")
    out = ok(["flavor", "list", "step-operator"], cli_env)
    assert "broken (from stepflow-broken) failed to load" in out
    assert "boto3_that_is_not_installed" in out and "local (from stepflow)" in out
    stderr = err(["step-operator", "register", "x", "--type=broken"], cli_env)
    assert "'stepflow-broken'" in stderr and "boto3_that_is_not_installed" in stderr
