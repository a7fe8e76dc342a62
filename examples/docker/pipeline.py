"""Docker example: `train` runs in a container built from this project; the rest runs locally.

    bash examples/docker/run.sh          # registers the stack, then runs this pipeline
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


@step(step_operator="docker", settings={"docker": {"memory": "256m", "cpus": 1}})
def train(rows: Rows, epochs: int = 300, lr: float = 0.05) -> dict[str, float | str]:
    """Gradient descent inside a container: its prints stream back as log lines."""
    print(f"training in {platform.node()} (container: {os.path.exists('/.dockerenv')}), {len(rows)} rows")
    w, b = regression.fit(rows, epochs, lr)
    return {"w": w, "b": b, "host": platform.node()}


@step
def report(model: dict[str, float | str]) -> str:
    """Summarize the model (runs in-process again)."""
    return f"y = {model['w']:.2f}x + {model['b']:.2f} (trained in container {model['host']})"


@pipeline
def training(epochs: int = 300):
    """make_data (local) -> train (docker) -> report (local)."""
    return report(train(make_data(), epochs=epochs))
