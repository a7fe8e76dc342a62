"""Vertex AI custom-training machine types, the accelerators each may carry, and picking one.

Light (no Google SDK): the flavor's config validation uses it at registration time. Prices are
*approximate* us-central1 on-demand figures, used only to rank candidates when a step's generic
``resources=`` request picks the cheapest machine that fits; they are not quotes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from stepflow.errors import ConfigError

DEFAULT_MACHINE = "n1-standard-4"


@dataclass(frozen=True)
class Machine:
    """One machine type: vCPUs, memory (GiB), built-in GPUs (A2/G2/A3 carry theirs) and price."""

    name: str
    vcpu: int
    memory_gib: float
    usd_per_hour: float
    gpus: int = 0
    gpu_type: str = ""

    def describe(self) -> str:
        """``n1-standard-8 (8 vCPU, 30 GiB)``."""
        gpu = f", {self.gpus} x {self.gpu_type}" if self.gpus else ""
        return f"{self.name} ({self.vcpu} vCPU, {self.memory_gib:g} GiB{gpu})"


def _family(prefix: str, sizes: list[int], gib_per_cpu: float, usd_per_cpu: float) -> list[Machine]:
    return [Machine(f"{prefix}-{n}", n, n * gib_per_cpu, round(n * usd_per_cpu, 4)) for n in sizes]


MACHINES: dict[str, Machine] = {m.name: m for m in [
    *_family("n1-standard", [4, 8, 16, 32, 64, 96], 3.75, 0.0475),
    *_family("n1-highmem", [2, 4, 8, 16, 32, 64, 96], 6.5, 0.0592),
    *_family("n1-highcpu", [16, 32, 64, 96], 0.9, 0.0354),
    *_family("n2-standard", [4, 8, 16, 32, 48, 64, 80], 4.0, 0.0486),
    *_family("n2-highmem", [2, 4, 8, 16, 32, 48, 64, 80], 8.0, 0.0656),
    *_family("e2-standard", [4, 8, 16, 32], 4.0, 0.0335),
    *_family("c2-standard", [4, 8, 16, 30, 60], 4.0, 0.0522),
    Machine("a2-highgpu-1g", 12, 85, 3.67, 1, "NVIDIA_TESLA_A100"),
    Machine("a2-highgpu-2g", 24, 170, 7.35, 2, "NVIDIA_TESLA_A100"),
    Machine("a2-highgpu-4g", 48, 340, 14.69, 4, "NVIDIA_TESLA_A100"),
    Machine("a2-highgpu-8g", 96, 680, 29.39, 8, "NVIDIA_TESLA_A100"),
    Machine("a2-ultragpu-1g", 12, 170, 5.07, 1, "NVIDIA_A100_80GB"),
    Machine("a2-ultragpu-8g", 96, 1360, 40.55, 8, "NVIDIA_A100_80GB"),
    Machine("g2-standard-4", 4, 16, 0.71, 1, "NVIDIA_L4"),
    Machine("g2-standard-8", 8, 32, 0.85, 1, "NVIDIA_L4"),
    Machine("g2-standard-12", 12, 48, 1.0, 1, "NVIDIA_L4"),
    Machine("g2-standard-24", 24, 96, 2.0, 2, "NVIDIA_L4"),
    Machine("g2-standard-48", 48, 192, 4.0, 4, "NVIDIA_L4"),
    Machine("g2-standard-96", 96, 384, 8.0, 8, "NVIDIA_L4"),
    Machine("a3-highgpu-8g", 208, 1872, 88.25, 8, "NVIDIA_H100_80GB"),
]}

#: Accelerators that attach to N1 machines: counts allowed, and the price of one per hour.
N1_ACCELERATORS: dict[str, tuple[tuple[int, ...], float]] = {
    "NVIDIA_TESLA_T4": ((1, 2, 4), 0.40),
    "NVIDIA_TESLA_P4": ((1, 2, 4), 0.69),
    "NVIDIA_TESLA_P100": ((1, 2, 4), 1.68),
    "NVIDIA_TESLA_V100": ((1, 2, 4, 8), 2.83),
}
#: What users may write for a GPU type (``Resources(gpu_type="T4")``).
GPU_ALIASES = {"T4": "NVIDIA_TESLA_T4", "P4": "NVIDIA_TESLA_P4", "P100": "NVIDIA_TESLA_P100",
               "V100": "NVIDIA_TESLA_V100", "A100": "NVIDIA_TESLA_A100", "A100_80GB": "NVIDIA_A100_80GB",
               "L4": "NVIDIA_L4", "H100": "NVIDIA_H100_80GB"}
ACCELERATORS = sorted({*N1_ACCELERATORS, *(m.gpu_type for m in MACHINES.values() if m.gpu_type)})


def gpu_name(value: str | None) -> str | None:
    """The Vertex accelerator enum name of ``value`` (``T4`` -> ``NVIDIA_TESLA_T4``)."""
    if not value:
        return None
    text = value.strip().upper().replace("-", "_")
    return GPU_ALIASES.get(text, text)


def check(machine_type: str, accelerator_type: str | None, accelerator_count: int) -> Machine:
    """The machine; ConfigError naming the valid choices when the machine or its accelerators are wrong."""
    machine = MACHINES.get(machine_type)
    if machine is None:
        close = difflib.get_close_matches(machine_type, list(MACHINES), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"unknown Vertex AI machine type {machine_type!r}: {hint}valid ones include "
                          "n1-standard-4, n1-highmem-8, n2-standard-8, e2-standard-4, a2-highgpu-1g, g2-standard-8")
    accel = gpu_name(accelerator_type)
    if machine.gpus:  # A2 / G2 / A3: the GPUs come with the machine
        if accel and (accel != machine.gpu_type or accelerator_count not in (0, machine.gpus)):
            raise ConfigError(f"{machine_type} comes with {machine.gpus} x {machine.gpu_type}: set "
                              f"accelerator_type={machine.gpu_type} accelerator_count={machine.gpus}, or leave "
                              "them unset")
        return machine
    if not accel:
        if accelerator_count:
            raise ConfigError(f"accelerator_count={accelerator_count} needs an accelerator_type: one of "
                              f"{', '.join(N1_ACCELERATORS)}")
        return machine
    if not machine_type.startswith("n1-"):
        raise ConfigError(f"{machine_type} takes no attached accelerators; attach {accel} to an n1 machine "
                          f"(e.g. n1-standard-8), or pick a machine with built-in GPUs (a2-highgpu-1g, g2-standard-8)")
    if accel not in N1_ACCELERATORS:
        built_in = ", ".join(sorted(set(ACCELERATORS) - set(N1_ACCELERATORS)))
        raise ConfigError(f"accelerator {accel} cannot attach to {machine_type}; n1 machines take "
                          f"{', '.join(N1_ACCELERATORS)} (and {built_in} come built into a2/g2/a3 machines)")
    counts = N1_ACCELERATORS[accel][0]
    if accelerator_count not in counts:
        raise ConfigError(f"{accel} on {machine_type}: accelerator_count must be one of "
                          f"{', '.join(map(str, counts))}, not {accelerator_count}")
    return machine


@dataclass(frozen=True)
class Pick:
    """A machine, and the accelerators to attach to it (none for built-in GPUs)."""

    machine_type: str
    accelerator_type: str | None = None
    accelerator_count: int = 0

    def describe(self) -> str:
        """``n1-standard-8 + 1 x NVIDIA_TESLA_T4``."""
        extra = f" + {self.accelerator_count} x {self.accelerator_type}" if self.accelerator_type else ""
        return MACHINES[self.machine_type].describe() + extra


def pick(cpu: float | None, memory_gib: float | None, gpu: int | None, gpu_type: str | None) -> Pick:
    """The cheapest machine (with accelerators) giving at least the request; ConfigError with the closest when none."""
    accel = gpu_name(gpu_type)
    want_gpus = gpu or (1 if accel else 0)
    options: list[tuple[float, Pick]] = []
    for m in MACHINES.values():
        if (cpu and m.vcpu < cpu) or (memory_gib and m.memory_gib < memory_gib):
            continue
        if not want_gpus:
            if not m.gpus:
                options.append((m.usd_per_hour, Pick(m.name)))
            continue
        if m.gpus and m.gpus >= want_gpus and (not accel or m.gpu_type == accel):
            options.append((m.usd_per_hour, Pick(m.name)))
        elif not m.gpus and m.name.startswith("n1-"):
            for kind, (counts, price) in N1_ACCELERATORS.items():
                fits = [c for c in counts if c >= want_gpus]
                if fits and (not accel or kind == accel):
                    options.append((m.usd_per_hour + fits[0] * price, Pick(m.name, kind, fits[0])))
    if options:
        return min(options, key=lambda o: (o[0], o[1].machine_type))[1]
    asked = ", ".join(f"{k}={v}" for k, v in (("cpu", cpu), ("memory", f"{memory_gib:g}GiB" if memory_gib else None),
                                               ("gpu", gpu), ("gpu_type", gpu_type)) if v)
    if accel and accel not in ACCELERATORS:
        raise ConfigError(f"Vertex AI has no GPU type {gpu_type!r}; GPU types: {', '.join(ACCELERATORS)} "
                          f"(or {', '.join(GPU_ALIASES)})")
    biggest = sorted(MACHINES.values(), key=lambda m: (m.gpus if want_gpus else 0, m.vcpu, m.memory_gib))[-3:]
    raise ConfigError(f"no Vertex AI machine offers {asked} on one replica; the largest are "
                      f"{', '.join(m.describe() for m in reversed(biggest))}. Lower the request, or set machine_type "
                      "and replica_count yourself")
