#!/usr/bin/env bash
# Run examples/vertex/pipeline.py with `train` as a Vertex AI custom job, against local parts only:
# the GCS emulator (the bucket) and the local Vertex AI control plane of stepflow-localcloud (custom
# jobs run as containers on this machine's Docker; their output is served as Cloud Logging
# entries). One command; both servers start on free ports and stop on exit.
#
#   bash examples/vertex/run_local.sh [RUN OPTIONS...]
#
# Needs dockerd, a registry on 127.0.0.1:5000 and the stepflow-base:py3.11 image
# (`bash scripts/services.sh`), and gcp-storage-emulator + gcsfs in the Python environment.
# Environment: PYTHON (default .venv/bin/python, else python3), STEPFLOW_HOME (default: a new
# temporary directory), QUOTA_ERROR_RATE (RESOURCE_EXHAUSTED injected at submit, e.g. 0.2).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
SF=("$PY" -m stepflow)
WORK=$(mktemp -d -t stepflow-vertex-XXXXXX)
export STEPFLOW_HOME=${STEPFLOW_HOME:-$WORK/home}
BUCKET=stepflow-example
PROJECT=my-project
REGION=us-central1

docker info >/dev/null 2>&1 || { echo "error: dockerd does not answer: run 'sudo bash scripts/services.sh'" >&2; exit 1; }
docker image inspect stepflow-base:py3.11 >/dev/null 2>&1 \
  || { echo "error: the stepflow-base:py3.11 image is missing: run 'sudo bash scripts/services.sh'" >&2; exit 1; }
"$PY" -c "import gcp_storage_emulator, gcsfs" 2>/dev/null \
  || { echo "error: $PY needs gcp-storage-emulator and gcsfs: $PY -m pip install gcp-storage-emulator 'stepflow[gcs]'" >&2; exit 1; }
"$PY" -c "import stepflow_vertex, stepflow_docker" 2>/dev/null || {
    echo "installing the Vertex AI plugin (editable): plugins/stepflow-docker, plugins/stepflow-vertex"
    "$PY" -m pip install -q -e plugins/stepflow-docker -e plugins/stepflow-vertex; }
"$PY" -c "import stepflow_localcloud.vertex" 2>/dev/null || {
    echo "installing the local control plane (editable): plugins/stepflow-localcloud"
    "$PY" -m pip install -q -e plugins/stepflow-localcloud; }

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_tcp() {  # PORT NAME PID LOG
    for _ in $(seq 1 300); do
        "$PY" -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1" 2>/dev/null \
            && return 0
        kill -0 "$3" 2>/dev/null || { echo "error: $2 exited:" >&2; tail -20 "$4" >&2; exit 1; }
        sleep 0.1
    done
    echo "error: $2 did not listen on port $1 within 30 s:" >&2; tail -20 "$4" >&2; exit 1
}
PIDS=()
cleanup() {
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[$i]}" 2>/dev/null || true
        wait "${PIDS[$i]}" 2>/dev/null || true
    done
    echo "logs of the GCS emulator and the Vertex AI control plane: $WORK"
}
trap cleanup EXIT

GCS_PORT=$(free_port)
GCS=http://127.0.0.1:$GCS_PORT
"$PY" -m gcp_storage_emulator start --host 127.0.0.1 --port "$GCS_PORT" --in-memory --quiet >"$WORK/gcs.log" 2>&1 &
PIDS+=($!)
wait_tcp "$GCS_PORT" "the GCS emulator" "${PIDS[-1]}" "$WORK/gcs.log"

VX_PORT=$(free_port)
"$PY" -m stepflow_localcloud.vertex --host 127.0.0.1 --port "$VX_PORT" --project "$PROJECT" --location "$REGION" \
    --gcs-endpoint "$GCS" --resource-exhausted-rate "${QUOTA_ERROR_RATE:-0}" >"$WORK/vertex.log" 2>&1 &
PIDS+=($!)
wait_tcp "$VX_PORT" "the local Vertex AI control plane" "${PIDS[-1]}" "$WORK/vertex.log"
echo "GCS emulator on $GCS, local Vertex AI on 127.0.0.1:$VX_PORT, STEPFLOW_HOME=$STEPFLOW_HOME"

"$PY" -c "
from gcsfs.core import GCSFileSystem
fs = GCSFileSystem(endpoint_url='$GCS', token='anon', project='$PROJECT')
fs.exists('$BUCKET') or fs.mkdir('$BUCKET')"

upsert() {  # KIND NAME [--type=FLAVOR] [--OPTION=VALUE]...
    local kind=$1 name=$2 args=()
    shift 2
    if "${SF[@]}" "$kind" describe "$name" >/dev/null 2>&1; then
        for a in "$@"; do [[ $a == --type=* ]] || args+=("$a"); done
        "${SF[@]}" "$kind" update "$name" "${args[@]}"
    else
        "${SF[@]}" "$kind" register "$name" "$@"
    fi
}
upsert artifact-store gcs-store --type=gcs --path=gs://$BUCKET/stepflow --endpoint_url="$GCS" --token=anon \
    --project=$PROJECT
upsert container-registry gar --type=gcp --uri=127.0.0.1:5000/vertex-example
upsert image-builder docker_builder --type=docker
upsert step-operator vertex --type=vertex --project=$PROJECT --region=$REGION --machine_type=n1-standard-4 \
    --service_account=trainer@$PROJECT.iam.gserviceaccount.com --api_endpoint="http://127.0.0.1:$VX_PORT"
if "${SF[@]}" stack describe vertex_stack >/dev/null 2>&1; then
    "${SF[@]}" stack update vertex_stack -c gar -a gcs-store -i docker_builder -s vertex -s local
else
    "${SF[@]}" stack register vertex_stack -c gar -a gcs-store -i docker_builder -s vertex -s local
fi
"${SF[@]}" stack set vertex_stack
"${SF[@]}" run examples.vertex.pipeline:training "$@"
echo "inspect the run: STEPFLOW_HOME=$STEPFLOW_HOME $PY -m stepflow runs list"
