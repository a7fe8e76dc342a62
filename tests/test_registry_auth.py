"""RegistryClient and RegistryAuth against real registries, and the challenge parser.

* The open registry of the Docker test services (127.0.0.1:5000), holding an image pushed with the docker CLI.
* Registries started here with ``docker-registry serve`` (the CNCF distribution registry) on free loopback
  ports, storage in a temporary directory: htpasswd (Basic) auth; token auth, with the token service written
  below (RS256 JWTs that the registry verifies against the certificate of its ``rootcertbundle``); TLS.
* Credential resolution from Docker config files and credential helpers (small scripts put on PATH).

Without the ``docker-registry`` binary (or, for the :5000 tests, dockerd and its registry) the tests are
skipped with a loud reason, except under CI (env ``CI`` set), where they fail.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from stepflow.interfaces.container_registry import RegistryError
from stepflow.remote import _registry as registry_module
from stepflow.remote._registry import (
    DOCKER_HUB_AUTH_KEY,
    AuthChallenge,
    CredentialHelperError,
    DigestMismatchError,
    DockerConfigError,
    RegistryAuth,
    RegistryAuthError,
    RegistryClient,
    RegistryCredentialsMissingError,
    RegistryNotFoundError,
    RegistryPermissionError,
    RegistryReferenceError,
    RegistryTLSError,
    RegistryUnreachableError,
    auth_config_key,
    parse_www_authenticate,
)
from tests import docker_env
from tests.docker_env import BASE_IMAGE, docker_test

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
USER, PASSWORD = "alice", "wonder-Land-42"
READER, READER_PASSWORD = "reader", "read-Only-7"
REFRESH_TOKEN = "refresh-token-of-alice"
SERVICE, ISSUER = "stepflow-test-registry", "stepflow-test-token-issuer"


# ------------------------------------------------------------------------------------------ helpers


def require_registry_binary() -> str:
    """The docker-registry binary; skip loudly (locally) or fail (CI) without it."""
    found = shutil.which("docker-registry") or ("/usr/bin/docker-registry"
                                                if os.access("/usr/bin/docker-registry", os.X_OK) else None)
    if found:
        return found
    problem = "no `docker-registry` binary (Debian package docker-registry: the CNCF distribution registry)"
    if os.environ.get("CI"):
        pytest.fail(f"registry auth tests must run in CI: {problem}", pytrace=False)
    pytest.skip(f"SKIPPED REGISTRY AUTH TESTS: {problem}; install it (`apt-get install docker-registry`). "
                "CI (env CI set) fails instead of skipping")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def serve_registry(root: Path, *, auth: dict[str, Any] | None = None,
                   tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Run ``docker-registry serve`` on a free loopback port with storage under ``root``; yield ``host:port``."""
    binary = require_registry_binary()
    port = free_port()
    http: dict[str, Any] = {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex}
    if tls is not None:
        http["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
        "http": http,
    }
    if auth is not None:
        config["auth"] = auth
    config_file = root / "config.yml"
    config_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
    log_path = root / "registry.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([binary, "serve", str(config_file)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                pytest.fail(f"docker-registry exited ({process.returncode}):\n{log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"docker-registry did not listen on :{port}:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def self_signed(directory: Path, common_name: str, *, ip: str | None = None) -> tuple[Path, Path, Any]:
    """A self-signed RSA certificate (its own CA): ``(cert PEM path, key PEM path, private key)``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False))
    if ip is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = directory / f"{common_name}.crt", directory / f"{common_name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, (key, cert)


def seed_image(host: str, name: str, tag: str, authorization: str | None) -> dict[str, Any]:
    """Push a tiny OCI image (one random layer) with plain distribution API calls; return its parts."""
    layer = os.urandom(4096)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer)]}}).encode()
    base = f"http://{host}"
    headers = {"Authorization": authorization} if authorization else {}
    with httpx.Client(headers=headers, timeout=30) as http:
        for blob in (layer, config):
            started = http.post(f"{base}/v2/{name}/blobs/uploads/")
            assert started.status_code == 202, started.text
            location = urllib.parse.urljoin(base, started.headers["location"])
            sep = "&" if "?" in location else "?"
            done = http.put(f"{location}{sep}digest={sha256_digest(blob)}", content=blob,
                            headers={"Content-Type": "application/octet-stream"})
            assert done.status_code == 201, done.text
        manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(config),
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256_digest(layer),
                        "size": len(layer)}],
        }
        body = json.dumps(manifest).encode()
        put = http.put(f"{base}/v2/{name}/manifests/{tag}", content=body, headers={"Content-Type": OCI_MANIFEST})
        assert put.status_code == 201, put.text
    return {"manifest": manifest, "digest": sha256_digest(body), "layer": layer, "config": config}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def write_docker_config(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


HELPER_SCRIPT = """#!{python}
import json, pathlib, sys
here = pathlib.Path(__file__).resolve().parent
server = sys.stdin.read().strip()
with open(here / "helper-calls.log", "a") as log:
    log.write(pathlib.Path(__file__).name + " " + " ".join(sys.argv[1:]) + " " + server + "\\n")
answers = json.loads((here / (pathlib.Path(__file__).name + ".json")).read_text())
answer = answers.get(server)
if answer is None:
    print("credentials not found in native keychain")
    sys.exit(1)
if "fail" in answer:
    print(answer["fail"], file=sys.stderr)
    sys.exit(3)
print(json.dumps(answer))
"""


def install_helper(bin_dir: Path, name: str, answers: dict[str, dict[str, str]]) -> Path:
    """A ``docker-credential-<name>`` on PATH answering ``answers[server URL]`` (its calls are logged)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / f"docker-credential-{name}"
    script.write_text(HELPER_SCRIPT.format(python=sys.executable))
    script.chmod(0o755)
    (bin_dir / f"docker-credential-{name}.json").write_text(json.dumps(answers))
    return bin_dir / "helper-calls.log"


@pytest.fixture(autouse=True)
def docker_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty Docker config directory of its own: the user's never leaks in."""
    directory = tmp_path / "docker-config"
    directory.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    return directory


@pytest.fixture
def helper_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory put first on PATH for fake credential helpers."""
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ.get('PATH', '')}")
    return directory


# ------------------------------------------------------------------------------ the token service


class TokenService:
    """A token service of the Docker registry token specification, in this process.

    GET with Basic credentials (or none: anonymous) and one ``scope`` parameter per scope answers
    ``{"token": ...}``; POST with the OAuth2 refresh-token grant answers ``{"access_token": ...}``. Tokens are
    RS256 JWTs carrying the signing certificate in ``x5c``: the registry checks it against its root bundle.
    ``alice`` may pull and push anywhere, ``reader`` only pull; anonymous users may pull ``public/...``.
    """

    users = {USER: (PASSWORD, {"pull", "push"}), READER: (READER_PASSWORD, {"pull"})}

    def __init__(self, directory: Path) -> None:
        self.cert_path, _, (self._key, cert) = self_signed(directory, "stepflow-test-token-signer")
        from cryptography.hazmat.primitives import serialization

        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.expires_in = 300
        self.sign_with_untrusted_key = False
        self.requests: list[dict[str, Any]] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
                user, ok = service.basic_user(self.headers.get("Authorization"))
                service.requests.append({"method": "GET", "path": url.path, "query": query, "user": user})
                if not ok:
                    return self.answer(401, {"details": "invalid username or password"})
                if query.get("service") != [SERVICE]:
                    return self.answer(400, {"details": "unknown service"})
                scopes = [s for value in query.get("scope", []) for s in value.split()]
                self.answer(200, {"token": service.issue(user, scopes), "expires_in": service.expires_in,
                                  "issued_at": datetime.datetime.now(datetime.UTC).isoformat()})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
                service.requests.append({"method": "POST", "path": self.path, "form": form,
                                         "content_type": self.headers.get("Content-Type")})
                if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [REFRESH_TOKEN]:
                    return self.answer(401, {"error": "invalid_grant"})
                scopes = form.get("scope", [""])[0].split()
                self.answer(200, {"access_token": service.issue(USER, scopes), "expires_in": service.expires_in,
                                  "scope": " ".join(scopes)})

            def answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def basic_user(self, header: str | None) -> tuple[str | None, bool]:
        """``(user, credentials ok)``; no header is the anonymous user."""
        if not header:
            return None, True
        scheme, _, value = header.partition(" ")
        user, _, password = base64.b64decode(value).decode().partition(":")
        known = self.users.get(user)
        return user, scheme.lower() == "basic" and known is not None and known[0] == password

    def grants(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository":
                continue
            allowed = self.users[user][1] if user else ({"pull"} if name.startswith("public/") else set())
            access.append({"type": "repository", "name": name,
                           "actions": [a for a in actions.split(",") if a in allowed]})
        return access

    def issue(self, user: str | None, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        def b64url(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {"iss": ISSUER, "sub": user or "", "aud": SERVICE, "exp": now + self.expires_in, "nbf": now - 5,
                  "iat": now, "jti": uuid.uuid4().hex, "access": self.grants(user, scopes)}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        key = rsa.generate_private_key(65537, 2048) if self.sign_with_untrusted_key else self._key
        signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"

    def token_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("path", "").startswith("/token")]


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry with htpasswd (Basic) auth: ``alice`` only."""
    import bcrypt

    require_registry_binary()
    root = tmp_path_factory.mktemp("basic-registry")
    htpasswd = root / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"{USER}:{hashed}\n")
    with serve_registry(root, auth={"htpasswd": {"realm": "stepflow-test", "path": str(htpasswd)}}) as host:
        yield host


