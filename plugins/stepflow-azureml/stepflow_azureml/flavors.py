"""Flavors of the Azure ML plugin. Light: imports no Azure SDK."""

from __future__ import annotations

from stepflow.interfaces.flavor import Flavor
from stepflow.remote import JobBackendFlavor
from stepflow_azureml.config import AcrRegistryConfig, AzureMLOperatorConfig, AzureMLStepSettings


class AzureMLOperatorFlavor(JobBackendFlavor):
    """Runs each step attempt as an Azure Machine Learning command job."""

    name = "azureml"
    description = ("Run steps as Azure Machine Learning command jobs (image built and pushed once per content hash; "
                   "needs a container registry and a remote artifact store).")
    implementation = "stepflow_azureml.operator:AzureMLBackend"
    config_class = AzureMLOperatorConfig
    settings_class = AzureMLStepSettings


class AcrRegistryFlavor(Flavor):
    """Azure Container Registry: admin credentials, or a Microsoft Entra token exchanged for an ACR token."""

    kind = "container_registry"
    name = "azure"
    description = ("Azure Container Registry (NAME.azurecr.io): logs in with admin credentials, or exchanges a "
                   "Microsoft Entra token of DefaultAzureCredential for an ACR refresh token.")
    config_class = AcrRegistryConfig
    implementation = "stepflow_azureml.registry:AcrContainerRegistry"
