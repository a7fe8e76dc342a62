"""Flavor discovery through entry points: list without importing, load on demand."""

from __future__ import annotations

import importlib.metadata as md

import attrs

from stepflow.errors import ConfigError, PluginError
from stepflow.interfaces.flavor import ENTRY_POINT_GROUPS, Flavor

KIND_LABELS = {k: k.replace("_", "-") for k in ENTRY_POINT_GROUPS}


def kind_from_label(label: str) -> str:
    """``step-operator`` / ``step_operator`` -> ``step_operator`` (ConfigError if unknown)."""
    kind = label.replace("-", "_")
    if kind not in ENTRY_POINT_GROUPS:
        raise ConfigError(f"unknown component kind '{label}'; kinds: {', '.join(KIND_LABELS.values())}")
    return kind


@attrs.frozen
class FlavorEntry:
    """A discovered flavor, not yet imported."""

    kind: str
    name: str
    target: str
    distribution: str


_CACHE: dict[str, dict[str, FlavorEntry]] = {}
_LOADED: dict[tuple[str, str], Flavor] = {}


def entries(kind: str) -> dict[str, FlavorEntry]:
    """Every flavor registered for ``kind``, by name. Imports nothing."""
    cached = _CACHE.get(kind)
    if cached is not None:
        return cached
    found: dict[str, FlavorEntry] = {}
    for ep in md.entry_points(group=ENTRY_POINT_GROUPS[kind]):
        dist = ep.dist.name if ep.dist is not None else "unknown distribution"
        found.setdefault(ep.name, FlavorEntry(kind, ep.name, ep.value, dist))
    _CACHE[kind] = found
    return found


def refresh() -> None:
    """Forget discovered and loaded flavors (after installing a plugin in-process)."""
    _CACHE.clear()
    _LOADED.clear()


def load(kind: str, name: str) -> Flavor:
    """Import flavor ``name`` of ``kind``; PluginError naming the distribution on failure."""
    key = (kind, name)
    if key in _LOADED:
        return _LOADED[key]
    available = entries(kind)
    entry = available.get(name)
    if entry is None:
        raise ConfigError(
            f"unknown {KIND_LABELS[kind]} flavor '{name}'; available: "
            f"{', '.join(sorted(available)) or 'none'} (install the plugin that provides it, "
            f"then see `stepflow flavor list {KIND_LABELS[kind]}`)"
        )
    module, _, attr = entry.target.partition(":")
    try:
        obj = importlib_import(module)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except Exception as exc:
        raise PluginError(
            f"{KIND_LABELS[kind]} flavor '{name}' from plugin distribution '{entry.distribution}' "
            f"failed to load ({entry.target}): {type(exc).__name__}: {exc}. "
            f"Only stacks using this flavor are affected; reinstall or fix '{entry.distribution}'."
        ) from exc
    flavor = obj() if isinstance(obj, type) else obj
    if not isinstance(flavor, Flavor):
        raise PluginError(
            f"{KIND_LABELS[kind]} flavor '{name}' from '{entry.distribution}' points at "
            f"{entry.target}, which is not a stepflow.interfaces.Flavor"
        )
    if flavor.kind and flavor.kind != kind:
        raise PluginError(f"flavor '{name}' from '{entry.distribution}' declares kind "
                          f"'{flavor.kind}' but is registered as a {KIND_LABELS[kind]}")
    _LOADED[key] = flavor
    return flavor


def importlib_import(module: str) -> object:
    """Import a module by name (kept apart so tests can see plugin import errors plainly)."""
    import importlib

    return importlib.import_module(module)
