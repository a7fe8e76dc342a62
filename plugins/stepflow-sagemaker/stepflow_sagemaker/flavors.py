"""Flavors of the SageMaker plugin. Light: imports neither aiobotocore nor botocore."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from stepflow.interfaces.flavor import Flavor
from stepflow.remote import JobBackendFlavor
from stepflow_sagemaker.config import (
    EcrRegistryConfig,
    SageMakerOperatorConfig,
    SageMakerStepSettings,
    ecr_region,
)


class SageMakerOperatorFlavor(JobBackendFlavor):
    """Runs each step attempt as an AWS SageMaker training job."""

    name = "sagemaker"
    description = ("Run steps as AWS SageMaker training jobs (image built and pushed once per content hash; "
                   "needs a container registry and a remote artifact store).")
    implementation = "stepflow_sagemaker.operator:SageMakerBackend"
    config_class = SageMakerOperatorConfig
    settings_class = SageMakerStepSettings

    def validate_stack(self, stack: Mapping[str, Any]) -> list[str]:
        """The ECR registry and the SageMaker operators of the stack must be in one region.

        Checked with the regions the registrations name (or the ECR uri's); a region left to the
        AWS config is checked again when a run starts.
        """
        registry = stack.get("container_registry")
        members = stack.get("components") or {}
        reg = members.get(f"container_registry:{registry}")
        if not registry or reg is None or reg.get("flavor") != "ecr":
            return []
        config = reg.get("config") or {}
        reg_region = config.get("region") or ecr_region(str(config.get("uri", "")))
        if not reg_region or "{{" in reg_region:
            return []
        problems = []
        for name in stack.get("step_operators") or ():
            op = members.get(f"step_operator:{name}")
            if op is None or op.get("flavor") != self.name:
                continue
            op_region = (op.get("config") or {}).get("region") or os.environ.get("AWS_REGION") \
                or os.environ.get("AWS_DEFAULT_REGION")
            if op_region and "{{" not in op_region and op_region != reg_region:
                problems.append(region_mismatch(name, op_region, registry, reg_region))
        return problems


def region_mismatch(operator: str, op_region: str, registry: str, reg_region: str) -> str:
    """The message for an ECR registry in another region than the SageMaker jobs."""
    return (f"step-operator '{operator}' runs SageMaker jobs in {op_region} but container-registry "
            f"'{registry}' is an ECR registry in {reg_region}: SageMaker pulls training images from ECR in "
            f"its own region; use a registry in {op_region} (ACCOUNT.dkr.ecr.{op_region}.amazonaws.com) or set "
            f"the operator's --region={reg_region}")


class EcrRegistryFlavor(Flavor):
    """Amazon ECR: push credentials from GetAuthorizationToken, repositories created on demand."""

    kind = "container_registry"
    name = "ecr"
    description = ("Amazon ECR registry: logs in with GetAuthorizationToken and creates the image repository "
                   "when missing.")
    config_class = EcrRegistryConfig
    implementation = "stepflow_sagemaker.ecr:EcrContainerRegistry"
