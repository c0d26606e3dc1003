"""The time budget (`config.time_budget_minutes`): how many epochs fit, planned before training from the
measured cost of each part of the run, then checked against the pace of real epochs.

    budget = TimeBudget(config.time_budget_minutes, run_start)
    epochs = budget.plan(config, costs)            # before training (Costs: measured by the training loop)
    budget.epoch_started(epoch)                    # at the start of each epoch
    plan = budget.after_epoch(config, epoch)       # after it: None keeps the plan, else (epochs, stage_epochs)

After epoch 4 (or later, until the epochs since the first have lasted MIN_PACED_SECONDS) the plan is checked
against the pace of the epochs from the second on and cut if the rest would not fit; with
progressive resizing the last stage is checked again before it starts, against the pace of the stage before
it, and shortened or lengthened (up to the config's epochs). The clock is a constructor argument, so tests
drive it with a fake one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Mapping, Optional

import ml_collections

from imgclf_jax import parallel
from imgclf_jax.schedule import last_stage_start, planned_for, progressive_stage, train_image_size, validates_after

log = logging.getLogger(__name__)

# Kept free of the time budget for what the estimate leaves out: the report at the end, checkpoints, logging.
RESERVE_S = 15.0
# The estimate is stretched by this much before it has to fit, as the loop costs a little more than its steps.
_BUDGET_SAFETY = 1.05
# The share of the paced epochs' lag behind their timing that the first pace check counts when the last stage
# is checked again. Epochs 2-4 say little of the later ones (docs/accuracy.md): on nine cats-vs-dogs runs alone
# they lagged by 5-31% and all later epochs by 0.1-2.3 times as much (e108: 31%, then 4%; e110: 6%, then 14%).
# So the first check cuts only for half of what it sees, and the check before the last stage, on the pace of
# the stage before it, fits the last stage to the time that is really left.
EARLY_LAG_SHARE = 0.5
# The first pace check reads at least this many seconds of epochs (by their timing), not only epochs 2-4: a
# small folder's epochs last a second or less, and a second more, from other work on the machine or from the
# run itself, then looks like a slowdown of 50% or more that cuts its plan (docs/accuracy.md, series 38).
MIN_PACED_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class Costs:
    """What a run's parts cost, measured before training."""

    step_seconds: Mapping[int, float]  # One train step, by training image size.
    steps_per_epoch: int
    epoch_extra_seconds: float  # Per epoch besides its steps (decoding again, without the cache).
    validation_seconds: float  # One validation pass.

    def estimate(self, config: ml_collections.ConfigDict, epochs: int, first_epoch: int = 1,
                 last_epoch: Optional[int] = None) -> float:
        """Seconds of epochs `first_epoch` to `last_epoch` (default: all) of `config` trained for `epochs`."""
        return estimate_training_seconds(config, epochs, self.step_seconds, self.steps_per_epoch,
                                         self.epoch_extra_seconds, self.validation_seconds, first_epoch, last_epoch)


def estimate_training_seconds(
    config: ml_collections.ConfigDict, epochs: int, step_seconds: Mapping[int, float], steps_per_epoch: int,
    epoch_extra_seconds: float, validation_seconds: float, first_epoch: int = 1, last_epoch: Optional[int] = None,
) -> float:
    """Estimated seconds of epochs `first_epoch` to `last_epoch` (default: all) of the config's recipe trained
    for `epochs` epochs: every epoch's steps at its training size (`step_seconds`: seconds per step by size)
    plus `epoch_extra_seconds`, and a validation pass after the epochs that have one."""
    planned = planned_for(config, epochs)
    return sum(steps_per_epoch * step_seconds[train_image_size(planned, epoch)] + epoch_extra_seconds
               + (validation_seconds if validates_after(planned, epoch) else 0.0)
               for epoch in range(first_epoch, (epochs if last_epoch is None else last_epoch) + 1))


def fit_epochs(config: ml_collections.ConfigDict, seconds: float, estimate: Callable[[int], float]) -> int:
    """The most epochs, up to config.epochs, whose `estimate(epochs)` fits in `seconds`. Below config.epochs,
    with progressive resizing, a multiple of the stages (so that they stay equal); never fewer than one stage
    (or one epoch), even if that does not fit."""
    if estimate(config.epochs) <= seconds:
        return config.epochs
    unit = config.progressive.stages if config.progressive.start_scale else 1
    fitted = min(unit, config.epochs)
    for epochs in range(2 * unit, config.epochs, unit):
        if estimate(epochs) > seconds:
            break
        fitted = epochs
    return fitted


