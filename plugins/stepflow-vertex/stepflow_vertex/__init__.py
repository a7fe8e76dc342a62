"""stepflow-vertex: Google Cloud Vertex AI components for stepflow (a step operator, a registry flavor)."""

__version__ = "0.1.0"
