"""Wire-level fake cloud services for tests: real server processes on free loopback ports.

- ``moto_server``: moto's server (``python -m moto.server``), every AWS API on one endpoint
  (S3, SageMaker, IAM, ECR, CloudWatch Logs ...). Needs ``pip install 'moto[server]'``.
- ``gcs_emulator``: gcp-storage-emulator, the Cloud Storage JSON API. Needs
  ``pip install gcp-storage-emulator``.
- ``azurite``: Microsoft's Azurite blob service (npm). Installed on first use with
  ``npm install --prefix $STEPFLOW_SERVICES_CACHE/azurite azurite@3`` (default cache
  ``~/.cache/stepflow-services``); ``STEPFLOW_AZURITE_BLOB`` may name an ``azurite-blob`` binary.

Use the session fixtures by importing them into a test module (``from tests.services import
moto_server``): each yields the service's endpoint URL and stops the process at the end of the
session. The context managers ``start_moto()``, ``start_gcs_emulator()`` and ``start_azurite()``
yield a :class:`Service` (URL, port, start-up time, log file) for other uses. A service that
cannot be installed here skips the tests using it, with the install error as the reason; set
``STEPFLOW_REQUIRE_SERVICES=1`` (CI) to fail instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_PACKAGE = "azurite@3"
#: Credentials moto accepts (it checks none by default).
AWS_TEST_KEY = "testing"
AWS_TEST_SECRET = "testing"
AWS_TEST_REGION = "us-east-1"

START_TIMEOUT = 60.0  # seconds for a service to answer on its port
INSTALL_TIMEOUT = 600.0


class ServiceUnavailable(RuntimeError):
    """A service cannot be installed on this machine (the message says why and how)."""


@dataclass
class Service:
    """A running service process."""

    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    started_in: float  # seconds from spawn until it answered
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        """The end of the service's output, for failure messages."""
        return _tail(self.log, lines)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_answers(port: int) -> bool:
    """Whether something on the port answers an HTTP request (any status will do)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.settimeout(2.0)
            s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(5) == b"HTTP/"
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, so no server outlives a killed run."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """TERM the service's own process group (it may have children), then KILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def run_service(name: str, argv: Callable[[int], Sequence[str]], *, url: Callable[[int], str],
                env: dict[str, str] | None = None, timeout: float = START_TIMEOUT,
                attempts: int = 3) -> Iterator[Service]:
    """Start ``argv(port)`` on a free port, wait (at most ``timeout`` s) until it answers HTTP.

    A process that exits before answering is retried on another port (the free port may have
    been taken meanwhile), then reported with its output.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"stepflow-{name}-"))
    failures = []
    for attempt in range(attempts):
        port = free_port()
        log = workdir / f"{name}-{attempt}.log"
        with log.open("wb") as out:
            t0 = time.monotonic()
            proc = subprocess.Popen(list(argv(port)), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=workdir, env=env,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        try:
            while proc.poll() is None and not _http_answers(port):
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"{name} did not answer on 127.0.0.1:{port} within {timeout:.0f} s; "
                                       f"output:\n{_tail(log)}")
                time.sleep(0.05)
            if proc.poll() is not None:
                failures.append(f"exit code {proc.returncode}:\n{_tail(log)}")
                continue
            service = Service(name, url(port), port, proc, time.monotonic() - t0, log)
            yield service
            return
        finally:
            _stop(proc)
    raise RuntimeError(f"{name} exited before answering ({attempts} attempts); last: {failures[-1]}")


# -- the services ------------------------------------------------------------------------
def start_moto() -> ContextManager[Service]:
    """moto's server: every mocked AWS API at one endpoint URL."""
    for module in ("moto.server", "flask", "werkzeug"):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            raise ServiceUnavailable(f"moto's server needs {module}: pip install 'moto[server]'")
    return run_service("moto", lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                             "-p", str(port)],
                       url=lambda port: f"http://127.0.0.1:{port}")


def start_gcs_emulator() -> ContextManager[Service]:
    """gcp-storage-emulator: the Cloud Storage JSON API, in memory."""
    if importlib.util.find_spec("gcp_storage_emulator") is None:
        raise ServiceUnavailable("the GCS emulator is not installed: pip install gcp-storage-emulator")
    return run_service("gcs-emulator", lambda port: [sys.executable, "-m", "gcp_storage_emulator", "start",
                                                     "--host", "127.0.0.1", "--port", str(port),
                                                     "--in-memory", "--quiet"],
                       url=lambda port: f"http://127.0.0.1:{port}")


