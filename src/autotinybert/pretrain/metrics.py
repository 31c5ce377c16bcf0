"""What a pre-training run logs: the columns of ``out/metrics.csv`` (always written) and the same
rows as TensorBoard scalars in ``out/tensorboard`` (when the optional tensorboard package is installed).
"""

from __future__ import annotations

from pathlib import Path

METRICS_FILE = "metrics.csv"
METRIC_FIELDS = ("step", "split", "arch", "loss", "mlm_loss", "mlm_accuracy", "kd_loss", "lr", "tokens_per_s")


class TensorBoard:
    """Scalars to ``out/tensorboard`` when the optional tensorboard package is installed."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: pip install 'autotinybert[tensorboard]'
                return
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, rows: list[dict]) -> None:
        if self.writer is None:
            return
        for row in rows:
            prefix = row["split"] if row["split"] == "train" else f"valid/{row['arch']}"
            for key in ("loss", "mlm_loss", "mlm_accuracy", "kd_loss", "lr", "tokens_per_s"):
                if row.get(key) not in (None, ""):
                    self.writer.add_scalar(f"{prefix}/{key}", float(row[key]), int(row["step"]))
        self.writer.flush()
