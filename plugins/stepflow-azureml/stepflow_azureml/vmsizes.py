"""Azure ML compute VM sizes, and picking one for a generic ``resources=`` request.

Light (no Azure SDK): the flavor's config validation uses it at registration time. Prices are
*approximate* East US pay-as-you-go Linux figures, used only to rank candidates when a step's
``resources=`` picks the cheapest size that fits; they are not quotes. Names are matched
without regard to case, as Azure does.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from stepflow.errors import ConfigError

DEFAULT_VM_SIZE = "Standard_DS3_v2"


@dataclass(frozen=True)
class VmSize:
    """One VM size: vCPUs, memory (GiB), GPUs and an approximate hourly price."""

    name: str
    vcpu: int
    memory_gib: float
    usd_per_hour: float
    gpus: int = 0
    gpu_type: str = ""

    def describe(self) -> str:
        """``Standard_NC6s_v3 (6 vCPU, 112 GiB, 1 x V100)``."""
        gpu = f", {self.gpus} x {self.gpu_type}" if self.gpus else ""
        return f"{self.name} ({self.vcpu} vCPU, {self.memory_gib:g} GiB{gpu})"


def _family(pattern: str, rows: list[tuple[int, float, float]]) -> list[VmSize]:
    return [VmSize(pattern.format(n=vcpu), vcpu, mem, price) for vcpu, mem, price in rows]


SIZES: dict[str, VmSize] = {s.name.lower(): s for s in [
    VmSize("Standard_DS2_v2", 2, 7, 0.146), VmSize("Standard_DS3_v2", 4, 14, 0.293),
    VmSize("Standard_DS4_v2", 8, 28, 0.585), VmSize("Standard_DS5_v2", 16, 56, 1.17),
    VmSize("Standard_DS11_v2", 2, 14, 0.185), VmSize("Standard_DS12_v2", 4, 28, 0.371),
    VmSize("Standard_DS13_v2", 8, 56, 0.741), VmSize("Standard_DS14_v2", 16, 112, 1.482),
    *_family("Standard_D{n}s_v3", [(2, 8, 0.096), (4, 16, 0.192), (8, 32, 0.384), (16, 64, 0.768),
                                   (32, 128, 1.536), (48, 192, 2.304), (64, 256, 3.072)]),
    *_family("Standard_E{n}s_v3", [(2, 16, 0.126), (4, 32, 0.252), (8, 64, 0.504), (16, 128, 1.008),
                                   (32, 256, 2.016), (64, 432, 3.629)]),
    *_family("Standard_F{n}s_v2", [(2, 4, 0.085), (4, 8, 0.169), (8, 16, 0.338), (16, 32, 0.677),
                                   (32, 64, 1.353), (48, 96, 2.03), (64, 128, 2.706), (72, 144, 3.045)]),
    VmSize("Standard_NC4as_T4_v3", 4, 28, 0.526, 1, "T4"), VmSize("Standard_NC8as_T4_v3", 8, 56, 0.752, 1, "T4"),
    VmSize("Standard_NC16as_T4_v3", 16, 110, 1.204, 1, "T4"),
    VmSize("Standard_NC64as_T4_v3", 64, 440, 4.352, 4, "T4"),
    VmSize("Standard_NC6s_v3", 6, 112, 3.06, 1, "V100"), VmSize("Standard_NC12s_v3", 12, 224, 6.12, 2, "V100"),
    VmSize("Standard_NC24s_v3", 24, 448, 12.24, 4, "V100"),
    VmSize("Standard_ND40rs_v2", 40, 672, 22.03, 8, "V100"),
    VmSize("Standard_NV36ads_A10_v5", 36, 440, 3.2, 1, "A10"),
    VmSize("Standard_NV72ads_A10_v5", 72, 880, 6.52, 2, "A10"),
    VmSize("Standard_NC24ads_A100_v4", 24, 220, 3.673, 1, "A100"),
    VmSize("Standard_NC48ads_A100_v4", 48, 440, 7.346, 2, "A100"),
    VmSize("Standard_NC96ads_A100_v4", 96, 880, 14.692, 4, "A100"),
    VmSize("Standard_ND96asr_v4", 96, 900, 27.197, 8, "A100"),
    VmSize("Standard_ND96amsr_A100_v4", 96, 1900, 32.77, 8, "A100_80GB"),
    VmSize("Standard_ND96isr_H100_v5", 96, 1900, 98.32, 8, "H100"),
]}
GPU_TYPES = sorted({s.gpu_type for s in SIZES.values() if s.gpu_type})
#: What users may write for a GPU type (``Resources(gpu_type="nvidia-tesla-t4")``).
GPU_ALIASES = {"NVIDIA_TESLA_T4": "T4", "TESLA_T4": "T4", "NVIDIA_TESLA_V100": "V100", "TESLA_V100": "V100",
               "NVIDIA_A10": "A10", "NVIDIA_TESLA_A100": "A100", "NVIDIA_A100": "A100",
               "NVIDIA_A100_80GB": "A100_80GB", "A100-80GB": "A100_80GB", "NVIDIA_H100": "H100",
               "NVIDIA_H100_80GB": "H100"}


def gpu_name(value: str | None) -> str | None:
    """The table's GPU name of ``value`` (``nvidia-tesla-t4`` -> ``T4``)."""
    if not value:
        return None
    text = value.strip().upper().replace("-", "_")
    return GPU_ALIASES.get(text, text)


