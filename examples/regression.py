"""The model the container and cloud examples train: y = 2x - 1 + noise, by gradient descent.

Plain functions: each example wraps them in steps bound to its own step operator.
"""

from __future__ import annotations

import random

Rows = list[tuple[float, float]]


def make_data(n: int = 300, seed: int = 3) -> Rows:
    """Synthesize y = 2x - 1 + noise."""
    rng = random.Random(seed)
    return [(x, 2 * x - 1 + rng.gauss(0, 0.2)) for x in (rng.uniform(-3, 3) for _ in range(n))]


def fit(rows: Rows, epochs: int = 300, lr: float = 0.05) -> tuple[float, float]:
    """Gradient descent on (w, b); prints its progress (the job's log lines)."""
    w = b = 0.0
    for epoch in range(epochs):
        gw = sum((w * x + b - y) * x for x, y in rows) * 2 / len(rows)
        gb = sum((w * x + b - y) for x, y in rows) * 2 / len(rows)
        w, b = w - lr * gw, b - lr * gb
        if epoch % 100 == 0:
            print(f"epoch {epoch}: w={w:.3f} b={b:.3f}", flush=True)
    return w, b
