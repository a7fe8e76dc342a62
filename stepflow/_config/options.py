"""Typed options for flavor configs and step settings: conversion, validation, redaction."""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from stepflow.errors import ConfigError

REDACTED = "********"
_ENV_REF = re.compile(r"\{\{\s*env\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@attrs.frozen
class OptionSpec:
    """One option of a config or settings class, as shown to users."""

    name: str
    type: Any
    type_name: str
    required: bool
    default: Any
    doc: str
    secret: bool
    choices: tuple[Any, ...] | None


def normalize_key(key: str) -> str:
    """``--instance-type`` / ``instance-type`` / ``instance_type`` -> ``instance_type``."""
    return key.lstrip("-").replace("-", "_")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def specs(cls: type) -> list[OptionSpec]:
    """Describe every option of an attrs config/settings class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in attrs.fields(cls):
        required = f.default is attrs.NOTHING
        default: Any = None
        if not required:
            factory = getattr(f.default, "factory", None)
            default = factory() if factory is not None else f.default
        tp = hints.get(f.name, Any)
        out.append(OptionSpec(f.name, tp, _type_name(tp), required, default,
                              f.metadata.get("doc", ""), bool(f.metadata.get("secret")),
                              f.metadata.get("choices")))
    return out


def convert(value: Any, tp: Any) -> Any:
    """Convert ``value`` (a CLI string or a Python value) to type ``tp``; ValueError if it can't."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        nullable = type(None) in options
        if nullable and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(value, option)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors) or f"expected {_type_name(tp)}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise ValueError(f"expected one of {', '.join(repr(a) for a in allowed)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        raise ValueError("expected a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ValueError("expected an integer") from None
        raise ValueError("expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise ValueError("expected a number") from None
        raise ValueError("expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError("expected a string")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ValueError("expected a path")
    base = origin or tp
    if base is set or base is frozenset:
        args = typing.get_args(tp)
        members = convert(value, list[args[0]]) if args else convert(value, list)  # type: ignore[valid-type]
        return base(members)
    if base in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            items: Any = json.loads(text) if text.startswith("[") else [
                v.strip() for v in text.split(",") if v.strip()]
        else:
            items = value
        if not isinstance(items, (list, tuple)):
            raise ValueError("expected a list (JSON, or comma-separated)")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        converted = [convert(v, item_tp) for v in items]
        return converted if base is list else tuple(converted)
    if base is dict:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                mapping = json.loads(text)
            else:  # KEY=VALUE,KEY=VALUE
                mapping = {}
                for part in filter(None, (p.strip() for p in text.split(","))):
                    k, sep, v = part.partition("=")
                    if not sep:
                        raise ValueError("expected a JSON object or KEY=VALUE,KEY=VALUE")
                    mapping[k.strip()] = v.strip()
        else:
            mapping = value
        if not isinstance(mapping, Mapping):
            raise ValueError("expected a mapping (JSON object or KEY=VALUE,...)")
        args = typing.get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): convert(v, val_tp) for k, v in mapping.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"expected {_type_name(tp)}")


def build(cls: type, values: Mapping[str, Any], *, what: str, partial_ok: bool = False,
          keep_env_refs: bool = True) -> Any:
    """Validate ``values`` against ``cls`` and return an instance (raise one error for all problems).

    ``what`` names the thing being configured in messages, e.g. "step-operator 'sagemaker'
    (flavor sagemaker)". ``{{env.VAR}}`` references are kept as they are (resolved later), unless
    ``keep_env_refs`` is false: the values were resolved already (:func:`resolve_env_values`) and
    every one is converted, even one whose text happens to look like a reference.
    """
    fields = {s.name: s for s in specs(cls)}
    problems = []
    unknown = False  # an unknown option with no close match: list the valid ones
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = normalize_key(raw_key)
        spec = fields.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, list(fields), n=2, cutoff=0.7)
            problems.append(f"unknown option '{raw_key}'" + (f" (did you mean --{' or --'.join(close)}?)"
                                                             if close else ""))
            unknown = unknown or not close
            continue
        if keep_env_refs and isinstance(value, str) and _ENV_REF.search(value):
            kwargs[key] = value
            continue
        shown = REDACTED if spec.secret else repr(value)  # never echo a secret, even a bad one
        try:
            converted = convert(value, spec.type)
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            problems.append(f"option '{key}' expects {spec.type_name}, got {shown}"
                            + ("" if spec.secret else f" ({exc})"))
            continue
        if spec.choices and converted not in spec.choices:
            problems.append(f"option '{key}' must be one of {', '.join(map(str, spec.choices))}, got {shown}")
            continue
        kwargs[key] = converted
    if not partial_ok:
        for spec in fields.values():
            if spec.required and spec.name not in kwargs:
                problems.append(f"missing required option '{spec.name}' ({spec.doc})")
    if problems:
        listing = f". Valid options: {describe_valid(cls)}" if unknown else ""
        raise ConfigError(f"{what}: " + "; ".join(problems) + listing)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a value the class refused says what to do itself
        raise ConfigError(f"{what}: {exc}") from None


def describe_valid(cls: type) -> str:
    """``name (type, required)``, ... for error messages."""
    parts = []
    for s in specs(cls):
        parts.append(f"--{s.name} ({s.type_name}{', required' if s.required else ''})")
    return ", ".join(parts) or "none"


def to_jsonable(instance: Any, only: set[str] | None = None) -> dict[str, Any]:
    """Config instance -> JSON-able dict (only the given keys when ``only`` is set)."""
    out = {}
    for f in attrs.fields(type(instance)):
        if only is not None and f.name not in only:
            continue
        value = getattr(instance, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def is_env_ref(value: Any) -> bool:
    """Whether ``value`` is one whole ``{{env.VAR}}`` reference (not a secret: shown and stored as is)."""
    return isinstance(value, str) and _ENV_REF.fullmatch(value.strip()) is not None


def env_ref_names(value: Any) -> list[str]:
    """The variables a value refers to with ``{{env.VAR}}`` (empty for other values)."""
    return [m.group(1) for m in _ENV_REF.finditer(value)] if isinstance(value, str) else []


def redact(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Replace secret values by a mask, keeping ``{{env.VAR}}`` references visible."""
    secret = {s.name for s in specs(cls) if s.secret}
    out = {}
    for k, v in values.items():
        if k in secret and v not in (None, "") and not is_env_ref(v):
            out[k] = REDACTED
        else:
            out[k] = v
    return out


def resolve_env_values(cls: type, values: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """Return ``values`` (raw option values) with ``{{env.VAR}}`` references replaced by the variables.

    Meant to run before :func:`build` (with ``keep_env_refs=False``), so that conversion and the
    config class's validators check the real value rather than the reference.
    """
    fields = {s.name: s for s in specs(cls)}
    out = dict(values)
    problems = []
    for key, value in values.items():
        if not isinstance(value, str) or not _ENV_REF.search(value):
            continue
        missing = [n for n in env_ref_names(value) if n not in os.environ]
        if missing:
            refs = ", ".join("{{env." + m + "}}" for m in missing)
            verb = "it is" if len(missing) == 1 else "they are"
            problems.append(f"option '{key}' refers to {refs}, but {verb} not set in the environment")
            continue
        text = _ENV_REF.sub(lambda m: os.environ[m.group(1)], value)
        spec = fields.get(normalize_key(key))
        if spec is not None:
            try:  # checked here to say where the bad value came from
                convert(text, spec.type)
            except (ValueError, TypeError) as exc:
                problems.append(f"option '{key}' (from the environment) expects {spec.type_name}: {exc}")
                continue
        out[key] = text
    if problems:
        raise ConfigError(f"{what}: " + "; ".join(problems))
    return out


def resolve_env_refs(cls: type, instance: Any, *, what: str) -> Any:
    """Return a copy of ``instance`` with ``{{env.VAR}}`` references replaced by their values.

    The config class's validators saw the references when ``instance`` was built; prefer
    :func:`resolve_env_values` before :func:`build`, which lets them see the resolved values only.
    """
    fields = {s.name: s for s in specs(cls)}
    changes: dict[str, Any] = {}
    problems = []
    for name, spec in fields.items():
        value = getattr(instance, name)
        if not isinstance(value, str) or not _ENV_REF.search(value):
            continue
        missing = [m.group(1) for m in _ENV_REF.finditer(value) if m.group(1) not in os.environ]
        if missing:
            refs = ", ".join("{{env." + m + "}}" for m in missing)
            verb = "it is" if len(missing) == 1 else "they are"
            problems.append(f"option '{name}' refers to {refs}, but {verb} not set in the environment")
            continue
        text = _ENV_REF.sub(lambda m: os.environ[m.group(1)], value)
        try:
            changes[name] = convert(text, spec.type)
        except (ValueError, TypeError) as exc:
            problems.append(f"option '{name}' (from the environment) expects {spec.type_name}: {exc}")
    if problems:
        raise ConfigError(f"{what}: " + "; ".join(problems))
    try:
        return attrs.evolve(instance, **changes) if changes else instance
    except (TypeError, ValueError) as exc:  # the config class's own validators
        raise ConfigError(f"{what}: {exc}") from None
