"""Request validation with the real SageMaker rules, answered in the real service's words.

Constraint failures are collected and reported the way AWS's front end does
(``2 validation errors detected: Value null at 'roleArn' failed to satisfy constraint: Member
must not be null; ...``), with the field's camelCase path. Semantic rules (spot training needs a
wait time, an image is needed) follow as single messages, as the service checks them after.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

NAME_PATTERN = r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}"
ROLE_PATTERN = r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+"
S3_PATTERN = r"^(https|s3)://([^/]+)/?(.*)"
ENV_KEY_PATTERN = r"[a-zA-Z_][a-zA-Z0-9_]*"
INPUT_MODES = ("Pipe", "File", "FastFile")
STATUSES = ("InProgress", "Completed", "Failed", "Stopping", "Stopped", "Deleting")
#: Limits of the service model (TrainingEnvironmentMap, HyperParameters, TagList).
MAX_ENV_ENTRIES, MAX_ENV_KEY, MAX_ENV_VALUE = 100, 512, 512
MAX_HP_ENTRIES, MAX_HP_KEY, MAX_HP_VALUE = 100, 256, 2500
MAX_TAGS = 50


class ApiError(Exception):
    """An error answer of the service: HTTP ``status`` with ``{"__type": code, "message": ...}``."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def validation_error(message: str) -> ApiError:
    """A ``ValidationException`` (HTTP 400)."""
    return ApiError("ValidationException", message)


@functools.cache
def instance_types() -> frozenset[str]:
    """The training instance types the API accepts, from botocore's copy of the service model."""
    from botocore.loaders import Loader

    model = Loader().load_service_model("sagemaker", "service-2")
    return frozenset(model["shapes"]["TrainingInstanceType"]["enum"])


def _camel(path: str) -> str:
    """``ResourceConfig.InstanceType`` -> ``resourceConfig.instanceType`` (the service's spelling)."""
    return ".".join(part[:1].lower() + part[1:] for part in path.split("."))


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    text = str(value)
    return f"'{text if len(text) <= 100 else text[:100] + '...'}'"


