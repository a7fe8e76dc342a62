"""Remote artifact stores (s3, gcs, azure) against real wire-level services: moto, the GCS
emulator and Azurite (see tests/services.py). Nothing is mocked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stepflow._components.fsspec_store import (
    AccessDeniedError,
    ArtifactStoreError,
    BucketNotFoundError,
    FsspecArtifactStore,
)
from stepflow._config import options
from stepflow._flavors.builtin import LocalOperatorFlavor
from stepflow._stack.client import Client
from stepflow.errors import ConfigError, PluginError
from tests.services import (  # noqa: F401  (session fixtures, requested by name)
    AWS_TEST_KEY,
    AWS_TEST_REGION,
    AWS_TEST_SECRET,
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    azurite,
    azurite_connection_string,
    gcs_emulator,
    moto_server,
)

# Marked at collection (not only by conftest's late marking) so anyio keeps the fixture params.
pytestmark = pytest.mark.anyio

FLAVORS = ["s3", "gcs", "azure"]
SDK_MODULES = {"fsspec", "s3fs", "botocore", "aiobotocore", "boto3", "gcsfs", "google", "adlfs", "azure"}


def unique(prefix: str = "sf") -> str:
    """A bucket name no other test uses (services live for the whole session)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class Backend:
    flavor: str
    scheme: str
    bucket_word: str
    config: Callable[[str], dict[str, Any]]  # root URI -> component config
    make_bucket: Callable[[str], None]


@pytest.fixture(autouse=True)
def _no_cloud_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credential chains must never probe a cloud metadata server from these tests."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_GCE_CHECK", "True")


