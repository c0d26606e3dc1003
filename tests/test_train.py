"""The train step, evaluation counting, and whole runs with checkpoints, resume and outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import numpy as np
import pytest

from helpers import fresh_state, make_class_folder
from imgclf_jax import (checkpointing, config_lib, evaluate, inference, input_pipeline, losses, recipes, schedule,
                        steps, time_budget, train, train_state, trainer)
from imgclf_jax import report as run_report
from imgclf_jax.errors import UserError
from imgclf_jax.metrics import REQUIRED_KEYS, read_metrics


@pytest.mark.slow
def test_run_with_a_weight_average_restores_it_for_prediction(tiny_config, two_class_dir, tmp_path):
    from imgclf_jax import inference

    tiny_config.update(data_dir=str(two_class_dir), ema_decay=0.9)
    train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    run = inference.load_run(str(tmp_path / "w"))
    assert isinstance(run.state, train_state.EmaTrainState)
    images = np.random.default_rng(1).uniform(size=(4, 16, 16, 3)).astype(np.float32)
    probs = inference.make_predict_fn(run)(images)
    expected = losses.probabilities(run.state.apply_fn(run.state.ema, images, train=False), "sigmoid")
    np.testing.assert_allclose(probs, expected, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage_epochs", [-1, 10, 11])
def test_stage_epochs_must_leave_the_last_stage_an_epoch(tiny_config, tmp_path, stage_epochs):
    tiny_config.update(data_dir=str(tmp_path / "does_not_matter"), epochs=30)
    tiny_config.cnn.global_pool = True
    tiny_config.progressive.update(start_scale=0.5, stages=4, stage_epochs=stage_epochs)
    with pytest.raises(UserError, match="progressive.stage_epochs must be 0 .* of the 30 epochs"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "w"))


@pytest.mark.slow
def test_stage_epochs_are_left_to_the_time_budget(tiny_config, tmp_path):
    tiny_config.update(data_dir=str(tmp_path / "does_not_matter"), epochs=30, time_budget_minutes=10.0)
    tiny_config.cnn.global_pool = True
    tiny_config.progressive.update(start_scale=0.5, stages=4, stage_epochs=5)
    with pytest.raises(UserError, match="stage_epochs is for the time budget to set"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "w"))


@pytest.mark.slow
def test_progressive_run_trains_small_then_full_size(tiny_config, two_class_dir, tmp_path):
    tiny_config.update(data_dir=str(two_class_dir), epochs=2)
    tiny_config.cnn.global_pool = True
    tiny_config.progressive.update(start_scale=0.5, stages=2)
    records = train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert [r["train_image_size"] for r in records] == [8, 16]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in records)


@pytest.mark.slow
def test_run_validating_every_other_epoch_keeps_the_best_of_those_and_resumes(tiny_config, two_class_dir,
                                                                             tmp_path, caplog):
    tiny_config.update(data_dir=str(two_class_dir), epochs=3, validate_every=2)
    workdir = tmp_path / "w"
    caplog.set_level("INFO")
    records = train.train_and_evaluate(tiny_config, str(workdir))
    assert [("val_accuracy" in r, "val_loss" in r) for r in records] == [(False, False), (True, True), (True, True)]
    assert "epoch 1/3" in caplog.text and "not validated" in caplog.text
    assert (workdir / "training_curves.png").is_file()
    csv_rows = (workdir / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and csv_rows[1].split(",")[5] == ""  # Epoch 1's val_accuracy cell is empty.
    checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), read_only=True)
    best_epoch = 2 if records[1]["val_accuracy"] > records[2]["val_accuracy"] else 3
    assert checkpointer.best_step() == best_epoch * (48 // 8)

    # Resumed for one more epoch with validate_every 5: epoch 4 is validated only because it is the last,
    # and epochs 1-3 are not trained again.
    tiny_config.update(epochs=4, validate_every=5)
    resumed = train.train_and_evaluate(tiny_config, str(workdir))
    assert resumed[:3] == records and resumed[3]["epoch"] == 4 and "val_accuracy" in resumed[3]


@pytest.mark.slow
def test_checkpoints_are_saved_when_an_epoch_may_be_the_best_when_due_and_at_the_end(
        tiny_config, two_class_dir, tmp_path, monkeypatch):
    tiny_config.update(data_dir=str(two_class_dir), epochs=7, validate_every=1, checkpoint_every_minutes=60.0)
    scripted_accuracy = iter([0.6, 0.5, 0.7, 0.7, 0.4, 0.3, 0.2])
    monkeypatch.setattr(trainer, "evaluate_batches",
                        lambda *args, **kwargs: {"loss": 1.0, "accuracy": next(scripted_accuracy)})
    saved = []
    real_save = checkpointing.Checkpointer.save

    def spy_save(self, step, state, meta, metrics):
        saved.append(meta["epoch"])
        real_save(self, step, state, meta, metrics)

    monkeypatch.setattr(checkpointing.Checkpointer, "save", spy_save)
    train.train_and_evaluate(tiny_config, str(tmp_path / "hourly"))
    # Epochs at least as good as every earlier one (a tie may be the best: the later wins), and the last; the
    # hour between time-due saves never passes.
    assert saved == [1, 3, 4, 7]
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "hourly" / "checkpoints"), read_only=True)
    assert checkpointer.best_step() == 4 * (48 // 8)

    saved.clear()
    scripted_accuracy = iter([0.6, 0.5, 0.7, 0.7, 0.4, 0.3, 0.2])
    tiny_config.checkpoint_every_minutes = 0.0  # Due after every epoch.
    train.train_and_evaluate(tiny_config, str(tmp_path / "every"))
    assert saved == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.slow
@pytest.mark.parametrize("keep_epoch, kept", [("best", 1), ("last", 3)])
def test_the_kept_epoch_is_what_evaluate_and_the_report_use(tiny_config, two_class_dir, tmp_path, monkeypatch,
                                                           keep_epoch, kept):
    tiny_config.update(data_dir=str(two_class_dir), epochs=3, validate_every=1, keep_epoch=keep_epoch)
    scripted_accuracy = iter([0.9, 0.5, 0.6])
    monkeypatch.setattr(trainer, "evaluate_batches",
                        lambda *args, **kwargs: {"loss": 1.0, "accuracy": next(scripted_accuracy)})
    workdir = str(tmp_path / "w")
    scorers = []  # One per validated epoch, in order.
    result = trainer.fit(tiny_config, workdir, scorer_factory=lambda: scorers.append(mock.Mock()) or scorers[-1])
    assert len(scorers) == 3 and result.kept_scorer is scorers[kept - 1]
    assert (result.kept_epoch, result.kept_step) == (kept, kept * (48 // 8))
    monkeypatch.undo()  # Evaluate scores for real.

    assert inference.load_run(workdir).epoch == kept
    assert inference.load_run(workdir, "best").epoch == 1 and inference.load_run(workdir, "latest").epoch == 3
    report = evaluate.evaluate(workdir, data_dir=str(two_class_dir), split="validation")
    assert (report["epoch"], report["checkpoint"]) == (kept, {"best": "best", "last": "latest"}[keep_epoch])
    assert run_report.score_checkpoint(workdir).epoch == kept


def test_keep_epoch_must_be_best_or_last(tiny_config):
    tiny_config.keep_epoch = "final"
    with pytest.raises(UserError, match="keep_epoch must be one of best, last"):
        config_lib.validate(tiny_config)


def _train_slower_than_timed(tiny_config, two_class_dir, tmp_path, caplog, monkeypatch):
    """Trains at most 12 epochs in two progressive stages within a minute, the train step timed at a
    microsecond: the budget plans all 12, which epochs 2-4 show cannot fit. Returns the records and the work
    directory. The first check reads epochs 2-4 alone (time_budget.MIN_PACED_SECONDS off: its window is
    tested in test_time_budget.py), as it does for epochs of seconds."""
    monkeypatch.setattr(trainer, "time_call", lambda call, state, batch, calls, clock=None: (state, 1e-6))
    monkeypatch.setattr(time_budget, "MIN_PACED_SECONDS", 0.0)
    tiny_config.update(data_dir=str(two_class_dir), epochs=12, time_budget_minutes=1.0, validate_every=100,
                       lr_schedule="cosine", warmup_epochs=1.0)
    tiny_config.cnn.global_pool = True
    tiny_config.progressive.update(start_scale=0.5, stages=2)
    workdir = tmp_path / "w"
    caplog.set_level("INFO")
    return train.train_and_evaluate(tiny_config, str(workdir)), workdir


@pytest.mark.slow
def test_a_run_slower_than_its_timing_is_re_planned_after_epoch_4_and_before_its_last_stage(
        tiny_config, two_class_dir, tmp_path, caplog, monkeypatch):
    # Steps timed at a microsecond: the plan is all 12 epochs, which epochs 2-4 show cannot fit in a minute,
    # and then the last stage neither.
    schedules = {}  # id of each optimizer made -> (the optimizer, its learning-rate schedule)
    make_optimizer, step = train_state.create_optimizer, steps.train_step

    def spy_optimizer(config, learning_rate_fn):
        tx = make_optimizer(config, learning_rate_fn)
        schedules[id(tx)] = (tx, learning_rate_fn)
        return tx

    traced = []  # (image size, schedule of the state's optimizer) for each trace of the train step

    def spy_step(state, batch, **kwargs):
        traced.append((kwargs["image_size"], schedules[id(state.tx)][1]))
        return step(state, batch, **kwargs)

    monkeypatch.setattr(trainer, "create_optimizer", spy_optimizer)
    monkeypatch.setattr(trainer, "train_step", spy_step)
    records, workdir = _train_slower_than_timed(tiny_config, two_class_dir, tmp_path, caplog, monkeypatch)
    assert "Time budget 1.0 min: 12 epoch(s)" in caplog.text
    # 8 is the fewest that keeps epochs 1-4 in the first (8 px) stage.
    assert "(counting 50% of the lag: the last stage is checked again before it starts); re-planned to 8 " \
           "epochs (was 12)" in caplog.text
    # Epochs 1-4 were the stage before the last: far slower than timed, so the last stage keeps one epoch.
    assert "the last stage shortened to 1 epoch(s) (was 4), 5 in all" in caplog.text
    assert [r["train_image_size"] for r in records] == [8] * 4 + [16]
    saved = json.loads((workdir / "config.json").read_text())
    assert (saved["epochs"], saved["progressive"]["stage_epochs"]) == (5, 4)
    # The learning rate follows the last plan's cosine to zero, not the 12 epochs' one, which would still
    # be at about 0.7 of its peak after epoch 5.
    assert records[-1]["learning_rate"] < 0.05 * tiny_config.learning_rate
    assert records[3]["learning_rate"] > 0.5 * tiny_config.learning_rate
    # And so does the optimizer the steps use: epochs 1-4 (8 px) ran on the 12-epoch schedule, epoch 5
    # (16 px) on one that reaches zero after 5 epochs.
    steps_per_epoch = records[0]["step"]
    assert [size for size, _ in traced] == [8, 16]
    (_, before), (_, after) = traced
    assert float(before(5 * steps_per_epoch)) > 0.6 * tiny_config.learning_rate
    assert float(after(5 * steps_per_epoch)) == 0.0

    # A resume keeps both: the 5 epochs and the stages' lengths.
    tiny_config.time_budget_minutes = 60.0
    assert train.train_and_evaluate(tiny_config, str(workdir)) == records
    assert "keeps the 5 epochs it planned" in caplog.text


@pytest.mark.slow
def test_the_check_before_the_last_stage_can_give_back_what_the_first_check_cut(
        tiny_config, two_class_dir, tmp_path, caplog, monkeypatch):
    # As above, epochs 2-4 cut the plan of 12 to 8; then the stage before the last is found on time (a stub
    # of fit_last_stage, which the test above and its own test cover), so the last stage grows back to 12.
    asked = []

    def on_time(config, seconds_left, pace, estimate, most_epochs=None):
        asked.append((config.epochs, most_epochs))
        return most_epochs

    monkeypatch.setattr(time_budget, "fit_last_stage", on_time)
    records, workdir = _train_slower_than_timed(tiny_config, two_class_dir, tmp_path, caplog, monkeypatch)
    assert "re-planned to 8 epochs (was 12)" in caplog.text
    assert asked == [(8, 12)]  # Up to the config's epochs.
    assert "the last stage lengthened to 8 epoch(s) (was 4), 12 in all, to use the budget" in caplog.text
    assert [r["train_image_size"] for r in records] == [8] * 4 + [16] * 8
    saved = json.loads((workdir / "config.json").read_text())
    assert (saved["epochs"], saved["progressive"]["stage_epochs"]) == (12, 4)
    # The learning rate goes on from where the 8-epoch plan left it after epoch 4 (3/7 of the way from the
    # warmup's end to zero: 0.61 of its peak), down to zero at the end of epoch 12 (a fresh 12-epoch cosine
    # would jump up to 0.71 of the peak instead).
    steps_per_epoch = records[0]["step"]
    eight_epochs = schedule.create_learning_rate_fn(schedule.planned_for(tiny_config, 8), steps_per_epoch)
    left_off = float(eight_epochs(4 * steps_per_epoch))
    assert left_off == pytest.approx(0.5 * (1 + np.cos(3 * np.pi / 7)) * tiny_config.learning_rate, rel=1e-4)
    rates = [r["learning_rate"] for r in records]  # Each epoch's last step's.
    into_last_stage = (steps_per_epoch - 1) / (8 * steps_per_epoch)
    assert rates[4] == pytest.approx(left_off * 0.5 * (1 + np.cos(np.pi * into_last_stage)), rel=1e-4)
    assert all(later < earlier for earlier, later in zip(rates[4:], rates[5:]))
    assert rates[-1] < 0.01 * tiny_config.learning_rate


@pytest.mark.slow
def test_time_budget_sets_the_epochs_and_a_resume_keeps_them(tiny_config, two_class_dir, tmp_path, caplog):
    tiny_config.update(data_dir=str(two_class_dir), epochs=6, time_budget_minutes=1e-4)
    tiny_config.cnn.global_pool = True
    tiny_config.progressive.update(start_scale=0.5, stages=2)
    workdir = tmp_path / "w"
    caplog.set_level("INFO")
    # A budget of 6 ms fits nothing: the run trains one epoch a stage, and says so.
    records = train.train_and_evaluate(tiny_config, str(workdir))
    assert [r["train_image_size"] for r in records] == [8, 16]
    assert "too short for even 2 epoch(s)" in caplog.text
    assert json.loads((workdir / "config.json").read_text())["epochs"] == 2
    assert tiny_config.epochs == 6  # The caller's config is not changed.

    # Resumed with a budget that fits everything: the run keeps its plan of 2 and has nothing left to do.
    tiny_config.time_budget_minutes = 60.0
    assert train.train_and_evaluate(tiny_config, str(workdir)) == records
    assert "keeps the 2 epochs it planned" in caplog.text


@pytest.mark.slow
def test_a_generous_time_budget_trains_every_epoch(tiny_config, two_class_dir, tmp_path):
    tiny_config.update(data_dir=str(two_class_dir), epochs=3, time_budget_minutes=60.0)
    records = train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert [r["epoch"] for r in records] == [1, 2, 3]


@pytest.mark.slow
def test_two_epoch_run_writes_every_output_then_resumes(tiny_config, two_class_dir, tmp_path, caplog):
    tiny_config.data_dir = str(two_class_dir)
    workdir = tmp_path / "work"
    records = train.train_and_evaluate(tiny_config, str(workdir))
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(set(REQUIRED_KEYS) <= set(r) for r in records)
    assert records[-1]["step"] == 2 * (48 // 8)
    assert records[-1]["val_accuracy"] >= 0.9  # The generated classes are easy.
    for name in ("config.json", "classes.json", "metrics.jsonl", "metrics.csv", "training_curves.png"):
        assert (workdir / name).is_file(), name
    assert json.loads((workdir / "classes.json").read_text()) == ["cats", "dogs"]
    assert json.loads((workdir / "config.json").read_text())["data_dir"] == str(two_class_dir)

    tiny_config.epochs = 3
    tiny_config.checkpoints_to_keep += 1  # Not part of the recipe: no reason to warn.
    caplog.set_level("INFO")
    records = train.train_and_evaluate(tiny_config, str(workdir))
    assert "Resuming from the checkpoint of epoch 2" in caplog.text
    warning = next(r.getMessage() for r in caplog.records if "started with another config" in r.getMessage())
    assert "epochs: 2 -> 3" in warning and "checkpoints_to_keep" not in warning
    assert "without changing what it trains: checkpoints_to_keep" in caplog.text
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert len((workdir / "metrics.csv").read_text().splitlines()) == 4
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 18


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tiny_config, two_class_dir, tmp_path, monkeypatch, caplog):
    tiny_config.update(data_dir=str(two_class_dir), epochs=3, lr_schedule="cosine", warmup_epochs=0.5,
                       checkpoint_every_minutes=0.0)  # Epoch 2 saved, whatever its accuracy.
    tiny_config.cnn.dropout = 0.2
    tiny_config.augment.update(enabled=True, flip=True, crop_area_min=0.6)
    train.train_and_evaluate(tiny_config, str(tmp_path / "straight"))

    real_batches = input_pipeline.train_batches

    def interrupt_in_epoch_3(*args, **kwargs):
        if args[4] == 3:
            raise KeyboardInterrupt
        return real_batches(*args, **kwargs)

    monkeypatch.setattr(input_pipeline, "train_batches", interrupt_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
    assert [r["epoch"] for r in read_metrics(str(tmp_path / "resumed"))] == [1, 2]
    monkeypatch.setattr(input_pipeline, "train_batches", real_batches)
    caplog.set_level("INFO")
    train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
    assert "Resuming from the checkpoint of epoch 2" in caplog.text
    assert "another config" not in caplog.text  # The same config: nothing to warn about.

    def final_params(name):
        config_state = fresh_state(tiny_config, 1)
        from imgclf_jax.checkpointing import Checkpointer

        restored, _, _ = Checkpointer(str(tmp_path / name / "checkpoints"), read_only=True).restore(config_state)
        return restored.params

    for a, b in zip(jax.tree_util.tree_leaves(final_params("straight")),
                    jax.tree_util.tree_leaves(final_params("resumed"))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    straight = read_metrics(str(tmp_path / "straight"))
    resumed = read_metrics(str(tmp_path / "resumed"))
    assert [r["val_loss"] for r in straight] == pytest.approx([r["val_loss"] for r in resumed], rel=1e-6)


@pytest.mark.slow
def test_three_classes_use_softmax_and_a_held_out_split(tiny_config, flat_three_class_dir, tmp_path):
    tiny_config.update(data_dir=str(flat_three_class_dir), epochs=1, validation_split=0.2)
    records = train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert len(records) == 1 and 0.0 <= records[0]["val_accuracy"] <= 1.0
    assert json.loads((tmp_path / "w" / "classes.json").read_text()) == ["a", "b", "c"]


@pytest.mark.slow
def test_a_run_without_validation_keeps_its_last_epoch_and_reports_on_test_photos(tiny_config, tmp_path, caplog):
    data = tmp_path / "d"
    make_class_folder(data / "train", {"cats": 24, "dogs": 24})
    make_class_folder(data / "test", {"cats": 5, "dogs": 5}, start=100)
    tiny_config.update(data_dir=str(data), epochs=3, report=True, early_stopping_share=0.5,
                       min_photos_per_class_to_hold_out=25)
    caplog.set_level("INFO")
    records = train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert [r["epoch"] for r in records] == [1, 2, 3] and not any("val_accuracy" in r for r in records)
    assert "48 training and 0 validation images" in caplog.text
    assert "No validation photos: the last epoch (3) is kept" in caplog.text
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "w" / "checkpoints"), read_only=True)
    assert checkpointer.restore(fresh_state(tiny_config, 1), "best")[2] == 3 * (48 // 8)  # The last epoch's step.
    page = (tmp_path / "w" / "report.html").read_text()
    assert "test accuracy</h1>" in page and "<b>10</b><span>test images</span>" in page
    assert "validation accuracy" not in page
    assert (tmp_path / "w" / "training_curves.png").is_file()


@pytest.mark.slow
def test_a_run_without_validation_or_test_photos_says_why_it_has_no_report(tiny_config, two_class_dir, tmp_path,
                                                                            caplog):
    flat = two_class_dir / "train"  # Class folders alone: nothing but the training photos.
    tiny_config.update(data_dir=str(flat), epochs=1, report=True, validation_split=0.0)
    caplog.set_level("INFO")
    records = train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert len(records) == 1 and "val_accuracy" not in records[0]
    assert "No run report:" in caplog.text and "neither a validation nor a test split" in caplog.text
    assert not (tmp_path / "w" / "report.html").exists()


@pytest.mark.slow
@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs must be a positive"),
    ("batch_size", -4, "batch_size must be a positive"),
    ("image_size", 0, "image_size must be a positive"),
    ("learning_rate", -0.1, "learning_rate must be a non-negative"),
    ("time_budget_minutes", -1.0, "time_budget_minutes must be a non-negative"),
    ("time_budget_minutes", float("nan"), "time_budget_minutes must be a non-negative"),
    ("checkpoint_every_minutes", -0.5, "checkpoint_every_minutes must be a non-negative"),
    ("auto_time_budget.seconds_per_image", -0.1, "auto_time_budget.seconds_per_image must be a non-negative"),
    ("auto_time_budget.min_minutes", 30.0, r"auto_time_budget.min_minutes \(30.0\) is above"),
    ("early_stopping_share", 1.0, r"early_stopping_share must be in \[0, 1\)"),
    ("resize", "stretch", "resize must be"),
    ("mix.mixup_alpha", -1.0, "mix.mixup_alpha must be >= 0"),
    ("mix.prob", 1.5, r"mix.prob must be in \[0, 1\]"),
    ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"),
    ("validate_every", 0, "validate_every must be a positive"),
    ("validation_split", 1.0, r"validation_split must be in \[0, 1\)"),
    ("min_photos_per_class_to_hold_out", -1, "min_photos_per_class_to_hold_out must be a non-negative"),
    ("augment.trivial_augment_max_photos_per_class", -5,
     "augment.trivial_augment_max_photos_per_class must be a non-negative"),
    ("optimizer", "lamb", "optimizer must be 'adam' or 'sgd'"),
    ("momentum", 1.0, r"momentum must be in \[0, 1\)"),
    ("progressive.start_scale", 1.5, r"progressive.start_scale must be in \[0, 1\]"),
    ("progressive.start_scale", 0.5, "needs a model that pools globally"),
])
def test_bad_config_values_are_refused_before_reading_data(tiny_config, tmp_path, field, value, message):
    tiny_config.data_dir = str(tmp_path / "does_not_matter")
    target, _, name = field.rpartition(".")
    setattr(tiny_config[target] if target else tiny_config, name, value)
    with pytest.raises(UserError, match=message):
        train.train_and_evaluate(tiny_config, str(tmp_path / "w"))


@pytest.mark.slow
def test_batch_larger_than_training_set_is_refused(tiny_config, two_class_dir, tmp_path):
    tiny_config.update(data_dir=str(two_class_dir), batch_size=64)
    with pytest.raises(UserError, match="batch_size 64 is larger than the training set \\(48 images\\)"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "w"))


@pytest.mark.slow
def test_workdir_of_other_classes_is_refused(tiny_config, two_class_dir, tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "classes.json").write_text('["apples", "pears"]')
    tiny_config.data_dir = str(two_class_dir)
    with pytest.raises(UserError, match="trained on classes \\['apples', 'pears'\\]"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "w"))


@pytest.mark.slow
def test_unusable_files_are_skipped_named_or_fatal_with_strict(tiny_config, two_class_dir, tmp_path):
    from helpers import png_bomb_bytes

    train_dir = two_class_dir / "train"
    (train_dir / "cats" / "page.jpg").write_text("<!DOCTYPE html><html>Access denied</html>")
    (train_dir / "dogs" / "empty.jpg").write_bytes(b"")
    (train_dir / "dogs" / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    good = (train_dir / "cats" / "img_0.jpg").read_bytes()
    (train_dir / "cats" / "cut.jpg").write_bytes(good[:200])
    (train_dir / "dogs" / "bomb.png").write_bytes(png_bomb_bytes())
    tiny_config.update(data_dir=str(two_class_dir), epochs=1)
    records = train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert len(records) == 1
    listed = dict(line.split("\t") for line in (tmp_path / "w" / "skipped_files.txt").read_text().splitlines())
    assert {p.rsplit("/", 1)[1] for p in listed} == {"page.jpg", "empty.jpg", "noise.png", "cut.jpg", "bomb.png"}
    assert "HTML" in listed[str(train_dir / "cats" / "page.jpg")]
    assert "above the limit" in listed[str(train_dir / "dogs" / "bomb.png")]
    tiny_config.strict = True
    with pytest.raises(UserError, match="5 unusable file\\(s\\) and --strict is set"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "w2"))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, two_class_dir, tmp_path):
    tiny_config.update(data_dir=str(two_class_dir), epochs=1)
    workdir = str(tmp_path / "w")
    train.train_and_evaluate(tiny_config, workdir)
    tiny_config.update(epochs=3, learning_rate=1e38)  # Adam steps of ~1e38 overflow float32 at once.
    with pytest.raises(trainer.TrainingDiverged, match="at epoch 2, step \\d+; stopped without saving"):
        train.train_and_evaluate(tiny_config, workdir)
    assert [r["epoch"] for r in read_metrics(workdir)] == [1]
    from imgclf_jax.checkpointing import Checkpointer

    assert Checkpointer(str(tmp_path / "w" / "checkpoints"), read_only=True).latest_step() == 48 // 8


@pytest.mark.slow
def test_sigkill_then_the_same_command_ends_like_an_uninterrupted_run(two_class_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from imgclf_jax import inference

    config_file = tmp_path / "kill_config.py"
    config_file.write_text(
        "from imgclf_jax import config_lib\n\n"
        "def get_config():\n"
        "    c = config_lib.base_config()\n"
        "    c.name = 'kill'\n"
        "    c.image_size, c.model, c.cnn.filters, c.cnn.dense_units = 24, 'cnn', (8, 16), 16\n"
        "    c.cnn.dropout, c.augment.enabled, c.augment.flip = 0.1, True, True\n"
        "    c.epochs, c.batch_size, c.learning_rate, c.lr_schedule = 6, 8, 2e-3, 'cosine'\n"
        "    c.report = False\n"
        "    return c\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

    def command(workdir):
        return [sys.executable, "-m", "imgclf_jax.train", "--config", str(config_file),
                "--data_dir", str(two_class_dir), "--workdir", str(workdir)]

    subprocess.run(command(tmp_path / "straight"), env=env, check=True, capture_output=True, timeout=600)

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(command(killed_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300

    def saved_steps():  # Orbax renames a checkpoint to its step number once it is complete.
        folder = killed_dir / "checkpoints"
        return [p for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []

    # An epoch's metrics are logged just before its checkpoint is saved: wait for both.
    while time.time() < deadline and (len(read_metrics(str(killed_dir))) < 2 or not saved_steps()):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    epochs_done = len(read_metrics(str(killed_dir)))
    assert 2 <= epochs_done < 6, "the run must be killed part-way"

    resumed = subprocess.run(command(killed_dir), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from the checkpoint of epoch" in resumed.stderr
    straight, again = read_metrics(str(tmp_path / "straight")), read_metrics(str(killed_dir))
    assert [r["epoch"] for r in again] == list(range(1, 7))
    assert [r["val_loss"] for r in again] == pytest.approx([r["val_loss"] for r in straight], rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(inference.load_run(str(tmp_path / "straight"), "latest").state.params),
                    jax.tree_util.tree_leaves(inference.load_run(str(killed_dir), "latest").state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _files_of(workdir):
    """Every file of a work directory with its bytes (the lock file aside)."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file() and p.name != ".imgclf.lock"}


