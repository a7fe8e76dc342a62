"""Config and settings of the ``sagemaker`` step operator and the ``ecr`` registry.

Light on purpose: attrs classes and plain checks, no AWS SDK. A ``ValueError`` raised while an
instance is built becomes a ``ConfigError`` naming the component (at registration) or the step
(before a run starts).
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from stepflow.errors import ConfigError
from stepflow.interfaces.flavor import option
from stepflow.remote import JobConfig, JobSettings, Resources
from stepflow_sagemaker import instances

#: Values SageMaker accepts (CreateTrainingJob's service model).
MAX_KEEP_ALIVE_S = 21600
MAX_TAGS = 50
ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+$")
ROLE_NAME = re.compile(r"^[a-zA-Z_0-9+=,.@\-/]{1,512}$")
EXPERIMENT_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,119}$")
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d$")
#: ``ACCOUNT.dkr.ecr.REGION.amazonaws.com`` (also .com.cn and FIPS hosts).
ECR_HOST = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr(-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?$")
_ENV_REF = "{{"


def _is_ref(value: Any) -> bool:
    return isinstance(value, str) and _ENV_REF in value


def check_region(value: str | None) -> None:
    """A region such as us-east-1 (``{{env.VAR}}`` references are checked once resolved)."""
    if value is None or _is_ref(value):
        return
    if not REGION.match(value):
        raise ValueError(f"region {value!r} is not an AWS region name (e.g. us-east-1, eu-west-1)")


def ecr_region(uri: str) -> str | None:
    """The region named by an ECR registry URI's host (None for other hosts)."""
    match = ECR_HOST.match(uri.split("/", 1)[0])
    return match.group("region") if match else None


def _check_resources(obj: Any, where: str) -> None:
    """Instance type known; generic requests satisfiable; both consistent."""
    try:
        instances.parse_memory(obj.memory)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if obj.gpu is not None and obj.gpu < 0:
        raise ValueError(f"gpu={obj.gpu}: a GPU request cannot be negative")
    if obj.cpu is not None and obj.cpu <= 0:
        raise ValueError(f"cpu={obj.cpu:g}: a CPU request must be positive")
    try:
        instances.resolve_instance_type(obj.instance_type, obj.cpu, obj.gpu, obj.memory)
    except ConfigError as exc:
        raise ValueError(f"{where}{exc}") from None


def _check_job_limits(obj: Any) -> None:
    if obj.instance_count is not None and obj.instance_count < 1:
        raise ValueError(f"instance_count={obj.instance_count}: at least 1 instance is needed")
    if obj.volume_size_gb is not None and obj.volume_size_gb < 1:
        raise ValueError(f"volume_size_gb={obj.volume_size_gb}: the ML storage volume needs at least 1 GB")
    if obj.max_runtime_s is not None and obj.max_runtime_s < 1:
        raise ValueError(f"max_runtime_s={obj.max_runtime_s}: must be at least 1 second")
    if obj.max_wait_s is not None and obj.max_wait_s < 1:
        raise ValueError(f"max_wait_s={obj.max_wait_s}: must be at least 1 second")
    if obj.keep_alive_s is not None and not 0 <= obj.keep_alive_s <= MAX_KEEP_ALIVE_S:
        raise ValueError(f"keep_alive_s={obj.keep_alive_s}: SageMaker warm pools keep instances 0 to "
                         f"{MAX_KEEP_ALIVE_S} seconds")
    if obj.use_spot and obj.keep_alive_s:
        raise ValueError("keep_alive_s (warm pools) cannot be combined with use_spot: SageMaker does not "
                         "keep spot instances warm")
    runtime, wait = obj.max_runtime_s, obj.max_wait_s
    if wait is not None and runtime is not None and wait < runtime:
        raise ValueError(f"max_wait_s={wait} must be at least max_runtime_s={runtime} (the wait for spot "
                         "capacity includes the training time)")
    if wait is not None and obj.use_spot is False:
        raise ValueError("max_wait_s applies to spot training only: set use_spot=true or drop max_wait_s")
    tags = obj.tags or {}
    if len(tags) > MAX_TAGS - 4:
        raise ValueError(f"{len(tags)} tags given: SageMaker allows {MAX_TAGS} per job and stepflow adds up to 4")
    for key, value in tags.items():
        if not key or len(key) > 128 or key.lower().startswith("aws:"):
            raise ValueError(f"tag key {key!r}: 1-128 characters, not starting with 'aws:'")
        if len(str(value)) > 256:
            raise ValueError(f"tag {key!r}: values are at most 256 characters")


