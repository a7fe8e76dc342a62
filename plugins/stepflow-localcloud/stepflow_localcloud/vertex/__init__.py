"""A local Vertex AI custom-job service for tests and examples: it *runs* the jobs.

:class:`LocalVertex` is a grpc.aio server speaking the real ``google.cloud.aiplatform.v1.JobService``
(CreateCustomJob, GetCustomJob, ListCustomJobs, CancelCustomJob, DeleteCustomJob) and
``google.logging.v2.LoggingServiceV2`` (ListLogEntries) on one plaintext port, so the real GAPIC
clients work unmodified. It runs each job's container on the local Docker daemon, reports the
job states as Vertex AI does, and keeps every output line as a log entry of the ``ml_job``
resource; plus validation, fault injection and counters. ``tls_port`` adds a TLS port under a
self-signed certificate made at start-up (``certificate_file``), for the high-level
``google.cloud.aiplatform`` SDK, which opens only secure channels.

    async with LocalVertex(project="my-project", location="us-central1") as vertex:
        channel = grpc.aio.insecure_channel(vertex.endpoint)
        jobs = JobServiceAsyncClient(transport=JobServiceGrpcAsyncIOTransport(channel=channel))

    with serve_in_thread(project="my-project") as vertex:          # from synchronous code
        ...

    python -m stepflow_localcloud.vertex --port 8781 --project my-project --location us-central1
    python -m stepflow_localcloud.vertex --port 8781 --tls-port 8783 --certificate-file local-vertex.pem
"""

from .server import BackgroundLocalVertex, LocalVertex, serve_in_thread
from .validation import ApiError

__all__ = ["ApiError", "BackgroundLocalVertex", "LocalVertex", "serve_in_thread"]
