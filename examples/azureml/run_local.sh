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

source examples/local_services.sh azureml
SUB=00000000-0000-0000-0000-000000000000
RG=ml-rg
WS=ml-ws
ACCOUNT=devstoreaccount1
KEY="Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's published dev key

need_docker
AZURITE=${STEPFLOW_AZURITE_BLOB:-$(command -v azurite-blob || true)}
[ -n "$AZURITE" ] || AZURITE=$("$PY" -c "import sys; sys.path.insert(0, '.'); from tests.services import azurite_blob_command as a; print(a())" 2>/dev/null) \
  || { echo "error: azurite-blob not found: npm install -g azurite (or set STEPFLOW_AZURITE_BLOB)" >&2; exit 1; }
"$PY" -c "import adlfs" 2>/dev/null \
  || { echo "error: $PY needs adlfs: $PY -m pip install 'stepflow[azure]'" >&2; exit 1; }
need_plugins stepflow_docker stepflow_azureml stepflow_localcloud

BLOB_PORT=$(free_port)
BLOB=http://127.0.0.1:$BLOB_PORT/$ACCOUNT
start_server "$WORK/azurite.log" "$AZURITE" --blobHost 127.0.0.1 --blobPort "$BLOB_PORT" --inMemoryPersistence \
    --skipApiVersionCheck --loose --silent --disableTelemetry
wait_tcp "$BLOB_PORT" "Azurite" "$WORK/azurite.log"
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
start_server "$WORK/azureml.log" "$PY" -m stepflow_localcloud.azureml --host 127.0.0.1 --port "$AML_PORT" \
    --subscription-id $SUB --resource-group $RG --workspace-name $WS --compute cpu-cluster \
    --certificate-file "$WORK/aml.pem" --throttle-rate "${THROTTLE_RATE:-0}" \
    --env "AZURE_STORAGE_CONNECTION_STRING=$CONN"
wait_tcp "$AML_PORT" "the local Azure ML control plane" "$WORK/azureml.log"
echo "Azurite on $BLOB, local Azure ML on https://127.0.0.1:$AML_PORT, STEPFLOW_HOME=$STEPFLOW_HOME"

upsert artifact-store az-store --type=azure --path=az://steps/stepflow --account_name=$ACCOUNT \
    --account_key="$KEY" --endpoint_url="$BLOB"
upsert container-registry acr --type=azure --uri=127.0.0.1:5000/azureml-example
upsert image-builder docker_builder --type=docker
upsert step-operator azureml --type=azureml --subscription_id=$SUB --resource_group=$RG --workspace_name=$WS \
    --compute=serverless --instance_type=Standard_DS3_v2 --endpoint="https://127.0.0.1:$AML_PORT" \
    --ca_bundle="$WORK/aml.pem"
upsert_stack azure_stack -c acr -a az-store -i docker_builder -s azureml -s local
"${SF[@]}" run examples.azureml.pipeline:training "$@"
echo "inspect the run: STEPFLOW_HOME=$STEPFLOW_HOME $PY -m stepflow runs list"