@attrs.frozen(kw_only=True)
class SageMakerOperatorConfig(JobConfig):
    """Options of the sagemaker step operator (plus those of every remote operator)."""

    role: str = option(doc="IAM role the training jobs run as: its ARN (arn:aws:iam::ACCOUNT:role/NAME) or its "
                           "name (expanded with the caller's account). It needs the SageMaker trust policy and "
                           "access to the S3 bucket, the ECR repository and CloudWatch Logs; jobs reach the "
                           "artifact store with it.")
    region: str | None = option(None, doc="AWS region of the jobs (default: the AWS config: AWS_REGION, "
                                          "AWS_DEFAULT_REGION or the profile's region).")
    instance_type: str | None = option(None, doc="Training instance type, e.g. ml.m5.large (default: picked from "
                                                 "the step's resources, else ml.m5.large).")
    instance_count: int = option(1, doc="Instances per job.")
    volume_size_gb: int = option(30, doc="Size of each instance's ML storage volume, GB (at least the step's "
                                         "resources disk).")
    max_runtime_s: int = option(86400, doc="StoppingCondition.MaxRuntimeInSeconds: SageMaker stops a job "
                                           "running longer (reported as a failure).")
    use_spot: bool = option(False, doc="Managed spot training (cheaper, may wait for capacity).")
    max_wait_s: int | None = option(None, doc="Spot only: MaxWaitTimeInSeconds, the wait for capacity plus the "
                                              "training time (default: max_runtime_s).")
    tags: dict[str, str] = option({}, doc="Tags put on every training job (stepflow adds stepflow.run, "
                                          "stepflow.step, stepflow.attempt).")
    subnets: list[str] = option([], doc="VPC subnet ids to run the jobs in (needs security_group_ids).")
    security_group_ids: list[str] = option([], doc="VPC security group ids (with subnets).")
    keep_alive_s: int = option(0, doc="Warm pool: seconds SageMaker keeps the instances after a job for the "
                                      "next one with the same configuration (0: off, at most 21600).")
    experiment_name: str | None = option(None, doc="Groups the jobs: tagged stepflow.experiment and used as the "
                                                   "S3 output prefix.")
    bucket_name: str | None = option(None, doc="S3 bucket for SageMaker's job output (OutputDataConfig; default: "
                                               "the artifact store's bucket).")
    endpoint_url: str | None = option(None, doc="SageMaker API address, for tests and private (VPC) endpoints "
                                                "(default: the region's; other services follow the AWS config, "
                                                "e.g. AWS_ENDPOINT_URL_LOGS).")
    profile: str | None = option(None, doc="Named profile of ~/.aws/config and ~/.aws/credentials (default: "
                                           "AWS_PROFILE, else the credential chain: environment, profile, "
                                           "container or instance role).")
    cpu: float | None = option(None, doc="Default vCPUs per instance for steps without resources=; picks the "
                                         "cheapest matching instance type when instance_type is not set.")
    gpu: int | None = option(None, doc="Default GPUs per instance for steps without resources=.")
    memory: str | None = option(None, doc="Default memory per instance for steps without resources=, e.g. 16g.")

    def __attrs_post_init__(self) -> None:
        role = self.role
        if not _is_ref(role):
            if not role or not role.strip():
                raise ValueError("role is empty: give the IAM role ARN the training jobs run as, e.g. "
                                 "arn:aws:iam::123456789012:role/SageMakerRole")
            if role.startswith("arn:") and not ROLE_ARN.match(role):
                raise ValueError(f"role {role!r} is not an IAM role ARN (arn:aws:iam::ACCOUNT_ID:role/NAME)")
            if not role.startswith("arn:") and not ROLE_NAME.match(role):
                raise ValueError(f"role {role!r} is neither an IAM role ARN nor a role name")
        check_region(self.region)
        if self.experiment_name and not _is_ref(self.experiment_name) \
                and not EXPERIMENT_NAME.match(self.experiment_name):
            raise ValueError(f"experiment_name {self.experiment_name!r}: letters, digits and single hyphens, "
                             "at most 120 characters")
        if self.bucket_name and not _is_ref(self.bucket_name):
            if self.bucket_name.startswith("s3://"):
                raise ValueError(f"bucket_name takes a bucket name, not a URI: {self.bucket_name.removeprefix('s3://')!r}")
            if not BUCKET_NAME.match(self.bucket_name):
                raise ValueError(f"bucket_name {self.bucket_name!r} is not a valid S3 bucket name")
        if bool(self.subnets) != bool(self.security_group_ids):
            raise ValueError("subnets and security_group_ids go together: a job in a VPC needs both "
                             "(SageMaker's VpcConfig)")
        if len(self.subnets) > 16 or len(self.security_group_ids) > 5:
            raise ValueError("SageMaker's VpcConfig takes at most 16 subnets and 5 security groups")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        _check_job_limits(self)
        _check_resources(self, "")


