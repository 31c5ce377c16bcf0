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