@pytest.fixture(scope="module")
def basic_image(basic_registry: str) -> dict[str, Any]:
    name = unique("team/app")
    return {"name": name, **seed_image(basic_registry, name, "v1", basic(USER, PASSWORD))}


@pytest.fixture(scope="module")
def token_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenService]:
    service = TokenService(tmp_path_factory.mktemp("token-service"))
    yield service
    service.close()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory, token_service: TokenService) -> Iterator[str]:
    """A registry with token auth, trusting the token service's certificate."""
    require_registry_binary()
    root = tmp_path_factory.mktemp("token-registry")
    auth = {"token": {"realm": token_service.realm, "service": SERVICE, "issuer": ISSUER,
                      "rootcertbundle": str(token_service.cert_path)}}
    with serve_registry(root, auth=auth) as host:
        yield host


@pytest.fixture(scope="module")
def seeded_images(token_registry: str, token_service: TokenService) -> dict[str, Any]:
    """A public and a private image in the token registry (the tests only read them)."""
    images = {}
    for kind, name in (("public", unique("public/app")), ("private", unique("team/app"))):
        token = token_service.issue(USER, [f"repository:{name}:pull,push"])
        images[kind] = {"name": name, **seed_image(token_registry, name, "v1", f"Bearer {token}")}
    return images


