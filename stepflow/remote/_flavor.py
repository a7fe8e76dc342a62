"""The flavor of a step operator implemented as a :class:`~stepflow.remote.JobBackend`."""

from __future__ import annotations

from typing import Any, ClassVar

from stepflow.interfaces.flavor import Flavor


class JobBackendFlavor(Flavor):
    """Subclass it for a backend plugin: ``implementation`` names the JobBackend class.

    ``create`` builds the backend and wraps it in the :class:`~stepflow.remote.JobOperator` that
    carries the remote path. The stack must have a container registry; set
    ``requires_remote_artifact_store`` unless jobs can reach a local store (docker can).
    """

    kind: ClassVar[str] = "step_operator"
    requires_container_registry: ClassVar[bool] = True
    requires_remote_artifact_store: ClassVar[bool] = True

    def create(self, name: str, config: Any) -> Any:
        """The operator: the backend class of ``implementation`` wrapped in a JobOperator."""
        from stepflow.remote._operator import JobOperator

        backend = self.load_implementation()(name=name, config=config)
        return JobOperator(backend, settings_class=self.settings_class)
