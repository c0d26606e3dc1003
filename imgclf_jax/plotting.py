"""Figures: training curves (loss and accuracy by epoch, train dashed vs validation), the confusion matrix
and the reliability diagram. Each is saved to a path or a binary file object (the HTML report embeds them)."""

from __future__ import annotations

from typing import IO, Any, Mapping, Sequence, Union

from matplotlib.figure import Figure  # Figures drawn straight to files: no pyplot, no display, no backend state.

Destination = Union[str, IO[bytes]]


def plain_text(text: str) -> str:
    """`text` as matplotlib draws it literally: a '$' would start mathtext (a class called 'a$b' fails)."""
    return str(text).replace("$", r"\$")


def plot_training_curves(runs: Mapping[str, Sequence[dict[str, Any]]], path: Destination) -> None:
    """Draws one figure with a loss panel and an accuracy panel; several runs are overlaid by colour."""
    fig = Figure(figsize=(11, 4.2))
    ax_loss, ax_acc = fig.subplots(1, 2)
    single = len(runs) == 1
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            prefix = "" if single else f"{plain_text(name)} "
            trained = [r for r in records if isinstance(r.get(f"train_{key}"), (int, float))]
            ax.plot([r["epoch"] for r in trained], [r[f"train_{key}"] for r in trained], "--", color=color,
                    marker=".", label=f"{prefix}train")
            # Not every epoch is validated (`validate_every`); a NaN is saved as null.
            validated = [r for r in records if isinstance(r.get(f"val_{key}"), (int, float))]
            ax.plot([r["epoch"] for r in validated], [r[f"val_{key}"] for r in validated], "-", color=color,
                    marker="o", label=f"{prefix}validation")
    for ax, title in ((ax_loss, "Loss"), (ax_acc, "Accuracy")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Destination,
                          title: str = "Confusion matrix") -> None:
    """Counts per (true, predicted) class, shaded by the fraction of each true class."""
    import numpy as np

    counts = np.asarray(matrix)
    n = len(class_names)
    row_totals = counts.sum(axis=1, keepdims=True)
    fractions = counts / np.maximum(row_totals, 1)
    side = min(4.0 + 0.45 * n, 30.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    labels = [plain_text(name) for name in class_names]
    ax.set_xticks(range(n), labels=labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels=labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(plain_text(title))
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                        color="white" if fractions[i, j] > 0.5 else "black", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_reliability(bins: Sequence[dict[str, Any]], ece: float, path: Destination) -> None:
    """Accuracy against mean confidence per confidence bin (from `metrics.calibration`), with the diagonal
    of perfect calibration and each bin's share of the images."""
    fig = Figure(figsize=(5.2, 5.6))
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lows = [b["low"] for b in bins]
    width = bins[0]["high"] - bins[0]["low"]
    filled = [b for b in bins if b["count"]]
    ax.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           color="C0", edgecolor="white", label="accuracy")
    ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="C3",
            label="(mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    total = max(sum(b["count"] for b in bins), 1)
    ax_count.bar(lows, [b["count"] / total for b in bins], width=width, align="edge", color="C7",
                 edgecolor="white")
    ax_count.set_xlim(0, 1)
    ax_count.set_xlabel("confidence (top-class probability)")
    ax_count.set_ylabel("share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
