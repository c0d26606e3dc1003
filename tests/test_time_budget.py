"""The time budget: the estimate, the plan and its checks, driven by a fake clock."""

from __future__ import annotations

import pytest

from imgclf_jax import time_budget


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


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _two_stage_config(tiny_config, epochs=12):
    tiny_config.update(epochs=epochs, validate_every=100, image_size=16)
    tiny_config.progressive.update(start_scale=0.5, stages=2)  # 8 px, then 16 px.
    return tiny_config


def _costs(step=1.0):
    # 10 steps an epoch: 10 s at 8 px, 20 s at 16 px; no validation cost.
    return time_budget.Costs({8: step, 16: 2 * step}, steps_per_epoch=10, epoch_extra_seconds=0.0,
                             validation_seconds=0.0)


def _run_epochs(budget, config, clock, first, last, seconds_each):
    """Epochs first..last, each taking `seconds_each` on the clock; the first re-plan after one, or None."""
    return _run_timed_epochs(budget, config, clock, first, [seconds_each] * (last - first + 1))


def _run_timed_epochs(budget, config, clock, first, durations):
    """Epochs from `first` on, taking `durations` seconds on the clock; the first re-plan after one, or None."""
    for epoch, seconds in enumerate(durations, start=first):
        budget.epoch_started(epoch)
        clock.now += seconds
        plan = budget.after_epoch(config, epoch)
        if plan:
            return epoch, plan
    return None


def test_the_plan_fits_the_budget_after_the_time_already_spent(tiny_config):
    config, clock = _two_stage_config(tiny_config), FakeClock()
    budget = time_budget.TimeBudget(minutes=10, run_start=0.0, clock=clock)
    clock.now = 60.0  # A minute of reading and timing before the plan.
    # 12 epochs cost 6 x 10 + 6 x 20 = 180 s (x1.05): they fit in the 525 s left.
    assert budget.plan(config, _costs()) == 12
    budget = time_budget.TimeBudget(minutes=3, run_start=0.0, clock=clock)
    # 105 s left: 4 epochs (2 + 2, 60 s x 1.05) fit; 6 (90 s x 1.05 = 94.5) too; 8 do not.
    assert budget.plan(config, _costs()) == 6


def test_epochs_on_time_keep_the_plan(tiny_config):
    config, clock = _two_stage_config(tiny_config), FakeClock()
    budget = time_budget.TimeBudget(minutes=10, run_start=0.0, clock=clock)
    config.epochs = budget.plan(config, _costs())
    assert _run_epochs(budget, config, clock, 1, 6, seconds_each=10.0) is None  # Each 8 px epoch as timed.


def test_slow_epochs_cut_the_plan_then_the_last_stage(tiny_config, caplog):
    caplog.set_level("INFO")
    config, clock = _two_stage_config(tiny_config), FakeClock()
    budget = time_budget.TimeBudget(minutes=4, run_start=0.0, clock=clock)
    config.epochs = budget.plan(config, _costs())  # 180 s x 1.05 fits in the 225 s left.
    assert config.epochs == 12
    # Epochs run at 3x their timing. After epoch 4 half of the lag is counted: 8 epochs (the fewest that keep
    # epochs 1-4 at 8 px), which then begin the last stage at once; at the full pace of epochs 1-4 only one
    # 16 px epoch fits in the 105 s left.
    assert _run_epochs(budget, config, clock, 1, 12, seconds_each=30.0) == (4, (5, 4))
    assert "counting 50% of the lag" in caplog.text and "re-planned to 8 epochs (was 12)" in caplog.text
    assert "the last stage shortened to 1 epoch(s) (was 4), 5 in all" in caplog.text


def test_a_stage_on_time_lengthens_the_last_stage_back_up_to_the_config(tiny_config, caplog):
    caplog.set_level("INFO")
    config, clock = _two_stage_config(tiny_config, epochs=16), FakeClock()
    config.progressive.stages = 4  # 8, 8, 16, 16 px.
    budget = time_budget.TimeBudget(minutes=6, run_start=0.0, clock=clock)
    config.epochs = budget.plan(config, _costs())
    assert config.epochs == 16
    # Epochs 1-4 lag 2.5x: the plan is cut (counting half the lag) ...
    epoch, (cut, stage_epochs) = _run_epochs(budget, config, clock, 1, 4, seconds_each=25.0)
    assert (epoch, stage_epochs) == (4, 0) and cut < 16
    config.epochs = cut
    # ... then the stage before the last runs faster than timed, so the last stage is lengthened (at most 16).
    epoch, (epochs, stage_epochs) = _run_epochs(budget, config, clock, 5, cut, seconds_each=10.0)
    assert epoch == 3 * cut // 4 and cut < epochs <= 16 and stage_epochs == cut // 4
    assert "the last stage lengthened" in caplog.text


def test_short_epochs_are_paced_over_enough_seconds_to_mean_something(tiny_config):
    config = _two_stage_config(tiny_config, epochs=40)  # 20 epochs at 8 px, then 20 at 16.
    # Epochs of 10 s: epochs 2-4 (30 s) are enough.
    assert time_budget.paced_epochs(config, _costs(step=1.0)) == range(2, 5)
    # Epochs of 0.5 s: 2-21 would make the 10 s, but the pace is read inside the first stage (2-20).
    assert time_budget.paced_epochs(config, _costs(step=0.05)) == range(2, 21)
    # Epochs of 2 s: 2-6.
    assert time_budget.paced_epochs(config, _costs(step=0.2)) == range(2, 7)
    config.epochs = 4  # Too short a plan for a check.
    assert time_budget.paced_epochs(config, _costs()) is None


def _run_with_a_blip(config, clock):
    """A 1-minute budget for 40 epochs of 0.5 s at 8 px and 1 s at 16 px (30 s x 1.05 fits in the 45 s left),
    whose epoch 2 takes 2 s longer than timed; the first re-plan, or None."""
    budget = time_budget.TimeBudget(minutes=1, run_start=0.0, clock=clock)
    config.epochs = budget.plan(config, _costs(step=0.05))
    assert config.epochs == 40
    return _run_timed_epochs(budget, config, clock, 1, [0.5, 2.5] + [0.5] * 18 + [1.0] * 20)


def test_a_blip_in_a_small_folders_first_epochs_does_not_cut_its_plan(tiny_config, monkeypatch):
    # Over the paced epochs 2-20 (11.5 s against 9.5 timed) the blip is a 1.2x pace, and the plan fits.
    assert _run_with_a_blip(_two_stage_config(tiny_config, epochs=40), FakeClock()) is None
    # Read over epochs 2-4 alone it would be a 2.3x pace, and cut the plan.
    monkeypatch.setattr(time_budget, "MIN_PACED_SECONDS", 0.0)
    assert _run_with_a_blip(_two_stage_config(tiny_config, epochs=40), FakeClock())[0] == 4
