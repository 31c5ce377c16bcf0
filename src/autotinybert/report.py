"""Tables and plots built from the files stages write (never from live models)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from .errors import UserError


def read_validation_curves(metrics_csv: str | Path, column: str = "mlm_accuracy") -> dict[str, list[tuple[int, float]]]:
    """``{arch: [(step, value), ...]}`` from a pre-training ``metrics.csv``."""
    path = Path(metrics_csv)
    if not path.is_file():
        raise UserError(f"{path} does not exist; point at the metrics.csv of a pretrain run")
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "valid" and row.get(column):
                curves[row["arch"]].append((int(row["step"]), float(row[column])))
    return dict(curves)


def plot_validation_curves(metrics_csv: str | Path, out_png: str | Path, column: str = "mlm_accuracy",
                           title: str | None = None) -> Path:
    """One line per validation-panel architecture: ``column`` against the training step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need the plots extra: pip install 'autotinybert[plots]'") from None
    curves = read_validation_curves(metrics_csv, column)
    if not curves:
        raise UserError(f"{metrics_csv} has no validation rows with {column}")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for arch, points in sorted(curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", markersize=3, label=arch)
    ax.set_xlabel("training step")
    ax.set_ylabel(column.replace("_", " "))
    ax.set_title(title or f"validation {column.replace('_', ' ')} of the panel architectures")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_pareto(results_json: str | Path, out_png: str | Path, ylabel: str = "fitness") -> Path:
    """Predicted latency vs fitness of every evaluated architecture, the Pareto front and each
    target's window and best architecture (from a search ``results.json`` + ``state.json``)."""
    import json

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need the plots extra: pip install 'autotinybert[plots]'") from None
    results_json = Path(results_json)
    results = json.loads(results_json.read_text(encoding="utf-8"))
    state = json.loads((results_json.parent / "state.json").read_text(encoding="utf-8"))
    points = state["evaluations"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.scatter([p["latency_ms"] for p in points], [p["fitness"] for p in points], s=8, c="0.6",
               label=f"evaluated ({len(points)})")
    front = results["pareto_front"]
    ax.step([p["latency_ms"] for p in front], [p["fitness"] for p in front], where="post", c="tab:red",
            marker="o", markersize=3, label="Pareto front")
    for i, target in enumerate(results["targets"]):
        low, high = target["window_ms"]
        ax.axvspan(low, high, alpha=0.08, color=f"C{i}")
        best = target["best"]
        ax.scatter([best["latency_ms"]], [best["fitness"]], marker="*", s=120, color=f"C{i}", zorder=3,
                   label=f"{target['target']['name']}: {best['arch']}")
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel(ylabel)
    ax.set_title("architecture search: predicted latency vs fitness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