class _Checks:
    """Collects constraint failures in the service's format."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, value: Any, constraint: str, *, key: str | None = None) -> None:
        where = _camel(path) + (f".{key}" if key is not None else "")  # a map key keeps its spelling
        self.problems.append(f"Value {_shown(value)} at '{where}' failed to satisfy constraint: "
                             f"Member must {constraint}")

    def present(self, path: str, value: Any) -> bool:
        if value is None:
            self.fail(path, None, "not be null")
            return False
        return True

    def string(self, path: str, value: Any, *, min_len: int = 0, max_len: int | None = None,
               pattern: str | None = None, key: str | None = None) -> None:
        if not isinstance(value, str):
            self.fail(path, value, "be a string", key=key)
            return
        if len(value) < min_len:
            self.fail(path, value, f"have length greater than or equal to {min_len}", key=key)
        if max_len is not None and len(value) > max_len:
            self.fail(path, value, f"have length less than or equal to {max_len}", key=key)
        if pattern is not None and not re.fullmatch(pattern.lstrip("^"), value):
            self.fail(path, value, f"satisfy regular expression pattern: {pattern}", key=key)

    def integer(self, path: str, value: Any, *, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, value, "be an integer")
        elif value < minimum:
            self.fail(path, value, f"have value greater than or equal to {minimum}")

    def enum(self, path: str, value: Any, allowed: Any) -> None:
        if value not in allowed:
            shown = ", ".join(sorted(allowed)) if len(allowed) <= 10 else f"{len(allowed)} ml.* instance types"
            self.fail(path, value, f"satisfy enum value set: [{shown}]")

    def string_map(self, path: str, value: Any, *, max_entries: int, max_key: int, max_value: int,
                   key_pattern: str | None = None) -> None:
        if not isinstance(value, Mapping):
            self.fail(path, value, "be a map")
            return
        if len(value) > max_entries:
            self.fail(path, f"map of {len(value)} entries", f"have at most {max_entries} entries")
        for key, item in value.items():
            shown_key = str(key) if len(str(key)) <= 64 else None
            self.string(path, key, max_len=max_key, pattern=key_pattern, key=shown_key)
            self.string(path, item, max_len=max_value, key=shown_key)

    def raise_if_any(self) -> None:
        if self.problems:
            n = len(self.problems)
            raise validation_error(f"{n} validation error{'s' if n > 1 else ''} detected: "
                                   + "; ".join(self.problems))


def validate_name(name: Any, field: str = "TrainingJobName") -> str:
    """A training job name the service accepts, else a ValidationException."""
    checks = _Checks()
    if checks.present(field, name):
        checks.string(field, name, min_len=1, max_len=63, pattern=NAME_PATTERN)
    checks.raise_if_any()
    return str(name)


def validate_create(body: Mapping[str, Any]) -> None:
    """Raise a ValidationException when the CreateTrainingJob request is one AWS would refuse."""
    c = _Checks()
    if c.present("TrainingJobName", body.get("TrainingJobName")):
        c.string("TrainingJobName", body["TrainingJobName"], min_len=1, max_len=63, pattern=NAME_PATTERN)
    if c.present("RoleArn", body.get("RoleArn")):
        c.string("RoleArn", body["RoleArn"], min_len=20, max_len=2048, pattern=ROLE_PATTERN)

    algo = body.get("AlgorithmSpecification")
    if c.present("AlgorithmSpecification", algo):
        algo = algo if isinstance(algo, Mapping) else {}
        if c.present("AlgorithmSpecification.TrainingInputMode", algo.get("TrainingInputMode")):
            c.enum("AlgorithmSpecification.TrainingInputMode", algo["TrainingInputMode"], INPUT_MODES)
        if algo.get("TrainingImage") is not None:
            c.string("AlgorithmSpecification.TrainingImage", algo["TrainingImage"], min_len=1, max_len=255)
        for key in ("ContainerEntrypoint", "ContainerArguments"):
            items = algo.get(key)
            if items is None:
                continue
            if not isinstance(items, list) or not 1 <= len(items) <= 100:
                c.fail(f"AlgorithmSpecification.{key}", items, "be a list of 1 to 100 strings")
                continue
            for item in items:
                c.string(f"AlgorithmSpecification.{key}", item, max_len=256)

    output = body.get("OutputDataConfig")
    if c.present("OutputDataConfig", output):
        output = output if isinstance(output, Mapping) else {}
        if c.present("OutputDataConfig.S3OutputPath", output.get("S3OutputPath")):
            c.string("OutputDataConfig.S3OutputPath", output["S3OutputPath"], max_len=1024, pattern=S3_PATTERN)

    resources = body.get("ResourceConfig")
    if c.present("ResourceConfig", resources):
        resources = resources if isinstance(resources, Mapping) else {}
        if c.present("ResourceConfig.InstanceType", resources.get("InstanceType")):
            c.enum("ResourceConfig.InstanceType", resources["InstanceType"], instance_types())
        if c.present("ResourceConfig.InstanceCount", resources.get("InstanceCount")):
            c.integer("ResourceConfig.InstanceCount", resources["InstanceCount"], minimum=1)
        if c.present("ResourceConfig.VolumeSizeInGB", resources.get("VolumeSizeInGB")):
            c.integer("ResourceConfig.VolumeSizeInGB", resources["VolumeSizeInGB"], minimum=1)

    stopping = body.get("StoppingCondition")
    if c.present("StoppingCondition", stopping):
        stopping = stopping if isinstance(stopping, Mapping) else {}
        if c.present("StoppingCondition.MaxRuntimeInSeconds", stopping.get("MaxRuntimeInSeconds")):
            c.integer("StoppingCondition.MaxRuntimeInSeconds", stopping["MaxRuntimeInSeconds"], minimum=1)
        if stopping.get("MaxWaitTimeInSeconds") is not None:
            c.integer("StoppingCondition.MaxWaitTimeInSeconds", stopping["MaxWaitTimeInSeconds"], minimum=1)

    if body.get("Environment") is not None:
        c.string_map("Environment", body["Environment"], max_entries=MAX_ENV_ENTRIES, max_key=MAX_ENV_KEY,
                     max_value=MAX_ENV_VALUE, key_pattern=ENV_KEY_PATTERN)
    if body.get("HyperParameters") is not None:
        c.string_map("HyperParameters", body["HyperParameters"], max_entries=MAX_HP_ENTRIES, max_key=MAX_HP_KEY,
                     max_value=MAX_HP_VALUE)
    tags = body.get("Tags")
    if tags is not None and (not isinstance(tags, list) or len(tags) > MAX_TAGS):
        c.fail("Tags", f"list of {len(tags) if isinstance(tags, list) else '?'}",
               f"have length less than or equal to {MAX_TAGS}")
    c.raise_if_any()

    # Semantic rules, checked by the service once the shapes are right.
    algo = body["AlgorithmSpecification"]
    if not algo.get("TrainingImage"):
        if algo.get("AlgorithmName"):
            raise validation_error("AlgorithmName is not supported by the local SageMaker backend: give "
                                   "AlgorithmSpecification.TrainingImage")
        raise validation_error("Either AlgorithmSpecification.TrainingImage or AlgorithmSpecification.AlgorithmName "
                               "must be provided")
    stopping = body["StoppingCondition"]
    max_wait = stopping.get("MaxWaitTimeInSeconds")
    if body.get("EnableManagedSpotTraining"):
        if max_wait is None or max_wait < stopping["MaxRuntimeInSeconds"]:
            raise validation_error("Invalid MaxWaitTimeInSeconds. It must be present and be greater than or equal "
                                   "to MaxRuntimeInSeconds when EnableManagedSpotTraining is true "
                                   f"(StoppingCondition.MaxWaitTimeInSeconds={max_wait}, "
                                   f"MaxRuntimeInSeconds={stopping['MaxRuntimeInSeconds']})")
    elif max_wait is not None:
        raise validation_error("Invalid StoppingCondition.MaxWaitTimeInSeconds: it is only supported when "
                               "EnableManagedSpotTraining is true")
