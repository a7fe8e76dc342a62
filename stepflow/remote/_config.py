"""Options every remote step operator has, and how a step's settings merge over them.

A backend's config class subclasses :class:`JobConfig` (``@attrs.frozen(kw_only=True)``), its
settings class :class:`JobSettings`. A step's settings override the operator's options of the
same name; dictionaries (``environment``, labels, tags) are merged key by key and lists
(``requirements``) added to. The merged object is an instance of the backend's config class:
backends read one object, whatever came from where.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import attrs

from stepflow.interfaces.flavor import option


@attrs.frozen(kw_only=True)
class JobConfig:
    """Options shared by every remote step operator."""

    base_image: str | None = option(None, doc="Image the step images are built FROM; it must have the runner's "
                                              "Python minor version (default: the operator's own default).")
    platform: str = option("linux/amd64", doc="OS/architecture of the machines jobs run on; wheels shipped in "
                                              "the image are chosen for it, e.g. linux/amd64 or linux/arm64.")
    environment: dict[str, str] = option({}, doc="Extra environment variables for every job (visible in the "
                                                 "job's description: no secrets).")
    requirements: list[str] = option([], doc="Extra host-installed distributions to ship in the image.")
    project_root: str | None = option(None, doc="Directory of project code copied into the image (default: the "
                                                "current directory). Git-ignored files, .env files and the "
                                                "stepflow home never ship; see `stepflow image context`.")
    max_concurrency: int | None = option(None, doc="Most jobs of this operator running at once.")
    submit_attempts: int = option(6, doc="Tries of each backend call that must not be lost (submit, stop) when "
                                         "the backend throttles or fails transiently.")
    pass_storage_credentials: bool = option(False, doc="Give jobs the artifact store's configured credentials "
                                                       "even where the backend can only pass them in the job's "
                                                       "environment, which anyone who may describe the job can "
                                                       "read. Prefer the job's own identity (role, service "
                                                       "account, managed identity).")


@attrs.frozen(kw_only=True)
class JobSettings:
    """Per-step settings shared by every remote step operator."""

    base_image: str | None = option(None, doc="Base image for this step's image.")
    environment: dict[str, str] = option({}, doc="Extra environment variables for this step's job.")
    requirements: list[str] = option([], doc="Extra distributions for this step's image.")


def merge(config: Any, settings: Any) -> Any:
    """``config`` with every non-empty field of ``settings`` that it also has laid over it.

    The config class's own cross-field checks are not run again on the result: they judge what
    was registered. A step's combination is judged by the backend's ``check`` before the run.
    """
    if settings is None:
        return config
    names = {f.name for f in attrs.fields(type(config))}
    changes: dict[str, Any] = {}
    for field in attrs.fields(type(settings)):
        value = getattr(settings, field.name)
        if field.name not in names or value is None or value == {} or value == []:
            continue
        current = getattr(config, field.name)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            value = {**current, **value}
        elif isinstance(value, list) and isinstance(current, list):
            value = [*current, *(v for v in value if v not in current)]
        changes[field.name] = value
    if not changes:
        return config
    merged = copy.copy(config)
    for name, value in changes.items():
        object.__setattr__(merged, name, value)  # frozen: set once, on this private copy
    return merged
