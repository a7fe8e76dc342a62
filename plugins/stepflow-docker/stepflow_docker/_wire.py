"""Small pieces of the docker operator: sizes, log timestamps, the secrets file, host capacity."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Mapping
from typing import Any

from stepflow.errors import BackendError
from stepflow.remote import Resources

#: Where a job's secrets are put into its container (not shown by `docker inspect`).
SECRETS_PATH = "/run/stepflow/secrets.json"


def parse_memory(value: str | int | float | None) -> int | None:
    """Bytes of ``512m`` / ``2g`` / an int."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().lower().removesuffix("b").removesuffix("i")
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def secrets_tar(secrets: Mapping[str, Any], user: str) -> bytes:
    """``/run/stepflow/secrets.json``, readable by the job's user only."""
    data = json.dumps(dict(secrets)).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        uid = int(user) if user.isdigit() else 0
        for name, mode, size in (("run/stepflow", 0o700, None), (SECRETS_PATH.lstrip("/"), 0o400, len(data))):
            info = tarfile.TarInfo(name)
            info.uid = info.gid = uid
            info.mode = mode
            if size is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = size
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def norm_stamp(stamp: str) -> str:
    """RFC 3339 with nanoseconds padded, so timestamps compare as strings."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return f"{head}.{(frac + '000000000')[:9]}"


def since_param(stamp: str) -> str:
    """A normalized log timestamp as Docker's ``since`` parameter (seconds.nanoseconds)."""
    if not stamp:
        return "0"
    import datetime as dt

    head, _, frac = stamp.partition(".")
    return f"{int(dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp())}.{frac}"


def host_memory_mib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def capacity_problems(resources: Resources) -> list[str]:
    """Why this machine cannot give a container ``resources`` (empty when it can)."""
    problems = []
    cpus = os.cpu_count() or 1
    if resources.cpu and resources.cpu > cpus:
        problems.append(f"resources ask for cpu={resources.cpu:g}, but this Docker host has {cpus} CPUs "
                        f"(closest: cpu={cpus})")
    mem = host_memory_mib()
    if resources.memory_mib and mem and resources.memory_mib > mem:
        problems.append(f"resources ask for memory={resources.memory}, but this Docker host has "
                        f"{mem / 1024:.1f} GiB (closest: memory='{int(mem // 1024)}GiB')")
    if resources.gpu and not any(os.path.exists(f"/dev/nvidia{i}") for i in range(8)):
        problems.append(f"resources ask for gpu={resources.gpu}, but this Docker host has no NVIDIA GPU "
                        "(closest: no gpu)")
    return problems


def unreachable(host: str | None, exc: BaseException) -> BackendError:
    """The error for a daemon that does not answer, saying how to start it."""
    return BackendError(f"cannot reach the Docker daemon at {host or 'unix:///var/run/docker.sock'}: "
                        f"{type(exc).__name__}: {exc}. Start it (e.g. `sudo systemctl start docker`, or `dockerd`; "
                        "in this repository scripts/services.sh does) or set --docker_host")
