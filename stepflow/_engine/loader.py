"""Load ``module:attribute`` pipeline references and parse ``--param key=value``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from stepflow._config import options
from stepflow._dsl.pipeline import Pipeline, PipelineDef
from stepflow.errors import ParameterError, PipelineLoadError


def _import(module: str) -> types.ModuleType:
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise PipelineLoadError(f"no such file: {module}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise PipelineLoadError(f"cannot import {module}: not a Python module")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = mod
        sys.path.insert(0, str(path.resolve().parent))
        spec.loader.exec_module(mod)
        return mod
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(module)


def load_target(ref: str) -> Pipeline | PipelineDef[Any]:
    """Resolve ``module.path:attribute`` (or ``path/to/file.py:attribute``) to a pipeline."""
    module, sep, attr = ref.rpartition(":")
    if not sep or not module or not attr:
        raise PipelineLoadError(
            f"'{ref}' is not a pipeline reference: use MODULE:PIPELINE, e.g. "
            "examples.quickstart.pipeline:training"
        )
    try:
        mod = _import(module)
    except PipelineLoadError:
        raise
    except Exception as exc:
        raise PipelineLoadError(
            f"could not import module '{module}' (from '{ref}'): {type(exc).__name__}: {exc}. "
            "Run from your project's root directory or install the project, and check the "
            "module path (dots, not slashes, unless you give a .py file)."
        ) from exc
    found = getattr(mod, attr, None)
    candidates = sorted(n for n, v in vars(mod).items() if isinstance(v, (Pipeline, PipelineDef)))
    if found is None:
        hint = f"pipelines in it: {', '.join(candidates)}" if candidates else "it defines no @pipeline"
        raise PipelineLoadError(f"module '{module}' has no attribute '{attr}'; {hint}")
    if not isinstance(found, (Pipeline, PipelineDef)):
        hint = f" (pipelines in it: {', '.join(candidates)})" if candidates else ""
        raise PipelineLoadError(
            f"'{ref}' is a {type(found).__name__}, not a @pipeline function or a Pipeline{hint}"
        )
    return found


def describe_params(pdef: PipelineDef[Any]) -> str:
    """One line listing a pipeline's parameters with their types and defaults."""
    hints = _hints(pdef)
    parts = []
    for name, p in pdef.signature.parameters.items():
        ann = hints.get(name)
        tname = getattr(ann, "__name__", None) or (str(ann) if ann is not None else "any")
        default = "" if p.default is p.empty else f", default {p.default!r}"
        parts.append(f"{name} ({tname}{default})")
    return ", ".join(parts) or "none"


def _hints(pdef: PipelineDef[Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(pdef.fn)
    except Exception:
        return {}


def _convert(value: str, ann: Any) -> Any:
    if ann is None or ann is object or ann is Any:
        try:  # no usable annotation: accept JSON literals, fall back to the raw string
            return json.loads(value)
        except ValueError:
            return value
    return options.convert(value, ann)


def parse_params(pdef: PipelineDef[Any], items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Turn ``["lr=0.2", ...]`` into typed keyword arguments for ``pdef``; raise clearly."""
    params = pdef.signature.parameters
    hints = _hints(pdef)
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            problems.append(f"--param '{item}' is not KEY=VALUE")
            continue
        if key not in params:
            problems.append(
                f"unknown parameter '{key}' for pipeline '{pdef.name}'; its parameters: "
                f"{describe_params(pdef)}"
            )
            continue
        ann = hints.get(key)
        if ann is None and params[key].default is not inspect.Parameter.empty:
            default = params[key].default
            ann = type(default) if default is not None else None
        try:
            out[key] = _convert(raw, ann) if ann is not None else _convert(raw, object)
        except (ValueError, TypeError) as exc:
            tname = getattr(ann, "__name__", str(ann))
            problems.append(f"parameter '{key}' expects {tname}, got {raw!r} ({exc})")
    if problems:
        raise ParameterError("\n".join(problems))
    return out
