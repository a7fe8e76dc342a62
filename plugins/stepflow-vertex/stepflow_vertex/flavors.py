"""Flavors of the Vertex AI plugin. Light: imports no Google SDK."""

from __future__ import annotations

from stepflow.interfaces.flavor import Flavor
from stepflow.remote import JobBackendFlavor
from stepflow_vertex.config import GcpRegistryConfig, VertexOperatorConfig, VertexStepSettings


class VertexOperatorFlavor(JobBackendFlavor):
    """Runs each step attempt as a Vertex AI custom job."""

    name = "vertex"
    description = ("Run steps as Google Cloud Vertex AI custom jobs (image built and pushed once per content hash; "
                   "needs a container registry and a remote artifact store).")
    implementation = "stepflow_vertex.operator:VertexBackend"
    config_class = VertexOperatorConfig
    settings_class = VertexStepSettings


class GcpRegistryFlavor(Flavor):
    """Artifact Registry or gcr.io: pushes with a Google access token (oauth2accesstoken)."""

    kind = "container_registry"
    name = "gcp"
    description = ("Google Artifact Registry (REGION-docker.pkg.dev/PROJECT/REPO) or gcr.io: logs in with an access "
                   "token from Application Default Credentials.")
    config_class = GcpRegistryConfig
    implementation = "stepflow_vertex.registry:GcpContainerRegistry"
