"""SageMaker training instance types: sizes, and picking one for a generic resource request.

Light (no AWS SDK): the flavor's config validation uses it at registration time.

The table holds the common ``ml.*`` training types with their vCPUs, memory (GiB) and GPUs.
``usd_per_hour`` is an *approximate* us-east-1 on-demand training price, used only to rank
candidates when :func:`pick_instance` chooses the cheapest type that satisfies a request; it is
not a quote. Burstable (``ml.t3.*``) and Trainium types are valid names but never picked
automatically.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from stepflow.errors import ConfigError

DEFAULT_INSTANCE_TYPE = "ml.m5.large"


@dataclass(frozen=True)
class InstanceType:
    """One SageMaker training instance type."""

    name: str
    vcpu: int
    memory_gib: float
    gpus: int
    usd_per_hour: float
    accelerator: str = ""
    #: Whether :func:`pick_instance` may choose it (burstable and non-GPU accelerators: no).
    auto: bool = True

    def describe(self) -> str:
        """``ml.g4dn.xlarge (4 vCPU, 16 GiB, 1 GPU T4)``."""
        gpu = f", {self.gpus} GPU{'s' if self.gpus != 1 else ''} {self.accelerator}".rstrip() if self.gpus else ""
        return f"{self.name} ({self.vcpu} vCPU, {self.memory_gib:g} GiB{gpu})"


def _family(prefix: str, rows: list[tuple[str, int, float, int, float]], *, accelerator: str = "",
            auto: bool = True) -> list[InstanceType]:
    return [InstanceType(f"ml.{prefix}.{size}", vcpu, mem, gpus, price, accelerator if gpus else "", auto)
            for size, vcpu, mem, gpus, price in rows]


_TABLE: list[InstanceType] = [
    # general purpose
    *_family("m5", [("large", 2, 8, 0, 0.115), ("xlarge", 4, 16, 0, 0.23), ("2xlarge", 8, 32, 0, 0.461),
                    ("4xlarge", 16, 64, 0, 0.922), ("12xlarge", 48, 192, 0, 2.765),
                    ("24xlarge", 96, 384, 0, 5.53)]),
    *_family("m4", [("xlarge", 4, 16, 0, 0.24), ("2xlarge", 8, 32, 0, 0.48), ("4xlarge", 16, 64, 0, 0.96),
                    ("10xlarge", 40, 160, 0, 2.4), ("16xlarge", 64, 256, 0, 3.84)]),
    *_family("m6i", [("large", 2, 8, 0, 0.115), ("xlarge", 4, 16, 0, 0.23), ("2xlarge", 8, 32, 0, 0.461),
                     ("4xlarge", 16, 64, 0, 0.922), ("8xlarge", 32, 128, 0, 1.843),
                     ("12xlarge", 48, 192, 0, 2.765), ("16xlarge", 64, 256, 0, 3.686),
                     ("24xlarge", 96, 384, 0, 5.53), ("32xlarge", 128, 512, 0, 7.373)]),
    *_family("m7i", [("large", 2, 8, 0, 0.121), ("xlarge", 4, 16, 0, 0.242), ("2xlarge", 8, 32, 0, 0.484),
                     ("4xlarge", 16, 64, 0, 0.968), ("8xlarge", 32, 128, 0, 1.935),
                     ("12xlarge", 48, 192, 0, 2.903), ("16xlarge", 64, 256, 0, 3.871),
                     ("24xlarge", 96, 384, 0, 5.806), ("48xlarge", 192, 768, 0, 11.612)]),
    # compute optimized
    *_family("c5", [("xlarge", 4, 8, 0, 0.204), ("2xlarge", 8, 16, 0, 0.408), ("4xlarge", 16, 32, 0, 0.816),
                    ("9xlarge", 36, 72, 0, 1.836), ("18xlarge", 72, 144, 0, 3.672)]),
    *_family("c4", [("xlarge", 4, 7.5, 0, 0.239), ("2xlarge", 8, 15, 0, 0.477), ("4xlarge", 16, 30, 0, 0.955),
                    ("8xlarge", 36, 60, 0, 1.91)]),
    *_family("c5n", [("xlarge", 4, 10.5, 0, 0.259), ("2xlarge", 8, 21, 0, 0.518), ("4xlarge", 16, 42, 0, 1.037),
                     ("9xlarge", 36, 96, 0, 2.333), ("18xlarge", 72, 192, 0, 4.666)]),
    *_family("c6i", [("xlarge", 4, 8, 0, 0.204), ("2xlarge", 8, 16, 0, 0.408), ("4xlarge", 16, 32, 0, 0.816),
                     ("8xlarge", 32, 64, 0, 1.632), ("12xlarge", 48, 96, 0, 2.448),
                     ("16xlarge", 64, 128, 0, 3.264), ("24xlarge", 96, 192, 0, 4.896),
                     ("32xlarge", 128, 256, 0, 6.528)]),
    *_family("c7i", [("large", 2, 4, 0, 0.107), ("xlarge", 4, 8, 0, 0.214), ("2xlarge", 8, 16, 0, 0.428),
                     ("4xlarge", 16, 32, 0, 0.857), ("8xlarge", 32, 64, 0, 1.714),
                     ("12xlarge", 48, 96, 0, 2.57), ("16xlarge", 64, 128, 0, 3.427),
                     ("24xlarge", 96, 192, 0, 5.141), ("48xlarge", 192, 384, 0, 10.282)]),
    # memory optimized
    *_family("r5", [("large", 2, 16, 0, 0.151), ("xlarge", 4, 32, 0, 0.302), ("2xlarge", 8, 64, 0, 0.605),
                    ("4xlarge", 16, 128, 0, 1.21), ("8xlarge", 32, 256, 0, 2.419),
                    ("12xlarge", 48, 384, 0, 3.629), ("16xlarge", 64, 512, 0, 4.838),
                    ("24xlarge", 96, 768, 0, 7.258)]),
    *_family("r5d", [("large", 2, 16, 0, 0.174), ("xlarge", 4, 32, 0, 0.348), ("2xlarge", 8, 64, 0, 0.697),
                     ("4xlarge", 16, 128, 0, 1.394), ("8xlarge", 32, 256, 0, 2.787),
                     ("12xlarge", 48, 384, 0, 4.181), ("16xlarge", 64, 512, 0, 5.574),
                     ("24xlarge", 96, 768, 0, 8.362)]),
    # burstable: valid, never picked automatically
    *_family("t3", [("medium", 2, 4, 0, 0.05), ("large", 2, 8, 0, 0.1), ("xlarge", 4, 16, 0, 0.2),
                    ("2xlarge", 8, 32, 0, 0.399)], auto=False),
    # GPU
    *_family("g4dn", [("xlarge", 4, 16, 1, 0.736), ("2xlarge", 8, 32, 1, 0.94), ("4xlarge", 16, 64, 1, 1.505),
                      ("8xlarge", 32, 128, 1, 2.72), ("12xlarge", 48, 192, 4, 4.89),
                      ("16xlarge", 64, 256, 1, 5.44)], accelerator="T4"),
    *_family("g5", [("xlarge", 4, 16, 1, 1.408), ("2xlarge", 8, 32, 1, 1.515), ("4xlarge", 16, 64, 1, 2.03),
                    ("8xlarge", 32, 128, 1, 3.06), ("16xlarge", 64, 256, 1, 5.12),
                    ("12xlarge", 48, 192, 4, 7.09), ("24xlarge", 96, 384, 4, 10.18),
                    ("48xlarge", 192, 768, 8, 20.36)], accelerator="A10G"),
    *_family("g6", [("xlarge", 4, 16, 1, 1.006), ("2xlarge", 8, 32, 1, 1.222), ("4xlarge", 16, 64, 1, 1.655),
                    ("8xlarge", 32, 128, 1, 2.521), ("16xlarge", 64, 256, 1, 4.254),
                    ("12xlarge", 48, 192, 4, 5.792), ("24xlarge", 96, 384, 4, 8.371),
                    ("48xlarge", 192, 768, 8, 16.742)], accelerator="L4"),
    *_family("p2", [("xlarge", 4, 61, 1, 1.125), ("8xlarge", 32, 488, 8, 8.64), ("16xlarge", 64, 732, 16, 17.28)],
             accelerator="K80"),
    *_family("p3", [("2xlarge", 8, 61, 1, 3.825), ("8xlarge", 32, 244, 4, 14.688),
                    ("16xlarge", 64, 488, 8, 28.152)], accelerator="V100"),
    *_family("p3dn", [("24xlarge", 96, 768, 8, 35.894)], accelerator="V100"),
    *_family("p4d", [("24xlarge", 96, 1152, 8, 37.688)], accelerator="A100"),
    *_family("p4de", [("24xlarge", 96, 1152, 8, 47.11)], accelerator="A100 80GB"),
    *_family("p5", [("48xlarge", 192, 2048, 8, 113.07)], accelerator="H100"),
    # Trainium: valid, never picked for a GPU request
    *_family("trn1", [("2xlarge", 8, 32, 0, 1.544), ("32xlarge", 128, 512, 0, 24.725)], auto=False),
]

#: name -> InstanceType
INSTANCE_TYPES: dict[str, InstanceType] = {t.name: t for t in _TABLE}
#: Shown when a name is unknown or a request cannot be met.
EXAMPLES = ("ml.m5.large", "ml.m5.xlarge", "ml.c5.2xlarge", "ml.r5.xlarge", "ml.g4dn.xlarge", "ml.g5.2xlarge",
            "ml.p3.2xlarge")
_NAME = re.compile(r"^ml\.[a-z0-9-]+\.[a-z0-9]+$")


def lookup(name: str) -> InstanceType | None:
    """The table entry of ``name`` (None when the table does not know it)."""
    return INSTANCE_TYPES.get(name)


def check_instance_type(name: str) -> InstanceType | None:
    """Validate an ``instance_type``; raise ConfigError listing valid ones when unknown.

    A well-formed name missing from the table but in botocore's list of SageMaker training
    types (newer families) is accepted and returns None (its size is unknown).
    """
    found = INSTANCE_TYPES.get(name)
    if found is not None:
        return found
    if _NAME.match(name) and name in _botocore_types():
        return None
    close = difflib.get_close_matches(name, sorted({*INSTANCE_TYPES, *_botocore_types()}), n=3, cutoff=0.75)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(f"unknown SageMaker instance type {name!r}: {hint}valid training types include "
                      f"{', '.join(EXAMPLES)} (all start with 'ml.'; see "
                      "https://aws.amazon.com/sagemaker/pricing/)")


def _botocore_types() -> tuple[str, ...]:
    """Training instance types botocore's SageMaker model lists (empty when botocore is absent)."""
    global _BOTOCORE_TYPES
    if _BOTOCORE_TYPES is None:
        try:
            import botocore.session

            model = botocore.session.get_session().get_service_model("sagemaker")
            shape = model.shape_for("TrainingInstanceType")
            _BOTOCORE_TYPES = tuple(shape.enum)  # type: ignore[attr-defined]
        except Exception:
            _BOTOCORE_TYPES = ()
    return _BOTOCORE_TYPES