def services_cache() -> Path:
    """Where npm-installed services live (``$STEPFLOW_SERVICES_CACHE``, default ~/.cache/stepflow-services)."""
    return Path(os.environ.get("STEPFLOW_SERVICES_CACHE", "~/.cache/stepflow-services")).expanduser()


def azurite_blob_command() -> str:
    """Path of ``azurite-blob``: ``$STEPFLOW_AZURITE_BLOB``, on PATH, or npm-installed into the cache."""
    explicit = os.environ.get("STEPFLOW_AZURITE_BLOB")
    if explicit:
        return explicit
    on_path = shutil.which("azurite-blob")
    if on_path:
        return on_path
    prefix = services_cache() / "azurite"
    binary = prefix / "node_modules" / ".bin" / "azurite-blob"
    if binary.exists():
        return str(binary)
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise ServiceUnavailable("azurite needs Node.js and npm: apt-get install -y nodejs npm")
    prefix.mkdir(parents=True, exist_ok=True)  # npm --prefix wants an existing directory
    cmd = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error",
           AZURITE_PACKAGE]
    with (prefix / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time across test processes
        if not binary.exists():
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                                      stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                raise ServiceUnavailable(f"`{' '.join(cmd)}` took over {INSTALL_TIMEOUT:.0f} s") from None
            if done.returncode != 0 or not binary.exists():
                raise ServiceUnavailable(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n"
                                         f"{(done.stdout + done.stderr).strip()[-2000:]}")
    return str(binary)


def sdk_python(name: str, *requirements: str) -> str:
    """Python of a virtualenv holding a cloud's own SDK, kept apart because its pins clash with ours.

    Created once in the services cache (``sdk/NAME``) and reused; raises ServiceUnavailable when
    it cannot be installed.
    """
    root = services_cache() / "sdk" / name
    python = root / "bin" / "python"
    marker = root / ".installed"
    root.parent.mkdir(parents=True, exist_ok=True)
    with (root.parent / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time across test processes
        if marker.exists() and marker.read_text() == "\n".join(requirements):
            return str(python)
        shutil.rmtree(root, ignore_errors=True)
        for cmd in ([sys.executable, "-m", "venv", str(root)],
                    [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements]):
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                                      stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                raise ServiceUnavailable(f"`{' '.join(cmd)}` took over {INSTALL_TIMEOUT:.0f} s") from None
            if done.returncode != 0:
                raise ServiceUnavailable(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n"
                                         f"{(done.stdout + done.stderr).strip()[-2000:]}")
        marker.write_text("\n".join(requirements))
    return str(python)


def start_azurite() -> ContextManager[Service]:
    """Azurite's blob service, in memory; the URL is the dev account's blob endpoint."""
    binary = azurite_blob_command()
    return run_service("azurite", lambda port: [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port),
                                                "--inMemoryPersistence", "--extentMemoryLimit", "1024",
                                                "--skipApiVersionCheck", "--loose", "--silent",
                                                "--disableTelemetry"],  # it would call home otherwise
                       url=lambda port: f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}")


def azurite_connection_string(url: str) -> str:
    """Connection string of the dev account at an Azurite blob endpoint."""
    return f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint={url};"


def aws_env(url: str) -> dict[str, str]:
    """Environment for AWS SDKs to talk to moto at ``url`` and never to real AWS (nor EC2 metadata)."""
    return {"AWS_ACCESS_KEY_ID": AWS_TEST_KEY, "AWS_SECRET_ACCESS_KEY": AWS_TEST_SECRET,
            "AWS_DEFAULT_REGION": AWS_TEST_REGION, "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"}


# -- session fixtures ----------------------------------------------------------------------
@contextlib.contextmanager
def _service_or_skip(start: Callable[[], ContextManager[Service]]) -> Iterator[Service]:
    with contextlib.ExitStack() as stack:
        try:
            service = stack.enter_context(start())
        except ServiceUnavailable as exc:
            if os.environ.get("STEPFLOW_REQUIRE_SERVICES", "") not in ("", "0"):
                pytest.fail(f"required service unavailable: {exc}")
            pytest.skip(f"SERVICE UNAVAILABLE, tests using it are skipped: {exc}")
        yield service


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's server for the session: its endpoint URL (``http://127.0.0.1:PORT``)."""
    with _service_or_skip(start_moto) as service:
        yield service.url


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """The GCS emulator for the session: its endpoint URL (``http://127.0.0.1:PORT``)."""
    with _service_or_skip(start_gcs_emulator) as service:
        yield service.url


@pytest.fixture(scope="session")
def azurite() -> Iterator[str]:
    """Azurite for the session: the dev account's blob endpoint (``http://127.0.0.1:PORT/devstoreaccount1``)."""
    with _service_or_skip(start_azurite) as service:
        yield service.url