@pytest.fixture(params=FLAVORS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Backend:
    """One flavor with its service running; secrets reach the config through {{env.VAR}}."""
    if request.param == "s3":
        url = request.getfixturevalue("moto_server")
        monkeypatch.setenv("TEST_S3_SECRET", AWS_TEST_SECRET)

        def make_s3(bucket: str) -> None:
            import boto3

            boto3.client("s3", endpoint_url=url, region_name=AWS_TEST_REGION, aws_access_key_id=AWS_TEST_KEY,
                         aws_secret_access_key=AWS_TEST_SECRET).create_bucket(Bucket=bucket)

        return Backend("s3", "s3", "bucket", lambda path: {
            "path": path, "endpoint_url": url, "region": AWS_TEST_REGION, "key": AWS_TEST_KEY,
            "secret": "{{env.TEST_S3_SECRET}}"}, make_s3)
    if request.param == "gcs":
        url = request.getfixturevalue("gcs_emulator")

        def make_gcs(bucket: str) -> None:
            from gcsfs.core import GCSFileSystem

            GCSFileSystem(endpoint_url=url, token="anon", skip_instance_cache=True).mkdir(bucket)

        return Backend("gcs", "gs", "bucket", lambda path: {
            "path": path, "endpoint_url": url, "token": "anon", "project": "test"}, make_gcs)
    url = request.getfixturevalue("azurite")
    monkeypatch.setenv("TEST_AZ_KEY", AZURITE_KEY)

    def make_container(name: str) -> None:
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(azurite_connection_string(url)) as client:
            client.create_container(name)

    return Backend("azure", "az", "container", lambda path: {
        "path": path, "endpoint_url": url, "account_name": AZURITE_ACCOUNT,
        "account_key": "{{env.TEST_AZ_KEY}}"}, make_container)


def make_store(backend: Backend, name: str, path: str) -> Any:
    client = Client()
    client.register_component("artifact-store", name, backend.flavor, backend.config(path))
    return client.instantiate("artifact-store", name)


async def test_round_trip(backend: Backend) -> None:
    bucket = unique()
    root = f"{backend.scheme}://{bucket}/runs"
    store = make_store(backend, "store", root + "/")
    assert isinstance(store, FsspecArtifactStore)
    assert store.name == "store" and store.flavor == backend.flavor and store.is_remote
    assert store.root == root
    backend.make_bucket(bucket)

    # fsspec's blocking calls must run off the event loop's thread.
    loop_thread = threading.get_ident()
    threads: list[int] = []
    real_cat = store.filesystem.cat_file

    def cat_file(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return real_cat(*args, **kwargs)

    store.filesystem.cat_file = cat_file

    big = os.urandom(5 * 2**20)
    await store.write_bytes("small.txt", b"hello")
    await store.write_bytes("a/b/c/nested.bin", b"\x00\x01")
    await store.write_bytes(f"{root}/a/big.bin", big)  # absolute URI
    assert await store.read_bytes("small.txt") == b"hello"
    assert await store.read_bytes(f"{root}/small.txt") == b"hello"
    assert await store.read_bytes("a/b/c/nested.bin") == b"\x00\x01"
    assert await store.read_bytes("a/big.bin") == big
    assert threads and loop_thread not in threads
    if backend.flavor == "gcs":  # gs:// and gcs:// name the same objects
        assert await store.read_bytes(f"gcs://{bucket}/runs/small.txt") == b"hello"

    assert await store.exists("a/b/c/nested.bin") and await store.exists(f"{root}/a/big.bin")
    assert not await store.exists("a/b/c/other.bin")
    everything = [f"{root}/a/b/c/nested.bin", f"{root}/a/big.bin", f"{root}/small.txt"]
    assert await store.list() == everything
    assert await store.list("a/b") == [f"{root}/a/b/c/nested.bin"]
    assert await store.list(f"{root}/a") == everything[:2]
    assert await store.list("nothing/here") == []

    await store.write_bytes("small.txt", b"replaced")
    assert await store.read_bytes("small.txt") == b"replaced"
    await store.delete("small.txt")
    await store.delete("small.txt")  # absent: not an error
    assert not await store.exists("small.txt")
    assert await store.list() == everything[:2]
    with pytest.raises(FileNotFoundError, match=re.escape(f"artifact store 'store': no artifact at {root}/small.txt")):
        await store.read_bytes("small.txt")
    with pytest.raises(ArtifactStoreError, match="cannot hold 'file:///etc/passwd'"):
        await store.read_bytes("file:///etc/passwd")


async def test_storage_options_reach_the_store_from_another_process(backend: Backend) -> None:
    bucket = unique()
    store = make_store(backend, "shared", f"{backend.scheme}://{bucket}/p")
    backend.make_bucket(bucket)
    await store.write_bytes("in.txt", b"from the runner")
    opts = store.storage_options()
    assert opts and json.loads(json.dumps(opts)) == opts  # plain data, can be shipped to a job
    script = (
        "import anyio, json, sys\n"
        "from stepflow._components import fsspec_store as m\n"
        "cls, root, opts = getattr(m, sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])\n"
        "store = cls.from_storage_options(root, opts, name='job')\n"
        "data = anyio.run(store.read_bytes, 'in.txt')\n"
        "anyio.run(store.write_bytes, 'out.txt', data.upper())\n"
    )
    # No credentials in the job's environment: everything comes from storage_options().
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_", "TEST_", "GOOGLE_"))}
    env.update(AWS_EC2_METADATA_DISABLED="true", NO_GCE_CHECK="True")
    done = subprocess.run([sys.executable, "-c", script, type(store).__name__, store.root, json.dumps(opts)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert await store.read_bytes("out.txt") == b"FROM THE RUNNER"


async def test_missing_bucket_is_named(backend: Backend) -> None:
    bucket = unique("nope")
    name = f"{backend.flavor}-store"
    store = make_store(backend, name, f"{backend.scheme}://{bucket}/x")
    word = backend.bucket_word

    def message(uri: str) -> str:
        return re.escape(f"artifact store '{name}': {word} '{bucket}' does not exist ({uri})")

    key = f"{backend.scheme}://{bucket}/x/k"
    with pytest.raises(BucketNotFoundError, match=message(key)):
        await store.write_bytes("k", b"data")
    with pytest.raises(BucketNotFoundError, match=message(key)):
        await store.read_bytes("k")
    with pytest.raises(BucketNotFoundError, match=message(key)):
        await store.exists("k")
    with pytest.raises(BucketNotFoundError, match=message(key)):
        await store.delete("k")
    with pytest.raises(BucketNotFoundError, match=message(f"{backend.scheme}://{bucket}/x")):
        await store.list()


async def test_azure_wrong_key_is_access_denied(request: pytest.FixtureRequest,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = azurite_connection_string(request.getfixturevalue("azurite")).replace(AZURITE_KEY, "d3Jvbmcga2V5IGZvciB0aGUgdGVzdA==")
    monkeypatch.setenv("TEST_AZ_CONN", wrong)
    client = Client()
    client.register_component("artifact-store", "az", "azure",
                              {"path": "az://data/x", "connection_string": "{{env.TEST_AZ_CONN}}"})
    assert client.describe_component("artifact-store", "az")["config"]["connection_string"] == "{{env.TEST_AZ_CONN}}"
    store = client.instantiate("artifact-store", "az")
    for op in (store.write_bytes("k", b"1"), store.read_bytes("k"), store.list()):
        with pytest.raises(AccessDeniedError, match=r"artifact store 'az': access denied to az://data/x.*check its credentials"):
            await op


@pytest.mark.parametrize(("flavor", "good", "bad", "expected"), [
    ("s3", "s3://bucket/runs", "gs://x", "s3 artifact store path must start with s3://, got 'gs://x'"),
    ("gcs", "gcs://bucket", "s3://x", "gcs artifact store path must start with gs:// or gcs://, got 's3://x'"),
    ("azure", "abfs://container/p", "https://acct.blob.core.windows.net/c",
     "azure artifact store path must start with az:// or abfs:// or abfss://, got 'https://acct.blob.core.windows.net/c'"),
])
def test_path_scheme_is_checked_at_register(flavor: str, good: str, bad: str, expected: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    client = Client()
    with pytest.raises(ConfigError, match=re.escape(f"artifact-store 'x' (flavor {flavor}): {expected}")):
        client.register_component("artifact-store", "x", flavor, {"path": bad})
    with pytest.raises(ConfigError, match="missing required option 'path'"):
        client.register_component("artifact-store", "x", flavor, {})
    scheme = good.split("://")[0]
    with pytest.raises(ConfigError, match=f"path must name a (bucket|container): {scheme}://[A-Z]+.*, got '{scheme}://'"):
        client.register_component("artifact-store", "x", flavor, {"path": f"{scheme}://"})
    assert client.register_component("artifact-store", "x", flavor, {"path": good}).config == {"path": good}
    # A path from the environment is checked once resolved.
    client.register_component("artifact-store", "from-env", flavor, {"path": "{{env.TEST_STORE_PATH}}"})
    monkeypatch.setenv("TEST_STORE_PATH", bad)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        client.instantiate("artifact-store", "from-env")


@pytest.mark.parametrize(("flavor", "module", "path"), [("s3", "s3fs", "s3://b/p"), ("gcs", "gcsfs", "gs://b"),
                                                        ("azure", "adlfs", "az://c")])
def test_missing_sdk_names_the_extra(flavor: str, module: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the extra is not installed
    client = Client()
    client.register_component("artifact-store", "store", flavor, {"path": path})
    with pytest.raises(PluginError, match=re.escape(f"the {flavor} artifact store needs {module}: "
                                                    f"pip install 'stepflow[{flavor}]'")):
        client.instantiate("artifact-store", "store")


def test_import_and_flavor_listing_import_no_sdk(tmp_path: Path) -> None:
    code = (
        "import sys, stepflow\n"
        "from stepflow._plugins import registry\n"
        "from stepflow._stack.client import Client\n"
        "c = Client()\n"
        "names = {e.name for e in c.flavor_entries('artifact-store')}\n"
        "assert {'local', 's3', 'gcs', 'azure'} <= names, names\n"
        "for n in ('s3', 'gcs', 'azure'):\n"
        "    assert registry.load('artifact_store', n).is_remote\n"
        "c.register_component('artifact-store', 's3-store', 's3', {'path': 's3://b/p', 'secret': 'x'})\n"
        "c.describe_component('artifact-store', 's3-store')\n"
        # namespace packages (a bare `google` made by a .pth file at startup) carry no code: not counted
        f"print(sorted(m for m, mod in list(sys.modules.items()) if m.split('.')[0] in {sorted(SDK_MODULES)!r} "
        "and getattr(mod, '__file__', None)))\n"
    )
    env = dict(os.environ, STEPFLOW_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_stack_with_an_s3_store_is_remote(monkeypatch: pytest.MonkeyPatch) -> None:
    client = Client()
    assert client.flavor("artifact-store", "s3").is_remote
    assert not client.flavor("artifact-store", "local").is_remote
    client.register_component("artifact-store", "s3-store", "s3", {"path": "s3://bucket/runs", "key": "AKIA",
                                                                   "secret": "hunter2"})
    described = client.describe_component("artifact-store", "s3-store")["config"]
    assert described["secret"] == options.REDACTED and described["key"] == "AKIA"
    # An operator that runs steps elsewhere accepts the s3 store and refuses the local one.
    monkeypatch.setattr(LocalOperatorFlavor, "requires_remote_artifact_store", True)
    client.register_component("step-operator", "far", "local")
    with pytest.raises(ConfigError, match="cannot reach the local artifact store 'default'"):
        client.register_stack("local-stack", artifact_store="default", step_operators=["far"])
    stack = client.register_stack("remote-stack", artifact_store="s3-store", step_operators=["far"])
    assert stack.artifact_store == "s3-store"


async def test_generic_store_over_local_files(tmp_path: Path) -> None:
    store = FsspecArtifactStore("files", path=f"file://{tmp_path}/root/")
    assert store.root == f"file://{tmp_path}/root"
    await store.write_bytes("a/b.bin", b"one")
    await store.write_bytes(f"file://{tmp_path}/root/c.bin", b"two")
    assert await store.read_bytes("a/b.bin") == b"one" and await store.exists("c.bin")
    assert await store.list() == [f"file://{tmp_path}/root/a/b.bin", f"file://{tmp_path}/root/c.bin"]
    assert sorted(p.name for p in (tmp_path / "root").rglob("*") if p.is_file()) == ["b.bin", "c.bin"]
    await store.delete("a/b.bin")
    with pytest.raises(FileNotFoundError):
        await store.read_bytes("a/b.bin")
