"""Dagster, one workload per process, in benchmarks/.venvs/dagster (run by ``python -m benchmarks``).

Idiomatic Dagster: ``@op`` / ``@job`` against a DagsterInstance in a throw-away DAGSTER_HOME (set by
the suite; sqlite run/event storage, telemetry off). Fan-out through dynamic outputs
(``DynamicOut`` + ``.map``), the chain and the diamond as graphs of aliased ops built per run
(graph construction counts, as stepflow's pipeline recording does), all with
``execute_in_process`` (in-process executor, in-memory IO manager). The sleepers need real
concurrency, which Dagster only gives across processes: ``execute_job`` of a reconstructable job
on the multiprocess executor with ``max_concurrent`` = N (forkserver start method, the fast one).
Console logger at WARNING, as for Prefect.
"""


import os
import sys
import time

import _harness as h
import dagster
from dagster import (
    Config,
    DagsterInstance,
    DynamicOut,
    DynamicOutput,
    GraphDefinition,
    In,
    execute_job,
    in_process_executor,
    job,
    multiprocess_executor,
    op,
    reconstructable,
)

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


class Size(Config):
    n: int


@op(out=DynamicOut())
def source(config: Size):  # type: ignore[no-untyped-def]
    for i in range(config.n):
        yield DynamicOutput(1, mapping_key=str(i))


@op
def one() -> int:
    return 1


@op
def noop(x: int) -> int:
    return x


@op
def nap(x: int) -> float:
    time.sleep(h.SLEEP_SECONDS)
    return h.SLEEP_SECONDS


@op
def payload() -> bytes:
    return bytes(h.PAYLOAD_BYTES)


@op
def transform(data: bytes) -> bytes:
    return h.rotate(data)


@op(ins={"parts": In(list)})
def join(parts: list) -> int:
    return h.join_sizes(parts)


@job(executor_def=in_process_executor)
def fanout() -> None:
    source().map(noop)


@job(executor_def=multiprocess_executor)
def sleepers() -> None:
    source().map(nap)


def make_sleepers():  # type: ignore[no-untyped-def]
    return sleepers


def chain_job(n: int):  # type: ignore[no-untyped-def]
    @job(name=f"chain_{n}", executor_def=in_process_executor)
    def chain() -> None:
        prev = one()
        for i in range(n):
            prev = noop.alias(f"noop_{i}")(prev)

    return chain


def diamond_job(n: int):  # type: ignore[no-untyped-def]
    @job(name=f"diamond_{n}", executor_def=in_process_executor)
    def diamond() -> None:
        src = payload()
        join([transform.alias(f"transform_{i}")(src) for i in range(n)])

    return diamond


def once(workload: str, n: int, instance: DagsterInstance) -> None:
    if workload == "fanout":
        r = fanout.execute_in_process(instance=instance, run_config={**QUIET, "ops": {"source": {"config": {"n": n}}}})
    elif workload == "chain":
        r = chain_job(n).execute_in_process(instance=instance, run_config=QUIET)
    elif workload == "diamond":
        r = diamond_job(n).execute_in_process(instance=instance, run_config=QUIET)
        assert r.output_for_node("join") == n * h.PAYLOAD_BYTES
    elif workload == "sleep":
        config = {**QUIET, "ops": {"source": {"config": {"n": n}}},
                  "execution": {"config": {"max_concurrent": n, "start_method": {"forkserver": {}}}}}
        with execute_job(reconstructable(make_sleepers), instance=instance, run_config=config) as r:
            assert r.success
        return
    else:
        raise SystemExit(f"dagster: workload {workload} not implemented")
    assert r.success


def main() -> None:
    a = h.args()
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise SystemExit("set DAGSTER_HOME to a throw-away directory")
    with open(os.path.join(home, "dagster.yaml"), "a") as fh:
        fh.write("telemetry:\n  enabled: false\n")
    with DagsterInstance.get() as instance:
        res = h.measure(lambda n: once(a.workload, n, instance), a, warmup_n=min(a.n, 5))
    res["dagster"] = dagster.__version__
    h.emit(res)


if __name__ == "__main__":
    GraphDefinition  # noqa: B018 - imported for readers looking for the graph API
    main()
    sys.exit(0)
