"""Evaluation: score a checkpoint of a trained run on a split and write a report.

    python -m imgclf_jax.evaluate --workdir W [--data_dir D | --dataset tfds:NAME] [--split S]
        [--checkpoint kept|best|latest|STEP] [--tta none|flip|flip_scale] [--batch_size N] [--name NAME]

Writes W/eval_<name>.json (accuracy, loss, per-class precision/recall/F1/support, confusion matrix, ROC-AUC
for two classes, top-5 accuracy for more than five) and W/confusion_matrix_<name>.png.
"""

from __future__ import annotations

if __name__ == "__main__":  # Before TensorFlow loads, so that its C++ start-up lines stay quiet.
    import sys

    from imgclf_jax import cli

    cli.prepare_environment(sys.argv)

import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from imgclf_jax import cli, config_lib, folders, inference, input_pipeline, plotting
from imgclf_jax import workdir as workdir_lib
from imgclf_jax.errors import UserError
from imgclf_jax.metrics import classification_report
from imgclf_jax.steps import evaluate_batches

def _pick_split(available: list[str], split: Optional[str], where: str,
                order: Sequence[str] = ("test", "validation")) -> str:
    if split:
        if split not in available:
            raise UserError(f"{where} has no '{split}' split (it has {', '.join(available) or 'none'})")
        return split
    for candidate in order:
        if candidate in available:
            return candidate
    raise UserError(f"{where} has neither a {' nor a '.join(order)} split; name one with --split")


def resolve_eval_data(
    run: inference.TrainedRun, data_dir: Optional[str], dataset: Optional[str], split: Optional[str],
    order: Sequence[str] = ("test", "validation"),
) -> tuple[input_pipeline.Split, str, str, list[tuple[str, str]]]:
    """Returns (split, report name, description, skipped files) for the data to score: `split`, or without
    it the first of `order` that the data has.

    `data_dir` may be a dataset root (train/validation/test folders) or a folder of class sub-folders.
    With neither `data_dir` nor `dataset`, the run's own data is used (the same held-out split, if any).
    """
    config = run.config
    if data_dir and dataset:
        raise UserError("give either --data_dir or --dataset, not both")
    if data_dir:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"data folder {data_dir} does not exist")
        split_folders = folders.find_split_folders(root)
        if split_folders:
            name = _pick_split(sorted(split_folders), split, str(root), order)
            folder = split_folders[name]
        else:
            if split:
                raise UserError(f"{root} has no split folders; drop --split to score all of its images")
            folder, name = root, root.name
        examples, skipped = folders.load_class_folder(str(folder), run.class_names, config.max_image_pixels)
        source = input_pipeline.folder_split(examples, config.image_size, config.max_image_pixels)
        return source, name, f"folder {folder}", skipped

    if dataset:
        config = config.copy_and_resolve_references()
        config.unlock()
        config.dataset, config.data_dir = dataset, ""
    # Only the split asked for is opened, so a problem in another (say a test/ class the model never saw)
    # does not stop the report, which scores validation.
    source = input_pipeline.load_source(config, splits=(split,) if split else tuple(order))
    if source.class_names != run.class_names:
        raise UserError(
            f"{source.description} has classes {source.class_names}, but the model was trained on "
            f"{run.class_names}")
    name = _pick_split(sorted(source.splits), split, source.description, order)
    prefix = dataset.split(":", 1)[-1] + "_" if dataset else ""  # evaluate() makes the name file-safe.
    return source.splits[name], prefix + name, f"{source.description} ({name})", source.skipped


