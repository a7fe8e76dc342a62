"""Config and settings of the ``docker`` step operator (light: no Docker SDK import)."""

from __future__ import annotations

import attrs

from stepflow.interfaces.flavor import option


@attrs.frozen
class DockerOperatorConfig:
    """Options of the docker step operator."""

    docker_host: str | None = option(None, doc="Docker daemon URL (default: $DOCKER_HOST or the local socket).")
    base_image: str = option("stepflow-base:py3.11", doc="Image the step images are built FROM (Python must "
                                                         "match the runner's minor version).")
    environment: dict[str, str] = option({}, doc="Extra environment variables for every step container.")
    network: str = option("host", doc="Docker network mode; 'host' lets jobs reach services on 127.0.0.1.")
    mounts: list[str] = option([], doc="Extra bind mounts, 'HOST:CONTAINER[:ro]', comma-separated.")
    mount_artifact_store: bool = option(True, doc="Bind-mount a local artifact store at the same path so jobs "
                                                  "can read payloads and write outputs.")
    memory: str | None = option(None, doc="Memory limit per container, e.g. 512m or 2g (no swap).")
    cpus: float | None = option(None, doc="CPU limit per container, e.g. 1.5.")
    gpus: str | None = option(None, doc="GPUs to request: a count or 'all' (passed to the daemon's device requests).")
    shm_size: str | None = option(None, doc="Size of /dev/shm, e.g. 1g.")
    user: str | None = option(None, doc="User to run the step as inside the container.")
    remove: bool = option(True, doc="Remove each container once its step finished.")
    stop_grace_s: int = option(2, doc="Seconds between SIGTERM and SIGKILL when a step is cancelled.")
    requirements: list[str] = option([], doc="Extra host-installed distributions to ship in the image.")
    project_root: str | None = option(None, doc="Directory of project code copied into the image "
                                                "(default: the current directory).")
    max_concurrency: int | None = option(None, doc="Most containers running at once for this operator.")


@attrs.frozen
class DockerOperatorSettings:
    """Per-step settings: ``@step(settings={"docker": {...}})``."""

    memory: str | None = option(None, doc="Memory limit for this step's container.")
    cpus: float | None = option(None, doc="CPU limit for this step's container.")
    gpus: str | None = option(None, doc="GPUs for this step: a count or 'all'.")
    environment: dict[str, str] = option({}, doc="Extra environment variables for this step.")
    mounts: list[str] = option([], doc="Extra bind mounts for this step.")
    network: str | None = option(None, doc="Network mode for this step.")
    base_image: str | None = option(None, doc="Base image for this step's image.")
    requirements: list[str] = option([], doc="Extra distributions for this step's image.")
