"""Training from the command line: `python -m imgclf_jax.train` (or `imgclf-train`), and
`train_and_evaluate(config, workdir)`, which trains (imgclf_jax.trainer), then draws the training curves and
writes the HTML run report from the kept epoch's validation scores (config.keep_epoch).

    python -m imgclf_jax.train [--config RECIPE] [--data_dir DIR | --dataset tfds:NAME] [...]
"""

from __future__ import annotations

if __name__ == "__main__":  # Before TensorFlow loads, so that its C++ start-up lines stay quiet.
    import sys

    from imgclf_jax import cli

    cli.prepare_environment(sys.argv)

import logging
import os
import sys
from typing import Any, Optional

import jax
import ml_collections

from imgclf_jax import cli, config_lib, parallel, plotting, recipes, report, trainer
from imgclf_jax.errors import UserError
from imgclf_jax.metrics import best_record, kept_record
from imgclf_jax.workdir import CURVES_FILE

log = logging.getLogger(__name__)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Trains (resuming from the latest checkpoint in `workdir` if any), then writes the training curves and,
    with config.report, report.html; returns the metrics records (process 0's; [] in the others)."""
    # The report's scores of the kept epoch, collected while validating, spare it a second pass over the photos.
    keep_scores = config.report and parallel.is_main_process() and jax.process_count() == 1
    result = trainer.fit(config, workdir, (lambda: report.ValidationScorer(report.GALLERY_SIZE)) if keep_scores
                         else None)
    best = best_record(result.records)
    kept = kept_record(result.records, result.config.keep_epoch)
    if not parallel.is_main_process() or not result.records:
        return result.records
    plotting.plot_training_curves({result.config.name: result.records}, os.path.join(workdir, CURVES_FILE))
    if kept is not None and kept is not best:  # A kept epoch was validated, so there is a best one too.
        log.info("Kept the last epoch (%d): validation accuracy %.4f (the best, %.4f, at epoch %d). Work "
                 "directory: %s", kept["epoch"], kept["val_accuracy"], best["val_accuracy"], best["epoch"], workdir)
    elif best is not None:
        log.info("Best validation accuracy %.4f at epoch %d. Work directory: %s", best["val_accuracy"],
                 best["epoch"], workdir)
    else:
        log.info("No validation photos: the last epoch (%d) is kept; score it on photos it has not seen with "
                 "`python -m imgclf_jax.evaluate --workdir %s` (the data's test split) or `... --data_dir DIR`.",
                 result.records[-1]["epoch"], workdir)
    if result.config.report:
        # Scores from before a resume are not at hand: then the report scores the kept checkpoint itself.
        scores = None
        if result.kept_scorer is not None and kept is not None and result.kept_epoch == kept["epoch"]:
            scores = result.kept_scorer.scores(result.config, result.class_names, result.kept_step,
                                               result.kept_epoch, result.validation_paths,
                                               f"{result.data_description} (validation)")
        _write_report(workdir, scores)
    return result.records


def _write_report(workdir: str, scores: Optional[report.ValidationScores] = None) -> None:
    """The HTML run report (`scores`: the kept checkpoint's validation scores, if at hand); a failure here is
    logged, since the trained run itself is complete."""
    if jax.process_count() > 1:  # Restoring in one process would wait for the others forever.
        log.info("Multi-process run: write the report with `python -m imgclf_jax.report %s`.", workdir)
        return
    try:
        log.info("Report: %s", report.build_report(workdir, scores=scores))
    except UserError as e:  # Nothing to score: a run without validation on a folder without test/.
        log.warning("No run report: %s.", e)
    except Exception as e:  # noqa: BLE001 - the checkpoints and metrics are already safe.
        log.warning("Could not write the run report (%s: %s); try `python -m imgclf_jax.report %s`.",
                    type(e).__name__, e, workdir)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "A shipped recipe by name (default, demo, cats_vs_dogs, tutorial_cnn) or your own "
        "recipe file by path. Default: demo with no data flags, default with --data_dir/--dataset. Override "
        "any field with --config.FIELD=VALUE (every field: docs/config.md, or imgclf_jax.config_lib.base_config).",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Work directory (default checkpoints/<config name>).")
    flags.DEFINE_string("data_dir", None, "Image folder: DIR/<class>/... or DIR/train/<class>/... "
                        "with DIR/validation/ (or val/) and optional DIR/test/.")
    flags.DEFINE_string("dataset", None, "'tfds:NAME' for a TensorFlow Datasets set, or 'demo'.")
    flags.DEFINE_integer("epochs", None, "Train exactly this many epochs (no time budget).")
    flags.DEFINE_float("time_budget_minutes", None, "Train as many epochs as fit in this many minutes of the "
                       "whole command (at most the config's epochs).")
    flags.DEFINE_integer("batch_size", None, "Training batch size.")
    flags.DEFINE_float("learning_rate", None, "Peak learning rate.")
    flags.DEFINE_integer("image_size", None, "Images are resized to IMAGE_SIZE x IMAGE_SIZE.")
    flags.DEFINE_integer("seed", None, "Random seed (initialisation, data order, augmentation).")
    flags.DEFINE_bool("strict", None, "Stop with an error if any file is unusable, instead of skipping it.")
    flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT of process 0's coordinator.")
    flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes take part.")
    flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0..num_processes-1.")
    flags.DEFINE_bool("distributed", False, "Multi-process runs: detect the three values above from the "
                      "cluster (SLURM, Open MPI, Kubernetes, TPU pods), as jax.distributed does.")


def apply_flags(config: ml_collections.ConfigDict, flag_values: Any) -> None:
    """Applies the plain flags to `config`. What a flag asks for is what the run does: `--epochs N` trains N
    epochs (no time budget re-plans them), `--time_budget_minutes M` replaces the recipe's budget (0: none),
    and `--image_size S` is kept even where the photos are smaller (image_size_from_photos)."""
    if flag_values.epochs is not None and flag_values.time_budget_minutes is not None:
        raise UserError("--epochs and --time_budget_minutes each decide how long to train; give one of them")
    if flag_values.epochs is not None or flag_values.time_budget_minutes is not None:
        config.time_budget_minutes, config.auto_time_budget.seconds_per_image = 0.0, 0.0
        config.progressive.stage_epochs = 0
    if flag_values.image_size is not None:
        config.image_size_from_photos = False
    config_lib.apply_overrides(
        config, data_dir=flag_values.data_dir, dataset=flag_values.dataset, epochs=flag_values.epochs,
        batch_size=flag_values.batch_size, learning_rate=flag_values.learning_rate,
        image_size=flag_values.image_size, seed=flag_values.seed, strict=flag_values.strict,
        time_budget_minutes=flag_values.time_budget_minutes,
    )


def main(argv) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed)
    if not parallel.is_main_process():
        logging.getLogger().setLevel(logging.WARNING)  # Process 0 speaks for the run.
    config = FLAGS.config
    apply_flags(config, FLAGS)
    train_and_evaluate(config, config_lib.default_workdir(config, FLAGS.workdir))


def run() -> None:
    _define_flags()
    cli.run("imgclf_jax.train", main, lambda: recipes.default_config_argv(sys.argv))


if __name__ == "__main__":
    run()
