"""Config and settings of the ``docker`` step operator (light: no Docker SDK import)."""

from __future__ import annotations

import attrs

from stepflow.interfaces.flavor import option
from stepflow.remote import JobConfig, JobSettings


@attrs.frozen(kw_only=True)
class DockerOperatorConfig(JobConfig):
    """Options of the docker step operator (plus those of every remote operator)."""

    docker_host: str | None = option(None, doc="Docker daemon URL (default: $DOCKER_HOST or the local socket).")
    network: str = option("auto", doc="Docker network mode. 'auto': 'host' when the artifact store is reached on "
                                      "127.0.0.1 (a local emulator), else 'bridge'.")
    mounts: list[str] = option([], doc="Extra bind mounts, 'HOST:CONTAINER[:ro]', comma-separated. A job gets only "
                                       "its own payload and output folder of a local artifact store.")
    memory: str | None = option(None, doc="Memory limit per container, e.g. 512m or 2g (no swap); default from "
                                          "the step's resources.")
    cpus: float | None = option(None, doc="CPU limit per container, e.g. 1.5; default from the step's resources.")
    gpus: str | None = option(None, doc="GPUs to request: a count or 'all'; default from the step's resources.")
    shm_size: str | None = option(None, doc="Size of /dev/shm, e.g. 1g.")
    user: str | None = option(None, doc="User to run steps as inside the container (default: nobody, 65534).")
    remove: bool = option(True, doc="Remove each container once its step finished.")
    stop_grace_s: int = option(2, doc="Seconds between SIGTERM and SIGKILL when a step is cancelled.")


@attrs.frozen(kw_only=True)
class DockerOperatorSettings(JobSettings):
    """Per-step settings: ``@step(settings={"docker": {...}})``."""

    memory: str | None = option(None, doc="Memory limit for this step's container.")
    cpus: float | None = option(None, doc="CPU limit for this step's container.")
    gpus: str | None = option(None, doc="GPUs for this step: a count or 'all'.")
    mounts: list[str] = option([], doc="Extra bind mounts for this step.")
    network: str | None = option(None, doc="Network mode for this step.")
