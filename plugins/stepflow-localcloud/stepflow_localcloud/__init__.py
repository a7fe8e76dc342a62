"""stepflow-localcloud: cloud control planes that run on this machine, for tests and examples.

Each subpackage speaks one managed ML service's real wire protocol and runs the jobs it is given
as containers on the local Docker daemon:

- :mod:`stepflow_localcloud.sagemaker`: AWS SageMaker training jobs
  (``python -m stepflow_localcloud.sagemaker``).
- :mod:`stepflow_localcloud.vertex`: Google Cloud Vertex AI custom jobs and their Cloud Logging
  entries, over gRPC (``python -m stepflow_localcloud.vertex``).
- :mod:`stepflow_localcloud.azureml`: an Azure Machine Learning workspace and its command jobs,
  over HTTPS for the real ``MLClient`` (``python -m stepflow_localcloud.azureml``).
"""
