"""The metrics log (jsonl, csv, TensorBoard), the classification report and the plotting script."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgclf_jax.metrics import MetricsLog, best_record, classification_report, kept_record, read_metrics

REPO = Path(__file__).resolve().parents[1]


def _record(epoch):
    return {"epoch": epoch, "step": 10 * epoch, "train_loss": 1.0 / epoch, "train_accuracy": 0.5,
            "val_loss": 1.2 / epoch, "val_accuracy": 0.4 + 0.1 * epoch, "learning_rate": 1e-3,
            "epoch_time_s": 2.0, "train_images_per_s": 100.0}


def test_log_appends_rewinds_and_mirrors_to_csv_and_tensorboard(tmp_path):
    log = MetricsLog(str(tmp_path))
    for epoch in (1, 2, 3):
        log.append(_record(epoch))
    log.keep_up_to(2)  # Resuming from the checkpoint of epoch 2.
    log.append(_record(3))
    assert [r["epoch"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and float(rows[1]["val_accuracy"]) == pytest.approx(0.6)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_line_cut_short_by_a_kill_is_ignored(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n" + '{"epoch": 2, "st')
    assert [r["epoch"] for r in read_metrics(str(tmp_path))] == [1]


def test_report_for_many_classes_has_top5_and_consistent_counts():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 200)
    logits = rng.normal(size=(200, 7)) + 2.0 * np.eye(7)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    report = classification_report(probs, labels, [f"c{i}" for i in range(7)])
    matrix = np.array(report["confusion_matrix"])
    assert matrix.sum() == 200 and np.trace(matrix) / 200 == pytest.approx(report["accuracy"])
    top5 = np.mean([label in np.argsort(-p)[:5] for p, label in zip(probs, labels)])
    assert report["top5_accuracy"] == pytest.approx(top5)
    assert report["loss"] == pytest.approx(np.mean(-np.log(probs[np.arange(200), labels])))
    assert sum(m["support"] for m in report["per_class"].values()) == 200


@pytest.mark.parametrize("num_classes", [2, 3, 7])
def test_report_figures_equal_scikit_learns(num_classes):
    from sklearn import metrics as skm

    rng = np.random.default_rng(num_classes)
    labels = rng.integers(0, num_classes, 300)
    labels[:2] = 0  # Class num_classes - 1 is never predicted below: precision 0, not a division error.
    # Rounded probabilities give tied scores, which ROC-AUC must count half.
    logits = np.round(rng.normal(size=(300, num_classes)) + 1.5 * np.eye(num_classes)[labels], 1)
    logits[:, -1] -= 100.0
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    report = classification_report(probs, labels, [f"c{i}" for i in range(num_classes)])
    ids = list(range(num_classes))
    predicted = probs.argmax(-1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, predicted, labels=ids,
                                                                         zero_division=0)
    assert report["confusion_matrix"] == skm.confusion_matrix(labels, predicted, labels=ids).tolist()
    for i, name in enumerate(report["classes"]):
        got = report["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i]))
    assert report["per_class"][f"c{num_classes - 1}"]["precision"] == 0.0
    assert report["macro_f1"] == pytest.approx(np.mean(f1))
    if num_classes == 2:
        assert report["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs[:, 1]))
    if num_classes > 5:
        assert report["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(labels, probs, k=5, labels=ids))


@pytest.mark.slow
def test_plot_metrics_script_overlays_runs(tmp_path):
    for name in ("a", "b"):
        log = MetricsLog(str(tmp_path / name))
        (tmp_path / name).mkdir()
        for epoch in (1, 2):
            log.append(_record(epoch))
    script = str(REPO / "scripts" / "plot_metrics.py")
    subprocess.run([sys.executable, script, str(tmp_path / "a")], check=True, capture_output=True)
    assert (tmp_path / "a" / "training_curves.png").stat().st_size > 1000
    out = tmp_path / "both.png"
    subprocess.run([sys.executable, script, str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.stat().st_size > 1000
    failed = subprocess.run([sys.executable, script, str(tmp_path / "none")], capture_output=True, text=True)
    assert failed.returncode == 2 and "no metrics.jsonl records" in failed.stderr


def test_calibration_bins_and_expected_calibration_error():
    from imgclf_jax.metrics import calibration

    probabilities = np.array([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 0, 0])
    result = calibration(probabilities, labels, num_bins=5)
    counts = [b["count"] for b in result["bins"]]
    assert counts == [0, 0, 2, 1, 2]  # (0.4, 0.6]: 0.5, 0.6 | (0.6, 0.8]: 0.7 | (0.8, 1]: 0.95, 0.9
    top = result["bins"][4]
    assert top["confidence"] == pytest.approx(0.925) and top["accuracy"] == 0.5
    # |0.5 - 0.55| * 2/5 + |1 - 0.7| * 1/5 + |0.5 - 0.925| * 2/5
    assert result["expected_calibration_error"] == pytest.approx(0.02 + 0.06 + 0.17)


def test_best_record_prefers_the_latest_of_tied_epochs():
    records = [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.8},
               {"epoch": 3, "val_accuracy": 0.7}, {"epoch": 4, "val_accuracy": 0.8}]
    assert best_record(records)["epoch"] == 4
    assert best_record(records[:3])["epoch"] == 2


def test_kept_record_is_the_best_or_the_validated_last():
    records = [{"epoch": 1, "val_accuracy": 0.8}, {"epoch": 2}, {"epoch": 3, "val_accuracy": 0.6}]
    assert kept_record(records, "best")["epoch"] == 1
    assert kept_record(records, "last")["epoch"] == 3
    assert kept_record(records[:2], "last") is None  # The last epoch was not validated.
    assert kept_record([], "last") is None


def test_best_record_passes_over_epochs_that_were_not_validated():
    records = [{"epoch": 1}, {"epoch": 2, "val_accuracy": 0.6}, {"epoch": 3}, {"epoch": 4, "val_accuracy": 0.5}]
    assert best_record(records)["epoch"] == 2
    assert best_record([{"epoch": 1}]) is None


def test_classes_without_images_are_named_and_left_out_of_macro_f1():
    probabilities = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.8, 0.1, 0.1]])
    report = classification_report(probabilities, np.array([0, 1, 0]), ["a", "b", "absent"])
    assert report["absent_classes"] == ["absent"]
    assert report["per_class"]["absent"]["support"] == 0
    assert report["macro_f1"] == pytest.approx(1.0)  # a and b are perfect; absent is neither seen nor predicted.
    predicted_absent = np.array([[0.1, 0.1, 0.8], [0.2, 0.7, 0.1], [0.8, 0.1, 0.1]])
    report = classification_report(predicted_absent, np.array([0, 1, 0]), ["a", "b", "absent"])
    assert report["macro_f1"] == pytest.approx(np.mean([2 / 3, 1.0, 0.0]))  # A false alarm for it counts.


def test_plots_draw_dollar_signs_in_class_names_literally(tmp_path):
    from imgclf_jax import plotting

    names = ["$cats$", "d$o_g", "100$ bills"]
    plotting.plot_confusion_matrix([[1, 0, 0], [0, 1, 0], [0, 0, 1]], names, str(tmp_path / "cm.png"), "a$b")
    plotting.plot_training_curves({"$x$": [_record(1)], "y": [_record(1)]}, str(tmp_path / "curves.png"))
    assert (tmp_path / "cm.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0


def test_records_that_are_not_epochs_are_passed_over_and_plots_skip_missing_values(tmp_path):
    from imgclf_jax import plotting

    (tmp_path / "metrics.jsonl").write_text(
        json.dumps(_record(1)) + "\n" + '{"epoch": 2}\n[1, 2]\n"text"\n' + json.dumps({**_record(3), "val_loss": None})
        + "\n")
    records = read_metrics(str(tmp_path))
    assert [r["epoch"] for r in records] == [1, 2, 3]
    plotting.plot_training_curves({"run": records}, str(tmp_path / "curves.png"))
    assert best_record(records)["epoch"] == 3
