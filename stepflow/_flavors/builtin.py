"""Built-in flavors. Registered through stepflow's own entry points, like any plugin's."""

from __future__ import annotations

from typing import Any

import attrs

from stepflow.interfaces.flavor import Flavor, option


@attrs.frozen
class LocalOperatorConfig:
    """Options of the in-process step operator."""

    max_threads: int = option(128, doc="Most sync steps running at once in worker threads.")
    max_concurrency: int | None = option(None, doc="Most steps on this operator at once (none: no limit).")


class LocalOperatorFlavor(Flavor):
    """Runs steps in the runner's process: async steps on the loop, sync ones in threads."""

    kind = "step_operator"
    name = "local"
    description = "Run steps in-process (async on the event loop, sync in worker threads)."
    config_class = LocalOperatorConfig

    def create(self, name: str, config: Any) -> Any:
        from stepflow._operators.local import LocalStepOperator

        return LocalStepOperator(name, max_threads=config.max_threads,
                                 max_concurrency=config.max_concurrency)


@attrs.frozen
class LocalArtifactStoreConfig:
    """Options of the local artifact store."""

    path: str | None = option(None, doc="Directory for artifacts (default: $STEPFLOW_HOME/artifacts).")


class LocalArtifactStoreFlavor(Flavor):
    """Artifacts as files on this machine."""

    kind = "artifact_store"
    name = "local"
    description = "Files in a local directory (not reachable by remote jobs)."
    config_class = LocalArtifactStoreConfig
    implementation = "stepflow._components.local_store:LocalArtifactStore"


@attrs.frozen
class DefaultRegistryConfig:
    """Options of a plain OCI/Docker registry."""

    uri: str = option(doc="Registry address, host[:port][/prefix], e.g. 127.0.0.1:5000/stepflow.")
    username: str | None = option(None, doc="User name for pushes (none: anonymous).")
    password: str | None = option(None, doc="Password or token; use {{env.VAR}} to keep it out of the store.",
                                  secret=True)


class DefaultRegistryFlavor(Flavor):
    """Any registry speaking the Docker/OCI distribution API."""

    kind = "container_registry"
    name = "default"
    description = "A Docker/OCI registry at host[:port][/prefix], optionally with credentials."
    config_class = DefaultRegistryConfig
    implementation = "stepflow._components.registry:DefaultContainerRegistry"


@attrs.frozen
class JsonlSinkConfig:
    """Options of the JSON Lines event sink."""

    path: str = option(doc="File to append events to; {run_id} is replaced by the run id.")


class JsonlSinkFlavor(Flavor):
    """Every event as a JSON line in a file."""

    kind = "event_sink"
    name = "jsonl"
    description = "Append every event to a JSON Lines file (lossless)."
    config_class = JsonlSinkConfig

    def create(self, name: str, config: Any) -> Any:
        from stepflow._bus.sinks import JsonlSink

        sink = JsonlSink(config.path)
        sink.name = name
        return sink


@attrs.frozen
class ConsoleSinkConfig:
    """Options of the console event sink."""

    show_logs: bool = option(True, doc="Also print step log lines.")


class ConsoleSinkFlavor(Flavor):
    """Structured log lines on the console (structlog)."""

    kind = "event_sink"
    name = "console"
    description = "Log every event as a structured console line (structlog)."
    config_class = ConsoleSinkConfig

    def create(self, name: str, config: Any) -> Any:
        from stepflow._bus.sinks import ConsoleSink

        sink = ConsoleSink(show_logs=config.show_logs)
        sink.name = name
        return sink
