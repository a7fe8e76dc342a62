#!/usr/bin/env bash
# Run examples/azureml/pipeline.py with `train` as an Azure ML command job, against local parts only:
# Azurite (the storage account) and the local Azure ML control plane of stepflow-localcloud (an
# HTTPS server that MLClient reaches as a custom cloud; command jobs run as containers on this
# machine's Docker). One command; both servers start on free ports and stop on exit.
#
#   bash examples/azureml/run_local.sh [RUN OPTIONS...]
#
# Needs dockerd, a registry on 127.0.0.1:5000 and the stepflow-base:py3.11 image
# (`bash scripts/services.sh`), Node.js with Azurite (`npm install -g azurite`, or
# $STEPFLOW_AZURITE_BLOB), and adlfs in the Python environment.
# Environment: PYTHON (default .venv/bin/python, else python3), STEPFLOW_HOME (default: a new
# temporary directory), THROTTLE_RATE (HTTP 429 injected on API calls, e.g. 0.2).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
SF=("$PY" -m stepflow)
WORK=$(mktemp -d -t stepflow-azureml-XXXXXX)
export STEPFLOW_HOME=${STEPFLOW_HOME:-$WORK/home}
SUB=00000000-0000-0000-0000-000000000000
RG=ml-rg
WS=ml-ws
ACCOUNT=devstoreaccount1
KEY="Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's published dev key

docker info >/dev/null 2>&1 || { echo "error: dockerd does not answer: run 'sudo bash scripts/services.sh'" >&2; exit 1; }
docker image inspect stepflow-base:py3.11 >/dev/null 2>&1 \
  || { echo "error: the stepflow-base:py3.11 image is missing: run 'sudo bash scripts/services.sh'" >&2; exit 1; }
AZURITE=${STEPFLOW_AZURITE_BLOB:-$(command -v azurite-blob || true)}
[ -n "$AZURITE" ] || AZURITE=$("$PY" -c "import sys; sys.path.insert(0, '.'); from tests.services import azurite_blob_command as a; print(a())" 2>/dev/null) \
  || { echo "error: azurite-blob not found: npm install -g azurite (or set STEPFLOW_AZURITE_BLOB)" >&2; exit 1; }
"$PY" -c "import adlfs" 2>/dev/null \
  || { echo "error: $PY needs adlfs: $PY -m pip install 'stepflow[azure]'" >&2; exit 1; }
"$PY" -c "import stepflow_azureml, stepflow_docker" 2>/dev/null || {
    echo "installing the Azure ML plugin (editable): plugins/stepflow-docker, plugins/stepflow-azureml"
    "$PY" -m pip install -q -e plugins/stepflow-docker -e plugins/stepflow-azureml; }
"$PY" -c "import stepflow_localcloud.azureml" 2>/dev/null || {
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
    echo "logs of Azurite and the Azure ML control plane: $WORK"
}
trap cleanup EXIT

BLOB_PORT=$(free_port)
BLOB=http://127.0.0.1:$BLOB_PORT/$ACCOUNT
"$AZURITE" --blobHost 127.0.0.1 --blobPort "$BLOB_PORT" --inMemoryPersistence --skipApiVersionCheck --loose \
    --silent --disableTelemetry >"$WORK/azurite.log" 2>&1 &
PIDS+=($!)
wait_tcp "$BLOB_PORT" "Azurite" "${PIDS[-1]}" "$WORK/azurite.log"
CONN="DefaultEndpointsProtocol=http;AccountName=$ACCOUNT;AccountKey=$KEY;BlobEndpoint=$BLOB;"
"$PY" -c "
from azure.storage.blob import BlobServiceClient
from azure.core.exceptions import ResourceExistsError
try:
    BlobServiceClient.from_connection_string('$CONN').create_container('steps')
except ResourceExistsError:
    pass"

AML_PORT=$(free_port)
# The jobs' containers get the connection string where a real compute's managed identity would serve.
"$PY" -m stepflow_localcloud.azureml --host 127.0.0.1 --port "$AML_PORT" --subscription-id $SUB \
    --resource-group $RG --workspace-name $WS --compute cpu-cluster --certificate-file "$WORK/aml.pem" \
    --throttle-rate "${THROTTLE_RATE:-0}" --env "AZURE_STORAGE_CONNECTION_STRING=$CONN" >"$WORK/azureml.log" 2>&1 &
PIDS+=($!)
wait_tcp "$AML_PORT" "the local Azure ML control plane" "${PIDS[-1]}" "$WORK/azureml.log"
echo "Azurite on $BLOB, local Azure ML on https://127.0.0.1:$AML_PORT, STEPFLOW_HOME=$STEPFLOW_HOME"

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
upsert artifact-store az-store --type=azure --path=az://steps/stepflow --account_name=$ACCOUNT \
    --account_key="$KEY" --endpoint_url="$BLOB"
upsert container-registry acr --type=azure --uri=127.0.0.1:5000/azureml-example
upsert image-builder docker_builder --type=docker
upsert step-operator azureml --type=azureml --subscription_id=$SUB --resource_group=$RG --workspace_name=$WS \
    --compute=serverless --instance_type=Standard_DS3_v2 --endpoint="https://127.0.0.1:$AML_PORT" \
    --ca_bundle="$WORK/aml.pem"
if "${SF[@]}" stack describe azure_stack >/dev/null 2>&1; then
    "${SF[@]}" stack update azure_stack -c acr -a az-store -i docker_builder -s azureml -s local
else
    "${SF[@]}" stack register azure_stack -c acr -a az-store -i docker_builder -s azureml -s local
fi
"${SF[@]}" stack set azure_stack
"${SF[@]}" run examples.azureml.pipeline:training "$@"
echo "inspect the run: STEPFLOW_HOME=$STEPFLOW_HOME $PY -m stepflow runs list"
