"""stepflow-docker: Docker components for stepflow (the image builder; more to come)."""

__version__ = "0.1.0"
