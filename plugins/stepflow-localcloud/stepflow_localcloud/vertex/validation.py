"""What Vertex AI checks in a CustomJob before accepting it, and its errors as gRPC statuses.

Field errors read as the service's do: ``List of found errors:<TAB>1.Field: <path>; Message: <text><TAB>``,
with the same violations as a ``google.rpc.BadRequest`` in the status details. Paths are relative to
the CustomJob (``job_spec.worker_pool_specs[0].machine_spec.accelerator_type``), as the service writes
them. An accelerator a machine type cannot carry is refused with the service's plain sentence
(``Accelerator "NVIDIA_TESLA_K80" is not supported for machine type "n1-standard-4"``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.cloud import aiplatform_v1
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

Accelerator = aiplatform_v1.AcceleratorType

#: Custom training machine types and their vCPUs (the families of Vertex's training machine table).
MACHINE_VCPUS: dict[str, int] = {
    **{f"n1-standard-{n}": n for n in (4, 8, 16, 32, 64, 96)},
    **{f"n1-highmem-{n}": n for n in (2, 4, 8, 16, 32, 64, 96)},
    **{f"n1-highcpu-{n}": n for n in (16, 32, 64, 96)},
    **{f"n2-standard-{n}": n for n in (4, 8, 16, 32, 48, 64, 80)},
    **{f"n2-highmem-{n}": n for n in (2, 4, 8, 16, 32, 48, 64, 80)},
    **{f"n2-highcpu-{n}": n for n in (16, 32, 48, 64, 80)},
    **{f"e2-standard-{n}": n for n in (4, 8, 16, 32)},
    **{f"e2-highmem-{n}": n for n in (2, 4, 8, 16)},
    **{f"e2-highcpu-{n}": n for n in (16, 32)},
    **{f"c2-standard-{n}": n for n in (4, 8, 16, 30, 60)},
    **{f"a2-highgpu-{g}g": 12 * g for g in (1, 2, 4, 8)},
    "a2-megagpu-16g": 96,
    **{f"a2-ultragpu-{g}g": 12 * g for g in (1, 2, 4, 8)},
    **{f"g2-standard-{n}": n for n in (4, 8, 12, 16, 24, 32, 48, 96)},
    "a3-highgpu-8g": 208,
}
#: GPU machine types come with a fixed accelerator type and count.
FIXED_ACCELERATORS: dict[str, tuple[int, int]] = {
    **{f"a2-highgpu-{g}g": (Accelerator.NVIDIA_TESLA_A100, g) for g in (1, 2, 4, 8)},
    "a2-megagpu-16g": (Accelerator.NVIDIA_TESLA_A100, 16),
    **{f"a2-ultragpu-{g}g": (Accelerator.NVIDIA_A100_80GB, g) for g in (1, 2, 4, 8)},
    **{f"g2-standard-{n}": (Accelerator.NVIDIA_L4, 1) for n in (4, 8, 12, 16, 32)},
    "g2-standard-24": (Accelerator.NVIDIA_L4, 2),
    "g2-standard-48": (Accelerator.NVIDIA_L4, 4),
    "g2-standard-96": (Accelerator.NVIDIA_L4, 8),
    "a3-highgpu-8g": (Accelerator.NVIDIA_H100_80GB, 8),
}
#: GPUs attachable to N1 machines: allowed counts and the most vCPUs each count supports (Compute Engine's limits).
N1_ACCELERATORS: dict[int, dict[int, int]] = {
    Accelerator.NVIDIA_TESLA_T4: {1: 48, 2: 48, 4: 96},
    Accelerator.NVIDIA_TESLA_V100: {1: 12, 2: 24, 4: 48, 8: 96},
    Accelerator.NVIDIA_TESLA_P100: {1: 16, 2: 32, 4: 96},
    Accelerator.NVIDIA_TESLA_P4: {1: 24, 2: 48, 4: 96},
}
BOOT_DISK_TYPES = ("pd-ssd", "pd-standard", "hyperdisk-balanced")
MAX_LABELS = 64
MAX_LABEL_LENGTH = 63
MAX_TIMEOUT = dt.timedelta(days=7)
_ENV_NAME = re.compile(r"[A-Za-z_.-][A-Za-z0-9_.-]*")


class ApiError(Exception):
    """An error answer: a gRPC status code, its message and optional ``google.rpc`` detail messages."""

    def __init__(self, code: grpc.StatusCode, message: str, details: list[Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, list(details or [])

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """The ``grpc-status-details-bin`` trailer: a google.rpc.Status matching the call's code and message."""
        if not self.details:
            return ()
        from google.rpc import status_pb2

        packed = []
        for detail in self.details:
            wrapper = any_pb2.Any()
            wrapper.Pack(detail)
            packed.append(wrapper)
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)
        return (("grpc-status-details-bin", status.SerializeToString()),)


