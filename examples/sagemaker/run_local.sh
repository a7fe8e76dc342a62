#!/usr/bin/env bash
# Run examples/sagemaker/pipeline.py with `train` as a SageMaker training job, against the local
# test backend: moto (S3, ECR, STS, CloudWatch Logs) and the local SageMaker control plane of
# stepflow-localcloud (training jobs run as containers on this machine's Docker). One command; both
# servers are started on free ports and stopped on exit, and the job containers are removed.
#
#   bash examples/sagemaker/run_local.sh [RUN OPTIONS...]
#
# Needs dockerd, a registry on 127.0.0.1:5000 and the stepflow-base:py3.11 image
# (`bash scripts/services.sh`), and moto[server] + s3fs in the Python environment.
# Environment: PYTHON (interpreter; default .venv/bin/python, else python3), STEPFLOW_HOME
# (default: a new temporary directory, so your own ~/.stepflow is untouched), THROTTLE_RATE and
# ERROR_RATE (fault injection of the SageMaker backend, e.g. 0.2 and 0.05, default 0).
set -euo pipefail
cd "$(dirname "$0")/../.."

source examples/local_services.sh sagemaker
BUCKET=stepflow-example
REGION=us-east-1

# -- prerequisites ----------------------------------------------------------------------------
need_docker
"$PY" -c "import moto.server, s3fs" 2>/dev/null \
  || { echo "error: $PY needs moto's server and s3fs: $PY -m pip install 'moto[server]' 'stepflow[s3]'" >&2; exit 1; }
need_plugins stepflow_docker stepflow_sagemaker stepflow_localcloud

# -- moto and the local SageMaker backend, stopped on exit ------------------------------------
MOTO_PORT=$(free_port)
MOTO=http://127.0.0.1:$MOTO_PORT
start_server "$WORK/moto.log" "$PY" -m moto.server -H 127.0.0.1 -p "$MOTO_PORT"
wait_tcp "$MOTO_PORT" moto "$WORK/moto.log"

SM_PORT=$(free_port)
SAGEMAKER=http://127.0.0.1:$SM_PORT
# Moto's test keys are named as the job role's: the default would hand this shell's own AWS keys
# to the job containers (through the control plane's container credentials endpoint).
start_server "$WORK/sagemaker.log" "$PY" -m stepflow_localcloud.sagemaker --host 127.0.0.1 --port "$SM_PORT" \
    --logs-endpoint "$MOTO" --region "$REGION" --throttle-rate "${THROTTLE_RATE:-0}" --error-rate "${ERROR_RATE:-0}" \
    --role-access-key-id testing --role-secret-access-key testing --role-session-token testing
wait_tcp "$SM_PORT" "the local SageMaker backend" "$WORK/sagemaker.log"
echo "moto on $MOTO, local SageMaker on $SAGEMAKER, STEPFLOW_HOME=$STEPFLOW_HOME"

# Every AWS call of this process and its children goes to moto, never to real AWS.
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_SESSION_TOKEN=testing
export AWS_DEFAULT_REGION=$REGION AWS_REGION=$REGION AWS_EC2_METADATA_DISABLED=true
export AWS_ENDPOINT_URL=$MOTO AWS_ENDPOINT_URL_SAGEMAKER=$SAGEMAKER
unset AWS_PROFILE

"$PY" -c "
import botocore.session
s3 = botocore.session.get_session().create_client('s3', endpoint_url='$MOTO', region_name='$REGION')
s3.create_bucket(Bucket='$BUCKET')"

# -- the stack (registered, or updated when STEPFLOW_HOME already has it: the ports change) -----
upsert artifact-store s3-store --type=s3 --path=s3://$BUCKET/artifacts --endpoint_url="$MOTO"
upsert container-registry ecr_registry --type=ecr --uri=127.0.0.1:5000/ecr --endpoint_url="$MOTO" --region=$REGION
upsert image-builder docker_builder --type=docker
upsert step-operator sagemaker --type=sagemaker --role=arn:aws:iam::123456789012:role/SageMakerRole \
    --instance_type=ml.m5.large --bucket_name=$BUCKET --experiment_name=demo --endpoint_url="$SAGEMAKER" \
    --region=$REGION
if "${SF[@]}" stack describe sagemaker_stack >/dev/null 2>&1; then
    "${SF[@]}" stack update sagemaker_stack -c ecr_registry -a s3-store -i docker_builder -s sagemaker -s local
else
    "${SF[@]}" stack register sagemaker_stack -m local_metadata_store -o local_orchestrator -c ecr_registry \
        -a s3-store -i docker_builder -s sagemaker -s local
fi
"${SF[@]}" stack set sagemaker_stack
"${SF[@]}" run examples.sagemaker.pipeline:training "$@"
echo "inspect the run: STEPFLOW_HOME=$STEPFLOW_HOME $PY -m stepflow runs list"
