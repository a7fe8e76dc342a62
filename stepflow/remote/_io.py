"""Reading and writing artifact URIs from inside a job (local paths or any fsspec URL)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STORAGE_OPTIONS_ENV = "STEPFLOW_STORAGE_OPTIONS"


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _storage_options() -> dict[str, Any]:
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    return dict(json.loads(raw)) if raw else {}


def read_uri(uri: str) -> bytes:
    """Bytes at ``uri`` (FileNotFoundError when absent)."""
    if _is_local(uri):
        return Path(uri.removeprefix("file://")).read_bytes()
    import fsspec

    with fsspec.open(uri, "rb", **_storage_options()) as fh:
        return bytes(fh.read())


def write_uri(uri: str, data: bytes) -> None:
    """Write ``data`` at ``uri`` (atomically for local files)."""
    if _is_local(uri):
        path = Path(uri.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    import fsspec

    with fsspec.open(uri, "wb", **_storage_options()) as fh:
        fh.write(data)


def sibling(uri: str, name: str) -> str:
    """The URI of ``name`` in the same directory as ``uri``."""
    head, _, _ = uri.rpartition("/")
    return f"{head}/{name}" if head else name
