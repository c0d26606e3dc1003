"""Training curves from metrics records: loss and accuracy by epoch, train (dashed) vs validation."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # Files only; never needs a display.
import matplotlib.pyplot as plt


def plot_training_curves(runs: Mapping[str, Sequence[dict[str, Any]]], path: str) -> None:
    """Draws one figure with a loss panel and an accuracy panel; several runs are overlaid by colour."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    single = len(runs) == 1
    for i, (name, records) in enumerate(runs.items()):
        epochs = [r["epoch"] for r in records]
        color = f"C{i}"
        for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            prefix = "" if single else f"{name} "
            ax.plot(epochs, [r[f"train_{key}"] for r in records], "--", color=color, marker=".",
                    label=f"{prefix}train")
            ax.plot(epochs, [r[f"val_{key}"] for r in records], "-", color=color, marker="o",
                    label=f"{prefix}validation")
    for ax, title in ((ax_loss, "Loss"), (ax_acc, "Accuracy")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
