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

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
SF=("$PY" -m stepflow)
WORK=$(mktemp -d -t stepflow-dask-XXXXXX)
export STEPFLOW_HOME=${STEPFLOW_HOME:-$WORK/home}
# The workers import the pipeline's module (examples.dask.pipeline) from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c "import stepflow_dask, distributed" 2>/dev/null || {
    echo "installing the Dask plugin (editable): plugins/stepflow-dask"
    "$PY" -m pip install -q -e plugins/stepflow-dask; }

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() {
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[$i]}" 2>/dev/null || true
        wait "${PIDS[$i]}" 2>/dev/null || true
    done
    echo "logs of the scheduler and workers: $WORK"
}
trap cleanup EXIT

PORT=$(free_port)
ADDRESS=tcp://127.0.0.1:$PORT
"$PY" -m distributed.cli.dask_scheduler --host 127.0.0.1 --port "$PORT" --no-dashboard >"$WORK/scheduler.log" 2>&1 &
PIDS+=($!)
for i in $(seq 1 "${WORKERS:-2}"); do
    "$PY" -m distributed.cli.dask_worker "$ADDRESS" --host 127.0.0.1 --nthreads "${THREADS:-2}" --no-dashboard \
        --name "worker-$i" >"$WORK/worker-$i.log" 2>&1 &
    PIDS+=($!)
done
"$PY" - "$ADDRESS" "${WORKERS:-2}" <<'PYEOF' || { echo "error: the cluster did not start:" >&2; tail -20 "$WORK"/*.log >&2; exit 1; }
import sys
from distributed import Client

with Client(sys.argv[1], timeout=30) as client:
    client.wait_for_workers(int(sys.argv[2]), timeout=60)
PYEOF
echo "Dask scheduler on $ADDRESS with ${WORKERS:-2} workers, STEPFLOW_HOME=$STEPFLOW_HOME"

if "${SF[@]}" step-operator describe dask >/dev/null 2>&1; then
    "${SF[@]}" step-operator update dask --address="$ADDRESS"
else
    "${SF[@]}" step-operator register dask --type=dask --address="$ADDRESS"
fi
if ! "${SF[@]}" stack describe dask_stack >/dev/null 2>&1; then
    "${SF[@]}" stack register dask_stack -a default -s dask -s local
fi
"${SF[@]}" stack set dask_stack
"${SF[@]}" run examples.dask.pipeline:ingestion "$@"
echo "inspect the run: STEPFLOW_HOME=$STEPFLOW_HOME $PY -m stepflow runs list"
