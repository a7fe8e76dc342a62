"""SageMaker example: `train` runs as a SageMaker training job; the rest runs locally.

    bash examples/sagemaker/run_local.sh     # everything against the local test backend (moto + Docker)

See README.md for running the same pipeline against real AWS.
"""

from __future__ import annotations

import os
import platform

from examples import regression
from stepflow import pipeline, step

Rows = regression.Rows


@step
def make_data(n: int = 300, seed: int = 3) -> Rows:
    """Synthesize y = 2x - 1 + noise (runs in-process)."""
    return regression.make_data(n, seed)


@step(custom_step_operator="sagemaker", settings={"sagemaker": {"instance_type": "ml.m5.large"}})
def train(rows: Rows, epochs: int = 300, lr: float = 0.05) -> dict[str, float | str]:
    """Gradient descent in a training job: its prints reach CloudWatch Logs and stream back as log lines."""
    job = os.environ.get("TRAINING_JOB_NAME", "(not in a training job)")
    print(f"training job {job} on {platform.node()}, {len(rows)} rows", flush=True)
    w, b = regression.fit(rows, epochs, lr)
    return {"w": w, "b": b, "job": job}


@step
def report(model: dict[str, float | str]) -> str:
    """Summarize the model (runs in-process again)."""
    return f"y = {model['w']:.2f}x + {model['b']:.2f} (trained by SageMaker job {model['job']})"


@pipeline
def training(epochs: int = 300):
    """make_data (local) -> train (sagemaker) -> report (local)."""
    return report(train(make_data(), epochs=epochs))
