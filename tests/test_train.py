"""The train step, evaluation counting, and whole runs with checkpoints, resume and outputs."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from conftest import fresh_state
from imgclf_jax import (augmentation, checkpointing, inference, input_pipeline, losses, mixing, schedule, steps,
                        time_budget, train, train_state, trainer)
from imgclf_jax.errors import UserError
from imgclf_jax.metrics import REQUIRED_KEYS, read_metrics


@pytest.mark.parametrize("loss_kind, num_classes", [("sigmoid", 2), ("softmax", 3)])
def test_train_step_lowers_the_loss_on_a_batch(tiny_config, loss_kind, num_classes):
    tiny_config.cnn.batch_norm = True
    tiny_config.cnn.dropout = 0.1
    state = fresh_state(tiny_config, losses.num_outputs(loss_kind, num_classes))
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(8, 16, 16, 3)).astype(np.float32),
             "label": (np.arange(8) % num_classes).astype(np.int32)}
    step = jax.jit(functools.partial(steps.train_step, loss_kind=loss_kind, label_smoothing=0.0),
                   donate_argnums=0)
    state, first = step(state, batch)
    for _ in range(30):
        state, last = step(state, batch)
    assert int(state.step) == 31
    assert float(last["loss"]) < 0.5 * float(first["loss"])
    assert float(last["accuracy"]) == 1.0


@pytest.mark.parametrize("loss_kind, num_classes", [("sigmoid", 2), ("softmax", 3)])
def test_mixed_train_step_loss_is_the_lam_weighted_loss_of_both_labels(tiny_config, loss_kind, num_classes):
    tiny_config.mix.update(mixup_alpha=0.4, cutmix_alpha=1.0)
    state = fresh_state(tiny_config, losses.num_outputs(loss_kind, num_classes))
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(8, 16, 16, 3)).astype(np.float32),
             "label": (np.arange(8) % num_classes).astype(np.int32)}
    step = jax.jit(functools.partial(steps.train_step, loss_kind=loss_kind, label_smoothing=0.1,
                                     mix_config=tiny_config.mix))
    _, reported = step(state, batch)

    # The same mix, recomputed from the step's key, scored with the untrained parameters.
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    mixed = mixing.mix_batch(jax.random.fold_in(dropout_key, steps._MIX_KEY_STREAM), batch["image"],
                             batch["label"], 0.4, 1.0, 1.0)
    assert 0.0 < float(mixed.lam) < 1.0
    logits, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, mixed.images,
                               train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key})
    expected = (float(mixed.lam) * losses.per_example_loss(logits, mixed.labels, loss_kind, 0.1)
                + (1 - float(mixed.lam)) * losses.per_example_loss(logits, mixed.partner_labels, loss_kind, 0.1))
    assert float(reported["loss"]) == pytest.approx(float(expected.mean()), rel=1e-5)

    plain = jax.jit(functools.partial(steps.train_step, loss_kind=loss_kind, label_smoothing=0.1))
    _, unmixed = plain(state, batch)
    assert float(unmixed["loss"]) != pytest.approx(float(reported["loss"]), rel=1e-3)


def test_train_step_trains_on_the_augmented_resized_batch(tiny_config):
    tiny_config.update(model="cnn")
    tiny_config.cnn.global_pool = True
    tiny_config.augment.update(enabled=True, flip=True, crop_area_min=0.5, brightness=0.1)
    state = fresh_state(tiny_config, 1)
    batch = {"image": np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
             "label": (np.arange(8) % 2).astype(np.int32)}
    step = jax.jit(functools.partial(steps.train_step, loss_kind="sigmoid", label_smoothing=0.0,
                                     augment_config=tiny_config.augment, image_size=8))
    _, reported = step(state, batch)

    # The same augmentation, recomputed from the step's key, scored with the untrained parameters.
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    images = augmentation.training_images(jax.random.fold_in(dropout_key, steps._AUGMENT_KEY_STREAM),
                                          batch["image"], tiny_config.augment, 8)
    assert images.shape == (8, 8, 8, 3)
    logits, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images,
                               train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key})
    expected = losses.per_example_loss(logits, batch["label"], "sigmoid").mean()
    assert float(reported["loss"]) == pytest.approx(float(expected), rel=1e-5)

    plain = jax.jit(functools.partial(steps.train_step, loss_kind="sigmoid", label_smoothing=0.0))
    _, unaugmented = plain(state, batch)
    assert float(unaugmented["loss"]) != pytest.approx(float(reported["loss"]), rel=1e-3)


def test_weight_average_follows_each_step_and_is_what_evaluation_uses(tiny_config):
    tiny_config.cnn.batch_norm = True
    tiny_config.ema_decay = 0.5
    state = fresh_state(tiny_config, 1)
    assert isinstance(state, train_state.EmaTrainState)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(8, 16, 16, 3)).astype(np.float32),
             "label": (np.arange(8) % 2).astype(np.int32)}
    step = jax.jit(functools.partial(steps.train_step, loss_kind="sigmoid", label_smoothing=0.0, ema_decay=0.5))
    average = {"params": state.params, "batch_stats": state.batch_stats}
    for n in range(1, 4):
        state, _ = step(state, batch)
        rate = min(0.5, (1 + n) / (10 + n))  # The step number after the update is n.
        average = jax.tree_util.tree_map(lambda a, x: rate * a + (1 - rate) * x, average,
                                         {"params": state.params, "batch_stats": state.batch_stats})
    for a, b in zip(jax.tree_util.tree_leaves(average), jax.tree_util.tree_leaves(state.ema)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(jax.tree_util.tree_leaves(state.ema["params"])[0],
                           jax.tree_util.tree_leaves(state.params)[0])

    evaluated = steps.eval_step(state, {**batch, "mask": np.ones(8, np.float32)}, "sigmoid")
    expected = state.apply_fn(state.ema, batch["image"], train=False)
    np.testing.assert_allclose(evaluated["logits"], expected, rtol=1e-5)


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


def test_progressive_resizing_stages(tiny_config):
    tiny_config.update(image_size=80, epochs=8)
    assert {schedule.train_image_size(tiny_config, e) for e in range(1, 9)} == {80}
    tiny_config.progressive.update(start_scale=0.6, stages=4)  # 48 px, then 58.7 and 69.3 px rounded.
    assert [schedule.train_image_size(tiny_config, e) for e in range(1, 9)] == [48, 48, 56, 56, 72, 72, 80, 80]
    tiny_config.progressive.stages = 1
    assert {schedule.train_image_size(tiny_config, e) for e in range(1, 9)} == {80}


def test_progressive_stages_of_set_length_leave_the_rest_to_the_last(tiny_config):
    tiny_config.update(image_size=64, epochs=35, validate_every=100)
    tiny_config.progressive.update(start_scale=0.5, stages=4)  # 32, 40, 56 and 64 px.
    assert schedule.last_stage_start(tiny_config) == 28  # Equal stages: epochs 28-35 are the last quarter.
    tiny_config.progressive.stage_epochs = 10  # As the time budget leaves a shortened last stage.
    assert [schedule.train_image_size(tiny_config, e) for e in range(1, 36)] == (
        [32] * 10 + [40] * 10 + [56] * 10 + [64] * 5)
    assert schedule.last_stage_start(tiny_config) == 31
    assert [e for e in range(1, 36) if schedule.validates_after(tiny_config, e)] == list(range(31, 36))  # And the last.
    tiny_config.progressive.start_scale = 0.0
    assert schedule.last_stage_start(tiny_config) is None


@pytest.mark.parametrize("stage_epochs", [-1, 10, 11])
def test_stage_epochs_must_leave_the_last_stage_an_epoch(tiny_config, tmp_path, stage_epochs):
    tiny_config.update(data_dir=str(tmp_path / "does_not_matter"), epochs=30)
    tiny_config.cnn.global_pool = True
    tiny_config.progressive.update(start_scale=0.5, stages=4, stage_epochs=stage_epochs)
    with pytest.raises(UserError, match="progressive.stage_epochs must be 0 .* of the 30 epochs"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "w"))


def test_stage_epochs_are_left_to_the_time_budget(tiny_config, tmp_path):
    tiny_config.update(data_dir=str(tmp_path / "does_not_matter"), epochs=30, time_budget_minutes=10.0)
    tiny_config.cnn.global_pool = True
    tiny_config.progressive.update(start_scale=0.5, stages=4, stage_epochs=5)
    with pytest.raises(UserError, match="stage_epochs is for the time budget to set"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "w"))


def test_progressive_run_trains_small_then_full_size(tiny_config, two_class_dir, tmp_path):
    tiny_config.update(data_dir=str(two_class_dir), epochs=2)
    tiny_config.cnn.global_pool = True
    tiny_config.progressive.update(start_scale=0.5, stages=2)
    records = train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert [r["train_image_size"] for r in records] == [8, 16]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in records)


def test_validate_every_skips_early_epochs_but_never_the_last_stage(tiny_config):
    tiny_config.update(epochs=8, validate_every=3)
    assert [e for e in range(1, 9) if schedule.validates_after(tiny_config, e)] == [3, 6, 8]
    tiny_config.progressive.update(start_scale=0.5, stages=4)  # The last stage is epochs 7 and 8.
    assert [e for e in range(1, 9) if schedule.validates_after(tiny_config, e)] == [3, 6, 7, 8]
    tiny_config.validate_every = 1
    assert all(schedule.validates_after(tiny_config, e) for e in range(1, 9))


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


def test_training_time_estimate_sums_each_epochs_steps_at_its_size_and_its_validation(tiny_config):
    tiny_config.update(epochs=8, validate_every=3, image_size=16)
    tiny_config.progressive.update(start_scale=0.5, stages=4)  # Stages of 8, 8, 16 and 16 px.
    step_seconds = {8: 1.0, 16: 2.0}
    # Epochs 1-4 at 8 px and 5-8 at 16 px, 10 steps each plus 0.5 s; validated after epochs 3 and 6 (every
    # third) and 7 and 8 (the last stage).
    assert time_budget.estimate_training_seconds(tiny_config, 8, step_seconds, 10, 0.5, 5.0) == pytest.approx(
        4 * 10.5 + 4 * 20.5 + 4 * 5.0)
    # Four epochs: one a stage; validated after epoch 3 and the last.
    assert time_budget.estimate_training_seconds(tiny_config, 4, step_seconds, 10, 0.0, 5.0) == pytest.approx(
        2 * 10.0 + 2 * 20.0 + 2 * 5.0)
    assert tiny_config.epochs == 8  # Estimating other epoch counts leaves the config alone.


def test_fit_epochs_keeps_whole_stages_and_never_goes_below_one(tiny_config):
    per_epoch = lambda epochs: 10.0 * epochs
    tiny_config.update(epochs=30)
    assert time_budget.fit_epochs(tiny_config, 1000.0, per_epoch) == 30  # All of them fit.
    assert time_budget.fit_epochs(tiny_config, 125.0, per_epoch) == 12
    assert time_budget.fit_epochs(tiny_config, 5.0, per_epoch) == 1  # Nothing fits: the least there is.
    tiny_config.progressive.update(start_scale=0.5, stages=4)
    assert time_budget.fit_epochs(tiny_config, 125.0, per_epoch) == 12
    assert time_budget.fit_epochs(tiny_config, 119.0, per_epoch) == 8  # A multiple of the 4 stages.
    assert time_budget.fit_epochs(tiny_config, 5.0, per_epoch) == 4
    assert time_budget.fit_epochs(tiny_config, 300.0, per_epoch) == 30  # The most asked for, even if not a multiple.
    assert time_budget.fit_epochs(tiny_config, 299.0, per_epoch) == 28


def test_refit_epochs_cuts_the_plan_to_the_pace_of_real_epochs(tiny_config):
    one_second_an_epoch = lambda config, epochs, first_epoch=1, last_epoch=None: float(
        (epochs if last_epoch is None else last_epoch) - first_epoch + 1)
    tiny_config.update(epochs=40, image_size=64)
    tiny_config.progressive.update(start_scale=0.5, stages=4)  # 32, 40, 56 and 64 px.
    paced = range(2, 5)  # Epochs 2-4, estimated at 3 s.
    refit = lambda seconds_left, paced_seconds: time_budget.refit_epochs(
        tiny_config, seconds_left, paced, paced_seconds, one_second_an_epoch)
    # At the estimated pace epochs 5-40 need 36 s, plus the 5% margin.
    assert refit(100.0, 3.0) == 40
    # Twice as slow: 2 * 1.05 * (E - 4) s must fit in 60 s, so E = 32 (a multiple of the 4 stages).
    assert refit(60.0, 6.0) == 32
    # Faster than timed counts as on time: 1.05 * (E - 4) <= 30 gives 32, not 40.
    assert refit(30.0, 1.5) == 32
    # Nothing fits: the fewest epochs that keep epochs 1-4 in the first stage (they trained at 32 px).
    assert refit(1.0, 6.0) == 16
    tiny_config.progressive.start_scale = 0.0  # Without stages any count will do: 2.1 * (E - 4) <= 20.
    assert refit(20.0, 6.0) == 13
    # Counting half of the lag: 1.05 * 1.5 * (E - 4) <= 20 gives 16 (all of it, above: 13).
    assert time_budget.refit_epochs(tiny_config, 20.0, paced, 6.0, one_second_an_epoch, lag_share=0.5) == 16
    assert tiny_config.epochs == 40  # Left for the caller to change.


def test_fit_last_stage_shortens_the_last_stage_to_the_pace_of_the_one_before(tiny_config):
    tiny_config.update(epochs=40, image_size=64)
    tiny_config.progressive.update(start_scale=0.5, stages=4)  # Stages of 10 epochs; the last is 31-40.

    def one_second_an_epoch(config, epochs, first_epoch=1, last_epoch=None):
        # Shorter plans are estimated with the stages before the last kept at 10 epochs each.
        assert config.progressive.stage_epochs == 10 and first_epoch == 31
        return float((epochs if last_epoch is None else last_epoch) - first_epoch + 1)

    fit = lambda seconds_left, pace: time_budget.fit_last_stage(tiny_config, seconds_left, pace, one_second_an_epoch)
    assert fit(100.0, 1.0) == 40  # The plan fits: 1.05 * 10 s.
    assert fit(15.0, 2.0) == 37  # 2.1 s an epoch: 7 fit in 15 s.
    assert fit(5.0, 0.5) == 34  # Faster than timed counts as on time: 1.05 s an epoch.
    assert fit(0.1, 2.0) == 31  # Nothing fits: one epoch of the last stage.
    # Up to `most_epochs` (the config's most, of which the time budget planned 40), a last stage that fits
    # with time to spare is lengthened to the most epochs that fit.
    longer = lambda seconds_left, pace: time_budget.fit_last_stage(tiny_config, seconds_left, pace, one_second_an_epoch,
                                                             most_epochs=60)
    assert longer(21.0, 1.0) == 50  # 20 epochs of 1.05 s fit in 21 s.
    assert longer(1000.0, 1.0) == 60  # Never past most_epochs.
    assert longer(15.0, 2.0) == 37  # Short of time, it shortens as without.
    assert time_budget.fit_last_stage(tiny_config, 1000.0, 1.0, one_second_an_epoch, most_epochs=20) == 40
    assert tiny_config.epochs == 40 and tiny_config.progressive.stage_epochs == 0  # Left for the caller.


@pytest.mark.parametrize("epochs", [37, 50])
def test_a_re_planned_last_stage_keeps_the_learning_rate_continuous(tiny_config, epochs):
    # Stages of 10 epochs planned for 40; the time budget made the last stage 7 or 20 epochs long.
    tiny_config.update(lr_schedule="cosine", warmup_epochs=1.0, epochs=40, learning_rate=0.1)
    tiny_config.progressive.update(start_scale=0.5, stages=4)
    planned = schedule.create_learning_rate_fn(tiny_config, steps_per_epoch=10)
    tiny_config.update(epochs=epochs)
    tiny_config.progressive.stage_epochs = 10
    re_planned = schedule.create_learning_rate_fn(tiny_config, steps_per_epoch=10)
    for step in (0, 10, 150, 299, 300):  # The stages before the last: the plan they were trained under.
        assert float(re_planned(step)) == pytest.approx(float(planned(step)), rel=1e-6)
    # The last stage decays from there (about 0.15 of the peak) to zero at its own end, without a jump.
    assert float(re_planned(301)) == pytest.approx(float(planned(300)), rel=1e-3)
    halfway = 300 + (epochs - 30) * 5
    assert float(re_planned(halfway)) == pytest.approx(float(planned(300)) / 2, rel=1e-6)
    assert float(re_planned(epochs * 10)) == pytest.approx(0.0, abs=1e-9)


def _train_slower_than_timed(tiny_config, two_class_dir, tmp_path, caplog, monkeypatch):
    """Trains at most 12 epochs in two progressive stages within a minute, the train step timed at a
    microsecond: the budget plans all 12, which epochs 2-4 show cannot fit. Returns the records and the work
    directory."""
    monkeypatch.setattr(trainer, "time_call", lambda call, state, batch, calls, clock=None: (state, 1e-6))
    tiny_config.update(data_dir=str(two_class_dir), epochs=12, time_budget_minutes=1.0, validate_every=100,
                       lr_schedule="cosine", warmup_epochs=1.0)
    tiny_config.cnn.global_pool = True
    tiny_config.progressive.update(start_scale=0.5, stages=2)
    workdir = tmp_path / "w"
    caplog.set_level("INFO")
    return train.train_and_evaluate(tiny_config, str(workdir)), workdir


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


def test_a_generous_time_budget_trains_every_epoch(tiny_config, two_class_dir, tmp_path):
    tiny_config.update(data_dir=str(two_class_dir), epochs=3, time_budget_minutes=60.0)
    records = train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert [r["epoch"] for r in records] == [1, 2, 3]


def test_learning_rate_schedules(tiny_config):
    tiny_config.update(lr_schedule="cosine", warmup_epochs=1.0, epochs=4, learning_rate=0.1)
    lr = schedule.create_learning_rate_fn(tiny_config, steps_per_epoch=10)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(0.1)
    assert float(lr(25)) == pytest.approx(0.05, rel=1e-3) and float(lr(40)) == pytest.approx(0.0, abs=1e-7)
    tiny_config.update(lr_schedule="constant", warmup_epochs=0.0)
    assert float(schedule.create_learning_rate_fn(tiny_config, 10)(37)) == pytest.approx(0.1)


def test_sgd_step_is_nesterov_momentum_with_l2_on_weights_only(tiny_config):
    tiny_config.update(optimizer="sgd", momentum=0.9, weight_decay=0.01, learning_rate=0.1)
    optimizer = train_state.create_optimizer(tiny_config, schedule.create_learning_rate_fn(tiny_config, 10))
    params = {"kernel": np.full((2, 2), 2.0, np.float32), "bias": np.full((2,), 2.0, np.float32)}
    grads = {"kernel": np.full((2, 2), 0.5, np.float32), "bias": np.full((2,), 0.5, np.float32)}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    # First step: momentum buffer m = g (+ 0.01 * p for weights); Nesterov steps by lr * (g + 0.9 * m).
    np.testing.assert_allclose(updates["kernel"], -0.1 * 1.9 * (0.5 + 0.01 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], -0.1 * 1.9 * 0.5, rtol=1e-6)


def test_evaluation_counts_each_example_once_whatever_the_batch_size(tiny_config, two_class_dir):
    state = fresh_state(tiny_config, 1)
    source = input_pipeline.load_folder_source(str(two_class_dir), 0.2, 0, 16, 10**8)
    prepared = input_pipeline.prepare(source.splits["validation"], 16, "squash", cache=True)
    eval_fn = jax.jit(functools.partial(steps.eval_step, loss_kind="sigmoid"))
    results = [steps.evaluate_batches(eval_fn, state, input_pipeline.eval_batches(prepared, bs))
               for bs in (3, 16, 50)]
    assert all(r["num_examples"] == 16 for r in results)
    for r in results[1:]:
        assert r["accuracy"] == results[0]["accuracy"]
        assert r["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)


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


def test_three_classes_use_softmax_and_a_held_out_split(tiny_config, flat_three_class_dir, tmp_path):
    tiny_config.update(data_dir=str(flat_three_class_dir), epochs=1, validation_split=0.2)
    records = train.train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert len(records) == 1 and 0.0 <= records[0]["val_accuracy"] <= 1.0
    assert json.loads((tmp_path / "w" / "classes.json").read_text()) == ["a", "b", "c"]


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs must be a positive"),
    ("batch_size", -4, "batch_size must be a positive"),
    ("image_size", 0, "image_size must be a positive"),
    ("learning_rate", -0.1, "learning_rate must be a non-negative"),
    ("time_budget_minutes", -1.0, "time_budget_minutes must be a non-negative"),
    ("time_budget_minutes", float("nan"), "time_budget_minutes must be a non-negative"),
    ("checkpoint_every_minutes", -0.5, "checkpoint_every_minutes must be a non-negative"),
    ("resize", "stretch", "resize must be"),
    ("mix.mixup_alpha", -1.0, "mix.mixup_alpha must be >= 0"),
    ("mix.prob", 1.5, r"mix.prob must be in \[0, 1\]"),
    ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"),
    ("validate_every", 0, "validate_every must be a positive"),
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


def test_batch_larger_than_training_set_is_refused(tiny_config, two_class_dir, tmp_path):
    tiny_config.update(data_dir=str(two_class_dir), batch_size=64)
    with pytest.raises(UserError, match="batch_size 64 is larger than the training set \\(48 images\\)"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "w"))


def test_workdir_of_other_classes_is_refused(tiny_config, two_class_dir, tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "classes.json").write_text('["apples", "pears"]')
    tiny_config.data_dir = str(two_class_dir)
    with pytest.raises(UserError, match="trained on classes \\['apples', 'pears'\\]"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "w"))


def test_unusable_files_are_skipped_named_or_fatal_with_strict(tiny_config, two_class_dir, tmp_path):
    from conftest import png_bomb_bytes

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


def test_a_refused_resume_leaves_the_work_directory_as_it_was(tiny_config, two_class_dir, tmp_path):
    tiny_config.update(data_dir=str(two_class_dir), epochs=1)
    workdir = tmp_path / "w"
    train.train_and_evaluate(tiny_config, str(workdir))
    before = _files_of(workdir)
    tiny_config.cnn.filters = (16, 16)
    with pytest.raises(UserError, match="saved by another model or optimizer \\(params.Conv_0.bias has shape"):
        train.train_and_evaluate(tiny_config, str(workdir))
    assert _files_of(workdir) == before


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


def test_a_work_directory_inside_the_data_folder_is_refused(tiny_config, flat_three_class_dir):
    tiny_config.update(data_dir=str(flat_three_class_dir), epochs=1)
    with pytest.raises(UserError, match="is inside the data folder"):
        train.train_and_evaluate(tiny_config, str(flat_three_class_dir / "checkpoints" / "run"))
    assert not (flat_three_class_dir / "checkpoints").exists()