@dataclass
class Violations:
    """Field errors gathered over a whole request, reported together as the service does."""

    found: list[tuple[str, str]] = field(default_factory=list)
    plain: list[str] = field(default_factory=list)

    def add(self, path: str, message: str) -> None:
        """Record that the field at ``path`` is wrong."""
        self.found.append((path, message))

    def add_plain(self, message: str) -> None:
        """Record a problem the service reports as a sentence of its own, not as a field violation."""
        self.plain.append(message)

    def raise_if_any(self) -> None:
        """INVALID_ARGUMENT listing every field violation, else the first plain problem, if any."""
        if self.found:
            raise invalid_fields(self.found)
        if self.plain:
            raise invalid(self.plain[0])


def invalid_fields(found: list[tuple[str, str]]) -> ApiError:
    """INVALID_ARGUMENT in the service's "List of found errors" form, with a BadRequest detail."""
    text = "".join(f"{i}.Field: {path}; Message: {message}\t" for i, (path, message) in enumerate(found, 1))
    detail = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=path, description=message) for path, message in found])
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"List of found errors:\t{text}", [detail])


def invalid(message: str) -> ApiError:
    """INVALID_ARGUMENT with a plain message."""
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ------------------------------------------------------------------------ resource names
def parse_parent(parent: str, project_ids: tuple[str, ...], location: str) -> None:
    """Check ``projects/P/locations/L`` names a project and the location this endpoint serves."""
    match = re.fullmatch(r"projects/([^/]+)/locations/([^/]+)", parent or "")
    if match is None:
        raise invalid_fields([("parent", f'Invalid resource name "{parent}": expected '
                                         '"projects/{project}/locations/{location}".')])
    check_scope(match.group(1), match.group(2), project_ids, location, "parent")


def parse_job_name(name: str, project_ids: tuple[str, ...], location: str) -> str:
    """The job id of ``projects/P/locations/L/customJobs/ID`` (checked like a parent)."""
    match = re.fullmatch(r"projects/([^/]+)/locations/([^/]+)/customJobs/([^/]+)", name or "")
    if match is None:
        raise invalid_fields([("name", f'Invalid CustomJob resource name "{name}": expected '
                                       '"projects/{project}/locations/{location}/customJobs/{custom_job}".')])
    check_scope(match.group(1), match.group(2), project_ids, location, "name")
    job_id = match.group(3)
    if not job_id.isdigit():
        raise invalid_fields([("name", f'Invalid CustomJob id "{job_id}": ids are numbers.')])
    return job_id


def check_scope(project: str, location: str, project_ids: tuple[str, ...], served: str, path: str) -> None:
    """The project must be this endpoint's (id or number) and the location its region."""
    if location != served:
        raise invalid_fields([(path, f'Location "{location}" does not match the endpoint\'s location "{served}": '
                                     f"use the {location}-aiplatform.googleapis.com endpoint.")])
    if project not in project_ids:
        raise invalid_fields([(path, f'Project "{project}" is not served by this endpoint (it serves '
                                     f'{" / ".join(project_ids)}).')])


# ------------------------------------------------------------------------ CreateCustomJob
def validate_custom_job(job: aiplatform_v1.CustomJob) -> None:
    """Everything CreateCustomJob rejects with INVALID_ARGUMENT, all violations at once."""
    v = Violations()
    if not job.display_name:
        v.add("display_name", "Required field is not set.")
    elif len(job.display_name) > 128:
        v.add("display_name", "Display name must be at most 128 characters long.")
    validate_labels(job.labels, "labels", v)
    spec = job.job_spec
    pools = list(spec.worker_pool_specs)
    if not pools:
        v.add("job_spec.worker_pool_specs", "Required field is not set: at least one worker pool spec "
                                                       "is needed.")
    for i, pool in enumerate(pools):
        _validate_pool(pool, i, f"job_spec.worker_pool_specs[{i}]", v)
    timeout = spec.scheduling.timeout if "scheduling" in spec else None
    if timeout is not None and (timeout < dt.timedelta(0) or timeout > MAX_TIMEOUT):
        v.add("job_spec.scheduling.timeout", "Timeout must be positive and at most 7 days.")
    base = spec.base_output_directory.output_uri_prefix if "base_output_directory" in spec else ""
    if "base_output_directory" in spec and not base.startswith("gs://"):
        v.add("job_spec.base_output_directory.output_uri_prefix",
              f'Output URI prefix "{base}" is not a Cloud Storage URI (gs://bucket/path).')
    v.raise_if_any()