_BOTOCORE_TYPES: tuple[str, ...] | None = None


def parse_memory(value: str | float | int | None) -> float | None:
    """Memory request in GiB: ``16``, ``16g``, ``16GiB``, ``16GB``, ``512m``, ``512Mi`` (None: none)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        gib = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        match = re.fullmatch(r"(\d+(?:\.\d+)?)(g|gi|gib|gb|m|mi|mib|mb|t|ti|tib|tb)?", text)
        if not match:
            raise ValueError(f"memory {value!r}: expected a size such as 16, 16g, 16GiB or 512m (GiB by default)")
        number, unit = float(match.group(1)), match.group(2) or "g"
        gib = number / 1024 if unit.startswith("m") else number * 1024 if unit.startswith("t") else number
    if gib <= 0:
        raise ValueError(f"memory {value!r} must be positive")
    return gib


def satisfies(itype: InstanceType, cpu: float | None, gpu: int | None, memory_gib: float | None) -> bool:
    """Whether one instance of ``itype`` has at least the requested resources."""
    return ((cpu is None or itype.vcpu >= cpu) and (gpu is None or itype.gpus >= gpu)
            and (memory_gib is None or itype.memory_gib >= memory_gib))


def describe_request(cpu: float | None, gpu: int | None, memory_gib: float | None) -> str:
    """``cpu=4, gpu=1, memory=16 GiB`` for messages."""
    parts = []
    if cpu is not None:
        parts.append(f"cpu={cpu:g}")
    if gpu is not None:
        parts.append(f"gpu={gpu}")
    if memory_gib is not None:
        parts.append(f"memory={memory_gib:g} GiB")
    return ", ".join(parts) or "nothing"


def pick_instance(cpu: float | None = None, gpu: int | None = None,
                  memory: str | float | int | None = None, gpu_type: str | None = None) -> InstanceType:
    """The cheapest automatically pickable type with at least ``cpu`` vCPUs, ``gpu`` GPUs and ``memory``.

    A CPU-only request never gets a GPU type (ties on price go to fewer GPUs, then fewer
    vCPUs). Raise ConfigError naming the request and a few of the largest types when nothing fits.
    """
    memory_gib = parse_memory(memory)
    if cpu is not None and cpu <= 0:
        raise ConfigError(f"cpu={cpu:g}: a CPU request must be positive")
    if gpu is not None and gpu < 0:
        raise ConfigError(f"gpu={gpu}: a GPU request cannot be negative")
    wanted_gpu = gpu if gpu else (1 if gpu_type else None)
    candidates = [t for t in _TABLE if t.auto and satisfies(t, cpu, wanted_gpu, memory_gib)
                  and (wanted_gpu is not None or t.gpus == 0)]
    if gpu_type:
        kinds = sorted({t.accelerator for t in _TABLE if t.gpus})
        candidates = [t for t in candidates if t.accelerator.lower() == gpu_type.lower()]
        if not candidates:
            raise ConfigError(f"no SageMaker training instance type offers {describe_request(cpu, gpu, memory_gib)} "
                              f"with {gpu_type} GPUs; GPU types: {', '.join(kinds)}")
    if not candidates:
        pool = [t for t in _TABLE if t.auto and (t.gpus > 0) == bool(wanted_gpu)]
        biggest = sorted(pool, key=lambda t: (t.gpus, t.vcpu, t.memory_gib), reverse=True)[:3]
        raise ConfigError(
            f"no SageMaker training instance type offers {describe_request(cpu, gpu, memory_gib)} on one "
            f"instance; the largest are {', '.join(t.describe() for t in biggest)}. Lower the request, "
            "or set instance_type (and instance_count for several instances) yourself")
    return min(candidates, key=lambda t: (t.usd_per_hour, t.gpus, t.vcpu, t.memory_gib, t.name))


def resolve_instance_type(instance_type: str | None, cpu: float | None, gpu: int | None,
                          memory: str | float | int | None, gpu_type: str | None = None) -> str:
    """The instance type of a job.

    An explicit ``instance_type`` (checked against any request), else the cheapest type
    satisfying the generic request, else :data:`DEFAULT_INSTANCE_TYPE`.
    """
    requested = cpu is not None or bool(gpu) or memory not in (None, "") or bool(gpu_type)
    if instance_type:
        known = check_instance_type(instance_type)
        memory_gib = parse_memory(memory)
        wrong_gpu = bool(gpu_type) and known is not None and known.accelerator.lower() != str(gpu_type).lower()
        if requested and known is not None and (not satisfies(known, cpu, gpu or None, memory_gib) or wrong_gpu):
            better = pick_instance(cpu, gpu, memory, gpu_type)
            raise ConfigError(
                f"instance_type {known.describe()} does not satisfy the requested "
                f"{describe_request(cpu, gpu, memory_gib)}: use e.g. {better.describe()}, or drop "
                "instance_type to let stepflow pick")
        return instance_type
    if requested:
        return pick_instance(cpu, gpu, memory, gpu_type).name
    return DEFAULT_INSTANCE_TYPE
