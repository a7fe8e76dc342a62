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

source examples/local_services.sh vertex
BUCKET=stepflow-example
PROJECT=my-project
REGION=us-central1

need_docker
"$PY" -c "import gcp_storage_emulator, gcsfs" 2>/dev/null \
  || { echo "error: $PY needs gcp-storage-emulator and gcsfs: $PY -m pip install gcp-storage-emulator 'stepflow[gcs]'" >&2; exit 1; }
need_plugins stepflow_docker stepflow_vertex stepflow_localcloud

GCS_PORT=$(free_port)
GCS=http://127.0.0.1:$GCS_PORT
start_server "$WORK/gcs.log" "$PY" -m gcp_storage_emulator start --host 127.0.0.1 --port "$GCS_PORT" --in-memory --quiet
wait_tcp "$GCS_PORT" "the GCS emulator" "$WORK/gcs.log"

VX_PORT=$(free_port)
start_server "$WORK/vertex.log" "$PY" -m stepflow_localcloud.vertex --host 127.0.0.1 --port "$VX_PORT" \
    --project "$PROJECT" --location "$REGION" --gcs-endpoint "$GCS" --resource-exhausted-rate "${QUOTA_ERROR_RATE:-0}"
wait_tcp "$VX_PORT" "the local Vertex AI control plane" "$WORK/vertex.log"
echo "GCS emulator on $GCS, local Vertex AI on 127.0.0.1:$VX_PORT, STEPFLOW_HOME=$STEPFLOW_HOME"

"$PY" -c "
from gcsfs.core import GCSFileSystem
fs = GCSFileSystem(endpoint_url='$GCS', token='anon', project='$PROJECT')
fs.exists('$BUCKET') or fs.mkdir('$BUCKET')"

upsert artifact-store gcs-store --type=gcs --path=gs://$BUCKET/stepflow --endpoint_url="$GCS" --token=anon \
    --project=$PROJECT
upsert container-registry gar --type=gcp --uri=127.0.0.1:5000/vertex-example
upsert image-builder docker_builder --type=docker
upsert step-operator vertex --type=vertex --project=$PROJECT --region=$REGION --machine_type=n1-standard-4 \
    --service_account=trainer@$PROJECT.iam.gserviceaccount.com --api_endpoint="http://127.0.0.1:$VX_PORT"
upsert_stack vertex_stack -c gar -a gcs-store -i docker_builder -s vertex -s local
"${SF[@]}" run examples.vertex.pipeline:training "$@"
echo "inspect the run: STEPFLOW_HOME=$STEPFLOW_HOME $PY -m stepflow runs list"
