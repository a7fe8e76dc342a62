"""The image builder interface: turns a build context into a container image."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar


class ImageBuilder(abc.ABC):
    """Builds images from a context directory (a Dockerfile at its root)."""

    flavor: ClassVar[str] = ""
    name: str = ""

    @abc.abstractmethod
    async def build(self, context: Path, tag: str) -> str:
        """Build ``context`` as ``tag`` and return the image id."""
