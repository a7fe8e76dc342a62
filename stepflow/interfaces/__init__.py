"""Interfaces that plugins implement. Implementations live elsewhere; these hold no behaviour."""

from stepflow.interfaces.artifact_store import ArtifactStore
from stepflow.interfaces.container_registry import ContainerRegistry
from stepflow.interfaces.flavor import ENTRY_POINT_GROUPS, ComponentKind, Flavor, NoConfig, option
from stepflow.interfaces.image_builder import ImageBuilder
from stepflow.interfaces.operator import Invocation, StepOperator
from stepflow.interfaces.sink import EventSink

__all__ = [
    "ENTRY_POINT_GROUPS",
    "ArtifactStore",
    "ComponentKind",
    "ContainerRegistry",
    "EventSink",
    "Flavor",
    "ImageBuilder",
    "Invocation",
    "NoConfig",
    "StepOperator",
    "option",
]
