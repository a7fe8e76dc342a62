"""Azure's error answers and the request rules the service checks before it accepts a job.

Errors follow Azure's shape, ``{"error": {"code", "message", ...}}``: ARM's own codes for the
resource hierarchy (SubscriptionNotFound, ResourceGroupNotFound, ResourceNotFound) and the
machine learning service's ``UserError`` with an ``innerError`` code for everything about a job.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

#: Job (run) names: what the service accepts as a run id.
JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,254}")
#: Experiment names, as the service states the rule.
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,255}")
SERVERLESS = "serverless"
#: An ISO 8601 duration as the service takes it (days down to seconds).
DURATION = re.compile(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?")
#: What a job update may change; anything else makes a PUT on an existing name a conflict.
MUTABLE = ("description", "tags", "displayName", "properties", "isArchived")

#: VM sizes serverless jobs may ask for (a representative part of Azure ML's list), lower-cased.
VM_SIZE_NAMES = (
    "Standard_D2_v2", "Standard_D3_v2", "Standard_D4_v2", "Standard_D5_v2", "Standard_D11_v2", "Standard_D12_v2",
    "Standard_D13_v2", "Standard_D14_v2", "Standard_DS1_v2", "Standard_DS2_v2", "Standard_DS3_v2",
    "Standard_DS4_v2", "Standard_DS5_v2", "Standard_DS11_v2", "Standard_DS12_v2", "Standard_DS13_v2",
    "Standard_DS14_v2", "Standard_D2s_v3", "Standard_D4s_v3", "Standard_D8s_v3", "Standard_D16s_v3",
    "Standard_D32s_v3", "Standard_D2_v3", "Standard_D4_v3", "Standard_D8_v3", "Standard_D16_v3",
    "Standard_D2as_v4", "Standard_D4as_v4", "Standard_D8as_v4", "Standard_D16as_v4", "Standard_D2ds_v4",
    "Standard_D4ds_v4", "Standard_D8ds_v4", "Standard_E2s_v3", "Standard_E4s_v3", "Standard_E8s_v3",
    "Standard_E16s_v3", "Standard_E32s_v3", "Standard_E4ds_v4", "Standard_E8ds_v4", "Standard_E16ds_v4",
    "Standard_F2s_v2", "Standard_F4s_v2", "Standard_F8s_v2", "Standard_F16s_v2", "Standard_F32s_v2",
    "Standard_NC6", "Standard_NC12", "Standard_NC24", "Standard_NC6s_v3", "Standard_NC12s_v3",
    "Standard_NC24s_v3", "Standard_NC4as_T4_v3", "Standard_NC8as_T4_v3", "Standard_NC16as_T4_v3",
    "Standard_NC64as_T4_v3", "Standard_NC24ads_A100_v4", "Standard_NC48ads_A100_v4", "Standard_NC96ads_A100_v4",
    "Standard_ND40rs_v2", "Standard_ND96asr_v4", "Standard_ND96amsr_A100_v4", "Standard_NV6", "Standard_NV12s_v3",
)
VM_SIZES = {s.lower(): s for s in VM_SIZE_NAMES}


class AzureError(Exception):
    """An error answer: HTTP status, Azure error code and message (plus an optional inner code)."""

    def __init__(self, status: int, code: str, message: str, *, inner: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"({code}) {message}")
        self.status, self.code, self.message, self.inner = status, code, message, inner
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body Azure sends."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner:
            error["innerError"] = {"code": self.inner}
        return {"error": error}


def user_error(message: str, inner: str = "BadArgument", status: int = 400) -> AzureError:
    """The machine learning service's ``UserError``."""
    return AzureError(status, "UserError", message, inner=inner)


def resource_not_found(resource: str, group: str) -> AzureError:
    """ARM's answer for a resource it does not know."""
    return AzureError(404, "ResourceNotFound", f"The Resource '{resource}' under resource group '{group}' was not "
                                               "found. For more details please go to "
                                               "https://aka.ms/ARMResourceNotFoundFix")


