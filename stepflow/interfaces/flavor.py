"""Flavors: how a kind of stack component is configured and created.

A plugin registers a flavor class under an entry-point group (``stepflow.step_operators``,
``stepflow.artifact_stores``, ``stepflow.container_registries``, ``stepflow.image_builders``,
``stepflow.event_sinks``). The module holding the flavor must stay light: it defines the config
(and settings) classes and names the implementation by import path, so listing flavors never
imports a cloud SDK. The implementation is imported only when a stack that uses it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import attrs

ComponentKind = Literal[
    "step_operator", "artifact_store", "container_registry", "image_builder", "event_sink"
]

#: kind -> entry-point group
ENTRY_POINT_GROUPS: dict[str, str] = {
    "step_operator": "stepflow.step_operators",
    "artifact_store": "stepflow.artifact_stores",
    "container_registry": "stepflow.container_registries",
    "image_builder": "stepflow.image_builders",
    "event_sink": "stepflow.event_sinks",
}


def option(default: Any = attrs.NOTHING, *, doc: str, secret: bool = False,
           choices: tuple[Any, ...] | None = None) -> Any:
    """Declare a config/settings field: ``doc`` is shown by ``stepflow flavor list``.

    ``secret=True`` fields are redacted by ``describe`` and accept ``{{env.VAR}}`` references
    resolved when the component is created. ``choices`` restricts the accepted values.
    A mutable default (list/dict) is copied per instance.
    """
    metadata = {"doc": doc, "secret": secret, "choices": choices}
    if isinstance(default, (list, dict, set)):
        value = default
        return attrs.field(factory=lambda: type(value)(value), metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


@attrs.frozen
class NoConfig:
    """Config class of flavors without options."""


class Flavor:
    """Describes one flavor of one component kind. Subclass it in a light module.

    Set ``kind``, ``name``, ``description``, ``config_class`` (an attrs class whose fields are
    declared with :func:`option`), optionally ``settings_class`` (per-step settings, step
    operators only), and ``implementation`` ("package.module:Class"). The implementation is
    constructed as ``Class(name=component_name, config=config_instance)`` unless
    :meth:`create` is overridden.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type] = NoConfig
    settings_class: ClassVar[type | None] = None
    implementation: ClassVar[str] = ""
    #: Step operators: the stack must also have a container registry.
    requires_container_registry: ClassVar[bool] = False
    #: Step operators: the stack's artifact store must be reachable from elsewhere.
    requires_remote_artifact_store: ClassVar[bool] = False
    #: Artifact stores: reachable from other machines (s3, gcs, azure ...).
    is_remote: ClassVar[bool] = False

    def load_implementation(self) -> type:
        """Import and return the implementation class (may import heavy SDKs)."""
        module, _, attr = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]

    def create(self, name: str, config: Any) -> Any:
        """Build a live component from a validated config instance."""
        return self.load_implementation()(name=name, config=config)

    def validate_stack(self, stack: Mapping[str, Any]) -> list[str]:
        """Extra cross-component checks for a stack using this flavor (empty when fine).

        ``stack`` has the stack's fields (``artifact_store``, ``container_registry``,
        ``step_operators`` ...) and ``components``: ``{"KIND:NAME": {"flavor": ..., "config":
        {...}}}`` with the options each member was registered with (secret values sealed).
        """
        return []
