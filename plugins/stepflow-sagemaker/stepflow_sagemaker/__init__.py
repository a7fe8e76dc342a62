"""stepflow-sagemaker: a SageMaker step operator and an ECR container registry for stepflow."""
