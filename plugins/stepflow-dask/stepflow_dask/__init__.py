"""stepflow-dask: run stepflow steps on a Dask distributed cluster.

Importing this package is light (no dask); the operator is loaded when a stack uses the
``dask`` flavor.
"""

from stepflow_dask.flavor import DaskOperatorConfig, DaskOperatorFlavor, DaskSettings

__all__ = ["DaskOperatorConfig", "DaskOperatorFlavor", "DaskSettings"]
