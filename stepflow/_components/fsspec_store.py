"""Artifact stores over fsspec filesystems: S3, Google Cloud Storage, Azure Blob Storage.

fsspec's synchronous API runs in worker threads (the async filesystems behind it run their own
I/O loop in a thread of fsspec's), so the event loop never blocks. The cloud SDKs (s3fs, gcsfs,
adlfs) are imported when a store is created, never when this module is imported.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import functools
import importlib
import uuid
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self, TypeVar

import anyio
import fsspec

from stepflow.errors import AccessDeniedError, ArtifactStoreError, BucketNotFoundError, ConfigError, PluginError
from stepflow.interfaces.artifact_store import ArtifactStore

T = TypeVar("T")


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("s3", "bucket/a/b")``; a plain path has scheme ``""``."""
    scheme, sep, rest = uri.partition("://")
    return (scheme.lower(), rest) if sep else ("", uri)


def _http_status(exc: BaseException) -> int | None:
    """HTTP status carried by an SDK error (azure-core ``status_code``, gcsfs ``code``)."""
    for attr in ("status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _brief(exc: BaseException) -> str:
    """``Type: first line`` of an error: SDK messages go on with request ids and XML bodies."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}"


class FsspecArtifactStore(ArtifactStore):
    """Artifacts as objects of any fsspec filesystem, under a root URI.

    ``uri`` arguments are absolute (``s3://bucket/key``, with one of the store's schemes) or
    relative to :attr:`root`. Object stores make every write atomic for readers: an object
    appears whole when its upload completes, never in part.
    """

    flavor = "fsspec"
    is_remote = True
    #: URI schemes this store accepts; empty: any (the root's).
    schemes: ClassVar[tuple[str, ...]] = ()
    #: Module (pip extra) that implements the protocol, imported when the store is created.
    sdk: ClassVar[str] = ""
    bucket_word: ClassVar[str] = "bucket"

    def __init__(self, name: str = "default", config: Any = None, *, path: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.name = name
        root = path if path is not None else getattr(config, "path", None)
        if not root:
            raise ConfigError(f"artifact store '{name}': a root URI (path) is required")
        scheme, rest = split_uri(root)
        if not scheme or (self.schemes and scheme not in self.schemes):
            wanted = " or ".join(s + "://" for s in self.schemes) if self.schemes else "a URI scheme"
            raise ConfigError(f"{self.flavor} artifact store path must start with {wanted}, got {root!r}")
        self._scheme = scheme
        self._local = scheme in ("file", "local")  # paths keep their leading '/'
        self._root = self._clean(rest)
        self._options = dict(storage_options) if storage_options is not None else self._options_from(config)
        self._fs = self._filesystem(self._options)
        self._known_buckets: set[str] = set()

    # -- construction --------------------------------------------------------------------
    def _options_from(self, config: Any) -> dict[str, Any]:
        """The fsspec storage options of a flavor config (subclasses map their options)."""
        return {}

    def _import_sdk(self) -> None:
        if not self.sdk:
            return
        try:
            importlib.import_module(self.sdk)
        except ImportError as exc:
            raise PluginError(f"the {self.flavor} artifact store needs {self.sdk}: "
                              f"pip install 'stepflow[{self.flavor}]' ({exc})") from exc

    def _filesystem(self, options: Mapping[str, Any]) -> fsspec.AbstractFileSystem:
        self._import_sdk()
        # Own instance, no listings cache: other processes write to the same store.
        return fsspec.filesystem(self._scheme, skip_instance_cache=True, use_listings_cache=False, **options)

    @classmethod
    def from_storage_options(cls, root: str, storage_options: Mapping[str, Any],
                             name: str = "default") -> Self:
        """Rebuild a store elsewhere (a remote job) from :attr:`root` and :meth:`storage_options`."""
        return cls(name, path=root, storage_options=storage_options)

    def storage_options(self) -> dict[str, Any]:
        """What another process needs to reach this store (fsspec storage options).

        Holds endpoints, regions and such; credentials only when they came from the config.
        """
        return copy.deepcopy(self._options)

    #: Storage options that are credentials (never in a job's visible description).
    secret_options: ClassVar[frozenset[str]] = frozenset()
    #: Storage options that only make sense on the runner's machine (profiles, local files).
    host_only_options: ClassVar[frozenset[str]] = frozenset()
    #: Values of a secret option that name a mode, not a credential (gcsfs's token="anon").
    public_modes: ClassVar[frozenset[str]] = frozenset()

    def job_storage_options(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(public, secret)`` options for jobs; host-only ones (a profile name) are left out."""
        public: dict[str, Any] = {}
        secret: dict[str, Any] = {}
        for key, value in self.storage_options().items():
            if key in self.host_only_options:
                continue
            credential = key in self.secret_options and value not in self.public_modes
            (secret if credential else public)[key] = value
        return public, secret

    @property
    def filesystem(self) -> fsspec.AbstractFileSystem:
        """The underlying fsspec filesystem (its calls block: run them in a thread)."""
        return self._fs

    @property
    def root(self) -> str:
        return f"{self._scheme}://{self._root}"

    # -- paths ---------------------------------------------------------------------------
    def _clean(self, path: str) -> str:
        return path.rstrip("/") if self._local else path.strip("/")

    def _path(self, uri: str) -> str:
        """Filesystem path (``bucket/key``) of an absolute or root-relative URI."""
        scheme, rest = split_uri(uri)
        if not scheme:
            rest = uri.strip("/")
            return f"{self._root}/{rest}" if rest else self._root
        if scheme != self._scheme and scheme not in self.schemes:
            raise ArtifactStoreError(f"artifact store '{self.name}' ({self.root}) cannot hold {uri!r}: "
                                     f"expected a {self._scheme}:// URI or a path relative to the root")
        return self._clean(rest)

    def _uri(self, path: str) -> str:
        return f"{self._scheme}://{path}"

    @staticmethod
    def _bucket(path: str) -> str:
        return path.split("/", 1)[0]

    # -- error handling ------------------------------------------------------------------
    async def _run(self, fn: Callable[[], T], *, what: str, path: str) -> T:
        """Run a blocking fsspec call in a worker thread, translating backend errors."""
        try:
            return await anyio.to_thread.run_sync(fn)
        except ArtifactStoreError:
            raise
        except Exception as exc:
            uri = self._uri(path)
            await self._check_bucket(path)  # a missing bucket explains most failures
            if isinstance(exc, FileNotFoundError):
                raise FileNotFoundError(f"artifact store '{self.name}': no artifact at {uri}") from exc
            if isinstance(exc, PermissionError) or _http_status(exc) in (401, 403):
                raise AccessDeniedError(f"artifact store '{self.name}': access denied to {uri} "
                                        f"(check its credentials): {_brief(exc)}") from exc
            raise ArtifactStoreError(f"artifact store '{self.name}': {what} {uri} failed: {_brief(exc)}") from exc

    async def _check_bucket(self, path: str) -> None:
        """Raise BucketNotFoundError / AccessDeniedError when the path's bucket is unusable."""
        bucket = self._bucket(path)
        if not bucket or bucket in self._known_buckets or self._local or self._scheme == "memory":
            return
        try:
            await anyio.to_thread.run_sync(self._fs.info, bucket)
        except FileNotFoundError:
            raise BucketNotFoundError(f"artifact store '{self.name}': {self.bucket_word} '{bucket}' does not "
                                      f"exist ({self._uri(path)})") from None
        except PermissionError as exc:
            raise AccessDeniedError(f"artifact store '{self.name}': access denied to {self.bucket_word} "
                                    f"'{bucket}' ({self._uri(path)}): {_brief(exc)}") from exc
        except Exception:
            return  # the probe itself failed: let the original error speak
        self._known_buckets.add(bucket)

    # -- the interface -------------------------------------------------------------------
    async def write_bytes(self, uri: str, data: bytes) -> None:
        path = self._path(uri)
        fs = self._fs

        def write() -> None:
            if not self._local:
                fs.pipe_file(path, data)  # one PUT / committed upload: atomic
                return
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)  # rename: readers never see half a file

        await self._run(write, what="writing", path=path)

    async def read_bytes(self, uri: str) -> bytes:
        path = self._path(uri)
        data = await self._run(functools.partial(self._fs.cat_file, path), what="reading", path=path)
        return bytes(data)

    async def exists(self, uri: str) -> bool:
        path = self._path(uri)
        found = bool(await self._run(functools.partial(self._fs.exists, path), what="checking", path=path))
        if not found:
            await self._check_bucket(path)  # "no" because the bucket is missing is a config error
        return found

    async def delete(self, uri: str) -> None:
        """Delete one artifact; deleting an absent one is not an error."""
        path = self._path(uri)
        with contextlib.suppress(FileNotFoundError):
            await self._run(functools.partial(self._fs.rm_file, path), what="deleting", path=path)

    async def list(self, prefix: str = "") -> builtins.list[str]:
        """URIs of every artifact under ``prefix`` (a folder-like prefix, searched recursively), sorted."""
        path = self._path(prefix)
        found = await self._run(functools.partial(self._fs.find, path), what="listing", path=path)
        if not found:
            await self._check_bucket(path)
        return sorted(self._uri(p) for p in found)


class S3ArtifactStore(FsspecArtifactStore):
    """Artifacts in an S3 (or S3-compatible) bucket, through s3fs."""

    flavor = "s3"
    schemes = ("s3",)
    sdk = "s3fs"
    image_requirements = ("s3fs",)
    secret_options = frozenset({"key", "secret", "token"})
    host_only_options = frozenset({"profile"})

    def _options_from(self, config: Any) -> dict[str, Any]:
        opts = {k: getattr(config, k, None) for k in ("endpoint_url", "key", "secret", "profile")}
        region = getattr(config, "region", None)
        if region:
            opts["client_kwargs"] = {"region_name": region}
        return {k: v for k, v in opts.items() if v is not None}


class GCSArtifactStore(FsspecArtifactStore):
    """Artifacts in a Google Cloud Storage bucket, through gcsfs."""

    flavor = "gcs"
    schemes = ("gs", "gcs")
    sdk = "gcsfs"
    image_requirements = ("gcsfs",)
    secret_options = frozenset({"token"})
    public_modes = frozenset({"anon", "google_default", "cloud"})

    def _options_from(self, config: Any) -> dict[str, Any]:
        opts = {k: getattr(config, k, None) for k in ("project", "endpoint_url", "token")}
        return {k: v for k, v in opts.items() if v is not None}

    def _filesystem(self, options: Mapping[str, Any]) -> fsspec.AbstractFileSystem:
        if not options.get("endpoint_url"):
            return super()._filesystem(options)
        self._import_sdk()
        # gcsfs's default class probes each bucket's layout over gRPC, which emulators do not
        # serve (60 s timeout per call): a custom endpoint gets the plain JSON-API class.
        from gcsfs.core import GCSFileSystem

        fs: fsspec.AbstractFileSystem = GCSFileSystem(skip_instance_cache=True, use_listings_cache=False,
                                                      **options)
        return fs


class AzureArtifactStore(FsspecArtifactStore):
    """Artifacts in an Azure Blob Storage container, through adlfs."""

    flavor = "azure"
    schemes = ("az", "abfs", "abfss")
    sdk = "adlfs"
    image_requirements = ("adlfs",)
    secret_options = frozenset({"connection_string", "account_key", "sas_token", "credential"})
    bucket_word = "container"

    def _options_from(self, config: Any) -> dict[str, Any]:
        name = getattr(config, "account_name", None)
        key = getattr(config, "account_key", None)
        conn = getattr(config, "connection_string", None)
        endpoint = getattr(config, "endpoint_url", None)
        if conn and endpoint:
            raise ConfigError(f"azure artifact store '{self.name}': give connection_string or "
                              "endpoint_url, not both (a connection string names its endpoint)")
        if endpoint:
            if not name:
                raise ConfigError(f"azure artifact store '{self.name}': endpoint_url needs account_name")
            # adlfs builds https://{host} from an account; a connection string keeps any scheme.
            parts = [f"BlobEndpoint={endpoint.rstrip('/')}", f"AccountName={name}"]
            if key:
                parts.append(f"AccountKey={key}")
            return {"connection_string": ";".join(parts) + ";"}
        if conn:
            return {"connection_string": conn}
        opts = {"account_name": name, "account_key": key}
        return {k: v for k, v in opts.items() if v is not None}
