"""Generic compute resources a step asks for: ``@step(resources=Resources(cpu=4, memory="16GiB"))``.

Every operator honours them: the docker operator turns them into container limits, the cloud
operators pick the smallest machine that fits (or refuse the step before the run starts,
naming the closest machines they have).
"""

from __future__ import annotations

import re
from typing import Any

import attrs

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: int | float | str, *, what: str, unit: str = "MiB") -> float:
    """Bytes-like sizes ("512m", "16GiB", "1.5 GB", 2048) in ``unit`` (MiB or GiB).

    Binary and decimal suffixes are both read as binary multiples (what schedulers do); a bare
    number is already in ``unit``.
    """
    scale = 1024 ** (2 if unit == "MiB" else 3)
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a size such as '16GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"{what} must be > 0, got {value!r}")
        return float(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{what}: cannot read {value!r} as a size; write e.g. '512MiB', '16GiB' or '2g'")
    number, prefix, _ = match.groups()
    amount = float(number) * 1024 ** _POWERS[prefix.lower()]
    if not prefix:  # a bare number with an optional "b": already in the unit
        amount = float(number) * scale
    if amount <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return amount / scale


def _positive(name: str) -> Any:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"Resources({name}=...) must be a number > 0, got {value!r}")

    return check


def _size(name: str, unit: str) -> Any:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None:
            parse_size(value, what=f"Resources({name}=...)", unit=unit)

    return check


@attrs.frozen
class Resources:
    """What one step needs to run: CPUs, memory, GPUs (of a type), disk.

    ``memory`` and ``disk`` take sizes such as ``"16GiB"``, ``"512m"`` (a bare number is MiB for
    memory, GiB for disk). Unset fields leave the choice to the operator's configuration.
    """

    cpu: float | None = attrs.field(default=None, validator=_positive("cpu"))
    memory: str | int | None = attrs.field(default=None, validator=_size("memory", "MiB"))
    gpu: int | None = attrs.field(default=None, validator=_positive("gpu"))
    gpu_type: str | None = None
    disk: str | int | None = attrs.field(default=None, validator=_size("disk", "GiB"))

    @gpu.validator
    def _whole_gpus(self, attribute: Any, value: int | None) -> None:
        if value is not None and int(value) != value:
            raise ValueError(f"Resources(gpu=...) must be a whole number, got {value!r}")

    @property
    def memory_mib(self) -> float | None:
        """Memory in MiB (None when unset)."""
        return None if self.memory is None else parse_size(self.memory, what="memory", unit="MiB")

    @property
    def disk_gib(self) -> float | None:
        """Disk in GiB (None when unset)."""
        return None if self.disk is None else parse_size(self.disk, what="disk", unit="GiB")

    def is_empty(self) -> bool:
        """True when nothing is asked for."""
        return all(v is None for v in attrs.astuple(self))

    def describe(self) -> str:
        """``cpu=4, memory=16GiB, gpu=1 (A100)`` for messages."""
        parts = [f"{f.name}={v}" for f in attrs.fields(Resources) if (v := getattr(self, f.name)) is not None
                 and f.name != "gpu_type"]
        if self.gpu_type:
            parts.append(f"gpu_type={self.gpu_type}")
        return ", ".join(parts) or "nothing specific"

    @classmethod
    def coerce(cls, value: Resources | dict[str, Any] | None) -> Resources | None:
        """Accept a Resources, a dict of its fields, or None."""
        if value is None or isinstance(value, Resources):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in attrs.fields(cls)}
            if unknown:
                raise ValueError(f"unknown resource(s) {', '.join(sorted(unknown))}; valid: cpu, memory, gpu, "
                                 "gpu_type, disk")
            return cls(**value)
        raise TypeError(f"resources must be a stepflow.Resources or a dict, got {type(value).__name__}")