def refit_epochs(config: ml_collections.ConfigDict, seconds_left: float, paced: range, paced_seconds: float,
                 estimate: Callable[..., float], lag_share: float = 1.0) -> int:
    """The epochs to train after the `paced` ones (1-based, trained under the plan of config.epochs) took
    `paced_seconds` and `seconds_left` remain: config.epochs if the rest fits at the pace they set, else fewer.

    `estimate(config, epochs, first_epoch, last_epoch)` is the timed estimate; the rest is estimated at the
    paced epochs' slowdown against it (never a speed-up: a small early epoch running fast says little of
    later, larger ones), of which only `lag_share` counts, plus the planning's margin. Fewer epochs keep whole
    progressive stages and put every trained epoch at the size it had, and are never fewer than that allows,
    even if they do not fit."""
    pace = paced_seconds / estimate(config, config.epochs, paced.start, paced.stop - 1)
    slowdown = 1.0 + lag_share * max(0.0, pace - 1.0)
    rest = lambda epochs: _BUDGET_SAFETY * slowdown * estimate(config, epochs, paced.stop)
    if rest(config.epochs) <= seconds_left:
        return config.epochs
    unit = config.progressive.stages if config.progressive.start_scale else 1
    trained_sizes = [train_image_size(config, epoch) for epoch in range(1, paced.stop)]

    def keeps_trained_sizes(epochs: int) -> bool:
        planned = planned_for(config, epochs)
        return [train_image_size(planned, epoch) for epoch in range(1, paced.stop)] == trained_sizes

    candidates = [epochs for epochs in range(unit, config.epochs, unit)
                  if epochs >= paced.stop and keeps_trained_sizes(epochs)]
    fitting = [epochs for epochs in candidates if rest(epochs) <= seconds_left]
    return max(fitting) if fitting else min(candidates, default=config.epochs)


def fit_last_stage(config: ml_collections.ConfigDict, seconds_left: float, pace: float,
                   estimate: Callable[..., float], most_epochs: Optional[int] = None) -> int:
    """The epochs to train when the last progressive stage is about to start (the stages before it equal,
    config.epochs a multiple of them), `seconds_left` remain and the stage before ran at `pace` times its
    timed estimate (`estimate`, as for `refit_epochs`): the most, up to `most_epochs` (default and at least
    config.epochs), whose last stage fits at that pace (never faster than timed) plus the planning's margin,
    and never fewer than one epoch of it. So the last stage is shortened where time runs short and, up to
    `most_epochs`, lengthened where more time is left than the plan needs (an earlier check cut more than the
    pace since then warrants, or the timing before training was slower than the epochs). Train
    another number of epochs with config.progressive.stage_epochs set to config.epochs //
    config.progressive.stages, which keeps the stages before the last as they were."""
    stages = config.progressive.stages
    stage_epochs = config.epochs // stages
    first = (stages - 1) * stage_epochs + 1

    def rest(epochs: int) -> float:
        planned = planned_for(config, epochs)
        planned.progressive.stage_epochs = stage_epochs
        return _BUDGET_SAFETY * max(1.0, pace) * estimate(planned, epochs, first)

    most = max(config.epochs, most_epochs or 0)
    return next((epochs for epochs in range(most, first, -1) if rest(epochs) <= seconds_left), first)


def paced_epochs(config: ml_collections.ConfigDict, costs: Costs) -> Optional[range]:
    """The epochs whose pace the first check reads (None if the plan is too short for one): from the second
    (the first compiles its step), while the learning rate is still near its peak, at least three of them and
    at least MIN_PACED_SECONDS of their estimate, inside the first progressive stage, and not the last epoch."""
    last = 4
    while (last + 1 < config.epochs and progressive_stage(config, last + 1) == progressive_stage(config, 2)
           and costs.estimate(config, config.epochs, 2, last) < MIN_PACED_SECONDS):
        last += 1
    return range(2, last + 1) if config.epochs > last else None


