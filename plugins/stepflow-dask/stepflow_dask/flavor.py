"""The ``dask`` flavor: options and per-step settings only.

stepflow imports this module to list options and to register components, so it stays light
(attrs and ``stepflow.interfaces``): dask and distributed are imported by the operator, only
when a stack that uses the flavor runs.
"""

from __future__ import annotations

from typing import Any

import attrs

from stepflow.interfaces import Flavor, option


def _positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_resources(name: str, value: dict[str, Any]) -> None:
    for key, amount in value.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ValueError(f"{name}: resource {key!r} needs a number > 0, got {amount!r}")


@attrs.frozen
class DaskOperatorConfig:
    """Options of a ``dask`` step operator (``stepflow step-operator register NAME --type=dask``)."""

    address: str = option("local", doc="Scheduler address, e.g. tcp://host:8786 (tls://... for a secured cluster), "
                                       "or 'local' for a LocalCluster started and stopped with each run.")
    connect_timeout: float = option(10.0, doc="Seconds to keep trying to reach the scheduler before the run fails.")
    local_workers: int = option(2, doc="address=local: number of worker processes.")
    local_threads_per_worker: int = option(1, doc="address=local: threads per worker process.")
    local_resources: dict[str, float] = option({}, doc='address=local: resources every local worker declares, '
                                                       'e.g. {"GPU": 1}.')
    tls_ca_file: str | None = option(None, doc="TLS: CA certificate (PEM file) that signed the scheduler's and "
                                               "workers' certificates.")
    tls_client_cert: str | None = option(None, doc="TLS: this client's certificate (PEM file).")
    tls_client_key: str | None = option(None, doc="TLS: this client's private key (PEM file; may be in the "
                                                  "certificate file).")
    resources: dict[str, float] = option({}, doc='Dask worker resources every step needs, e.g. {"GPU": 1}; '
                                                 "added to those derived from the step's Resources.")
    gpu_resource: str = option("GPU", doc="Worker resource name that Resources(gpu=N) asks for.")
    memory_resource: str = option("MEMORY", doc="Worker resource name that Resources(memory=...) asks for, in bytes "
                                                "(workers declare e.g. --resources MEMORY=16e9); empty: not mapped.")
    cpu_resource: str = option("", doc="Worker resource name that Resources(cpu=N) asks for (empty: not mapped, "
                                       "the default: a Dask task uses one worker thread).")
    workers: list[str] = option([], doc="Restrict steps to these workers (addresses, names or hostnames).")
    allow_other_workers: bool = option(False, doc="With workers: let other workers run steps when those are busy.")
    priority: int = option(0, doc="Dask priority of steps (higher runs first when the cluster is busy).")
    max_concurrency: int | None = option(None, doc="Most steps of this operator on the cluster at once (none: no "
                                                   "limit; the cluster queues the rest).")
    check_versions: bool = option(True, doc="Before the first submit, fail when package versions differ between "
                                            "this machine, the scheduler and the workers.")
    announce_after_s: float = option(0.5, doc="A step still running after this many seconds reports the worker it "
                                              "runs on (and a worker that dies under it); shorter steps report "
                                              "their worker with their result.")
    reattach: bool = option(True, doc="Publish each running step on the scheduler so that `stepflow resume` after a "
                                      "runner crash re-attaches to it instead of running it again.")

    def __attrs_post_init__(self) -> None:
        # A ValueError here becomes a ConfigError at registration time, naming the option.
        if self.address != "local" and "://" not in self.address:
            raise ValueError(f"address must be 'local' or a scheduler URL such as tcp://host:8786, got "
                             f"{self.address!r}")
        _positive("connect_timeout", self.connect_timeout, allow_none=False)
        _positive("local_workers", self.local_workers, allow_none=False)
        _positive("local_threads_per_worker", self.local_threads_per_worker, allow_none=False)
        _positive("max_concurrency", self.max_concurrency)
        if self.announce_after_s < 0:
            raise ValueError(f"announce_after_s must be >= 0, got {self.announce_after_s}")
        _check_resources("resources", self.resources)
        _check_resources("local_resources", self.local_resources)
        tls = [self.tls_ca_file, self.tls_client_cert]
        if any(tls) and not all(tls):
            raise ValueError("TLS needs both tls_ca_file and tls_client_cert (and tls_client_key unless the key "
                             "is in the certificate file)")
        if self.address.startswith("tls://") and not all(tls):
            raise ValueError(f"address {self.address} uses TLS: set tls_ca_file and tls_client_cert")


@attrs.frozen
class DaskSettings:
    """Per-step settings: ``@step(settings={"dask": {...}})`` (or keyed by the component name)."""

    resources: dict[str, float] = option({}, doc='Extra Dask worker resources for this step, e.g. {"GPU": 1}.')
    workers: list[str] = option([], doc="Restrict this step to these workers (overrides the operator's).")
    allow_other_workers: bool | None = option(None, doc="With workers: let other workers run this step.")
    priority: int | None = option(None, doc="Dask priority of this step (overrides the operator's).")

    def __attrs_post_init__(self) -> None:
        _check_resources("resources", self.resources)


class DaskOperatorFlavor(Flavor):
    """Runs each step attempt as a task on a Dask distributed cluster."""

    kind = "step_operator"
    name = "dask"
    description = ("Run steps as tasks on a Dask distributed cluster (an existing scheduler, or a LocalCluster "
                   "per run); prints and logs come back as log lines.")
    config_class = DaskOperatorConfig
    settings_class = DaskSettings
    implementation = "stepflow_dask.operator:DaskStepOperator"
