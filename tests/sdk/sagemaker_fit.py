"""The SageMaker Python SDK's bring-your-own-container flow, as a user runs it.

Run with the SDK's own virtualenv: ``python sagemaker_fit.py '<json config>'``. The endpoints
come from ``AWS_ENDPOINT_URL_SAGEMAKER`` (the local control plane) and ``AWS_ENDPOINT_URL`` (S3,
STS, CloudWatch Logs); nothing else is configured. Prints ``MODEL=<uri>`` on success and
``FIT-ERROR=<type>: <message>`` (exit 3) when ``fit`` raises.
"""

import json
import sys

import boto3
import sagemaker
from sagemaker.estimator import Estimator

config = json.loads(sys.argv[1])
session = sagemaker.Session(boto_session=boto3.Session(), default_bucket=config["bucket"])
estimator = Estimator(
    image_uri=config["image"], role=config["role"], instance_count=1, instance_type="ml.m5.large",
    output_path=f"s3://{config['bucket']}/models", hyperparameters=config["hyperparameters"],
    environment={"TEAM": "ml"}, max_run=300, sagemaker_session=session)
try:
    estimator.fit({"train": f"s3://{config['bucket']}/data/train"}, wait=True, logs="All", job_name=config["job"])
except Exception as exc:
    print(f"FIT-ERROR={type(exc).__name__}: {exc}", flush=True)
    sys.exit(3)
print(f"MODEL={estimator.model_data}", flush=True)