def validate_job_name(name: str) -> None:
    """Reject a name the service would not accept as a job (run) id."""
    if not JOB_NAME.fullmatch(name):
        raise user_error(f"Job name '{name}' is invalid: a job name must be 1-255 characters, start with a letter "
                         "or a number, and can only contain letters, numbers, underscores, and dashes.",
                         inner="InvalidJobName")


def validate_job(name: str, props: Any, computes: dict[str, dict[str, Any]], workspace: str) -> None:
    """The checks the service makes on a command job before it accepts it (raises AzureError)."""
    validate_job_name(name)
    if not isinstance(props, dict):
        raise user_error("The request body must hold a 'properties' object.", inner="InvalidRequestBody")
    job_type = props.get("jobType")
    if job_type != "Command":
        raise user_error(f"Job type '{job_type}' is not supported here: only Command jobs run.",
                         inner="NotSupported")
    if not str(props.get("command") or "").strip():
        raise user_error("The command of a command job must not be empty.", inner="RequiredField")
    if not props.get("environmentId"):
        raise user_error("A command job needs an environment (environmentId).", inner="RequiredField")
    experiment = props.get("experimentName") or "Default"
    if not EXPERIMENT_NAME.fullmatch(str(experiment)):
        raise user_error("Experiment name must be 1-256 characters, start with a letter or a number, and can only "
                         "contain letters, numbers, underscores, and dashes.", inner="InvalidExperimentName")
    job_timeout(props)  # raises when limits.timeout is no duration
    compute = compute_name(props.get("computeId"))
    resources = props.get("resources") or {}
    count = resources.get("instanceCount", 1)
    if not isinstance(count, int) or count < 1:
        raise user_error(f"Instance count must be a positive integer, got {count!r}.", inner="InvalidInstanceCount")
    if compute is not None:
        if compute not in computes:
            raise user_error(f"Compute '{compute}' does not exist in workspace '{workspace}'. Create it first or "
                             "submit the job to an existing compute target.", inner="ComputeNotFound")
    else:  # serverless: the VM size is the job's own choice
        size = resources.get("instanceType")
        if size is not None and str(size).lower() not in VM_SIZES:
            close = [VM_SIZES[s] for s in difflib.get_close_matches(str(size).lower(), VM_SIZES, n=4, cutoff=0.6)]
            hint = f" Did you mean one of: {', '.join(close)}?" if close else ""
            raise user_error(f"The specified VM size '{size}' is not supported for serverless compute in this "
                             f"region.{hint}", inner="InvalidVmSize")


def job_timeout(props: dict[str, Any]) -> float | None:
    """Seconds of ``limits.timeout`` (an ISO 8601 duration), after which the service cancels the job."""
    value = (props.get("limits") or {}).get("timeout")
    if value is None:
        return None
    match = DURATION.fullmatch(str(value))
    if match is None or not any(match.groups()):
        raise user_error(f"limits.timeout '{value}' is not an ISO 8601 duration such as PT1H30M.",
                         inner="InvalidTimeout")
    days, hours, minutes, seconds = (float(g or 0) for g in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise user_error(f"limits.timeout '{value}' must be positive.", inner="InvalidTimeout")
    return total


def compute_name(compute_id: Any) -> str | None:
    """The cluster a job's ``computeId`` names (an ARM id or a name), or None for serverless.

    ``MLClient`` sends ``compute="serverless"`` as is; no ``computeId`` at all also means serverless.
    """
    if not compute_id:
        return None
    name = str(compute_id).rstrip("/").rsplit("/", 1)[-1].removeprefix("azureml:")
    return None if name.lower() == SERVERLESS else name


def immutable_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The properties a PUT on an existing job would change although the service forbids it."""
    keys = (set(old) | set(new)) - set(MUTABLE)
    return sorted(k for k in keys if _norm(old.get(k)) != _norm(new.get(k)))


def _norm(value: Any) -> Any:
    """Empty containers and absence compare equal (clients omit what they do not set)."""
    return None if value in ({}, [], None) else value