@pytest.mark.slow
def test_a_refused_resume_leaves_the_work_directory_as_it_was(tiny_config, two_class_dir, tmp_path):
    tiny_config.update(data_dir=str(two_class_dir), epochs=1)
    workdir = tmp_path / "w"
    train.train_and_evaluate(tiny_config, str(workdir))
    before = _files_of(workdir)
    tiny_config.cnn.filters = (16, 16)
    with pytest.raises(UserError, match="saved by another model or optimizer \\(params.Conv_0.bias has shape"):
        train.train_and_evaluate(tiny_config, str(workdir))
    assert _files_of(workdir) == before


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_recovers_whole(tiny_config, two_class_dir, tmp_path):
    tiny_config.update(data_dir=str(two_class_dir), epochs=2, checkpoint_every_minutes=0.0)
    train.train_and_evaluate(tiny_config, str(tmp_path / "clean"))
    workdir = tmp_path / "w"
    train.train_and_evaluate(tiny_config, str(workdir))
    latest = workdir / "checkpoints" / "12"
    for f in (latest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    records = train.train_and_evaluate(tiny_config, str(workdir))  # Retrains epoch 2 from epoch 1's checkpoint.
    assert [r["epoch"] for r in records] == [1, 2]
    assert [p.name.split("-")[0] for p in (workdir / "damaged_checkpoints").iterdir()] == ["12"]
    resumed = inference.load_run(str(workdir), "latest")
    clean = inference.load_run(str(tmp_path / "clean"), "latest")
    assert resumed.step == 12
    for a, b in zip(jax.tree_util.tree_leaves(resumed.state.params), jax.tree_util.tree_leaves(clean.state.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_second_run_on_a_work_directory_in_use_is_refused(tiny_config, two_class_dir, tmp_path):
    from imgclf_jax.workdir import WorkdirLock

    tiny_config.update(data_dir=str(two_class_dir), epochs=1)
    workdir = tmp_path / "w"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom imgclf_jax.workdir import WorkdirLock\n"
         "with WorkdirLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n", str(workdir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="is in use by another training run"):
            train.train_and_evaluate(tiny_config, str(workdir))
    finally:
        holder.kill()
        holder.wait()
    assert not (workdir / "metrics.jsonl").exists()
    with WorkdirLock(str(workdir)):  # Released again by the refused run.
        pass


@pytest.mark.slow
def test_a_non_finite_validation_loss_stops_the_run_without_saving_the_epoch(tiny_config, two_class_dir, tmp_path,
                                                                             monkeypatch):
    tiny_config.update(data_dir=str(two_class_dir), epochs=3)
    real_evaluate = trainer.evaluate_batches
    calls = []

    def nan_on_second(*args, **kwargs):
        calls.append(1)
        result = real_evaluate(*args, **kwargs)
        return {**result, "loss": float("nan")} if len(calls) == 2 else result

    monkeypatch.setattr(trainer, "evaluate_batches", nan_on_second)
    with pytest.raises(trainer.TrainingDiverged, match="validation loss became nan at epoch 2"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert [r["epoch"] for r in read_metrics(str(tmp_path / "w"))] == [1]
    from imgclf_jax.checkpointing import Checkpointer

    assert Checkpointer(str(tmp_path / "w" / "checkpoints"), read_only=True).all_steps() == [6]


def test_metrics_files_hold_null_not_nan(tmp_path):
    from imgclf_jax.metrics import MetricsLog

    (tmp_path / "w").mkdir()
    MetricsLog(str(tmp_path / "w")).append({"epoch": 1, "step": 3, "train_loss": float("inf"),
                                            "val_loss": float("nan"), "val_accuracy": 0.5})
    line = (tmp_path / "w" / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name}")) == {
        "epoch": 1, "step": 3, "train_loss": None, "val_loss": None, "val_accuracy": 0.5}


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["file", "read_only_checkpoints"])
def test_a_work_directory_that_cannot_be_written_is_refused_before_training(tiny_config, two_class_dir, tmp_path,
                                                                           monkeypatch, problem):
    tiny_config.update(data_dir=str(two_class_dir), epochs=1)
    workdir = tmp_path / "w"
    if problem == "file":
        workdir.write_text("not a folder")
        with pytest.raises(UserError, match="is a file, not a folder"):
            train.train_and_evaluate(tiny_config, str(workdir))
        return
    (workdir / "checkpoints").mkdir(parents=True)
    real = tempfile.NamedTemporaryFile

    def refuse_in_checkpoints(*args, dir=None, **kwargs):
        if dir and dir.endswith("checkpoints"):
            raise PermissionError(13, "Permission denied", dir)
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse_in_checkpoints)
    with pytest.raises(UserError, match="cannot write in the work directory .*Permission denied"):
        train.train_and_evaluate(tiny_config, str(workdir))


@pytest.mark.slow
def test_a_work_directory_inside_the_data_folder_is_refused(tiny_config, flat_three_class_dir):
    tiny_config.update(data_dir=str(flat_three_class_dir), epochs=1)
    with pytest.raises(UserError, match="is inside the data folder"):
        train.train_and_evaluate(tiny_config, str(flat_three_class_dir / "checkpoints" / "run"))
    assert not (flat_three_class_dir / "checkpoints").exists()


@pytest.mark.slow
def test_the_demo_trains_to_the_losses_pinned_before_the_loop_was_split_into_modules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # The demo writes its digits to ./data.
    config = recipes.load_config_file("demo")
    config.epochs, config.report = 2, False
    records = train.train_and_evaluate(config, str(tmp_path / "w"))
    # The same two epochs with the code of b362441 (one train.py) on a 2-core AMD EPYC: bit for bit there.
    # Other CPUs round floats differently (AVX-512, another BLAS), and so do the native kernels' Winograd
    # F(4x4, 3x3) convolutions (0.2% on the second validation loss); a change of behaviour (data order,
    # augmentation draws, the schedule) moves these by percents, far beyond the tolerance.
    assert [r["train_loss"] for r in records] == pytest.approx([1.425199270248413, 0.36461812257766724], rel=5e-3)
    assert [r["val_loss"] for r in records] == pytest.approx([0.35461063504551116, 0.21554521664271448], rel=5e-3)


@pytest.mark.slow
def test_a_run_stops_early_when_validation_stops_improving_and_a_rerun_has_nothing_to_do(
        tiny_config, two_class_dir, tmp_path, caplog):
    # A learning rate of 0 leaves the weights, so validation never improves after the first epoch.
    tiny_config.update(data_dir=str(two_class_dir), epochs=40, learning_rate=0.0, early_stopping_share=0.1)
    workdir = tmp_path / "w"
    caplog.set_level("INFO")
    records = train.train_and_evaluate(tiny_config, str(workdir))
    # The patience is 10% of 40 epochs, but at least 5: epochs 2-6 do not improve on epoch 1.
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["stopped_early"] is True and not any("stopped_early" in r for r in records[:-1])
    assert "Early stopping: no better validation for 5 epochs" in caplog.text
    assert "the run ends after epoch 6 instead of 40" in caplog.text
    assert checkpointing.Checkpointer(str(workdir / "checkpoints")).latest_step() == records[-1]["step"]

    caplog.clear()
    assert train.train_and_evaluate(tiny_config, str(workdir)) == records
    assert "stopped early at epoch 6" in caplog.text and "nothing to do" in caplog.text


def test_early_stopping_waits_for_the_last_progressive_stage(tiny_config):
    tiny_config.update(epochs=40, early_stopping_share=0.1)
    validated = {"val_accuracy": 0.5}
    # Without stages: once 5 epochs (10% of 40, at least 5) have passed since the last improvement.
    assert not trainer._stops_early(tiny_config, validated, 5, 1) and trainer._stops_early(tiny_config, validated, 6, 1)
    # With four stages of 10 epochs, not before epoch 31, the first of the last stage; then as without.
    tiny_config.progressive.update(start_scale=0.5, stages=4)
    assert not any(trainer._stops_early(tiny_config, validated, epoch, 1) for epoch in range(2, 31))
    assert trainer._stops_early(tiny_config, validated, 31, 1)
    assert not trainer._stops_early(tiny_config, validated, 31, 27)  # Improved 4 epochs ago: patience holds.
    assert not trainer._stops_early(tiny_config, {}, 35, 1)  # An epoch without validation never stops a run.
    tiny_config.update(epochs=36)  # Once early stopping has shortened the last stage (schedule.cooldown_plan),
    tiny_config.progressive.stage_epochs = 10
    assert not any(trainer._stops_early(tiny_config, validated, epoch, 1) for epoch in range(32, 37))  # it is over.


@pytest.mark.slow
def test_early_stopping_in_the_last_stage_trains_half_a_stage_more(tiny_config, two_class_dir, tmp_path, caplog):
    tiny_config.update(data_dir=str(two_class_dir), epochs=20, learning_rate=0.0, early_stopping_share=0.1,
                       image_size=16)
    tiny_config.cnn.global_pool = True  # As progressive resizing needs.
    tiny_config.progressive.update(start_scale=0.5, stages=4)  # Stages of 5 epochs; the last from epoch 16.
    workdir = tmp_path / "w"
    caplog.set_level("INFO")
    records = train.train_and_evaluate(tiny_config, str(workdir))
    # Validation never improves after epoch 1; early stopping waits for epoch 16, then ends the stage 3 epochs on.
    assert [r["epoch"] for r in records] == list(range(1, 20))
    assert records[-1]["stopped_early"] is True and not any("stopped_early" in r for r in records[:-1])
    assert "the run ends after epoch 19 instead of 20" in caplog.text
    saved = json.loads((workdir / "config.json").read_text())
    assert (saved["epochs"], saved["progressive"]["stage_epochs"]) == (19, 5)  # A resume keeps the shorter plan.
    caplog.clear()
    assert train.train_and_evaluate(tiny_config, str(workdir)) == records
    assert "nothing to do" in caplog.text


@pytest.mark.slow
def test_training_improving_runs_every_epoch_with_early_stopping_on(tiny_config, two_class_dir, tmp_path):
    tiny_config.update(data_dir=str(two_class_dir), epochs=3, early_stopping_share=0.5)
    records = train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert [r["epoch"] for r in records] == [1, 2, 3] and not any("stopped_early" in r for r in records)


@pytest.mark.slow
def test_a_budget_growing_with_the_data_is_stated_and_epochs_on_the_command_line_replace_it(
        two_class_dir, tmp_path, caplog):
    common = ["--data_dir", str(two_class_dir), "--config.image_size=16", "--config.model=cnn",
              "--config.cnn.filters=(8,16)", "--config.cnn.dense_units=16", "--config.report=False",
              "--config.progressive.start_scale=0", "--config.tta=none", "--config.ema_decay=0",
              "--batch_size", "8"]
    budgeted = subprocess.run(
        [sys.executable, "-m", "imgclf_jax.train", "--config", "default", "--workdir", str(tmp_path / "a"),
         "--config.epochs=2", *common], capture_output=True, text=True)
    assert budgeted.returncode == 0, budgeted.stderr
    # 48 training images at 0.45 s each are 0.4 minutes: the recipe's least, 5 minutes, applies.
    assert "Time budget: 5.0 min for 48 training images (0.45 s an image, within 5-20 min" in budgeted.stderr
    fixed = subprocess.run(
        [sys.executable, "-m", "imgclf_jax.train", "--config", "default", "--workdir", str(tmp_path / "b"),
         "--epochs", "3", *common], capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stderr
    assert "Time budget" not in fixed.stderr
    assert [r["epoch"] for r in read_metrics(str(tmp_path / "b"))] == [1, 2, 3]
    both = subprocess.run(
        [sys.executable, "-m", "imgclf_jax.train", "--config", "default", "--workdir", str(tmp_path / "c"),
         "--epochs", "3", "--time_budget_minutes", "5", *common], capture_output=True, text=True)
    assert both.returncode == 2 and "give one of them" in both.stderr


@pytest.mark.slow
def test_the_run_adapts_to_its_photos_and_keeps_what_trained(tiny_config, two_class_dir, tmp_path, caplog):
    # The generated photos are 24x20: below the floor of 64 px, so the run trains at 64 instead of 96; and 24
    # photos a class are more than the TrivialAugment limit of 20 set here.
    tiny_config.update(data_dir=str(two_class_dir), image_size=96, image_size_from_photos=True, epochs=1)
    tiny_config.augment.update(enabled=True, trivial_augment=True, trivial_augment_max_photos_per_class=20)
    caplog.set_level("INFO")
    train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    saved = json.loads((tmp_path / "w" / "config.json").read_text())
    assert (saved["image_size"], saved["augment"]["trivial_augment"]) == (64, False)
    assert "Image size: 64 px, the training photos' median shorter side (20 px), instead of 96" in caplog.text
    assert "TrivialAugment off: 24 training photos a class, more than" in caplog.text
    assert inference.load_run(str(tmp_path / "w")).config.image_size == 64


def test_an_unchanged_plan_reuses_the_optimizer_so_the_timed_steps_stay_compiled(tiny_config):
    tiny_config.lr_schedule = "cosine"
    run = trainer._Run(source=None, loss_kind="sigmoid", mesh=None, model=None, steps_per_epoch=5, rows=(0, 8),
                       train_images=None, val_images=None, train_step=None, eval_step=None)
    first = run.optimizer(tiny_config)
    assert run.optimizer(tiny_config.copy_and_resolve_references()) is first  # An equal config: the same objects.
    replanned = tiny_config.copy_and_resolve_references()
    replanned.epochs += 4
    assert run.optimizer(replanned)[1] is not first[1]
    assert run.optimizer(replanned)[0](9) > first[0](9)  # A longer cosine decays more slowly.


@pytest.mark.parametrize("flag_values, expected", [
    # (epochs, time_budget_minutes, image_size) -> (epochs, budget minutes for 1000 images, image_size_from_photos)
    ((None, None, None), (200, 7.5, True)),  # The recipe's own: a budget growing with the data.
    ((30, None, None), (30, 0.0, True)),  # Exactly 30 epochs, no budget.
    ((None, 12.0, None), (200, 12.0, True)),  # Another budget.
    ((None, 0.0, None), (200, 0.0, True)),  # No budget at all: the recipe's most epochs.
    ((None, None, 224), (200, 7.5, False)),  # The size asked for, whatever the photos' size.
])
def test_plain_flags_mean_what_they_say(flag_values, expected):
    import types

    epochs, minutes, size = flag_values
    values = types.SimpleNamespace(epochs=epochs, time_budget_minutes=minutes, image_size=size, data_dir="d",
                                   dataset=None, batch_size=None, learning_rate=None, seed=None, strict=None)
    config = recipes.load_config_file("default")
    train.apply_flags(config, values)
    assert (config.epochs, config_lib.time_budget_minutes(config, 1000), config.image_size_from_photos) == expected
    assert config.image_size == (size or 160)


def test_epochs_and_a_time_budget_together_are_refused():
    import types

    values = types.SimpleNamespace(epochs=3, time_budget_minutes=5.0, image_size=None)
    with pytest.raises(UserError, match="give one of them"):
        train.apply_flags(recipes.load_config_file("default"), values)
