"""Config and settings of the ``vertex`` step operator and the ``gcp`` registry (light: no Google SDK)."""

from __future__ import annotations

import re
from typing import Any

import attrs

from stepflow.errors import ConfigError
from stepflow.interfaces.flavor import option
from stepflow.remote import JobConfig, JobSettings, Resources
from stepflow_vertex import machines

STRATEGIES = ("STANDARD", "SPOT", "FLEX_START")
DISK_TYPES = ("pd-ssd", "pd-standard")
REGION = re.compile(r"^[a-z]+-[a-z]+\d+$")
#: ``REGION-docker.pkg.dev`` (Artifact Registry); gcr.io hosts are multi-regional.
ARTIFACT_HOST = re.compile(r"^(?P<region>[a-z]+-[a-z]+\d+)-docker\.pkg\.dev$")
_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")


def _is_ref(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def registry_region(uri: str) -> str | None:
    """The region an Artifact Registry URI names (None for gcr.io and other hosts)."""
    match = ARTIFACT_HOST.match(uri.split("/", 1)[0])
    return match.group("region") if match else None


def _check_machine(obj: Any) -> None:
    if obj.machine_type is not None and not _is_ref(obj.machine_type):
        machines.check(obj.machine_type, obj.accelerator_type, obj.accelerator_count or 0)
    elif obj.accelerator_type is not None:
        machines.check(machines.DEFAULT_MACHINE, obj.accelerator_type, obj.accelerator_count or 0)


def _check_common(obj: Any) -> None:
    if obj.replica_count is not None and obj.replica_count < 1:
        raise ValueError(f"replica_count={obj.replica_count}: at least 1 replica is needed")
    if obj.boot_disk_size_gb is not None and not 100 <= obj.boot_disk_size_gb <= 64000:
        raise ValueError(f"boot_disk_size_gb={obj.boot_disk_size_gb}: Vertex AI takes 100 to 64000 GB")
    if obj.timeout is not None and obj.timeout < 1:
        raise ValueError(f"timeout={obj.timeout}: must be at least 1 second")
    for key, value in (obj.labels or {}).items():
        if not _LABEL.match(key) or not _LABEL_VALUE.match(str(value)):
            raise ValueError(f"label {key}={value!r}: Vertex AI labels are lowercase letters, digits, '_' and '-', "
                             "at most 63 characters, keys starting with a letter")
    try:
        _check_machine(obj)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


@attrs.frozen(kw_only=True)
class VertexOperatorConfig(JobConfig):
    """Options of the vertex step operator (plus those of every remote operator)."""

    project: str = option(doc="Google Cloud project the jobs run in.")
    region: str = option(doc="Vertex AI region, e.g. us-central1.")
    machine_type: str | None = option(None, doc="Machine type, e.g. n1-standard-4 (default: picked from the step's "
                                                "resources, else n1-standard-4).")
    accelerator_type: str | None = option(None, doc="GPU attached to n1 machines: NVIDIA_TESLA_T4, NVIDIA_TESLA_V100, "
                                                    "... (a2/g2/a3 machines carry their own).")
    accelerator_count: int = option(0, doc="How many accelerator_type GPUs (n1: 1, 2, 4; V100 also 8).")
    replica_count: int = option(1, doc="Replicas of the worker pool.")
    boot_disk_type: str = option("pd-ssd", doc="Boot disk type.", choices=DISK_TYPES)
    boot_disk_size_gb: int = option(100, doc="Boot disk size, GB (at least the step's resources disk).")
    service_account: str | None = option(None, doc="Service account the jobs run as; it reaches the artifact store "
                                                   "(default: the project's Vertex AI custom code service agent).")
    network: str | None = option(None, doc="VPC network to peer with, projects/NUMBER/global/networks/NAME.")
    reserved_ip_ranges: list[str] = option([], doc="Reserved IP ranges of the network for the jobs.")
    encryption_spec_key_name: str | None = option(None, doc="Cloud KMS key (CMEK) protecting the jobs.")
    labels: dict[str, str] = option({}, doc="Labels put on every job (stepflow adds stepflow_run, stepflow_step, "
                                            "stepflow_attempt).")
    timeout: int | None = option(None, doc="scheduling.timeout: Vertex AI fails a job running longer (default "
                                             "the step's timeout, else Vertex's 7 days).")
    restart_job_on_worker_restart: bool = option(False, doc="Restart the job when a worker restarts.")
    scheduling_strategy: str = option("STANDARD", doc="Capacity: STANDARD (on demand), SPOT (preemptible, cheaper) "
                                                      "or FLEX_START (waits for capacity up to max_wait_duration).",
                                      choices=STRATEGIES)
    max_wait_duration: int | None = option(None, doc="FLEX_START / SPOT: how long a job may wait for capacity.")
    persistent_resource_id: str | None = option(None, doc="Run on this persistent resource (a warm cluster).")
    api_endpoint: str | None = option(None, doc="Vertex AI API address (default REGION-aiplatform.googleapis.com). "
                                                "http://HOST:PORT speaks plain gRPC without credentials: local "
                                                "control planes and tests; Cloud Logging is then read there too.")

    def __attrs_post_init__(self) -> None:
        if not _is_ref(self.region) and not REGION.match(self.region or ""):
            raise ValueError(f"region {self.region!r} is not a Google Cloud region (e.g. us-central1, europe-west4)")
        if not self.project or not self.project.strip():
            raise ValueError("project is empty: give the Google Cloud project id the jobs run in")
        if self.max_wait_duration is not None and self.scheduling_strategy == "STANDARD":
            raise ValueError("max_wait_duration applies to SPOT and FLEX_START scheduling: set scheduling_strategy "
                             "or drop it")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        _check_common(self)


@attrs.frozen(kw_only=True)
class VertexStepSettings(JobSettings):
    """Per-step settings: ``@step(settings={"vertex": {...}})``; unset ones keep the operator's."""

    machine_type: str | None = option(None, doc="Machine type for this step.")
    accelerator_type: str | None = option(None, doc="Accelerator for this step.")
    accelerator_count: int | None = option(None, doc="How many accelerators for this step.")
    replica_count: int | None = option(None, doc="Replicas for this step.")
    boot_disk_size_gb: int | None = option(None, doc="Boot disk size for this step, GB.")
    labels: dict[str, str] = option({}, doc="Extra labels for this step's job.")
    timeout: int | None = option(None, doc="scheduling.timeout for this step.")
    scheduling_strategy: str | None = option(None, doc="STANDARD, SPOT or FLEX_START for this step.")

    def __attrs_post_init__(self) -> None:
        if self.scheduling_strategy is not None and self.scheduling_strategy not in STRATEGIES:
            raise ValueError(f"scheduling_strategy {self.scheduling_strategy!r}: one of {', '.join(STRATEGIES)}")
        _check_common(self)


@attrs.frozen
class JobShape:
    """What one custom job runs on: the machine, its accelerators, replicas and disk."""

    machine_type: str
    accelerator_type: str | None
    accelerator_count: int
    replica_count: int
    boot_disk_size_gb: int


def job_shape(config: VertexOperatorConfig, merged: VertexOperatorConfig, resources: Resources | None) -> JobShape:
    """The machine of one step: one its settings name; else the cheapest fitting its resources; else the operator's.

    An explicit machine that cannot meet the step's resources is refused, naming one that can.
    """
    step_machine = merged.machine_type if merged.machine_type != config.machine_type else None
    asks = resources is not None and not resources.is_empty()
    disk = merged.boot_disk_size_gb
    if asks:
        assert resources is not None
        fit = machines.pick(resources.cpu, (resources.memory_mib or 0) / 1024 or None, resources.gpu,
                            resources.gpu_type)
        if resources.disk_gib:
            disk = max(disk, int(-(-resources.disk_gib // 1)))
        if step_machine:
            chosen = machines.check(step_machine, merged.accelerator_type, merged.accelerator_count or 0)
            memory = (resources.memory_mib or 0) / 1024
            gpus = chosen.gpus or (merged.accelerator_count or 0)
            if (resources.cpu and chosen.vcpu < resources.cpu) or (memory and chosen.memory_gib < memory) \
                    or (resources.gpu and gpus < resources.gpu):
                raise ConfigError(f"machine_type {chosen.describe()} does not satisfy the step's resources "
                                  f"({resources.describe()}): use e.g. {fit.describe()}, or drop machine_type")
            return JobShape(step_machine, merged.accelerator_type, merged.accelerator_count or 0,
                            merged.replica_count, disk)
        return JobShape(fit.machine_type, fit.accelerator_type, fit.accelerator_count, merged.replica_count, disk)
    machine = merged.machine_type or machines.DEFAULT_MACHINE
    machines.check(machine, merged.accelerator_type, merged.accelerator_count or 0)
    return JobShape(machine, machines.gpu_name(merged.accelerator_type), merged.accelerator_count or 0,
                    merged.replica_count, disk)


@attrs.frozen
class GcpRegistryConfig:
    """Options of the gcp container registry (Artifact Registry, gcr.io)."""

    uri: str = option(doc="Registry address: REGION-docker.pkg.dev/PROJECT/REPOSITORY or gcr.io/PROJECT.")

    def __attrs_post_init__(self) -> None:
        uri = self.uri.strip()
        if not _is_ref(uri) and (not uri or "://" in uri or " " in uri):
            raise ValueError(f"uri {self.uri!r}: give host/path without a scheme, e.g. "
                             "us-central1-docker.pkg.dev/my-project/steps")
