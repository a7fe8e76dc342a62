"""Quickstart: load -> split -> several trainers in parallel -> pick the best.

A tiny linear-regression model trained by gradient descent in plain Python, so it runs
anywhere. Each trainer uses a different learning rate; they all run at the same time.

    stepflow run examples.quickstart.pipeline:training --param epochs=300
"""

from __future__ import annotations

import random

import anyio

from stepflow import pipeline, step

Dataset = list[tuple[float, float]]


@step
async def load_data(n: int = 400, noise: float = 0.3, seed: int = 7) -> Dataset:
    """Pretend to fetch data (async I/O), then synthesize y = 3x + 2 + noise."""
    await anyio.sleep(0.05)
    rng = random.Random(seed)
    xs = [rng.uniform(-2, 2) for _ in range(n)]
    return [(x, 3.0 * x + 2.0 + rng.gauss(0, noise)) for x in xs]


@step(outputs=("train", "test"))
def split(data: Dataset, test_fraction: float = 0.25) -> tuple[Dataset, Dataset]:
    """Hold out the last ``test_fraction`` of the rows for evaluation."""
    cut = int(len(data) * (1 - test_fraction))
    return data[:cut], data[cut:]


@step(retries=1, retry_delay=0.1)
def train(data: Dataset, lr: float, epochs: int) -> dict[str, float]:
    """Fit w, b by full-batch gradient descent; runs in a worker thread (a sync step)."""
    w, b = 0.0, 0.0
    n = len(data)
    for _ in range(epochs):
        gw = sum((w * x + b - y) * x for x, y in data) * 2 / n
        gb = sum((w * x + b - y) for x, y in data) * 2 / n
        w, b = w - lr * gw, b - lr * gb
    return {"lr": lr, "w": w, "b": b}


@step
def evaluate(model: dict[str, float], data: Dataset) -> dict[str, float]:
    """Mean squared error of ``model`` on ``data``."""
    mse = sum((model["w"] * x + model["b"] - y) ** 2 for x, y in data) / len(data)
    return {**model, "mse": mse}


@step
def pick_best(scores: list[dict[str, float]]) -> dict[str, float]:
    """The model with the lowest test error."""
    best = min(scores, key=lambda s: s["mse"])
    print(f"best learning rate {best['lr']}: w={best['w']:.3f} b={best['b']:.3f} mse={best['mse']:.4f}")
    return best


@pipeline
def training(epochs: int = 200, learning_rates: list[float] | None = None) -> dict[str, float]:
    """Train one model per learning rate in parallel and keep the best one."""
    data = load_data()
    train_set, test_set = split(data)
    scores = [
        evaluate(train(train_set, lr=lr, epochs=epochs), test_set)
        for lr in (learning_rates or [0.001, 0.01, 0.05, 0.1])
    ]
    return pick_best(scores)