class TimeBudget:
    """Plans a run's epochs to fit `minutes` of the whole command started at `run_start` (on `clock`), then
    keeps or re-plans them after each epoch (see the module's docstring)."""

    def __init__(self, minutes: float, run_start: float, clock: Callable[[], float] = time.perf_counter):
        self.minutes, self.run_start, self.clock = minutes, run_start, clock
        self._costs: Optional[Costs] = None
        self._most_epochs = 0
        self._paced: Optional[range] = None
        self._checks_last_stage = False
        self._starts: dict[int, float] = {}

    def seconds_left(self) -> float:
        return self.minutes * 60 - (self.clock() - self.run_start) - RESERVE_S

    def plan(self, config: ml_collections.ConfigDict, costs: Costs) -> int:
        """The epochs that fit (at most config.epochs), logged; sets up the checks of `after_epoch`."""
        self._costs, self._most_epochs = costs, config.epochs
        available = self.seconds_left()
        estimate = lambda epochs: _BUDGET_SAFETY * costs.estimate(config, epochs)
        epochs = parallel.value_of_main_process(fit_epochs(config, available, estimate))
        sizes = sorted(costs.step_seconds)
        log.info(
            "Time budget %.1f min: %d epoch(s) (at most %d) estimated at %.1f min after %.0f s of reading, decoding "
            "and timing (a step of %d images: %s; validation %.1f s).",
            self.minutes, epochs, config.epochs, estimate(epochs) / 60, self.clock() - self.run_start,
            config.batch_size, ", ".join(f"{1000 * costs.step_seconds[size]:.0f} ms at {size} px" for size in sizes),
            costs.validation_seconds)
        if estimate(epochs) > available:
            log.warning("The time budget of %.1f min is too short for even %d epoch(s) of this recipe; training %d.",
                        self.minutes, epochs, epochs)
        planned = planned_for(config, epochs)
        self._paced = paced_epochs(planned, costs)
        self._checks_last_stage = (last_stage_start(planned) is not None and not planned.progressive.stage_epochs
                                   and epochs % planned.progressive.stages == 0)
        return epochs

    def epoch_started(self, epoch: int) -> None:
        self._starts[epoch] = self.clock()

    def after_epoch(self, config: ml_collections.ConfigDict, epoch: int) -> Optional[tuple[int, int]]:
        """None to keep the plan, or the new (epochs, progressive.stage_epochs) to train after `epoch`."""
        planned, changed = config, False
        if self._paced and epoch == self._paced.stop - 1:
            epochs = self._check_pace(planned)
            if epochs != planned.epochs:
                planned, changed = planned_for(planned, epochs), True
        if self._checks_last_stage and epoch == last_stage_start(planned) - 1:
            epochs = self._check_last_stage(planned)
            if epochs != planned.epochs:
                stage_epochs = planned.epochs // planned.progressive.stages
                planned, changed = planned_for(planned, epochs), True
                planned.progressive.stage_epochs = stage_epochs
        return (planned.epochs, planned.progressive.stage_epochs) if changed else None

    def _check_pace(self, config: ml_collections.ConfigDict) -> int:
        """The epochs to train now that the paced epochs have ended (`refit_epochs`), logged."""
        paced, lag_share = self._paced, EARLY_LAG_SHARE if self._checks_last_stage else 1.0
        paced_seconds = self.clock() - self._starts[paced.start]
        epochs = parallel.value_of_main_process(
            refit_epochs(config, self.seconds_left(), paced, paced_seconds, self._costs.estimate, lag_share))
        pace = paced_seconds / self._costs.estimate(config, config.epochs, paced.start, paced.stop - 1)
        what = (f"the plan of {config.epochs} stands" if epochs == config.epochs
                else f"re-planned to {epochs} epochs (was {config.epochs}) to end within the budget")
        counted = "" if lag_share == 1.0 or pace <= 1.0 else (
            f" (counting {lag_share:.0%} of the lag: the last stage is checked again before it starts)")
        log.info("Time budget: epochs %d-%d took %.1f s, %.2fx their timed estimate%s; %s.",
                 paced.start, paced.stop - 1, paced_seconds, pace, counted, what)
        return epochs

    def _check_last_stage(self, config: ml_collections.ConfigDict) -> int:
        """The epochs to train now that the stage before the last has ended (`fit_last_stage`, at that stage's
        pace, checkpoints and validation included, up to the config's most epochs), logged."""
        now, last = self.clock(), last_stage_start(config)
        first = min(epoch for epoch in range(1, last)
                    if progressive_stage(config, epoch) == config.progressive.stages - 2)
        # Its first epoch compiles the step for the new size (seconds on a CPU), which the last stage's epochs do
        # not repeat: on a small folder it would make the stage look several times slower than it is.
        first += first < last - 1
        pace = (now - self._starts[first]) / self._costs.estimate(config, config.epochs, first, last - 1)
        epochs = parallel.value_of_main_process(
            fit_last_stage(config, self.seconds_left(), pace, self._costs.estimate, self._most_epochs))
        what = (f"the plan of {config.epochs} stands" if epochs == config.epochs else
                f"the last stage {'shortened' if epochs < config.epochs else 'lengthened'} to {epochs - last + 1} "
                f"epoch(s) (was {config.epochs - last + 1}), {epochs} in all, to "
                f"{'end within' if epochs < config.epochs else 'use'} the budget")
        log.info("Time budget: epochs %d-%d (the stage before the last) took %.1f s, %.2fx their timed estimate; "
                 "%s.", first, last - 1, now - self._starts[first], pace, what)
        return epochs
