"""The image builder interface: turns a build context into a pushed container image."""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

#: Called with one human-readable progress line (build output, push progress).
Progress = Callable[[str], None]


class ImageBuilder(abc.ABC):
    """Builds images from a context directory (a ``Dockerfile`` at its root) and pushes them."""

    flavor: ClassVar[str] = ""
    name: str = ""

    @abc.abstractmethod
    async def build(self, context: Path, tag: str, *, progress: Progress | None = None) -> str:
        """Build ``context`` as ``tag`` (a full reference, registry included); return the image id.

        Raise :class:`stepflow.errors.ImageBuildError` with the build log tail on failure.
        """

    @abc.abstractmethod
    async def push(self, tag: str, credentials: tuple[str, str] | None = None, *,
                   progress: Progress | None = None) -> None:
        """Push ``tag`` to its registry; raise ImageBuildError saying why on failure."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
