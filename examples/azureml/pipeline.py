"""Azure ML example: `train` runs as an Azure Machine Learning command job; the rest runs locally.

    bash examples/azureml/run_local.sh     # everything against the local control plane (Azurite + Docker)

See docs/azureml.md for running the same pipeline in an Azure ML workspace.
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


@step(custom_step_operator="azureml", resources=Resources(cpu=4, memory="14GiB"))
def train(rows: Rows, epochs: int = 300, lr: float = 0.05) -> dict[str, float | str]:
    """Gradient descent in a command job: its prints reach the job's std_log.txt and stream back as log lines."""
    job = os.environ.get("AZUREML_RUN_ID", "(not in an Azure ML job)")
    print(f"Azure ML job {job} on {platform.node()}, {len(rows)} rows", flush=True)
    w, b = regression.fit(rows, epochs, lr)
    return {"w": w, "b": b, "job": job}


@step
def report(model: dict[str, float | str]) -> str:
    """Summarize the model (runs in-process again)."""
    return f"y = {model['w']:.2f}x + {model['b']:.2f} (trained by Azure ML job {model['job']})"


@pipeline
def training(epochs: int = 300):
    """make_data (local) -> train (azureml) -> report (local)."""
    return report(train(make_data(), epochs=epochs))
