"""Prefect 3, one workload per process, in benchmarks/.venvs/prefect (run by ``python -m benchmarks``).

Idiomatic Prefect 3: ``@task`` / ``@flow``, concurrency through ``.submit()`` on the default
ThreadPoolTaskRunner with futures passed as inputs (fan-out, diamond), plain task calls for the
sequential chain, async tasks gathered in an async flow for the sleepers. Local ephemeral API
server under a throw-away PREFECT_HOME (set by the suite), result persistence off, console
logging at WARNING so 10k "Finished in state Completed()" lines are not what we measure.
"""

from __future__ import annotations

import asyncio
import os

import _harness as h

os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import prefect
from prefect import flow, task


@task
def source() -> int:
    return 1


@task
def noop(x: int) -> int:
    return x


@task
async def nap(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@task
def payload() -> bytes:
    return bytes(h.PAYLOAD_BYTES)


@task
def transform(data: bytes) -> bytes:
    return h.rotate(data)


@task
def join(parts: list[bytes]) -> int:
    return h.join_sizes(parts)


@flow
def fanout(n: int) -> None:
    root = source.submit()
    futures = [noop.submit(root) for _ in range(n)]
    for f in futures:
        f.result()


@flow
def chain(n: int) -> int:
    prev = source()
    for _ in range(n):
        prev = noop(prev)
    return prev


@flow
async def sleepers(n: int) -> None:
    await asyncio.gather(*(nap(h.SLEEP_SECONDS) for _ in range(n)))


@flow
def diamond(n: int) -> int:
    src = payload.submit()
    parts = [transform.submit(src) for _ in range(n)]
    return join.submit(parts).result()


def once(workload: str, n: int) -> None:
    if workload == "fanout":
        fanout(n)
    elif workload == "chain":
        assert chain(n) == 1
    elif workload == "sleep":
        asyncio.run(sleepers(n))
    elif workload == "diamond":
        assert diamond(n) == n * h.PAYLOAD_BYTES
    else:
        raise SystemExit(f"prefect: workload {workload} not implemented")


def main() -> None:
    a = h.args()
    res = h.measure(lambda n: once(a.workload, n), a, warmup_n=min(a.n, 5))
    res["prefect"] = prefect.__version__
    h.emit(res)


if __name__ == "__main__":
    main()
