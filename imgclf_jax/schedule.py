"""What happens at each epoch of a run: the learning-rate schedule, the progressive-resizing stage and its
training image size, and whether the epoch ends with a validation pass. Functions of the config alone."""

from __future__ import annotations

import math
from typing import Optional

import ml_collections
import optax


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Constant, or linear warmup then cosine decay to zero over the whole run.

    Where the time budget re-planned the last progressive stage (`progressive.stage_epochs` set), the
    stages before it keep the cosine of the plan they were trained under (equal stages of stage_epochs), and
    the last stage decays from where that left off to zero at its own end: the rate stays continuous whether
    the stage was shortened or lengthened."""
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    total_steps = config.epochs * steps_per_epoch
    if config.lr_schedule == "cosine":
        stage_epochs = config.progressive.stage_epochs if progressive_stage(config, 1) is not None else 0
        planned_steps = config.progressive.stages * stage_epochs * steps_per_epoch if stage_epochs else total_steps
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup_steps else config.learning_rate,
            peak_value=config.learning_rate,
            warmup_steps=warmup_steps,
            decay_steps=max(planned_steps, warmup_steps + 1),
            end_value=0.0,
        )
        if not stage_epochs:
            return schedule
        last_stage_step = (config.progressive.stages - 1) * stage_epochs * steps_per_epoch
        last_stage = optax.cosine_decay_schedule(float(schedule(last_stage_step)),
                                                 max(total_steps - last_stage_step, 1))
        return optax.join_schedules([schedule, last_stage], [last_stage_step])
    if warmup_steps:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, config.learning_rate, warmup_steps),
             optax.constant_schedule(config.learning_rate)],
            [warmup_steps],
        )
    return optax.constant_schedule(config.learning_rate)


def progressive_stage(config: ml_collections.ConfigDict, epoch: int) -> Optional[int]:
    """The 0-based progressive-resizing stage of `epoch` (1-based); None without progressive resizing."""
    scale, stages = config.progressive.start_scale, config.progressive.stages
    if not scale or stages == 1:
        return None
    if config.progressive.stage_epochs:  # Set when the time budget re-planned the last stage.
        return min(stages - 1, (epoch - 1) // config.progressive.stage_epochs)
    return min(stages - 1, (epoch - 1) * stages // config.epochs)


def last_stage_start(config: ml_collections.ConfigDict) -> Optional[int]:
    """The first epoch (1-based) of the last progressive-resizing stage; None without stages (or with one)."""
    if progressive_stage(config, config.epochs) is None:
        return None
    return next(epoch for epoch in range(1, config.epochs + 1)
                if progressive_stage(config, epoch) == config.progressive.stages - 1)


def cooldown_plan(config: ml_collections.ConfigDict, epoch: int) -> tuple[int, int]:
    """The plan (epochs, progressive.stage_epochs) that early stopping turns a run into after `epoch`. In the
    last progressive stage, the stage ends at most half a stage later and its learning rate still comes down
    to zero there (`create_learning_rate_fn` decays a re-planned last stage to its own end), so the network
    gets the low rates where it gains most instead of stopping at a high one. Elsewhere the run ends at `epoch`."""
    start = last_stage_start(config)
    if start is None or epoch < start:
        return epoch, config.progressive.stage_epochs
    stage_epochs = config.progressive.stage_epochs or (start - 1) // (config.progressive.stages - 1)
    return min(config.epochs, epoch + max(1, math.ceil(stage_epochs / 2))), stage_epochs


def train_image_size(config: ml_collections.ConfigDict, epoch: int) -> int:
    """The training image size of `epoch` (1-based): config.image_size, or with progressive resizing
    (config.progressive.start_scale > 0) the size of the epoch's stage, rounded to a multiple of 8."""
    stage = progressive_stage(config, epoch)
    if stage is None or stage == config.progressive.stages - 1:
        return config.image_size
    scale = config.progressive.start_scale
    size = config.image_size * (scale + (1.0 - scale) * stage / (config.progressive.stages - 1))
    return max(8, int(round(size / 8)) * 8)


def validates_after(config: ml_collections.ConfigDict, epoch: int) -> bool:
    """Whether `epoch` (1-based) ends with a validation pass (config.validate_every): every N-th epoch, the
    last, and with progressive resizing every epoch of the last stage."""
    stage = progressive_stage(config, epoch)
    return (epoch % config.validate_every == 0 or epoch == config.epochs
            or (stage is not None and stage == config.progressive.stages - 1))


def planned_for(config: ml_collections.ConfigDict, epochs: int) -> ml_collections.ConfigDict:
    """A copy of `config` trained for `epochs` epochs, to ask what another plan would do (stage sizes,
    validation) without changing the config."""
    planned = config.copy_and_resolve_references()
    planned.epochs = epochs
    return planned
