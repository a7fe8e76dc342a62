"""The remote path tried as an attacker would: what a job exposes, what the store holds, what an image ships.

- Everything `docker inspect` shows of a running step's container, and everything SageMaker's
  DescribeTrainingJob shows, does not let anyone forge a payload a job runs or an output the
  runner accepts; forged ones are refused and nothing of them is unpickled (marker files).
- A step output changed in the run store or the artifact store is refused on resume.
- A project holding the stepflow home, a git-ignored .env and .git ships none of them: read
  back from the image's layers in the registry.
- A secret given to components appears in none of: the store files, the image, the job's
  description, the events file.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import tarfile
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stepflow import _envelope as envelope
from stepflow import run
from stepflow._stack.client import Client
from stepflow._store import keys
from stepflow.errors import PayloadError
from stepflow.events import LogLine
from stepflow.remote import _keys as job_keys
from tests.docker_env import (
    REGISTRY,
    cli_environ,
    docker_test,
    register_docker_stack,
    remove_local_images,
    run_with_events,
    stepflow_cli,
    write_project,
)
from tests.services import AWS_TEST_REGION, aws_env, moto_server

__all__ = ["moto_server"]

PIPES = textwrap.dedent(
    '''
    import os
    import time

    from stepflow import pipeline, step


    @step(step_operator="docker")
    def train(seconds: float = 1.0) -> dict:
        time.sleep(seconds)
        return {"score": 1.0, "uid": os.getuid()}


    @pipeline
    def one(seconds: float = 1.0):
        return train(seconds)
    '''
)


class Boom:
    """Unpickling this creates the marker file: proof that a forged envelope's body ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def real_derive() -> Any:
    home = Path(os.environ["STEPFLOW_HOME"])
    return lambda purpose: keys.derive(keys.master_key(home), purpose)


