"""A local SageMaker training-job service for tests and examples: it *runs* the jobs.

moto answers the SageMaker API but marks every training job Completed at once and has no
StopTrainingJob. :class:`LocalSageMaker` is a small HTTP server speaking the real wire protocol
(AWS JSON 1.1, reached by botocore / aiobotocore through ``endpoint_url``) that runs each job's
image on the local Docker daemon, reports InProgress with secondary statuses until the container
exits, ships its output to CloudWatch Logs (moto) and can stop it; plus fault injection. As on
SageMaker, a job's container gets no keys in its environment: its AWS SDKs fetch the job role's
credentials from a container credentials endpoint (:class:`CredentialsEndpoint`).

    async with LocalSageMaker(logs_endpoint=moto_url, throttle_rate=0.1) as sm:
        client = session.create_client("sagemaker", endpoint_url=sm.url, ...)

    with serve_in_thread(logs_endpoint=moto_url) as sm:          # from synchronous code
        ...

    python -m stepflow_localcloud.sagemaker --port 8777 --logs-endpoint http://127.0.0.1:5001
"""

from .credentials import CredentialsEndpoint, RoleCredentials
from .server import BackgroundLocalSageMaker, LocalSageMaker, serve_in_thread
from .validation import ApiError

__all__ = ["ApiError", "BackgroundLocalSageMaker", "CredentialsEndpoint", "LocalSageMaker", "RoleCredentials",
           "serve_in_thread"]
