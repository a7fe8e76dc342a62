"""Interfaces that plugins implement. Implementations live elsewhere; these hold no behaviour."""

from stepflow.interfaces.operator import Invocation, StepOperator
from stepflow.interfaces.sink import EventSink

__all__ = ["EventSink", "Invocation", "StepOperator"]