def predict_split(
    run: inference.TrainedRun, data: input_pipeline.Split, batch_size: int, tta: Optional[str] = None,
    on_batch: Optional[Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, classes), labels (N,)) for every image of `data`, in order.

    `tta`: the test-time augmentation (inference.make_predict_fn; None: the run's config.tta).
    `on_batch(images, probabilities, labels)` sees each batch's real examples as they go by (the images
    as the model saw them, float [0, 1]), for callers that want more than the numbers.
    """
    predict = inference.make_predict_fn(run, tta)
    prepared = input_pipeline.prepare(data, run.config.image_size, run.config.resize, cache=False)
    probabilities, labels = [], []

    def collect(images: np.ndarray, batch_probabilities: np.ndarray, batch_labels: np.ndarray) -> None:
        probabilities.append(batch_probabilities)
        labels.append(batch_labels)
        if on_batch is not None:
            on_batch(images, batch_probabilities, batch_labels)

    evaluate_batches(lambda _, batch: {"probabilities": predict(batch["image"])}, None,
                     input_pipeline.eval_batches(prepared, batch_size), on_batch=collect)
    return np.concatenate(probabilities), np.concatenate(labels)


def evaluate(
    workdir: str,
    data_dir: Optional[str] = None,
    dataset: Optional[str] = None,
    split: Optional[str] = None,
    checkpoint: str = "kept",
    batch_size: int = 64,
    tta: Optional[str] = None,
    name: Optional[str] = None,
) -> dict[str, Any]:
    """Scores a checkpoint and writes `eval_<name>.json` and `confusion_matrix_<name>.png` into `workdir`.

    `tta` None uses the test-time augmentation the run's config names (config.tta)."""
    config_lib.require_positive_int("batch_size", batch_size)
    run = inference.load_run(workdir, checkpoint)
    tta = inference.resolve_tta(run, tta)
    data, default_name, description, skipped = resolve_eval_data(run, data_dir, dataset, split)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name or default_name)

    probabilities, labels = predict_split(run, data, batch_size, tta)
    if not np.all(np.isfinite(probabilities)):
        raise UserError(f"the model's outputs are NaN or infinite on {int((~np.isfinite(probabilities)).any(-1).sum())} "
                        f"of {len(labels)} images (checkpoint step {run.step}); use another --checkpoint")
    report = classification_report(probabilities, labels, run.class_names)
    report.update({
        "name": name, "data": description, "checkpoint": inference.checkpoint_to_restore(run.config, checkpoint),
        "step": run.step, "epoch": run.epoch,
        "tta": tta, "skipped_files": [{"path": p, "reason": r} for p, r in skipped],
    })
    json_path = os.path.join(workdir, f"eval_{name}.json")
    workdir_lib.write_json(json_path, report)
    png_path = os.path.join(workdir, f"confusion_matrix_{name}.png")
    plotting.plot_confusion_matrix(report["confusion_matrix"], run.class_names, png_path,
                                   f"{name}: accuracy {report['accuracy']:.4f} (n={report['num_examples']})")
    print(format_report(report))
    print(f"Wrote {json_path} and {png_path}")
    return report


def format_report(report: dict[str, Any]) -> str:
    """A readable summary: headline numbers, the per-class table and the confusion matrix."""
    classes = report["classes"]
    width = max(12, max(len(c) for c in classes) + 2)
    lines = [
        f"Checkpoint step {report['step']} (epoch {report['epoch']}, {report['checkpoint']}) on "
        f"{report['data']}: {report['num_examples']} images"
        + (f" ({report['tta']} TTA)" if report["tta"] != "none" else ""),
        f"accuracy {report['accuracy']:.4f}  loss {report['loss']:.4f}  macro F1 {report['macro_f1']:.4f}"
        f"  ECE {report['calibration']['expected_calibration_error']:.4f}"
        + (f"  ROC-AUC {report['roc_auc']:.4f}" if "roc_auc" in report else "")
        + (f"  top-5 accuracy {report['top5_accuracy']:.4f}" if "top5_accuracy" in report else ""),
        "",
        f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for c in classes:
        m = report["per_class"][c]
        lines.append(f"{c:<{width}}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>10d}")
    if len(classes) <= 20:
        lines += ["", "confusion matrix (rows = true class, columns = predicted):",
                  " " * width + "".join(f"{c[:9]:>10}" for c in classes)]
        for c, row in zip(classes, report["confusion_matrix"]):
            lines.append(f"{c:<{width}}" + "".join(f"{v:>10d}" for v in row))
    absent = report.get("absent_classes", [])
    if absent:
        lines.append(f"\n{len(absent)} trained class(es) have no images here ({', '.join(absent)}): their support "
                     "is 0 and the macro F1 leaves them out unless the model predicted them.")
    if report["skipped_files"]:
        lines.append(f"\n{len(report['skipped_files'])} file(s) could not be used (listed in the JSON report).")
    return "\n".join(lines)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Work directory of a training run.", required=True)
    flags.DEFINE_string("data_dir", None, "A dataset root (train/validation/test folders) or a folder of "
                        "class sub-folders. Default: the run's own data.")
    flags.DEFINE_string("dataset", None, "'tfds:NAME' to score a TensorFlow Datasets split.")
    flags.DEFINE_string("split", None, "Split to score (default: test, else validation).")
    flags.DEFINE_string("checkpoint", "kept", inference.CHECKPOINT_HELP)
    flags.DEFINE_integer("batch_size", 64, "Evaluation batch size (does not change the results).")
    flags.DEFINE_enum("tta", None, list(config_lib.TTA_MODES), "Test-time augmentation: 'flip' averages each "
                      "image's prediction with its mirror image's, 'flip_scale' also with both at 1.1x the size. "
                      "Default: the run's config.tta.")
    flags.DEFINE_string("name", None, "Report name: eval_<name>.json (default: the split or folder name).")


def main(argv) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    evaluate(FLAGS.workdir, FLAGS.data_dir, FLAGS.dataset, FLAGS.split, FLAGS.checkpoint, FLAGS.batch_size,
             FLAGS.tta, FLAGS.name)


def run() -> None:
    _define_flags()
    cli.run("imgclf_jax.evaluate", main)


if __name__ == "__main__":
    run()
