#!/usr/bin/env bash
# Run examples/dask/pipeline.py with its 100 `ingest` partitions on a Dask cluster of this machine:
# a `dask scheduler` and two `dask worker` processes on 127.0.0.1, started here and stopped on exit.
# One command; the scheduler listens on a free port.
#
#   bash examples/dask/run_local.sh [RUN OPTIONS...]      # e.g. -p partitions=20 -p work_s=0.2
#
# Environment: PYTHON (default .venv/bin/python, else python3), STEPFLOW_HOME (default: a new
# temporary directory), WORKERS (default 2), THREADS (threads per worker, default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."

source examples/local_services.sh dask
# The workers import the pipeline's module (examples.dask.pipeline) from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
need_plugins stepflow_dask

PORT=$(free_port)
ADDRESS=tcp://127.0.0.1:$PORT
start_server "$WORK/scheduler.log" "$PY" -m distributed.cli.dask_scheduler --host 127.0.0.1 --port "$PORT" \
    --no-dashboard
for i in $(seq 1 "${WORKERS:-2}"); do
    start_server "$WORK/worker-$i.log" "$PY" -m distributed.cli.dask_worker "$ADDRESS" --host 127.0.0.1 \
        --nthreads "${THREADS:-2}" --no-dashboard --name "worker-$i"
done
"$PY" - "$ADDRESS" "${WORKERS:-2}" <<'PYEOF' || { echo "error: the cluster did not start:" >&2; tail -20 "$WORK"/*.log >&2; exit 1; }
import sys
from distributed import Client

with Client(sys.argv[1], timeout=30) as client:
    client.wait_for_workers(int(sys.argv[2]), timeout=60)
PYEOF
echo "Dask scheduler on $ADDRESS with ${WORKERS:-2} workers, STEPFLOW_HOME=$STEPFLOW_HOME"

upsert step-operator dask --type=dask --address="$ADDRESS"
upsert_stack dask_stack -a default -s dask -s local
"${SF[@]}" run examples.dask.pipeline:ingestion "$@"
echo "inspect the run: STEPFLOW_HOME=$STEPFLOW_HOME $PY -m stepflow runs list"
