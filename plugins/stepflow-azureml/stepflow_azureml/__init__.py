"""Azure Machine Learning plugin for stepflow: the ``azureml`` step operator and the ``azure`` (ACR) registry."""