def _validate_pool(pool: aiplatform_v1.WorkerPoolSpec, index: int, path: str, v: Violations) -> None:
    empty = aiplatform_v1.WorkerPoolSpec.pb(pool).ByteSize() == 0
    if index > 0 and empty:
        return  # an empty placeholder skips a pool, as the service allows
    if index == 0 and pool.replica_count != 1:
        v.add(f"{path}.replica_count", f"The first worker pool must have exactly 1 replica, got "
                                       f"{pool.replica_count}.")
    elif pool.replica_count < 1:
        v.add(f"{path}.replica_count", "Replica count must be at least 1.")
    if "python_package_spec" in pool:
        v.add(f"{path}.python_package_spec", "Python package training is not supported by this local control "
                                             "plane: use container_spec.")
    elif "container_spec" not in pool or not pool.container_spec.image_uri:
        v.add(f"{path}.container_spec.image_uri", "Required field is not set.")
    else:
        for j, env in enumerate(pool.container_spec.env):
            if not env.name or not _ENV_NAME.fullmatch(env.name):
                v.add(f"{path}.container_spec.env[{j}].name",
                      f'Invalid environment variable name "{env.name}": use letters, digits, "_", "-" or "." and '
                      "do not start with a digit.")
    _validate_machine(pool.machine_spec, f"{path}.machine_spec", v)
    if "disk_spec" in pool:
        disk = pool.disk_spec
        if disk.boot_disk_type and disk.boot_disk_type not in BOOT_DISK_TYPES:
            v.add(f"{path}.disk_spec.boot_disk_type", f'Boot disk type "{disk.boot_disk_type}" is not supported: '
                                                      f"use one of {', '.join(BOOT_DISK_TYPES)}.")
        if disk.boot_disk_size_gb and not 100 <= disk.boot_disk_size_gb <= 64000:
            v.add(f"{path}.disk_spec.boot_disk_size_gb", "Boot disk size must be between 100 and 64000 GB.")


def _validate_machine(machine: aiplatform_v1.MachineSpec, path: str, v: Violations) -> None:
    mtype = machine.machine_type
    accel, count = Accelerator(machine.accelerator_type), machine.accelerator_count
    if not mtype:
        v.add(f"{path}.machine_type", "Required field is not set.")
        return
    if mtype not in MACHINE_VCPUS:
        v.add(f"{path}.machine_type", f'Machine type "{mtype}" is not supported.')
        return
    if count < 0:
        v.add(f"{path}.accelerator_count", "Accelerator count must not be negative.")
        return
    has_type = accel != Accelerator.ACCELERATOR_TYPE_UNSPECIFIED
    if bool(count) != has_type:
        v.add(f"{path}.accelerator_type",
              "Both `accelerator_type` and `accelerator_count` should be specified or none.")
        return
    fixed = FIXED_ACCELERATORS.get(mtype)
    if fixed is not None:
        want_type, want_count = fixed
        if (accel, count) != (want_type, want_count):
            v.add(f"{path}.accelerator_type", f'Machine type "{mtype}" requires accelerator type '
                                              f"{Accelerator(want_type).name} "
                                              f"with count {want_count}, got {accel.name} with count {count}.")
        return
    if not has_type:
        return
    counts = N1_ACCELERATORS.get(accel) if mtype.startswith("n1-") else None
    if counts is None:  # GPUs attach to N1 machines only (A2/G2/A3 ones come with their own)
        v.add_plain(f'Accelerator "{accel.name}" is not supported for machine type "{mtype}"')
    elif count not in counts:
        v.add(f"{path}.accelerator_count", f"Accelerator count {count} is not supported for {accel.name}: use one "
                                           f"of {', '.join(map(str, counts))}.")
    elif MACHINE_VCPUS[mtype] > counts[count]:
        v.add(f"{path}.machine_type", f'Machine type "{mtype}" has {MACHINE_VCPUS[mtype]} vCPUs: {count} x '
                                      f"{accel.name} supports at most {counts[count]}.")


def _label_part_ok(text: str, *, key: bool) -> bool:
    if key and (not text or not (text[0].isalpha() and not text[0].isupper())):
        return False
    return all(c in "_-" or c.isdigit() or (c.isalpha() and not c.isupper()) for c in text)


def validate_labels(labels: Mapping[str, str], path: str, v: Violations) -> None:
    """Google Cloud's label rules: lowercase letters, digits, ``_`` and ``-``, keys start with a letter."""
    if len(labels) > MAX_LABELS:
        v.add(path, f"At most {MAX_LABELS} labels are allowed, got {len(labels)}.")
    for key, value in labels.items():
        if len(key) > MAX_LABEL_LENGTH or not _label_part_ok(key, key=True):
            v.add(f"{path}[{key!r}]", f'Invalid label key "{key}": keys are 1 to {MAX_LABEL_LENGTH} characters of '
                                      'lowercase letters, digits, "_" and "-", starting with a lowercase letter.')
        if len(value) > MAX_LABEL_LENGTH or not _label_part_ok(value, key=False):
            v.add(f"{path}[{key!r}]", f'Invalid label value "{value}": values are at most {MAX_LABEL_LENGTH} '
                                      'characters of lowercase letters, digits, "_" and "-".')