@pytest.fixture
def seeded(seeded_images: dict[str, Any], token_service: TokenService) -> dict[str, Any]:
    """The seeded images; the token service's request log starts empty."""
    token_service.requests.clear()
    return seeded_images


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An open registry serving HTTPS with a self-signed certificate for 127.0.0.1: ``(host, CA file)``."""
    require_registry_binary()
    root = tmp_path_factory.mktemp("tls-registry")
    cert, key, _ = self_signed(root, "stepflow-test-registry", ip="127.0.0.1")
    with serve_registry(root, tls=(cert, key)) as host:
        yield host, cert


@pytest.fixture(scope="module")
def pushed_image() -> Iterator[str]:
    """``stepflow-base`` pushed with the docker CLI to the registry on :5000 under a unique repository."""
    docker_env.require_docker()
    repository = unique("stepflow-auth-test/base")
    ref = f"{docker_env.REGISTRY}/{repository}:t1"
    subprocess.run(["docker", "tag", BASE_IMAGE, ref], check=True, capture_output=True, timeout=60)
    try:
        push = subprocess.run(["docker", "push", ref], capture_output=True, text=True, timeout=600)
        assert push.returncode == 0, push.stderr or push.stdout
        yield repository
    finally:
        subprocess.run(["docker", "rmi", ref], capture_output=True, timeout=120)


# ------------------------------------------------------------------------------ challenge parsing


def test_bearer_challenge_keeps_the_comma_inside_a_quoted_scope() -> None:
    [challenge] = parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="registry",scope="repository:a/b:pull,push"')
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.example/token"
    assert challenge.service == "registry"
    assert challenge.scopes == ("repository:a/b:pull,push",)
    assert challenge.params == {"realm": "https://auth.example/token", "service": "registry",
                                "scope": "repository:a/b:pull,push"}


def test_basic_challenge_and_escaped_quotes() -> None:
    assert parse_www_authenticate('Basic realm="Registry Realm"') == [AuthChallenge("basic", {"realm": "Registry Realm"})]
    [challenge] = parse_www_authenticate(r'Basic realm="say \"hi\", then \\ go", charset="UTF-8"')
    assert challenge.params == {"realm": 'say "hi", then \\ go', "charset": "UTF-8"}


def test_several_challenges_in_one_header_and_across_headers() -> None:
    header = ('Basic realm="a, b", Bearer realm="https://t/token",service=s,'
              'scope="repository:x:pull,push repository:y:pull",error="insufficient_scope"')
    basic_challenge, bearer = parse_www_authenticate(header)
    assert basic_challenge == AuthChallenge("Basic", {"realm": "a, b"})
    assert bearer.scopes == ("repository:x:pull,push", "repository:y:pull")
    assert bearer.error == "insufficient_scope"
    assert bearer.service == "s"
    challenges = parse_www_authenticate(['Negotiate', 'Bearer realm="r"', 'Basic realm="b"'])
    assert [c.scheme for c in challenges] == ["negotiate", "bearer", "basic"]


def test_challenge_case_spacing_token68_and_junk() -> None:
    assert parse_www_authenticate('BEARER Realm = "x" , SERVICE=y,,scope="repository:p:pull"') == [
        AuthChallenge("bearer", {"realm": "x", "service": "y", "scope": "repository:p:pull"})]
    negotiate, basic_challenge = parse_www_authenticate('Negotiate YII+/ab==, Basic realm="r"')
    assert negotiate.token68 == "YII+/ab==" and not negotiate.params
    assert basic_challenge.realm == "r"
    # Junk is dropped, the rest kept; an unterminated quote runs to the end.
    assert parse_www_authenticate('=junk, Basic realm="q" stray, Bearer realm="open') == [
        AuthChallenge("basic", {"realm": "q"}), AuthChallenge("bearer", {"realm": "open"})]
    assert parse_www_authenticate("") == []
    assert parse_www_authenticate(" , ,") == []


# ------------------------------------------------------------------------ credential resolution


def test_explicit_credentials_come_first(docker_config_dir: Path) -> None:
    write_docker_config(docker_config_dir, {"auths": {"reg.example:5000": {"auth": base64.b64encode(b"u:p").decode()}}})
    auth = RegistryAuth.resolve("reg.example:5000/prefix", ("bob", "explicit-pw"))
    assert (auth.username, auth.password, auth.source) == ("bob", "explicit-pw", "explicit credentials")


@pytest.mark.parametrize(("key", "registry"), [
    ("reg.example:5000", "reg.example:5000"),
    ("https://reg.example:5000", "reg.example:5000/team"),
    ("http://reg.example:5000/v2/", "https://reg.example:5000"),
    (DOCKER_HUB_AUTH_KEY, "docker.io"),
    (DOCKER_HUB_AUTH_KEY, "index.docker.io/library"),
    ("https://index.docker.io/v1/", "registry-1.docker.io"),
])
def test_auths_entries_match_hosts_like_docker(docker_config_dir: Path, key: str, registry: str) -> None:
    path = write_docker_config(docker_config_dir, {"auths": {
        "other.example": {"auth": base64.b64encode(b"nobody:nothing").decode()},
        key: {"auth": base64.b64encode(b"carol:pa:ss").decode()}}})
    auth = RegistryAuth.resolve(registry)
    assert (auth.username, auth.password) == ("carol", "pa:ss")
    assert str(path) in auth.source and repr(key) in auth.source


def test_auth_config_keys() -> None:
    assert auth_config_key("docker.io") == DOCKER_HUB_AUTH_KEY
    assert auth_config_key("https://registry-1.docker.io/x") == DOCKER_HUB_AUTH_KEY
    assert auth_config_key("127.0.0.1:5000/prefix") == "127.0.0.1:5000"


def test_auths_username_password_and_identity_token_fields(docker_config_dir: Path) -> None:
    write_docker_config(docker_config_dir, {"auths": {
        "a.example": {"username": "dave", "password": "pw"},
        "b.example": {"auth": base64.b64encode(b"erin:").decode(), "identitytoken": "refresh-xyz"},
        "c.example": {},
    }})
    a = RegistryAuth.resolve("a.example")
    assert (a.username, a.password) == ("dave", "pw")
    b = RegistryAuth.resolve("b.example")
    assert b.identity_token == "refresh-xyz" and b.username == "erin" and not b.password
    c = RegistryAuth.resolve("c.example")
    assert c.anonymous and "no credentials for c.example" in c.source


def test_no_config_file_is_anonymous(docker_config_dir: Path) -> None:
    auth = RegistryAuth.resolve("reg.example")
    assert auth.anonymous
    assert str(docker_config_dir / "config.json") in auth.source


def test_malformed_config_errors_do_not_leak_secrets(docker_config_dir: Path) -> None:
    path = write_docker_config(docker_config_dir, {"auths": {"reg.example": {"auth": "bm8tY29sb24taGVyZS1zZWNyZXQ="}}})
    with pytest.raises(DockerConfigError) as caught:
        RegistryAuth.resolve("reg.example")
    assert str(path) in str(caught.value) and "docker login reg.example" in str(caught.value)
    assert "secret" not in str(caught.value) and "bm8t" not in str(caught.value)
    path.write_text("{not json")
    with pytest.raises(DockerConfigError, match="not valid JSON"):
        RegistryAuth.resolve("reg.example")


def test_secrets_are_hidden_from_repr_and_pickling_keeps_errors() -> None:
    auth = RegistryAuth("reg.example", username="u", password="hunter2", source="explicit credentials")
    assert "hunter2" not in repr(auth) and "<hidden>" in repr(auth)
    token_auth = RegistryAuth("reg.example", identity_token="tok-123", source="x")
    assert "tok-123" not in repr(token_auth)
    error = RegistryAuthError("reg.example", "rejected", source="explicit credentials")
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, RegistryAuthError) and isinstance(again, RegistryError)
    assert str(again) == str(error) and again.source == "explicit credentials"


def test_cred_helpers_win_over_creds_store_and_auths(docker_config_dir: Path, helper_bin: Path) -> None:
    calls = install_helper(helper_bin, "fake", {"reg.example:5000": {"Username": "frank", "Secret": "from-helper"}})
    install_helper(helper_bin, "store", {"reg.example:5000": {"Username": "store-user", "Secret": "from-store"}})
    path = write_docker_config(docker_config_dir, {
        "credsStore": "store", "credHelpers": {"reg.example:5000": "fake"},
        "auths": {"reg.example:5000": {"auth": base64.b64encode(b"file:file").decode()}}})
    auth = RegistryAuth.resolve("reg.example:5000/team")
    assert (auth.username, auth.password) == ("frank", "from-helper")
    assert "docker-credential-fake" in auth.source and str(path) in auth.source
    assert calls.read_text().splitlines() == ["docker-credential-fake get reg.example:5000"]
    # Without a credHelpers entry the credsStore helper answers; Docker Hub is asked for by its config key.
    hub = install_helper(helper_bin, "store", {DOCKER_HUB_AUTH_KEY: {"Username": "<token>", "Secret": "idtok"}})
    auth = RegistryAuth.resolve("docker.io")
    assert auth.identity_token == "idtok" and auth.username is None
    assert "credsStore" in auth.source
    assert hub.read_text().splitlines()[-1] == f"docker-credential-store get {DOCKER_HUB_AUTH_KEY}"


def test_helper_without_credentials_falls_back_to_auths(docker_config_dir: Path, helper_bin: Path) -> None:
    install_helper(helper_bin, "empty", {})
    write_docker_config(docker_config_dir, {"credsStore": "empty",
                                            "auths": {"reg.example": {"auth": base64.b64encode(b"g:h").decode()}}})
    auth = RegistryAuth.resolve("reg.example")
    assert (auth.username, auth.password) == ("g", "h")


def test_missing_and_failing_helpers_are_clear_errors(docker_config_dir: Path, helper_bin: Path) -> None:
    write_docker_config(docker_config_dir, {"credHelpers": {"reg.example": "not-installed-anywhere"}})
    with pytest.raises(CredentialHelperError) as caught:
        RegistryAuth.resolve("reg.example")
    message = str(caught.value)
    assert "docker-credential-not-installed-anywhere" in message and "reg.example" in message and "PATH" in message
    install_helper(helper_bin, "broken", {"reg.example": {"fail": "keychain locked"}})
    write_docker_config(docker_config_dir, {"credHelpers": {"reg.example": "broken"}})
    with pytest.raises(CredentialHelperError) as caught:
        RegistryAuth.resolve("reg.example")
    message = str(caught.value)
    assert "docker-credential-broken" in message and "reg.example" in message and "keychain locked" in message


def test_bad_addresses_and_names_are_rejected() -> None:
    with pytest.raises(RegistryReferenceError):
        RegistryClient("ftp://reg.example")
    with pytest.raises(RegistryReferenceError):
        RegistryClient("http://reg.example", insecure=False)
    with pytest.raises(RegistryReferenceError):
        RegistryClient("reg.example/Team")
    client = RegistryClient("reg.example/team")
    assert client._name("app") == "team/app"
    with pytest.raises(RegistryReferenceError):
        client._name("Bad/Name")
    assert RegistryClient("localhost:5000").base_url == "http://localhost:5000"
    assert RegistryClient("[::1]:5000").base_url == "http://[::1]:5000"
    assert RegistryClient("127.0.0.1:5000", insecure=False).base_url == "https://127.0.0.1:5000"
    assert RegistryClient("reg.example").base_url == "https://reg.example"
    assert RegistryClient("reg.example", insecure=True).base_url == "http://reg.example"
    assert RegistryClient("docker.io").base_url == "https://registry-1.docker.io"
    assert RegistryClient("docker.io")._name("python") == "library/python"


# ----------------------------------------------------------------------- the open registry on :5000


@docker_test
async def test_open_registry_manifests_and_blobs(pushed_image: str) -> None:
    prefix, _, repository = pushed_image.partition("/")
    async with RegistryClient(f"{docker_env.REGISTRY}/{prefix}") as client:
        await client.check(repository, push=True)
        assert await client.has_manifest(repository, "t1")
        assert not await client.has_manifest(repository, "t2")
        assert not await client.has_manifest(unique("never-pushed"), "t1")
        media_type, manifest = await client.get_manifest(repository, "t1")
        assert media_type in ("application/vnd.docker.distribution.manifest.v2+json", OCI_MANIFEST)
        config = json.loads(await client.get_blob(repository, manifest["config"]["digest"]))
        inspected = subprocess.run(["docker", "image", "inspect", BASE_IMAGE, "--format", "{{json .RootFS.Layers}}"],
                                   capture_output=True, text=True, check=True)
        assert config["rootfs"]["diff_ids"] == json.loads(inspected.stdout)
        layer = manifest["layers"][0]
        content = await client.get_blob(repository, layer["digest"])
        assert len(content) == layer["size"] and sha256_digest(content) == layer["digest"]
        with pytest.raises(RegistryNotFoundError):
            await client.get_blob(repository, sha256_digest(b"no such blob"))
        with pytest.raises(RegistryNotFoundError):
            await client.get_manifest(repository, "t2")


async def test_unreachable_registry_names_the_address() -> None:
    port = free_port()
    async with RegistryClient(f"127.0.0.1:{port}") as client:
        with pytest.raises(RegistryUnreachableError) as caught:
            await client.check("app", push=False)
    message = str(caught.value)
    assert f"http://127.0.0.1:{port}/v2/" in message and "is the registry running" in message


# --------------------------------------------------------------------------------- Basic (htpasswd)


async def test_basic_registry_without_credentials_asks_for_them(basic_registry: str) -> None:
    async with RegistryClient(basic_registry) as client:
        with pytest.raises(RegistryCredentialsMissingError) as caught:
            await client.check("team/app", push=False)
        message = str(caught.value)
        assert "the registry asks for credentials" in message
        assert f"`docker login {basic_registry}`" in message and "--username/--password" in message
        with pytest.raises(RegistryCredentialsMissingError):
            await client.has_manifest("team/app", "v1")


async def test_basic_registry_wrong_password_names_the_source(basic_registry: str) -> None:
    async with RegistryClient(basic_registry, (USER, "wrong-password-123")) as client:
        with pytest.raises(RegistryAuthError) as caught:
            await client.check("team/app", push=True)
    error = caught.value
    assert not isinstance(error, RegistryCredentialsMissingError)
    assert "rejected" in str(error) and "explicit credentials" in str(error) and repr(USER) in str(error)
    assert "HTTP 401" in str(error) and "wrong-password-123" not in str(error)


async def test_basic_registry_right_credentials(basic_registry: str, basic_image: dict[str, Any]) -> None:
    team, _, repository = basic_image["name"].partition("/")
    async with RegistryClient(f"{basic_registry}/{team}", (USER, PASSWORD)) as client:
        await client.check(repository, push=True)
        assert await client.has_manifest(repository, "v1")
        assert not await client.has_manifest(repository, "v2")
        media_type, manifest = await client.get_manifest(repository, "v1")
        assert (media_type, manifest) == (OCI_MANIFEST, basic_image["manifest"])
        assert (await client.get_manifest(repository, basic_image["digest"]))[1] == basic_image["manifest"]
        assert await client.get_blob(repository, sha256_digest(basic_image["layer"])) == basic_image["layer"]


@pytest.mark.anyio  # explicit: the conftest's late marking does not combine with parametrize
@pytest.mark.parametrize("key_form", ["{host}", "http://{host}"])
async def test_basic_credentials_from_docker_config(basic_registry: str, basic_image: dict[str, Any],
                                                    docker_config_dir: Path, key_form: str) -> None:
    key = key_form.format(host=basic_registry)
    path = write_docker_config(docker_config_dir, {"auths": {
        key: {"auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}})
    async with RegistryClient(basic_registry) as client:
        await client.check(basic_image["name"], push=True)
        assert await client.has_manifest(basic_image["name"], "v1")
    write_docker_config(docker_config_dir, {"auths": {key: {"auth": base64.b64encode(f"{USER}:nope".encode()).decode()}}})
    async with RegistryClient(basic_registry) as client:
        with pytest.raises(RegistryAuthError) as caught:
            await client.check(basic_image["name"], push=False)
    assert "rejected" in str(caught.value) and str(path) in str(caught.value)
    assert str(path) in caught.value.source


async def test_basic_credentials_from_credential_helper(basic_registry: str, basic_image: dict[str, Any],
                                                        docker_config_dir: Path, helper_bin: Path) -> None:
    calls = install_helper(helper_bin, "fake", {basic_registry: {"Username": USER, "Secret": PASSWORD}})
    write_docker_config(docker_config_dir, {"credHelpers": {basic_registry: "fake"}})
    async with RegistryClient(basic_registry) as client:
        await client.check(basic_image["name"], push=True)
        assert await client.has_manifest(basic_image["name"], "v1")
    assert calls.read_text().splitlines() == [f"docker-credential-fake get {basic_registry}"]  # asked once

    install_helper(helper_bin, "fake", {basic_registry: {"Username": USER, "Secret": "stale-secret"}})
    async with RegistryClient(basic_registry) as client:
        with pytest.raises(RegistryAuthError) as caught:
            await client.check(basic_image["name"], push=False)
    assert "rejected" in str(caught.value) and "docker-credential-fake" in str(caught.value)
    assert "stale-secret" not in str(caught.value)


async def test_missing_credential_helper_fails_clearly(basic_registry: str, docker_config_dir: Path) -> None:
    write_docker_config(docker_config_dir, {"credsStore": "stepflow-no-such-helper"})
    async with RegistryClient(basic_registry) as client:
        with pytest.raises(CredentialHelperError) as caught:
            await client.check("team/app", push=False)
    assert "docker-credential-stepflow-no-such-helper" in str(caught.value) and basic_registry in str(caught.value)


async def test_registry_not_asking_for_auth_never_runs_helpers(basic_registry: str, tls_registry: tuple[str, Path],
                                                               docker_config_dir: Path) -> None:
    host, ca_file = tls_registry
    write_docker_config(docker_config_dir, {"credsStore": "stepflow-no-such-helper"})
    async with RegistryClient(host, insecure=False, verify=str(ca_file)) as client:
        await client.check("team/app", push=True)
        assert not await client.has_manifest("team/app", "v1")


async def test_tampered_blob_fails_the_digest_check(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("tamper-registry")
    with serve_registry(root) as host:
        image = seed_image(host, "team/tampered", "v1", None)
        digest = sha256_digest(image["layer"])
        hex_digest = digest.split(":")[1]
        [data] = (root / "data").rglob(f"blobs/sha256/{hex_digest[:2]}/{hex_digest}/data")
        data.write_bytes(bytes(255 - b for b in image["layer"]))  # same size, other content
        async with RegistryClient(host) as client:
            with pytest.raises(DigestMismatchError) as caught:
                await client.get_blob("team/tampered", digest)
    assert digest in str(caught.value)


# ---------------------------------------------------------------------------------- token auth


async def test_anonymous_bearer_flow_reads_a_public_repository(token_registry: str, token_service: TokenService,
                                                               seeded: dict[str, Any]) -> None:
    public = seeded["public"]
    async with RegistryClient(token_registry) as client:
        await client.check(public["name"], push=False)
        assert await client.has_manifest(public["name"], "v1")
        assert not await client.has_manifest(public["name"], "v2")
        media_type, manifest = await client.get_manifest(public["name"], "v1")
        assert (media_type, manifest) == (OCI_MANIFEST, public["manifest"])
        assert await client.get_blob(public["name"], manifest["config"]["digest"]) == public["config"]
    requests = token_service.token_requests()
    assert requests and all(r["user"] is None and r["method"] == "GET" for r in requests)
    assert all(r["query"]["service"] == [SERVICE] for r in requests)
    assert {tuple(r["query"]["scope"]) for r in requests} >= {(f"repository:{public['name']}:pull",)}


async def test_anonymous_bearer_flow_cannot_push_or_read_private(token_registry: str, seeded: dict[str, Any]) -> None:
    async with RegistryClient(token_registry) as client:
        with pytest.raises(RegistryCredentialsMissingError) as caught:
            await client.check(seeded["public"]["name"], push=True)
        assert f"docker login {token_registry}" in str(caught.value)
        with pytest.raises(RegistryCredentialsMissingError):
            await client.has_manifest(seeded["private"]["name"], "v1")
        with pytest.raises(RegistryCredentialsMissingError):
            await client.check(seeded["private"]["name"], push=False)


async def test_authenticated_bearer_flow_with_push_scope(token_registry: str, token_service: TokenService,
                                                         seeded: dict[str, Any]) -> None:
    private = seeded["private"]
    async with RegistryClient(token_registry, (USER, PASSWORD)) as client:
        await client.check(private["name"], push=True)
        [request] = token_service.token_requests()
        assert request["user"] == USER and request["query"]["account"] == [USER]
        assert request["query"]["scope"] == [f"repository:{private['name']}:pull,push"]
        assert await client.has_manifest(private["name"], "v1")
        _, manifest = await client.get_manifest(private["name"], private["digest"])
        assert manifest == private["manifest"]
        assert await client.get_blob(private["name"], sha256_digest(private["layer"])) == private["layer"]
        await client.check(unique("team/new-repo"), push=True)  # push rights to a repository not created yet


async def test_wrong_credentials_are_rejected_by_the_token_service(token_registry: str, token_service: TokenService,
                                                                   seeded: dict[str, Any]) -> None:
    async with RegistryClient(token_registry, (USER, "not-her-password")) as client:
        with pytest.raises(RegistryAuthError) as caught:
            await client.check(seeded["private"]["name"], push=True)
    message = str(caught.value)
    assert not isinstance(caught.value, RegistryCredentialsMissingError | RegistryPermissionError)
    assert token_service.realm in message and "rejected" in message and "explicit credentials" in message
    assert "not-her-password" not in message and "HTTP 401" in message


async def test_read_only_user_cannot_push(token_registry: str, seeded: dict[str, Any]) -> None:
    private = seeded["private"]["name"]
    async with RegistryClient(token_registry, (READER, READER_PASSWORD)) as client:
        await client.check(private, push=False)
        assert await client.has_manifest(private, "v1")
        with pytest.raises(RegistryPermissionError) as caught:
            await client.check(private, push=True)
    message = str(caught.value)
    assert f"user {READER!r}" in message and "may not push" in message and private in message


async def test_registry_rejecting_the_issued_token(token_registry: str, token_service: TokenService,
                                                   seeded: dict[str, Any]) -> None:
    token_service.sign_with_untrusted_key = True
    try:
        async with RegistryClient(token_registry, (USER, PASSWORD)) as client:
            with pytest.raises(RegistryAuthError, match="did not accept the token"):
                await client.check(seeded["private"]["name"], push=False)
    finally:
        token_service.sign_with_untrusted_key = False


async def test_tokens_are_cached_per_scope_until_they_expire(token_registry: str, token_service: TokenService,
                                                             seeded: dict[str, Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    public, private = seeded["public"]["name"], seeded["private"]["name"]
    clock = [1000.0]
    monkeypatch.setattr(registry_module, "_monotonic", lambda: clock[0])
    async with RegistryClient(token_registry, (USER, PASSWORD)) as client:
        for _ in range(3):
            assert await client.has_manifest(private, "v1")
        assert len(token_service.token_requests()) == 1
        assert await client.has_manifest(public, "v1")  # another scope: another token
        assert len(token_service.token_requests()) == 2
        clock[0] += token_service.expires_in * 0.8  # still fresh
        assert await client.has_manifest(private, "v1")
        assert len(token_service.token_requests()) == 2
        clock[0] += token_service.expires_in * 0.2  # expired (or about to)
        assert await client.has_manifest(private, "v1")
        assert len(token_service.token_requests()) == 3


async def test_identity_token_uses_the_oauth2_refresh_grant(token_registry: str, token_service: TokenService,
                                                            seeded: dict[str, Any], docker_config_dir: Path) -> None:
    private = seeded["private"]["name"]
    path = write_docker_config(docker_config_dir, {"auths": {token_registry: {
        "auth": base64.b64encode(f"{USER}:".encode()).decode(), "identitytoken": REFRESH_TOKEN}}})
    async with RegistryClient(token_registry) as client:
        await client.check(private, push=True)
        assert await client.has_manifest(private, "v1")
    posts = [r for r in token_service.requests if r["method"] == "POST"]
    assert posts and len(posts) == len(token_service.requests)
    form = posts[0]["form"]
    assert form["grant_type"] == ["refresh_token"] and form["refresh_token"] == [REFRESH_TOKEN]
    assert form["service"] == [SERVICE] and form["scope"] == [f"repository:{private}:pull,push"]
    assert posts[0]["content_type"] == "application/x-www-form-urlencoded"

    write_docker_config(docker_config_dir, {"auths": {token_registry: {"identitytoken": "revoked"}}})
    async with RegistryClient(token_registry) as client:
        with pytest.raises(RegistryAuthError) as caught:
            await client.check(private, push=False)
    assert "identity token" in str(caught.value) and str(path) in str(caught.value)
    assert "revoked" not in str(caught.value)


async def test_identity_token_from_a_credential_helper(token_registry: str, token_service: TokenService,
                                                       seeded: dict[str, Any], docker_config_dir: Path,
                                                       helper_bin: Path) -> None:
    install_helper(helper_bin, "fake", {token_registry: {"Username": "<token>", "Secret": REFRESH_TOKEN}})
    write_docker_config(docker_config_dir, {"credsStore": "fake"})
    async with RegistryClient(token_registry) as client:
        await client.check(seeded["private"]["name"], push=True)
    assert [r["method"] for r in token_service.requests] == ["POST"]


async def test_real_challenges_parse(token_registry: str, token_service: TokenService) -> None:
    name = unique("team/app")
    async with httpx.AsyncClient(base_url=f"http://{token_registry}") as http:
        pull = await http.head(f"/v2/{name}/manifests/v1")
        push = await http.post(f"/v2/{name}/blobs/uploads/")
    assert pull.status_code == push.status_code == 401
    [pull_challenge] = parse_www_authenticate(pull.headers.get_list("www-authenticate"))
    [push_challenge] = parse_www_authenticate(push.headers.get_list("www-authenticate"))
    assert pull_challenge == AuthChallenge("bearer", {"realm": token_service.realm, "service": SERVICE,
                                                      "scope": f"repository:{name}:pull"})
    [push_scope] = push_challenge.scopes  # one scope, its comma kept (the registry orders the actions randomly)
    resource, _, actions = push_scope.rpartition(":")
    assert resource == f"repository:{name}" and sorted(actions.split(",")) == ["pull", "push"]
    assert (push_challenge.realm, push_challenge.service) == (token_service.realm, SERVICE)


async def test_one_scope_parameter_per_scope(token_registry: str, token_service: TokenService) -> None:
    scopes = ("repository:public/a:pull", "repository:team/b:pull,push")
    async with RegistryClient(token_registry, (USER, PASSWORD)) as client:
        auth = RegistryAuth(token_registry, username=USER, password=PASSWORD, source="explicit credentials")
        token, lifetime = await client._fetch_token(token_service.realm, SERVICE, scopes, auth, "test")
    assert lifetime == token_service.expires_in
    [request] = token_service.token_requests()[-1:]
    assert request["query"]["scope"] == list(scopes)
    assert registry_module._granted_actions(token, "team/b") == {"pull", "push"}


# ------------------------------------------------------------------------------------------- TLS


async def test_untrusted_certificate_is_a_tls_error(tls_registry: tuple[str, Path]) -> None:
    host, ca_file = tls_registry
    async with RegistryClient(host, insecure=False) as client:
        with pytest.raises(RegistryTLSError) as caught:
            await client.check("team/app", push=False)
    assert "not trusted" in str(caught.value) and f"https://{host}/v2/" in str(caught.value)
    async with RegistryClient(f"https://{host}", verify=str(ca_file)) as client:
        await client.check("team/app", push=True)


async def test_plain_http_to_a_tls_port_and_https_to_a_plain_port(tls_registry: tuple[str, Path],
                                                                   basic_registry: str) -> None:
    host, _ = tls_registry
    async with RegistryClient(host) as client:  # loopback: plain HTTP by default
        with pytest.raises(RegistryTLSError, match=r"serves HTTPS.*insecure=False"):
            await client.check("team/app", push=False)
    async with RegistryClient(basic_registry, insecure=False) as client:
        with pytest.raises(RegistryTLSError, match=r"does not speak TLS.*insecure=True"):
            await client.check("team/app", push=False)
