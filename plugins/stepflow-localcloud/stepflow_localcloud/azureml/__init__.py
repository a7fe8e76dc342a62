"""A local Azure Machine Learning workspace for tests and examples: it *runs* the jobs.

:class:`LocalAzureML` is an aiohttp server over HTTPS (a self-signed certificate made at start-up,
for ``localhost`` and ``127.0.0.1``) that answers the REST calls the real ``azure-ai-ml``
``MLClient`` makes for a workspace, its compute clusters and its command jobs, and runs each job's
command in its environment's image on the local Docker daemon. Point ``MLClient`` at it through a
custom cloud::

    async with LocalAzureML(computes=("cpu-cluster",), container_env={"AZURE_STORAGE_CONNECTION_STRING": s}) as aml:
        ml_client = MLClient(credential, aml.subscription_id, aml.resource_group, aml.workspace_name,
                             cloud=aml.cloud_name, cloud_metadata=aml.cloud_metadata,
                             connection_verify=aml.certificate_file)

    with serve_in_thread(phase_delay=0.2) as aml:                   # from synchronous code
        ...

    python -m stepflow_localcloud.azureml --port 8443 --compute cpu-cluster

Any credential whose ``get_token`` returns an ``AccessToken`` works: the server wants a bearer
token on every ARM and run-history call and checks nothing else.

Routes, where ``{ws}`` stands for
``/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.MachineLearningServices/workspaces/{ws}``
(ARM routes need ``api-version`` and a bearer token; paths match regardless of case, as ARM's do):

- ``GET {ws}``: the workspace; its ``discoveryUrl`` is ``GET /discovery``.
- ``GET {ws}/computes`` and ``GET {ws}/computes/{name}``: the configured compute clusters (AmlCompute).
- ``PUT`` / ``GET {ws}/environments/{name}/versions/{version}``: environment versions (an image;
  ``MLClient`` registers an anonymous one before each job).
- ``PUT {ws}/jobs/{name}``: create a command job (201), or update the mutable fields of an
  existing one (200: description, tags, displayName, properties, isArchived); anything else on an
  existing name is a 400 ``UserError`` "A job with this name already exists ...".
- ``GET {ws}/jobs/{name}``, ``GET {ws}/jobs`` (``listViewType`` ActiveOnly / ArchivedOnly / All;
  newest first, ``list_page_size`` per page, the next through ``nextLink`` with ``$skipToken``).
- ``POST {ws}/jobs/{name}/cancel``: 202 with ``Location`` and ``Retry-After``, then
  ``GET /subscriptions/{sub}/providers/Microsoft.MachineLearningServices/locations/{loc}/mfeOperationResults/{id}``
  answers 202 until the job is Canceled, then 200 (ARM's long-running-operation protocol); a job
  that is Finalizing or has ended cannot be canceled (400 ``UserError``).
- ``GET /discovery``: the workspace's service URLs (``api``, ``history``, ...), all this server.
- ``GET /history/v1.0{ws}/runs/{name}/details``: run-history details: ``status``, ``error``
  (a failed job's ``{"error": {"code", "message"}}``), ``logFiles`` {``user_logs/std_log.txt``: URL}.
- ``GET /logs/{token}/user_logs/std_log.txt``: the job's stdout and stderr as written so far,
  without auth (like a SAS URL); ``Range: bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` answer 206 with
  ``Content-Range``, past the end 416.
- Test hooks: ``GET /_fake/stats``, ``POST /_fake/config`` (``throttle_rate``, ``error_rate``,
  ``seed``), ``POST /_fake/reset`` (``{"jobs": true}`` also cancels and forgets every job).

Unknown subscriptions, resource groups and workspaces answer 404 SubscriptionNotFound /
ResourceGroupNotFound / ResourceNotFound; unknown computes ResourceNotFound; unknown jobs and
runs 404 UserError; invalid jobs (name, unknown compute, serverless VM size, empty command, no
environment, ``limits.timeout``) 400 UserError with an ``innerError`` code. Past its
``limits.timeout`` a running job is cancelled, as the service documents.
"""

from .server import BackgroundLocalAzureML, LocalAzureML, serve_in_thread
from .validation import AzureError

__all__ = ["AzureError", "BackgroundLocalAzureML", "LocalAzureML", "serve_in_thread"]