def candidate_keys(exposed: str) -> list[bytes]:
    """Every key an attacker could make of what a job exposes: each value, hex-decoded, and derived."""
    out: list[bytes] = []
    for value in {v for v in _strings(json.loads(exposed))}:
        out.append(value.encode())
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            continue
        out += [raw, job_keys.payload_key(raw)]
        if len(raw) == 32:  # as if it were a token: the keys a token unlocks alone
            out.append(job_keys.unwrap_output_key(raw, "00" * 32, "x"))
    return out


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
        yield from value.replace("=", " ").split()
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@pytest.fixture
def docker_project(tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    root = tmp_path / "proj"
    module = write_project(root, PIPES, "secpipes")
    prefix = register_docker_stack(root)
    yield root, module, prefix
    remove_local_images(f"{REGISTRY}/{prefix}/")


def docker_operator(backend_cls: type, root: Path) -> Any:
    from stepflow_docker.operator_config import DockerOperatorConfig, DockerOperatorSettings

    from stepflow.remote import JobOperator

    return JobOperator(backend_cls("docker", DockerOperatorConfig(project_root=str(root))),
                       settings_class=DockerOperatorSettings)


# ------------------------------------------------------------------ what a docker job exposes
@docker_test
async def test_docker_inspect_gives_nothing_to_forge_a_payload_or_output_with(
        docker_project: tuple[Path, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stepflow_docker.operator import DockerBackend

    root, module, _ = docker_project
    monkeypatch.syspath_prepend(str(root))
    mod = __import__(module)
    marker = tmp_path / "forged-output-ran"
    seen: dict[str, Any] = {}

    class Attacked(DockerBackend):
        """Between the job's end and the runner reading its output, an attacker acts."""

        async def cleanup(self, job_id: str, state: Any) -> None:
            inspected = subprocess.run(["docker", "inspect", job_id], capture_output=True, text=True, check=True)
            seen["inspect"] = inspected.stdout
            info = json.loads(inspected.stdout)[0]
            command = info["Config"]["Cmd"]
            output = Path(command[command.index("--output") + 1])
            header = {"run_id": info["Config"]["Labels"]["stepflow.run"], "step": "train", "attempt": 1,
                      "job": info["Name"].lstrip("/")}
            seen["job"], seen["output"] = header["job"], output
            # The best they can do: sign with what they saw (the pinned sha, labels, env values).
            pin = next(e.split("=", 1)[1] for e in info["Config"]["Env"] if e.startswith("STEPFLOW_PAYLOAD_SHA256="))
            output.write_bytes(envelope.encode("output", {"ok": True, "value": Boom(str(marker))},
                                               bytes.fromhex(pin), **header))
            await super().cleanup(job_id, state)

    result = await run(mod.one(0.5), operators={"docker": docker_operator(Attacked, root)})
    err = result.steps["train"].error
    assert result.status == "failed" and err is not None and err.type == "PayloadError", err
    assert "signature mismatch" in err.message and "nothing was executed" in err.message
    assert not marker.exists()
    exposed = seen["inspect"]
    assert "STEPFLOW_JOB_TOKEN" not in exposed  # the token reaches the job as a file, not in its config
    token = job_keys.JobKeys.derive(real_derive(), seen["job"]).token.hex()
    assert token not in exposed
    # No value docker inspect shows signs an output the runner accepts for this job.
    output_key = job_keys.JobKeys.derive(real_derive(), seen["job"]).output_key
    forged_body = {"ok": True, "value": Boom(str(marker))}
    for key in candidate_keys(exposed):
        forged = envelope.encode("output", forged_body, key, job=seen["job"])
        with pytest.raises(PayloadError):
            envelope.decode(forged, output_key, kind="output")
    assert not marker.exists()


@docker_test
async def test_a_payload_forged_with_what_docker_inspect_shows_is_refused(
        docker_project: tuple[Path, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stepflow_docker.operator import DockerBackend

    root, module, _ = docker_project
    monkeypatch.syspath_prepend(str(root))
    mod = __import__(module)
    marker = tmp_path / "forged-payload-ran"

    class Replaced(DockerBackend):
        """Someone with write access to the store swaps the payload before the job reads it."""

        async def submit(self, job: Any) -> str:
            path = Path(job.command[job.command.index("--payload") + 1])
            _, head, _, _ = envelope._split(path.read_bytes())
            header = json.loads(head)
            forged_body = {"fn": os.system, "args": (f"touch {marker}",), "kwargs": {}}
            for key in [bytes.fromhex(job.env["STEPFLOW_PAYLOAD_SHA256"]), b"guess"]:
                path.write_bytes(envelope.encode("payload", forged_body, key, **{
                    k: header[k] for k in ("run_id", "step", "attempt", "job", "output_key")}))
            return await super().submit(job)

    result, events = await run_with_events(mod.one(0.2), operators={"docker": docker_operator(Replaced, root)})
    assert result.status == "failed"
    logs = "\n".join(e.line for e in events if isinstance(e, LogLine))
    assert "does not match the sha256 its job was started with" in logs
    assert not marker.exists()


# ------------------------------------------------------------------ tampered outputs on resume
RESUMABLE = textwrap.dedent(
    '''
    import os
    from pathlib import Path

    from stepflow import pipeline, step


    @step
    def small() -> int:
        Path(os.environ["RUNS_DIR"], "small").open("a").write("x")
        return 42


    @step
    def big() -> bytes:
        return b"b" * (600 * 1024)


    @step
    def last(a: int, b: bytes) -> int:
        if not Path(os.environ["RUNS_DIR"], "allow").exists():
            raise RuntimeError("not yet")
        return a + len(b)


    @pipeline
    def resumable():
        return last(small(), big())
    '''
)


def test_a_tampered_step_output_is_refused_on_resume_and_nothing_runs(tmp_path: Path,
                                                                     cli_env: dict[str, str]) -> None:
    root = tmp_path / "proj"
    module = write_project(root, RESUMABLE, "respipes")
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    env = cli_environ(root, cli_env, RUNS_DIR=str(runs_dir))
    run_id = f"tamper-{uuid.uuid4().hex[:6]}"
    first = stepflow_cli(["run", f"{module}:resumable", "--run-id", run_id, "--no-progress"], root, env)
    assert first.returncode == 1 and "not yet" in first.stdout + first.stderr
    (runs_dir / "allow").write_text("")
    home = Path(env["STEPFLOW_HOME"])
    db = sqlite3.connect(home / "stepflow.db")
    (inline,) = db.execute("SELECT output FROM steps WHERE run_id = ? AND step = 'small'", (run_id,)).fetchone()
    (big_uri,) = db.execute("SELECT output_uri FROM steps WHERE run_id = ? AND step = 'big'", (run_id,)).fetchone()
    assert inline is not None and big_uri  # small inline, large in the artifact store
    marker = tmp_path / "tampered-output-ran"
    forged = envelope.encode("stored-value", Boom(str(marker)), b"attacker-key", run_id=run_id, step="small")

    # 1. the inline output replaced in the store file
    db.execute("UPDATE steps SET output = ? WHERE run_id = ? AND step = 'small'", (forged, run_id))
    db.commit()
    resumed = stepflow_cli(["resume", run_id, "--no-progress"], root, env)
    assert resumed.returncode == 2, resumed.stdout + resumed.stderr
    assert "recorded output of step 'small'" in resumed.stderr and "signature mismatch" in resumed.stderr
    assert "Traceback" not in resumed.stderr and not marker.exists()

    # 2. the large output replaced in the artifact store (anyone with write access to the bucket)
    db.execute("UPDATE steps SET output = ? WHERE run_id = ? AND step = 'small'", (inline, run_id))
    db.commit()
    Path(big_uri).write_bytes(envelope.encode("stored-value", Boom(str(marker)), b"k", run_id=run_id, step="big"))
    resumed = stepflow_cli(["resume", run_id, "--no-progress"], root, env)
    assert resumed.returncode == 2 and "recorded output of step 'big'" in resumed.stderr
    assert not marker.exists()

    # 3. an output of another step (validly signed) moved into this one
    (other,) = db.execute("SELECT output FROM steps WHERE run_id = ? AND step = 'small'", (run_id,)).fetchone()
    db.execute("UPDATE steps SET output = ?, output_uri = NULL WHERE run_id = ? AND step = 'big'", (other, run_id))
    db.commit()
    resumed = stepflow_cli(["resume", run_id, "--no-progress"], root, env)
    assert resumed.returncode == 2 and "belongs to step 'small', not 'big'" in resumed.stderr
    db.close()


def test_resume_reuses_verified_outputs_and_runs_no_finished_step_again(tmp_path: Path,
                                                                      cli_env: dict[str, str]) -> None:
    root = tmp_path / "proj"
    module = write_project(root, RESUMABLE, "respipes")
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    env = cli_environ(root, cli_env, RUNS_DIR=str(runs_dir))
    run_id = f"reuse-{uuid.uuid4().hex[:6]}"
    assert stepflow_cli(["run", f"{module}:resumable", "--run-id", run_id, "--no-progress"], root, env).returncode == 1
    (runs_dir / "allow").write_text("")
    resumed = stepflow_cli(["resume", run_id, "--no-progress"], root, env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (runs_dir / "small").read_text() == "x"  # ran once, in the first run only


# ------------------------------------------------------------------ what an image ships
def image_layers(ref: str) -> list[bytes]:
    """Every layer of ``ref`` as the registry serves it (digests checked), uncompressed."""
    import gzip

    import anyio

    from stepflow.remote import RegistryClient

    name, tag = ref.rsplit(":", 1)
    host, _, repo = name.partition("/")

    async def read() -> list[bytes]:
        async with RegistryClient(host) as client:
            _, manifest = await client.get_manifest(repo, tag)
            return [await client.get_blob(repo, layer["digest"]) for layer in manifest["layers"]]

    return [gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob for blob in anyio.run(read)]


def image_files(ref: str) -> set[str]:
    """Every path in every layer of ``ref``, read from the registry."""
    found: set[str] = set()
    for layer in image_layers(ref):
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            found.update(m.name for m in tar.getmembers())
    return found


@docker_test
def test_the_image_ships_no_home_no_env_file_no_git(tmp_path: Path, cli_env: dict[str, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "proj"
    module = write_project(root, PIPES, "shippipes")
    home = root / ".stepflow"  # $STEPFLOW_HOME inside the project
    monkeypatch.setenv("STEPFLOW_HOME", str(home))
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".gitignore").write_text(".env\n")
    (root / ".env").write_text("API_TOKEN=hunter2-do-not-ship\n")
    (root / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n")
    prefix = f"t-ship-{uuid.uuid4().hex[:8]}"
    c = Client()
    c.register_component("container_registry", "reg", "default", {"uri": f"{REGISTRY}/{prefix}"})
    c.register_component("image_builder", "docker", "docker", {})
    c.register_component("step_operator", "docker", "docker", {"project_root": str(root)})
    c.register_stack("s", artifact_store="default", container_registry="reg", image_builder="docker",
                     step_operators=["docker"])
    c.set_active_stack("s")
    env = cli_environ(root, cli_env, STEPFLOW_HOME=str(home))
    try:
        events = tmp_path / "events.jsonl"
        done = stepflow_cli(["run", f"{module}:one", "--no-progress", "--events", str(events)], root, env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert (home / "stepflow.db").exists() and (home / "stepflow.key").exists()
        pushed = [json.loads(line) for line in events.read_text().splitlines() if '"ImagePushed"' in line]
        files = image_files(pushed[0]["image"])
        project = {f.removeprefix("opt/stepflow/project/") for f in files if f.startswith("opt/stepflow/project/")}
        assert f"{module}.py" in project  # the code ships
        for absent in (".env", ".git", ".stepflow", ".stepflow/stepflow.db", ".stepflow/stepflow.key", "id_rsa"):
            assert absent not in project, f"{absent} was shipped"
        assert not any(p.startswith((".git/", ".stepflow/")) for p in project)
    finally:
        remove_local_images(f"{REGISTRY}/{prefix}/")


# ------------------------------------------------------------------ secrets: grep everything
@docker_test
def test_no_secret_value_in_store_image_job_description_or_events(tmp_path: Path, cli_env: dict[str, str],
                                                                  moto_server: str) -> None:
    import boto3

    secret = f"Sup3r-S3cret-{uuid.uuid4().hex}"
    password = f"Reg-Passw0rd-{uuid.uuid4().hex}"
    bucket = f"sec-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, region_name=AWS_TEST_REGION, aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    root = tmp_path / "proj"
    module = write_project(root, PIPES, "grepipes")
    prefix = f"t-grep-{uuid.uuid4().hex[:8]}"
    env = cli_environ(root, {**cli_env, **aws_env(moto_server)})
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)  # the store's own credentials must carry the job
    commands = [
        ["artifact-store", "register", "s3", "--type=s3", f"--path=s3://{bucket}/sf", f"--endpoint_url={moto_server}",
         "--key=AKIATESTKEY", f"--secret={secret}"],
        ["container-registry", "register", "reg", "--type=default", f"--uri={REGISTRY}/{prefix}",
         "--username=ci", f"--password={password}"],
        ["image-builder", "register", "docker", "--type=docker"],
        ["step-operator", "register", "docker", "--type=docker", f"--project_root={root}"],
        ["stack", "register", "s", "-a", "s3", "-c", "reg", "-i", "docker", "-s", "docker", "--set"],
    ]
    for args in commands:
        done = stepflow_cli(args, root, env, timeout=60)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    inspected: list[str] = []
    watcher = subprocess.Popen(["docker", "events", "--filter", "event=start", "--filter", "label=stepflow.job",
                                "--format", "{{.ID}}"], stdout=subprocess.PIPE, text=True)

    def inspect_each_started_container() -> None:  # while it runs: it is removed once collected
        assert watcher.stdout is not None
        for line in watcher.stdout:
            got = subprocess.run(["docker", "inspect", line.strip()], capture_output=True, text=True)
            inspected.append(got.stdout)

    reader = threading.Thread(target=inspect_each_started_container, daemon=True)
    reader.start()
    try:
        events = tmp_path / "events.jsonl"
        done = stepflow_cli(["run", f"{module}:one", "-p", "seconds=3", "--no-progress", "--events", str(events)],
                            root, env)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        watcher.terminate()
        reader.join(timeout=10)
    assert inspected and '"STEPFLOW_PAYLOAD_SHA256=' in inspected[0]  # the job was seen while it ran
    home = Path(env["STEPFLOW_HOME"])
    haystacks = {"events": events.read_bytes(), "stdout": (done.stdout + done.stderr).encode(),
                 "inspect": "\n".join(inspected).encode()}
    for name in ("stepflow.db", "stepflow.db-wal", "stepflow.db-shm"):
        if (home / name).exists():
            haystacks[name] = (home / name).read_bytes()
    pushed = [json.loads(line) for line in events.read_text().splitlines() if '"ImagePushed"' in line]
    haystacks["image"] = b"".join(image_layers(pushed[0]["image"]))
    for where, data in haystacks.items():
        assert secret.encode() not in data, f"the store secret is in {where}"
        assert password.encode() not in data, f"the registry password is in {where}"
    remove_local_images(f"{REGISTRY}/{prefix}/")
