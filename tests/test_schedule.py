"""The run's schedule: progressive-resizing stages, validation epochs and learning rates by epoch."""

from __future__ import annotations


import pytest

from imgclf_jax import schedule


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


def test_validate_every_skips_early_epochs_but_never_the_last_stage(tiny_config):
    tiny_config.update(epochs=8, validate_every=3)
    assert [e for e in range(1, 9) if schedule.validates_after(tiny_config, e)] == [3, 6, 8]
    tiny_config.progressive.update(start_scale=0.5, stages=4)  # The last stage is epochs 7 and 8.
    assert [e for e in range(1, 9) if schedule.validates_after(tiny_config, e)] == [3, 6, 7, 8]
    tiny_config.validate_every = 1
    assert all(schedule.validates_after(tiny_config, e) for e in range(1, 9))


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


def test_learning_rate_schedules(tiny_config):
    tiny_config.update(lr_schedule="cosine", warmup_epochs=1.0, epochs=4, learning_rate=0.1)
    lr = schedule.create_learning_rate_fn(tiny_config, steps_per_epoch=10)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(0.1)
    assert float(lr(25)) == pytest.approx(0.05, rel=1e-3) and float(lr(40)) == pytest.approx(0.0, abs=1e-7)
    tiny_config.update(lr_schedule="constant", warmup_epochs=0.0)
    assert float(schedule.create_learning_rate_fn(tiny_config, 10)(37)) == pytest.approx(0.1)


def test_early_stopping_cools_down_the_last_stage_instead_of_stopping_at_a_high_learning_rate(tiny_config):
    tiny_config.update(epochs=40, lr_schedule="cosine", warmup_epochs=0.0, learning_rate=1.0, image_size=64)
    tiny_config.progressive.update(start_scale=0.5, stages=4)  # Stages of 10 epochs; the last from epoch 31.
    assert schedule.cooldown_plan(tiny_config, 30) == (30, 0)  # Before the last stage the run would end there.
    assert schedule.cooldown_plan(tiny_config, 31) == (36, 10)  # Half a stage more.
    assert schedule.cooldown_plan(tiny_config, 38) == (40, 10)  # The plan's own end comes first.
    before = schedule.create_learning_rate_fn(tiny_config, steps_per_epoch=1)
    tiny_config.update(epochs=36)
    tiny_config.progressive.stage_epochs = 10
    after = schedule.create_learning_rate_fn(tiny_config, steps_per_epoch=1)
    assert [schedule.train_image_size(tiny_config, e) for e in range(31, 37)] == [64] * 6  # The size is kept.
    assert float(after(30)) == pytest.approx(float(before(30)))  # Continuous where the last stage starts,
    rates = [float(after(step)) for step in range(30, 37)]
    assert rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(0.0, abs=1e-7)  # and down to
    assert float(before(36)) > 0.1 * float(before(30))  # zero at the new end, where the old plan was far from it.
    tiny_config.progressive.start_scale = 0.0
    assert schedule.cooldown_plan(tiny_config, 31) == (31, 10)  # Without stages a run stops where it is.
