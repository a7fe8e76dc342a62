"""Deterministic job names and labels, and the check of a job against its backend's limits."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from stepflow.errors import ConfigError
from stepflow.remote._backend import Job, Limits

PREFIX = "sf"


def _clean(text: str, limits: Limits) -> str:
    lowered = text if "A-Z" in limits.name_charset else text.lower()
    return re.sub(r"-+", "-", limits.name_pattern().sub("-", lowered)).strip("-")


def run_prefix(run_id: str, limits: Limits = Limits()) -> str:
    """``sf-<run>-``: every job of a run starts with it (backends list a run's jobs by it)."""
    return f"{PREFIX}-{_clean(run_id, limits)}-"


def job_name(run_id: str, step: str, attempt: int, limits: Limits = Limits()) -> str:
    """``sf-<run>-<step>-<attempt>``, within the backend's length and charset.

    When too long, the step part is shortened and a hash of the full identity keeps it unique.
    The same run, step and attempt always give the same name: that is what makes submission
    idempotent and lets a resumed run find its jobs.
    """
    head = run_prefix(run_id, limits)
    full = f"{head}{_clean(step, limits)}-{attempt}"
    if len(full) <= limits.name_length:
        return full
    digest = hashlib.sha256(f"{run_id}/{step}/{attempt}".encode()).hexdigest()[:8]
    tail = f"-{digest}-{attempt}"
    room = limits.name_length - len(head) - len(tail)
    if room < 1:
        return f"{PREFIX}-{digest}-{attempt}"[:limits.name_length]
    return (head + _clean(step, limits)[:room].rstrip("-") + tail)[:limits.name_length]


def clean_labels(labels: Mapping[str, str], limits: Limits) -> dict[str, str]:
    """Labels made acceptable to the backend (characters replaced, lengths cut)."""
    out = {}
    for key, value in labels.items():
        if limits.label_charset:
            pattern = re.compile(f"[^{limits.label_charset}]")
            lower = "A-Z" not in limits.label_charset
            key = pattern.sub("_", key.lower() if lower else key)
            value = pattern.sub("_", value.lower() if lower else value)
        if limits.label_length:
            key, value = key[:limits.label_length], value[:limits.label_length]
        out[key] = value
    return out


def check_limits(job: Job, limits: Limits, *, what: str) -> None:
    """ConfigError naming every way ``job`` exceeds its backend's limits."""
    problems = []
    env = dict(job.env)
    if limits.env_entries is not None and len(env) > limits.env_entries:
        problems.append(f"{len(env)} environment variables, but the backend allows at most {limits.env_entries} "
                        "(lower `environment`)")
    if limits.env_value_length is not None:
        for key, value in env.items():
            if len(value) > limits.env_value_length:
                problems.append(f"environment variable {key} is {len(value)} characters long; the backend allows at "
                                f"most {limits.env_value_length} per value (shorten it, or pass large data as a "
                                "step input instead)")
    command = list(job.command)
    if limits.command_items is not None and len(command) > limits.command_items:
        problems.append(f"the job's command has {len(command)} items; the backend allows {limits.command_items}")
    if limits.command_item_length is not None:
        long = [c for c in command if len(c) > limits.command_item_length]
        if long:
            problems.append(f"the job's command has an argument of {len(long[0])} characters ({long[0][:60]}...); the "
                            f"backend allows {limits.command_item_length}: use a shorter artifact store path or "
                            "step name")
    if len(job.name) > limits.name_length or limits.name_pattern().search(job.name):
        problems.append(f"job name {job.name!r} breaks the backend's naming rules (at most {limits.name_length} "
                        f"characters of [{limits.name_charset}])")
    if problems:
        raise ConfigError(f"{what}: cannot submit job {job.name}: " + "; ".join(problems))
