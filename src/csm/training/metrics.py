"""Training metrics: a CSV log (one row per step) and a loss-curve PNG drawn from it."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

FIELDS = ["step", "loss", "backbone_loss", "decoder_loss", "val_loss", "learning_rate", "grad_norm",
          "step_seconds", "samples_per_second", "peak_memory_gb"]


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Rows of a metrics CSV (empty if absent)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite the CSV with ``rows`` (missing fields left empty)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_loss(rows: list[dict], path: Path) -> Path | None:
    """Training (and validation) loss against step as a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss curve (pip install 'csm-mlx[analysis]')")
        return None
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in [("loss", "train"), ("backbone_loss", "train: codebook 0"), ("decoder_loss", "train: 1-31")]:
        ax.plot(steps, [float(r[key]) for r in rows], label=label, lw=1 if key != "loss" else 1.8)
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss") not in (None, "")]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="CSM fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
