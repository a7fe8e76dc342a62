"""Vertex AI example: `train` runs as a Vertex AI custom job; the rest runs locally.

    bash examples/vertex/run_local.sh     # everything against the local control plane (GCS emulator + Docker)

See docs/vertex.md for running the same pipeline in a Google Cloud project.
"""

from __future__ import annotations

import os
import platform

from examples import regression
from stepflow import Resources, pipeline, step

Rows = regression.Rows


@step
def make_data(n: int = 300, seed: int = 3) -> Rows:
    """Synthesize y = 2x - 1 + noise (runs in-process)."""
    return regression.make_data(n, seed)


@step(custom_step_operator="vertex", resources=Resources(cpu=4, memory="15GiB"))
def train(rows: Rows, epochs: int = 300, lr: float = 0.05) -> dict[str, float | str]:
    """Gradient descent in a custom job: its prints reach Cloud Logging and stream back as log lines."""
    job = os.environ.get("CLOUD_ML_JOB_ID", "(not in a custom job)")
    print(f"custom job {job} on {platform.node()}, {len(rows)} rows", flush=True)
    w, b = regression.fit(rows, epochs, lr)
    return {"w": w, "b": b, "job": job}


@step
def report(model: dict[str, float | str]) -> str:
    """Summarize the model (runs in-process again)."""
    return f"y = {model['w']:.2f}x + {model['b']:.2f} (trained by Vertex AI custom job {model['job']})"


@pipeline
def training(epochs: int = 300):
    """make_data (local) -> train (vertex) -> report (local)."""
    return report(train(make_data(), epochs=epochs))
