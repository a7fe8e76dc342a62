"""Dask example: an ingestion run that fans 100 partitions out over a Dask cluster and reduces them.

    bash examples/dask/run_local.sh          # a local scheduler and two workers, then this pipeline

`plan` and `summarize` run in the runner's process; every `ingest` step is a task on the cluster
(the `dask` step operator of the active stack). Moving the partitions to Docker or a cloud is a
stack change: register a step operator named `dask` of another flavor, or alias it
(`-s dask=docker`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time

from stepflow import pipeline, step

log = logging.getLogger("examples.dask")
log.setLevel(logging.INFO)  # records reach the runner as log lines (the root logger would drop INFO)


@step
def plan(rows: int = 2_000) -> dict[str, int]:
    """Where and how to read the partitions (runs in-process)."""
    return {"seed_base": 1_000, "rows": rows}


@step(step_operator="dask", retries=2)
def ingest(source: dict[str, int], partition: int, work_s: float = 0.0) -> dict[str, float | int | str]:
    """Read one partition (synthesized), clean it and return its statistics, on a Dask worker."""
    rng = random.Random(source["seed_base"] + partition)
    values = [rng.gauss(50.0, 10.0) for _ in range(source["rows"])]
    clean = [v for v in values if 0.0 <= v <= 100.0]
    if work_s:
        time.sleep(work_s)  # stands in for I/O: reading the partition from object storage
    digest = hashlib.sha256(repr(clean).encode()).hexdigest()[:12]
    log.info("partition %d: %d of %d rows kept", partition, len(clean), len(values))
    return {"partition": partition, "rows": len(clean), "dropped": len(values) - len(clean),
            "sum": sum(clean), "digest": digest, "pid": os.getpid()}


@step
def summarize(parts: list[dict[str, float | int | str]]) -> dict[str, float | int]:
    """Reduce every partition's statistics (runs in-process)."""
    rows = sum(int(p["rows"]) for p in parts)
    return {"partitions": len(parts), "rows": rows, "dropped": sum(int(p["dropped"]) for p in parts),
            "mean": sum(float(p["sum"]) for p in parts) / rows, "processes": len({p["pid"] for p in parts})}


@pipeline
def ingestion(partitions: int = 100, rows: int = 2_000, work_s: float = 0.0):
    """plan (local) -> ingest x partitions (dask) -> summarize (local)."""
    source = plan(rows)
    parts = [ingest.with_options(name=f"ingest_{p:03d}")(source, p, work_s=work_s) for p in range(partitions)]
    return summarize(parts)
