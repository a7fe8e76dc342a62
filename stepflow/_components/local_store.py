"""The local artifact store: plain files under one directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from stepflow.interfaces.artifact_store import ArtifactStore


class LocalArtifactStore(ArtifactStore):
    """Artifacts as files under ``path`` (default ``$STEPFLOW_HOME/artifacts``)."""

    flavor = "local"
    is_remote = False

    def __init__(self, name: str = "default", config: Any = None) -> None:
        from stepflow._store.sqlite import stepflow_home

        self.name = name
        configured = getattr(config, "path", None)
        self._root = Path(configured).expanduser() if configured else stepflow_home() / "artifacts"

    @property
    def root(self) -> str:
        return str(self._root)

    def _path(self, uri: str) -> Path:
        path = Path(uri.removeprefix("file://"))
        return path if path.is_absolute() else self._root / path

    async def write_bytes(self, uri: str, data: bytes) -> None:
        path = self._path(uri)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)  # atomic: readers never see half a file

        await anyio.to_thread.run_sync(write)

    async def read_bytes(self, uri: str) -> bytes:
        return await anyio.to_thread.run_sync(self._path(uri).read_bytes)

    async def exists(self, uri: str) -> bool:
        return await anyio.to_thread.run_sync(self._path(uri).exists)
