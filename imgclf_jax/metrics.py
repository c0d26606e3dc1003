"""Metrics: the per-epoch log (`metrics.jsonl`, `metrics.csv` beside it, TensorBoard events) and the
classification report that evaluation writes."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
REQUIRED_KEYS = (
    "epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "learning_rate", "epoch_time_s", "train_images_per_s",
)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # A line cut short by a kill: the epoch is redone on resume.
            break
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):  # Else not ours: passed over.
            records.append(record)
    return records


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float (at any depth) replaced by None: JSON has no NaN, and a bare
    `NaN` in a file makes it unreadable to strict parsers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def to_json_line(record: dict[str, Any]) -> str:
    """One line of valid JSON (`finite_or_null`)."""
    return json.dumps(finite_or_null(record), allow_nan=False) + "\n"


def best_record(records: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The epoch record with the highest validation accuracy; ties go to the latest epoch, as the best
    checkpoint kept by orbax does. Epochs that were not validated (`validate_every`) have no `val_accuracy`
    and are passed over; None if no epoch was validated."""
    validated = [r for r in records if isinstance(r.get("val_accuracy"), (int, float))]
    return max(reversed(validated), key=lambda r: r["val_accuracy"]) if validated else None


def kept_record(records: Sequence[dict[str, Any]], keep_epoch: str) -> Optional[dict[str, Any]]:
    """The record of the epoch a run keeps (config.keep_epoch): the best validated one, or the last one if it
    was validated (a finished run validates its last epoch); None if there is none."""
    if keep_epoch == "best":
        return best_record(records)
    return records[-1] if records and isinstance(records[-1].get("val_accuracy"), (int, float)) else None


class MetricsLog:
    """Appends epoch records durably; on resume it drops records of epochs after the restored one, so an
    epoch is never logged twice."""

    def __init__(self, workdir: str):
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.csv_path = self.workdir / CSV_FILE
        self._tensorboard = None

    def keep_up_to(self, epoch: int) -> None:
        records = [r for r in read_metrics(str(self.workdir)) if r.get("epoch", 0) <= epoch]
        self._rewrite(records)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(to_json_line(record))
            f.flush()
            os.fsync(f.fileno())
        self._write_csv(read_metrics(str(self.workdir)))
        self._write_tensorboard(record)

    def _write_tensorboard(self, record: dict[str, Any]) -> None:
        """Scalars by epoch in `tensorboard/` for `tensorboard --logdir WORKDIR`.

        Written with TensorFlow's core `tf.summary.write` and the scalars plugin's metadata, which is what
        `tf.summary.scalar` does, without needing the tensorboard package installed to write them.
        """
        import tensorflow as tf  # Already loaded by the input pipeline when training.

        if self._tensorboard is None:
            self._tensorboard = tf.summary.create_file_writer(str(self.workdir / TENSORBOARD_DIR))
        metadata = tf.compat.v1.SummaryMetadata(
            plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars")).SerializeToString()
        with self._tensorboard.as_default():
            for key, value in record.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    tf.summary.write(key, tf.constant(float(value), tf.float32), step=int(record["epoch"]),
                                     metadata=metadata)
        self._tensorboard.flush()

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(to_json_line(r) for r in records))
        os.replace(tmp, self.path)
        self._write_csv(records)

    def _write_csv(self, records: list[dict[str, Any]]) -> None:
        columns = list(REQUIRED_KEYS)
        for record in records:
            columns.extend(k for k in record if k not in columns)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
        os.replace(tmp, self.csv_path)


def classification_report(
    probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, loss, per-class precision/recall/F1/support and the confusion matrix (rows = true class,
    columns = predicted, in `class_names` order); ROC-AUC for two classes, top-5 accuracy for more than five.
    Classes without images (`absent_classes`) are listed, and left out of the macro F1 unless predicted.

    Computed with numpy (scikit-learn gives the same figures, tests/test_metrics.py): importing sklearn.metrics
    took 2.7 s of every training command's report.
    """
    num_classes = len(class_names)
    labels = np.asarray(labels, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    predicted = probabilities.argmax(axis=-1)
    p_true = probabilities[np.arange(len(labels)), labels]
    confusion = np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(
        num_classes, num_classes)
    correct, support, predicted_count = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    precision = correct / np.maximum(predicted_count, 1)  # 0 where a class is never predicted.
    recall = correct / np.maximum(support, 1)
    f1 = 2 * precision * recall / np.where(precision + recall > 0, precision + recall, 1.0)
    # As scikit-learn's default: a class neither present nor predicted (a folder without it) has no F1 to
    # average; one predicted but not present counts, with F1 0.
    scored = (support > 0) | (predicted_count > 0)
    report: dict[str, Any] = {
        "accuracy": float(np.mean(predicted == labels)),
        "loss": float(np.mean(-np.log(np.clip(p_true, 1e-12, 1.0)))),
        "num_examples": int(len(labels)),
        "classes": list(class_names),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "macro_f1": float(np.mean(f1[scored])) if scored.any() else 0.0,
        "absent_classes": [name for i, name in enumerate(class_names) if support[i] == 0],
        "confusion_matrix": confusion.tolist(),
    }
    if num_classes == 2 and len(set(labels.tolist())) == 2:
        report["roc_auc"] = roc_auc(probabilities[:, 1], labels == 1)
    if num_classes > 5:
        # As scikit-learn's top_k_accuracy_score ranks them: stable sort, ties to the higher class index.
        top5 = np.argsort(probabilities, axis=1, kind="mergesort")[:, ::-1][:, :5]
        report["top5_accuracy"] = float(np.mean(np.any(top5 == labels[:, None], axis=1)))
    report["calibration"] = calibration(probabilities, labels)
    return report


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties
    count half), from the ranks of the scores (Mann-Whitney U)."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    ranks = ((last - counts + 1 + last) / 2.0)[group]  # Tied scores share their average rank.
    num_positive, num_negative = int(positive.sum()), int((~positive).sum())
    u = ranks[positive].sum() - num_positive * (num_positive + 1) / 2.0
    return float(u / (num_positive * num_negative))


def calibration(probabilities: np.ndarray, labels: np.ndarray, num_bins: int = 10) -> dict[str, Any]:
    """Reliability of the top-class probability: per equal-width confidence bin, the mean confidence and
    the accuracy; and the expected calibration error (ECE), their gap weighted by the bins' sizes."""
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels, np.int64)
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == labels
    # Bin b holds confidences in (b/num_bins, (b+1)/num_bins]; a confidence of 0 goes to the first bin.
    bin_of = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    bins, ece = [], 0.0
    for b in range(num_bins):
        members = bin_of == b
        count = int(members.sum())
        mean_confidence = float(confidence[members].mean()) if count else 0.0
        accuracy = float(correct[members].mean()) if count else 0.0
        ece += count / max(len(labels), 1) * abs(accuracy - mean_confidence)
        bins.append({"low": b / num_bins, "high": (b + 1) / num_bins, "count": count,
                     "confidence": mean_confidence, "accuracy": accuracy})
    return {"expected_calibration_error": float(ece), "bins": bins}
