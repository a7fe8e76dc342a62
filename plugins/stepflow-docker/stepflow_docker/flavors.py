"""Flavors of the Docker plugin. Light: imports neither aiodocker nor aiohttp."""

from __future__ import annotations

import attrs

from stepflow.interfaces.flavor import Flavor, option
from stepflow.remote import JobBackendFlavor
from stepflow_docker.operator_config import DockerOperatorConfig, DockerOperatorSettings


@attrs.frozen
class DockerBuilderConfig:
    """Options of the Docker image builder."""

    docker_host: str | None = option(
        None, doc="Docker daemon address, e.g. unix:///var/run/docker.sock or tcp://host:2375 "
                  "(none: DOCKER_HOST, else the local socket).")


class DockerImageBuilderFlavor(Flavor):
    """Builds step images on a Docker daemon and pushes them to the stack's registry."""

    kind = "image_builder"
    name = "docker"
    description = "Build step images on a Docker daemon (local or DOCKER_HOST) and push them."
    config_class = DockerBuilderConfig
    implementation = "stepflow_docker.builder:DockerImageBuilder"


class DockerOperatorFlavor(JobBackendFlavor):
    """Runs each step attempt as a container on a Docker daemon."""

    name = "docker"
    description = "Run steps as containers on a Docker daemon (image built, pushed and pulled per content hash)."
    implementation = "stepflow_docker.operator:DockerBackend"
    requires_remote_artifact_store = False  # a local store's job paths are bind-mounted
    config_class = DockerOperatorConfig
    settings_class = DockerOperatorSettings
