"""Slow accuracy check (not part of the tests): train a config on a dataset, time it, score the best
checkpoint, and compare with what the config promises.

    python scripts/accuracy_check.py --config cats_vs_dogs \
        --data_dir ../shared/datasets/cats_vs_dogs --expect 0.90 --max_minutes 20

Prints one Markdown table row (for docs/accuracy.md) and exits 1 if the accuracy or the time misses.
Extra `--config.FIELD=VALUE` overrides are passed through, so a variant can be measured without a new file.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from imgclf_jax import cli, config_lib, evaluate, metrics, recipes, train  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags() -> None:
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file to check.", lock_config=True)
    flags.DEFINE_string("data_dir", None, "Dataset folder (train/ and validation/ or test/).", required=True)
    flags.DEFINE_string("workdir", None, "Work directory, new or empty (default: a new temporary one).")
    flags.DEFINE_float("expect", 0.0, "Accuracy the best checkpoint must reach on the scored split.")
    flags.DEFINE_float("max_minutes", 0.0, "Training time budget in minutes (0 = no limit).")
    flags.DEFINE_string("split", "validation", "Split scored with the best checkpoint.")
    flags.DEFINE_enum("tta", None, list(config_lib.TTA_MODES), "Test-time augmentation when scoring "
                      "(default: the config's tta, as evaluate and predict use).")
    flags.DEFINE_string("note", "", "Free text for the table row (what this variant changes).")


def main(argv) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    config_lib.apply_overrides(config, data_dir=FLAGS.data_dir)
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix=f"accuracy_{config.name}_")
    if os.path.isdir(workdir) and os.listdir(workdir):
        # train would resume the run in it, and the time and accuracy would not be a run from scratch's.
        raise SystemExit(f"work directory {workdir} is not empty: give a new one")
    start = time.perf_counter()
    records = train.train_and_evaluate(config, workdir)
    minutes = (time.perf_counter() - start) / 60
    tta = FLAGS.tta or config.tta
    scores = evaluate.evaluate(workdir, data_dir=FLAGS.data_dir, split=FLAGS.split, tta=tta,
                               name=f"check_{FLAGS.split}_{tta}")
    kept = metrics.kept_record(records, config.keep_epoch) or {"epoch": 0}
    epochs = records[-1]["epoch"] if records else 0  # A time budget may have trained fewer than config.epochs.
    print(f"| {config.name} | {FLAGS.note or '-'} | {config.model} {config.image_size}px, {epochs} epochs | "
          f"{scores['accuracy']:.4f} ({FLAGS.split}, tta {tta}, {config.keep_epoch} epoch {kept['epoch']}) | "
          f"{minutes:.1f} min (whole command incl. scan and compile) |")
    missed = []
    if scores["accuracy"] < FLAGS.expect:
        missed.append(f"accuracy {scores['accuracy']:.4f} < {FLAGS.expect}")
    if FLAGS.max_minutes and minutes > FLAGS.max_minutes:
        missed.append(f"{minutes:.1f} min > {FLAGS.max_minutes} min")
    if missed:
        print("MISSED: " + "; ".join(missed))
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    _define_flags()
    cli.run("accuracy_check", main, lambda: recipes.default_config_argv(sys.argv))