@attrs.frozen(kw_only=True)
class SageMakerStepSettings(JobSettings):
    """Per-step settings: ``@step(settings={"sagemaker": {...}})``; unset ones keep the operator's."""

    instance_type: str | None = option(None, doc="Instance type for this step.")
    instance_count: int | None = option(None, doc="Instances for this step.")
    volume_size_gb: int | None = option(None, doc="ML storage volume size for this step, GB.")
    max_runtime_s: int | None = option(None, doc="MaxRuntimeInSeconds for this step.")
    use_spot: bool | None = option(None, doc="Managed spot training for this step.")
    max_wait_s: int | None = option(None, doc="MaxWaitTimeInSeconds (spot) for this step.")
    tags: dict[str, str] = option({}, doc="Extra tags for this step's job.")
    keep_alive_s: int | None = option(None, doc="Warm pool keep-alive for this step, seconds.")
    cpu: float | None = option(None, doc="vCPUs this step needs (prefer @step(resources=...)).")
    gpu: int | None = option(None, doc="GPUs this step needs (prefer @step(resources=...)).")
    memory: str | None = option(None, doc="Memory this step needs, e.g. 32g (prefer @step(resources=...)).")

    def __attrs_post_init__(self) -> None:
        _check_job_limits(self)
        _check_resources(self, "")


@attrs.frozen
class JobOptions:
    """What one training job uses: the merged options, with the instance type decided."""

    instance_type: str
    instance_count: int
    volume_size_gb: int
    max_runtime_s: int
    use_spot: bool
    max_wait_s: int | None
    keep_alive_s: int
    tags: dict[str, str]


def job_options(config: SageMakerOperatorConfig, merged: SageMakerOperatorConfig,
                resources: Resources | None = None) -> JobOptions:
    """Decide one job's instance type and limits; ConfigError when they cannot work.

    The instance type: one the step set in its settings; else the cheapest type meeting the
    step's resources (``@step(resources=...)``, or cpu/gpu/memory settings); else the
    operator's ``instance_type``, or its cpu/gpu/memory, or ml.m5.large. An explicit type that
    cannot meet the step's resources is refused, naming one that can.
    """
    step_type = merged.instance_type if merged.instance_type != config.instance_type else None
    step_asks = (merged.cpu, merged.gpu, merged.memory) != (config.cpu, config.gpu, config.memory)
    gpu_type = None
    if resources is not None and not resources.is_empty():
        cpu, gpu, gpu_type = resources.cpu, resources.gpu, resources.gpu_type
        memory: str | None = f"{resources.memory_mib / 1024:g}g" if resources.memory_mib else None
        itype = step_type
    elif step_type or step_asks:
        itype, cpu, gpu, memory = step_type, merged.cpu, merged.gpu, merged.memory
    else:
        itype, cpu, gpu, memory = config.instance_type, config.cpu, config.gpu, config.memory
    instance_type = instances.resolve_instance_type(itype, cpu, gpu, memory, gpu_type)
    volume = merged.volume_size_gb
    if resources is not None and resources.disk_gib:
        volume = max(volume, int(-(-resources.disk_gib // 1)))
    if merged.use_spot and merged.keep_alive_s:
        raise ConfigError("keep_alive_s (warm pools) cannot be combined with use_spot")
    wait = merged.max_wait_s
    if merged.use_spot:
        wait = wait if wait is not None else merged.max_runtime_s
        if wait < merged.max_runtime_s:
            raise ConfigError(f"max_wait_s={wait} must be at least max_runtime_s={merged.max_runtime_s}")
    else:
        wait = None
    if len(merged.tags) > MAX_TAGS - 4:
        raise ConfigError(f"{len(merged.tags)} tags: SageMaker allows {MAX_TAGS} per job and stepflow adds up to 4")
    return JobOptions(instance_type, merged.instance_count, volume, merged.max_runtime_s, bool(merged.use_spot),
                      wait, merged.keep_alive_s, dict(merged.tags))


@attrs.frozen
class EcrRegistryConfig:
    """Options of the ecr container registry."""

    uri: str = option(doc="Registry address: ACCOUNT_ID.dkr.ecr.REGION.amazonaws.com[/prefix] (any host[:port] "
                          "[/prefix] is accepted for tests, with endpoint_url pointing at an ECR API).")
    region: str | None = option(None, doc="Region of the registry (default: the one in the uri, else the AWS "
                                          "config).")
    endpoint_url: str | None = option(None, doc="ECR API address, for tests and private endpoints (default: the "
                                                "region's).")
    profile: str | None = option(None, doc="Named profile of the AWS config files (default: the credential "
                                           "chain).")
    create_repository: bool = option(True, doc="Create the image repository in ECR when it is missing.")

    def __attrs_post_init__(self) -> None:
        if _is_ref(self.uri):
            return
        uri = self.uri.strip().rstrip("/")
        if not uri or "://" in uri or " " in uri:
            raise ValueError(f"uri {self.uri!r}: give host[/prefix] without a scheme, e.g. "
                             "123456789012.dkr.ecr.us-east-1.amazonaws.com/ml")
        check_region(self.region)
        named = ecr_region(uri)
        if named and self.region and not _is_ref(self.region) and named != self.region:
            raise ValueError(f"region {self.region!r} differs from the region in the uri ({named}); drop --region "
                             "or fix the uri")
