"""stepflow: an asyncio event-driven job runner for ML pipelines.

Define steps with :func:`step`, wire them in a :func:`pipeline` function, and execute with
``await run(my_pipeline(...))``. Every state change is a typed event on an :class:`EventBus`.
"""

from stepflow._bus.bus import EventBus, EventHandler, Subscription
from stepflow._bus.sinks import ConsoleSink, JsonlSink, read_jsonl
from stepflow._dsl.pipeline import Pipeline, PipelineDef, pipeline
from stepflow._dsl.step import Step, StepOutput, step
from stepflow._engine.context import StepContext, current_step, running_step
from stepflow._engine.result import RunResult, StepError, StepResult
from stepflow._engine.run import resume, run, run_sync
from stepflow._operators.local import LocalStepOperator
from stepflow._version import __version__
from stepflow.errors import (
    NonRetryableError,
    OutputNotPicklableError,
    PipelineDefinitionError,
    StepflowError,
    StepOutputUsageError,
    StepTimeoutError,
    UnknownOperatorError,
)
from stepflow.interfaces import EventSink, Invocation, StepOperator
from stepflow.resources import Resources

__all__ = [
    "ConsoleSink",
    "EventBus",
    "EventHandler",
    "EventSink",
    "Invocation",
    "JsonlSink",
    "LocalStepOperator",
    "NonRetryableError",
    "OutputNotPicklableError",
    "Pipeline",
    "PipelineDef",
    "PipelineDefinitionError",
    "Resources",
    "RunResult",
    "Step",
    "StepContext",
    "StepError",
    "StepOperator",
    "StepOutput",
    "StepOutputUsageError",
    "StepResult",
    "StepTimeoutError",
    "StepflowError",
    "Subscription",
    "UnknownOperatorError",
    "__version__",
    "current_step",
    "pipeline",
    "read_jsonl",
    "resume",
    "run",
    "run_sync",
    "running_step",
    "step",
]
