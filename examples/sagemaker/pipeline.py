"""SageMaker example: `train` runs as a SageMaker training job; the rest runs locally.

    bash examples/sagemaker/run_local.sh     # everything against the local test backend (moto + Docker)

See README.md for running the same pipeline against real AWS.
"""

from __future__ import annotations

import os
import platform
import random

from stepflow import pipeline, step

Rows = list[tuple[float, float]]


@step
def make_data(n: int = 300, seed: int = 3) -> Rows:
    """Synthesize y = 2x - 1 + noise (runs in-process)."""
    rng = random.Random(seed)
    return [(x, 2 * x - 1 + rng.gauss(0, 0.2)) for x in (rng.uniform(-3, 3) for _ in range(n))]


@step(custom_step_operator="sagemaker", settings={"sagemaker": {"instance_type": "ml.m5.large"}})
def train(rows: Rows, epochs: int = 300, lr: float = 0.05) -> dict[str, float | str]:
    """Gradient descent in a training job: its prints reach CloudWatch Logs and stream back as log lines."""
    job = os.environ.get("TRAINING_JOB_NAME", "(not in a training job)")
    print(f"training job {job} on {platform.node()}, {len(rows)} rows", flush=True)
    w = b = 0.0
    for epoch in range(epochs):
        gw = sum((w * x + b - y) * x for x, y in rows) * 2 / len(rows)
        gb = sum((w * x + b - y) for x, y in rows) * 2 / len(rows)
        w, b = w - lr * gw, b - lr * gb
        if epoch % 100 == 0:
            print(f"epoch {epoch}: w={w:.3f} b={b:.3f}", flush=True)
    return {"w": w, "b": b, "job": job}


@step
def report(model: dict[str, float | str]) -> str:
    """Summarize the model (runs in-process again)."""
    return f"y = {model['w']:.2f}x + {model['b']:.2f} (trained by SageMaker job {model['job']})"


@pipeline
def training(epochs: int = 300):
    """make_data (local) -> train (sagemaker) -> report (local)."""
    return report(train(make_data(), epochs=epochs))