def check(name: str) -> VmSize:
    """The VM size named ``name``; ConfigError naming the closest valid ones."""
    size = SIZES.get(name.strip().lower())
    if size is not None:
        return size
    names = [s.name for s in SIZES.values()]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(dict.fromkeys(close))}? " if close else ""
    raise ConfigError(f"unknown Azure ML VM size {name!r}: {hint}valid ones include Standard_DS3_v2, "
                      "Standard_D8s_v3, Standard_E8s_v3, Standard_F16s_v2, Standard_NC4as_T4_v3, Standard_NC6s_v3, "
                      "Standard_NC24ads_A100_v4")


def fits(size: VmSize, cpu: float | None, memory_gib: float | None, gpu: int | None, gpu_type: str | None) -> bool:
    """Whether ``size`` gives at least the request."""
    want = gpu or (1 if gpu_type else 0)
    if (cpu and size.vcpu < cpu) or (memory_gib and size.memory_gib < memory_gib) or size.gpus < want:
        return False
    return not gpu_type or size.gpu_type == gpu_name(gpu_type)


def pick(cpu: float | None, memory_gib: float | None, gpu: int | None, gpu_type: str | None) -> VmSize:
    """The cheapest size giving at least the request (CPU-only sizes when no GPU is asked for).

    ConfigError naming the largest sizes when none fits, or the GPU types when ``gpu_type`` is unknown.
    """
    if gpu_type and gpu_name(gpu_type) not in GPU_TYPES:
        raise ConfigError(f"Azure ML has no GPU type {gpu_type!r} in its VM sizes; GPU types: {', '.join(GPU_TYPES)}")
    want_gpu = bool(gpu or gpu_type)
    options = [s for s in SIZES.values() if bool(s.gpus) == want_gpu and fits(s, cpu, memory_gib, gpu, gpu_type)]
    if options:
        return min(options, key=lambda s: (s.usd_per_hour, s.name))
    asked = ", ".join(f"{k}={v}" for k, v in (("cpu", cpu), ("memory", f"{memory_gib:g}GiB" if memory_gib else None),
                                               ("gpu", gpu), ("gpu_type", gpu_type)) if v)
    pool = [s for s in SIZES.values() if bool(s.gpus) == want_gpu] or list(SIZES.values())
    biggest = sorted(pool, key=lambda s: (s.gpus, s.vcpu, s.memory_gib))[-3:]
    raise ConfigError(f"no Azure ML VM size offers {asked} on one node; the largest are "
                      f"{', '.join(s.describe() for s in reversed(biggest))}. Lower the request, or set "
                      "instance_type and instance_count yourself")
