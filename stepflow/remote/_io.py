"""Reading and writing artifact URIs from inside a job (local paths or any fsspec URL).

The job reaches the artifact store with fsspec storage options in two parts: the public ones
(endpoints, regions) from ``$STEPFLOW_STORAGE_OPTIONS``, and credentials, when the store's
config holds any, from the job's private secrets. Usually there are none: the job's identity on
its backend (IAM role, service account, managed identity) grants the access.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STORAGE_OPTIONS_ENV = "STEPFLOW_STORAGE_OPTIONS"


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return "://" not in uri or uri.startswith("file://")


def storage_options(secret: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The public storage options of the environment, with ``secret`` ones merged over them."""
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    options = dict(json.loads(raw)) if raw else {}
    options.update(secret or {})
    return options


def _filesystem(uri: str, options: Mapping[str, Any]) -> Any:
    """The fsspec filesystem of ``uri`` (as the runner's artifact store builds it)."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme in ("gs", "gcs") and options.get("endpoint_url"):
        # gcsfs's default class probes each bucket's layout over gRPC, which a custom endpoint
        # (an emulator, a private gateway) does not serve: a 60 s timeout per call.
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
    import fsspec

    return fsspec.filesystem(scheme, skip_instance_cache=True, use_listings_cache=False, **options)


def read_uri(uri: str, options: Mapping[str, Any] | None = None) -> bytes:
    """Bytes at ``uri`` (FileNotFoundError when absent)."""
    if is_local(uri):
        return Path(uri.removeprefix("file://")).read_bytes()
    return bytes(_filesystem(uri, dict(options or {})).cat_file(uri))


def write_uri(uri: str, data: bytes, options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` at ``uri`` (atomically for local files)."""
    if is_local(uri):
        path = Path(uri.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    _filesystem(uri, dict(options or {})).pipe_file(uri, data)
