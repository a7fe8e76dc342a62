"""Render results/<name>.json as a log-scale bar chart (run in the benchmarks/.venvs/tools venv).

    python benchmarks/chart.py benchmarks/results/latest.json benchmarks/results/latest.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ORDER = ["floor", "stepflow", "stepflow-result", "prefect", "dagster"]
LABELS = {"floor": "raw asyncio floor", "stepflow": "stepflow", "stepflow-result": "stepflow (RunResult as task result)",
          "prefect": "Prefect 3", "dagster": "Dagster"}
COLORS = {"floor": "#9e9e9e", "stepflow": "#1f77b4", "stepflow-result": "#aec7e8", "prefect": "#ff7f0e",
          "dagster": "#2ca02c"}


def main(src: str, dst: str) -> None:
    with open(src) as fh:
        data = json.load(fh)
    rows = [r for r in data["rows"] if "min_s" in r]
    workloads = [w for w in data["descriptions"] if any(r["workload"] == w for r in rows)]
    contenders = [c for c in ORDER if any(r["contender"] == c for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.8))
    width = 0.8 / max(1, len(contenders))
    for ax, key, title, unit in ((axes[0], "overhead_us_per_step", "orchestration overhead per step", "microseconds"),
                                 (axes[1], "min_s", "wall time (min of reps)", "seconds")):
        for ci, c in enumerate(contenders):
            xs, ys, ns = [], [], []
            for wi, w in enumerate(workloads):
                r = next((r for r in rows if r["workload"] == w and r["contender"] == c), None)
                if r is None or not r[key] or r[key] <= 0:
                    continue
                xs.append(wi + (ci - (len(contenders) - 1) / 2) * width)
                ys.append(r[key])
                ns.append(r["n"])
            bars = ax.bar(xs, ys, width, label=LABELS.get(c, c), color=COLORS.get(c))
            for bar, n, y in zip(bars, ns, ys, strict=True):
                ax.annotate(f"N={n:,}" if key == "min_s" else (f"{y:.0f}" if y >= 10 else f"{y:.1f}"),
                            (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=6,
                            rotation=90 if key == "min_s" else 0)
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 6)  # room for the labels above the tallest bars
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads, rotation=20)
        ax.set_ylabel(f"{unit} (log scale)")
        ax.set_title(title)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    m = data["machine"]
    fig.suptitle(f"stepflow vs raw asyncio, Prefect, Dagster - {data['date']} - {m['cpus']} CPUs, "
                 f"{m['memory_gib']} GiB, Python {m['python']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
