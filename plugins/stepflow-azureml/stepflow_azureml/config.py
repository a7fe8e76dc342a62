"""Config and settings of the ``azureml`` step operator and the ``azure`` registry (light: no Azure SDK)."""

from __future__ import annotations

import re
from typing import Any

import attrs

from stepflow.errors import ConfigError
from stepflow.interfaces.flavor import option
from stepflow.remote import JobConfig, JobSettings, Resources
from stepflow_azureml import vmsizes

SERVERLESS = "serverless"
JOB_TIERS = ("Spot", "Basic", "Standard", "Premium")
PRIORITIES = ("low", "medium", "high")
CLOUDS = ("AzureCloud", "AzureChinaCloud", "AzureUSGovernment")
_SHM = re.compile(r"^\d+[bkmg]?$", re.IGNORECASE)
_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
#: ``NAME.azurecr.io`` (and the sovereign clouds' registry suffixes).
ACR_HOST = re.compile(r"^[a-z0-9]{5,50}\.azurecr\.(io|cn|us)$")


def _is_ref(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def _check_common(obj: Any) -> None:
    if obj.instance_type is not None and not _is_ref(obj.instance_type):
        try:
            vmsizes.check(obj.instance_type)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    if obj.instance_count is not None and obj.instance_count < 1:
        raise ValueError(f"instance_count={obj.instance_count}: at least 1 node is needed")
    if obj.shm_size is not None and not _SHM.match(str(obj.shm_size)):
        raise ValueError(f"shm_size={obj.shm_size!r}: give a size such as 2g or 512m")
    if obj.timeout is not None and obj.timeout < 1:
        raise ValueError(f"timeout={obj.timeout}: must be at least 1 second")
    if obj.compute is not None and not str(obj.compute).strip():
        raise ValueError("compute is empty: give 'serverless' or the name of a compute cluster or instance")


@attrs.frozen(kw_only=True)
class AzureMLOperatorConfig(JobConfig):
    """Options of the azureml step operator (plus those of every remote operator)."""

    subscription_id: str = option(doc="Azure subscription id of the workspace.")
    resource_group: str = option(doc="Resource group of the workspace.")
    workspace_name: str = option(doc="Azure Machine Learning workspace the jobs run in.")
    tenant_id: str | None = option(None, doc="Microsoft Entra tenant (directory) id; needed with client_id.")
    client_id: str | None = option(None, doc="Service principal (app registration) client id; with client_secret. "
                                             "Default: DefaultAzureCredential (environment, workload identity, "
                                             "managed identity, Azure CLI ...).")
    client_secret: str | None = option(None, doc="Service principal secret; use {{env.VAR}}.", secret=True)
    compute: str = option(SERVERLESS, doc="'serverless' (Azure provisions per job), or the name of a compute "
                                          "cluster or compute instance of the workspace.")
    instance_type: str | None = option(None, doc="VM size, e.g. Standard_DS3_v2 (default: picked from the step's "
                                                 "resources; else Standard_DS3_v2 on serverless, the cluster's "
                                                 "own size on a cluster).")
    instance_count: int = option(1, doc="Nodes per job.")
    experiment_name: str | None = option(None, doc="Experiment the jobs are grouped under in the studio (default: "
                                                   "the pipeline's name).")
    tags: dict[str, str] = option({}, doc="Tags put on every job (stepflow adds stepflow.run, stepflow.step, "
                                          "stepflow.attempt).")
    shm_size: str | None = option(None, doc="Shared memory of the job's container, e.g. 8g (Azure's default 2g).")
    timeout: int | None = option(None, doc="Azure ML cancels a job running longer, seconds (default: the step's "
                                           "timeout, else none).")
    job_tier: str | None = option(None, doc="Serverless job tier: Spot (preemptible, cheaper), Basic, Standard "
                                            "or Premium.", choices=JOB_TIERS)
    priority: str | None = option(None, doc="Queue priority on a compute cluster: low, medium or high.",
                                  choices=PRIORITIES)
    cloud: str = option("AzureCloud", doc="Azure cloud: AzureCloud, AzureChinaCloud or AzureUSGovernment.",
                        choices=CLOUDS)
    endpoint: str | None = option(None, doc="https://HOST:PORT of an Azure ML control plane reached as a custom "
                                            "cloud (local control planes and tests); its token is static.")
    ca_bundle: str | None = option(None, doc="PEM file of the certificates to trust for endpoint (a local "
                                             "control plane's self-signed one).")
    submit_attempts: int = option(8, doc="Tries of each submission (a job lookup, the image's environment, the "
                                         "job) and stop when Azure throttles (429) or fails transiently (5xx).")

    def __attrs_post_init__(self) -> None:
        for name in ("subscription_id", "resource_group", "workspace_name"):
            value = getattr(self, name)
            if not value or not str(value).strip():
                raise ValueError(f"{name} is empty: give the workspace's {name.replace('_', ' ')}")
        if not _is_ref(self.subscription_id) and not self.endpoint and not _GUID.match(self.subscription_id):
            raise ValueError(f"subscription_id {self.subscription_id!r} is not a subscription id (a GUID such as "
                             "00000000-0000-0000-0000-000000000000): see `az account show --query id`")
        if (self.client_id is None) != (self.client_secret is None):
            raise ValueError("client_id and client_secret go together (a service principal); give both, or neither "
                             "to use DefaultAzureCredential")
        if self.client_id is not None and not self.tenant_id:
            raise ValueError("client_id needs tenant_id: the service principal's directory")
        if self.endpoint is not None and not self.endpoint.startswith("https://"):
            raise ValueError(f"endpoint {self.endpoint!r}: Azure ML refuses bearer tokens over plain http; give "
                             "https://HOST:PORT")
        if self.ca_bundle is not None and self.endpoint is None:
            raise ValueError("ca_bundle applies to endpoint: set endpoint too, or drop ca_bundle")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        _check_tiers(self)
        _check_common(self)


def _check_tiers(obj: Any) -> None:
    if obj.job_tier is not None and obj.compute not in (None, SERVERLESS):
        raise ValueError(f"job_tier applies to serverless compute, not to compute {obj.compute!r}: use priority "
                         "on a cluster")
    if obj.priority is not None and obj.compute == SERVERLESS:
        raise ValueError("priority applies to compute clusters; on serverless compute use job_tier")


@attrs.frozen(kw_only=True)
class AzureMLStepSettings(JobSettings):
    """Per-step settings: ``@step(settings={"azureml": {...}})``; unset ones keep the operator's."""

    compute: str | None = option(None, doc="'serverless' or a compute target for this step.")
    instance_type: str | None = option(None, doc="VM size for this step.")
    instance_count: int | None = option(None, doc="Nodes for this step.")
    tags: dict[str, str] = option({}, doc="Extra tags for this step's job.")
    shm_size: str | None = option(None, doc="Shared memory for this step, e.g. 16g.")
    timeout: int | None = option(None, doc="Azure ML's time limit for this step, seconds.")
    job_tier: str | None = option(None, doc="Serverless job tier for this step.", choices=JOB_TIERS)
    priority: str | None = option(None, doc="Cluster queue priority for this step.", choices=PRIORITIES)

    def __attrs_post_init__(self) -> None:
        _check_common(self)


@attrs.frozen
class JobShape:
    """Where one job runs: the compute, its VM size (None: the cluster's own) and node count."""

    compute: str
    instance_type: str | None
    instance_count: int

    @property
    def serverless(self) -> bool:
        """Whether Azure provisions the job's nodes itself."""
        return self.compute == SERVERLESS


def job_shape(config: AzureMLOperatorConfig, merged: AzureMLOperatorConfig, resources: Resources | None) -> JobShape:
    """The compute and VM size of one step.

    A size its settings name; else the cheapest fitting its resources; else the operator's (on
    serverless, Standard_DS3_v2). A named size that cannot meet the step's resources is refused,
    naming one that can.
    """
    compute = merged.compute or SERVERLESS
    _check_tiers(merged)
    step_size = merged.instance_type if merged.instance_type != config.instance_type else None
    count = merged.instance_count or 1
    if resources is not None and not resources.is_empty():
        memory = (resources.memory_mib or 0) / 1024 or None
        fit = vmsizes.pick(resources.cpu, memory, resources.gpu, resources.gpu_type)
        if step_size:
            chosen = vmsizes.check(step_size)
            if not vmsizes.fits(chosen, resources.cpu, memory, resources.gpu, resources.gpu_type):
                raise ConfigError(f"instance_type {chosen.describe()} does not satisfy the step's resources "
                                  f"({resources.describe()}): use e.g. {fit.describe()}, or drop instance_type")
            return JobShape(compute, chosen.name, count)
        return JobShape(compute, fit.name, count)
    size = merged.instance_type
    if size is None and compute == SERVERLESS:
        size = vmsizes.DEFAULT_VM_SIZE
    return JobShape(compute, vmsizes.check(size).name if size else None, count)


@attrs.frozen
class AcrRegistryConfig:
    """Options of the azure container registry (Azure Container Registry)."""

    uri: str = option(doc="Registry address: NAME.azurecr.io, optionally with a path (NAME.azurecr.io/steps).")
    username: str | None = option(None, doc="Admin user (or a token name) to push with; with password. Default: a "
                                            "Microsoft Entra token of DefaultAzureCredential exchanged for an ACR "
                                            "refresh token.")
    password: str | None = option(None, doc="Password of username; use {{env.VAR}}.", secret=True)
    tenant_id: str | None = option(None, doc="Tenant whose token is exchanged (default: the credential's).")

    def __attrs_post_init__(self) -> None:
        uri = self.uri.strip()
        if not _is_ref(uri) and (not uri or "://" in uri or " " in uri):
            raise ValueError(f"uri {self.uri!r}: give host/path without a scheme, e.g. myregistry.azurecr.io")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together; give both, or neither to log in with a Microsoft "
                             "Entra token")
