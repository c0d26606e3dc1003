"""Training: the TrainState, the jitted train and eval steps, and the epoch loop around them.

`train_step` and `eval_step` are pure functions of (state, batch); `train_and_evaluate(config, workdir)`
does the I/O: data, logging, metrics, checkpoints (with resume) and plots. Run it with

    python -m imgclf_jax.train [--config RECIPE] [--data_dir DIR | --dataset tfds:NAME] [...]
"""

from __future__ import annotations

if __name__ == "__main__":  # Before TensorFlow loads, so that its C++ start-up lines stay quiet.
    import sys

    from imgclf_jax import cli

    cli.prepare_environment(sys.argv)

import contextlib
import functools
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax.training import train_state

from imgclf_jax import (augmentation, checkpointing, cli, config_lib, folders, input_pipeline, losses, mixing,
                        models, parallel, plotting, xla_cpu)
from imgclf_jax.errors import UserError
from imgclf_jax.workdir_lock import WorkdirLock
from imgclf_jax.metrics import MetricsLog, best_record, read_metrics

log = logging.getLogger(__name__)

CLASSES_FILE = "classes.json"
CONFIG_FILE = "config.json"
SKIPPED_FILE = "skipped_files.txt"
CURVES_FILE = "training_curves.png"


class TrainState(train_state.TrainState):
    """Params, optimizer state and step (from flax), plus batch-norm statistics and the dropout key."""

    batch_stats: Any
    dropout_key: jax.Array


class EmaTrainState(TrainState):
    """A TrainState that also keeps an exponential moving average of the weights and batch-norm statistics
    (`config.ema_decay` > 0): {"params": ..., "batch_stats": ...}. A subclass, so that runs without it keep
    the checkpoint layout they always had."""

    ema: Any


def eval_variables(state: TrainState) -> dict[str, Any]:
    """The variables to evaluate and predict with: the weights' moving average where the run keeps one."""
    if isinstance(state, EmaTrainState):
        return dict(state.ema)
    return {"params": state.params, "batch_stats": state.batch_stats}


def update_ema(state: EmaTrainState, decay: float) -> EmaTrainState:
    """Moves the average of params and batch statistics towards the current ones. The effective decay
    starts low, min(decay, (1 + step) / (10 + step)) as in tf.train.ExponentialMovingAverage, so early
    averages do not keep the random initialisation."""
    step = state.step.astype(jnp.float32)
    rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    current = {"params": state.params, "batch_stats": state.batch_stats}
    ema = jax.tree_util.tree_map(lambda avg, x: rate * avg + (1.0 - rate) * x, dict(state.ema), current)
    return state.replace(ema=ema)


# Folded into the step's dropout key for augmentation and MixUp/CutMix, so that dropout draws stay as they
# are with or without them.
_AUGMENT_KEY_STREAM = 0x617567
_MIX_KEY_STREAM = 0x6D6978


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------------
# State and optimizer.


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Constant, or linear warmup then cosine decay to zero over the whole run.

    Where the time budget re-planned the last progressive stage (`progressive.stage_epochs` set), the
    stages before it keep the cosine of the plan they were trained under (equal stages of stage_epochs), and
    the last stage decays from where that left off to zero at its own end: the rate stays continuous whether
    the stage was shortened or lengthened."""
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    total_steps = config.epochs * steps_per_epoch
    if config.lr_schedule == "cosine":
        stage_epochs = config.progressive.stage_epochs if _progressive_stage(config, 1) is not None else 0
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


def _progressive_stage(config: ml_collections.ConfigDict, epoch: int) -> Optional[int]:
    """The 0-based progressive-resizing stage of `epoch` (1-based); None without progressive resizing."""
    scale, stages = config.progressive.start_scale, config.progressive.stages
    if not scale or stages == 1:
        return None
    if config.progressive.stage_epochs:  # Set when the time budget re-planned the last stage.
        return min(stages - 1, (epoch - 1) // config.progressive.stage_epochs)
    return min(stages - 1, (epoch - 1) * stages // config.epochs)


def last_stage_start(config: ml_collections.ConfigDict) -> Optional[int]:
    """The first epoch (1-based) of the last progressive-resizing stage; None without stages (or with one)."""
    if _progressive_stage(config, config.epochs) is None:
        return None
    return next(epoch for epoch in range(1, config.epochs + 1)
                if _progressive_stage(config, epoch) == config.progressive.stages - 1)


def train_image_size(config: ml_collections.ConfigDict, epoch: int) -> int:
    """The training image size of `epoch` (1-based): config.image_size, or with progressive resizing
    (config.progressive.start_scale > 0) the size of the epoch's stage, rounded to a multiple of 8."""
    stage = _progressive_stage(config, epoch)
    if stage is None or stage == config.progressive.stages - 1:
        return config.image_size
    scale = config.progressive.start_scale
    size = config.image_size * (scale + (1.0 - scale) * stage / (config.progressive.stages - 1))
    return max(8, int(round(size / 8)) * 8)


def validates_after(config: ml_collections.ConfigDict, epoch: int) -> bool:
    """Whether `epoch` (1-based) ends with a validation pass (config.validate_every): every N-th epoch, the
    last, and with progressive resizing every epoch of the last stage."""
    stage = _progressive_stage(config, epoch)
    return (epoch % config.validate_every == 0 or epoch == config.epochs
            or (stage is not None and stage == config.progressive.stages - 1))


def planned_for(config: ml_collections.ConfigDict, epochs: int) -> ml_collections.ConfigDict:
    """A copy of `config` trained for `epochs` epochs, to ask what another plan would do (stage sizes,
    validation) without changing the config."""
    planned = config.copy_and_resolve_references()
    planned.epochs = epochs
    return planned


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


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule):
    """Adam, or AdamW if weight_decay > 0; or SGD with Nesterov momentum and an L2 term. Weight decay never
    applies to biases and norm scales (1-d parameters)."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
    if config.optimizer == "sgd":
        sgd = optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.momentum > 0)
        if config.weight_decay > 0:
            return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask), sgd)
        return sgd
    if config.weight_decay > 0:
        return optax.adamw(learning_rate_fn, weight_decay=config.weight_decay, mask=decay_mask)
    return optax.adam(learning_rate_fn)


def create_train_state(
    model: flax.linen.Module,
    image_size: int,
    optimizer: optax.GradientTransformation,
    seed: int,
    mesh: Optional[jax.sharding.Mesh] = None,
    ema: bool = False,
) -> TrainState:
    """A fresh state from `seed`; with a `mesh`, replicated on every device of it; with `ema`, keeping a
    moving average of the weights (which starts as a copy of them)."""
    create = functools.partial(_initial_state, model, image_size, optimizer, seed, ema)
    return jax.jit(create, out_shardings=parallel.replicated(mesh) if mesh is not None else None,
                   compiler_options=xla_cpu.one_off_compiler_options())()


def abstract_train_state(
    model: flax.linen.Module, image_size: int, optimizer: optax.GradientTransformation, ema: bool = False,
) -> TrainState:
    """The state's structure, shapes and dtypes without computing it: a restore target (nothing compiled)."""
    return jax.eval_shape(functools.partial(_initial_state, model, image_size, optimizer, 0, ema))


def _initial_state(model: flax.linen.Module, image_size: int, optimizer: optax.GradientTransformation,
                   seed: int, ema: bool = False) -> TrainState:
    params_key, dropout_key = jax.random.split(jax.random.key(seed))
    variables = model.init(params_key, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
    fields = dict(apply_fn=model.apply, params=variables["params"], tx=optimizer,
                  batch_stats=variables.get("batch_stats", {}), dropout_key=jax.random.key_data(dropout_key))
    if ema:
        return EmaTrainState.create(**fields, ema={"params": fields["params"], "batch_stats": fields["batch_stats"]})
    return TrainState.create(**fields)


# ----------------------------------------------------------------------------------------------------
# Steps (pure; jitted once by the loop).


def train_step(
    state: TrainState, batch: dict[str, jax.Array], loss_kind: str, label_smoothing: float,
    mix_config: Optional[ml_collections.ConfigDict] = None, ema_decay: float = 0.0,
    augment_config: Optional[ml_collections.ConfigDict] = None, image_size: Optional[int] = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one batch; returns the new state and the batch's mean loss and accuracy.

    The batch's images (uint8, or float in [0, 1]) are first augmented as `augment_config` (config.augment,
    None = not at all) says, at `image_size` px (default: as given; imgclf_jax.augmentation). With
    `mix_config` (config.mix) enabled, the batch is then mixed (MixUp/CutMix, imgclf_jax.mixing); the
    accuracy is measured against each image's larger share of label. An EmaTrainState also moves its
    weight average (`ema_decay`).
    """
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    images = augmentation.training_images(jax.random.fold_in(dropout_key, _AUGMENT_KEY_STREAM), batch["image"],
                                          augment_config, image_size)
    labels = batch["label"]
    partner_labels, lam = labels, jnp.float32(1.0)
    mixed = mix_config is not None and mixing.is_enabled(mix_config)
    if mixed:
        images, labels, partner_labels, lam = mixing.mix_batch(
            jax.random.fold_in(dropout_key, _MIX_KEY_STREAM), images, labels,
            mix_config.mixup_alpha, mix_config.cutmix_alpha, mix_config.prob)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_key},
        )
        loss = losses.per_example_loss(logits, labels, loss_kind, label_smoothing)
        if mixed:
            loss = lam * loss + (1.0 - lam) * losses.per_example_loss(
                logits, partner_labels, loss_kind, label_smoothing)
        return loss.mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    if isinstance(state, EmaTrainState):
        state = update_ema(state, ema_decay)
    majority_labels = jnp.where(lam >= 0.5, labels, partner_labels)
    correct = losses.predicted_class(logits, loss_kind) == majority_labels
    return state, {"loss": loss, "accuracy": correct.mean()}


def eval_step(state: TrainState, batch: dict[str, jax.Array], loss_kind: str) -> dict[str, jax.Array]:
    """Sums over the real (mask 1) examples of a padded batch, plus the logits and probabilities for reports."""
    logits = state.apply_fn(eval_variables(state), batch["image"], train=False)
    mask = batch["mask"]
    loss = losses.per_example_loss(logits, batch["label"], loss_kind)
    correct = (losses.predicted_class(logits, loss_kind) == batch["label"]).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(loss * mask),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
        "logits": logits,
        "probabilities": losses.probabilities(logits, loss_kind),
    }


def evaluate_batches(
    eval_fn: Callable, state: TrainState, batches: Iterable[dict[str, np.ndarray]],
    on_batch: Optional[Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = None,
) -> dict[str, float]:
    """Mean loss and accuracy over every real example of `batches`.

    `on_batch(images, probabilities, labels)` sees each batch's real examples, one batch behind the device
    (so fetching the probabilities does not stall the next batch's dispatch).
    """
    keys = ("loss_sum", "correct", "count")
    sums, pending = [], None

    def hand_over(batch, out):
        real = batch["mask"] == 1
        on_batch(batch["image"][real], np.asarray(out["probabilities"])[real], batch["label"][real])

    for batch in batches:
        out = eval_fn(state, batch)
        sums.append({k: out[k] for k in keys})
        if on_batch is not None:
            if pending is not None:
                hand_over(*pending)
            pending = (batch, out)
    if pending is not None:
        hand_over(*pending)
    sums = jax.device_get(sums)
    totals = {k: sum(float(s[k]) for s in sums) for k in keys}
    count = totals["count"]
    return {
        "loss": float(totals["loss_sum"]) / max(count, 1.0),
        "accuracy": float(totals["correct"]) / max(count, 1.0),
        "num_examples": int(count),
    }


# ----------------------------------------------------------------------------------------------------
# The loop.


def _check_workdir_classes(workdir: str, class_names: list[str]) -> None:
    path = os.path.join(workdir, CLASSES_FILE)
    if os.path.exists(path):
        try:
            saved = config_lib.read_class_names(path)
        except config_lib.DamagedFile as e:  # Rewritten once the checkpoints (their shapes) prove compatible.
            log.warning("%s; it is written anew.", e)
            return
        if saved != class_names:
            raise UserError(
                f"work directory {workdir} was trained on classes {saved}, but this data has {class_names}; "
                "use another --workdir"
            )


def _make_workdir(workdir: str) -> None:
    """Creates `workdir` if needed and checks that this process can write in it, before any training."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir} is a file, not a folder; name a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_check_"):
            pass
        checkpoints = os.path.join(workdir, "checkpoints")
        if os.path.isdir(checkpoints):
            with tempfile.NamedTemporaryFile(dir=checkpoints, prefix=".write_check_"):
                pass
    except OSError as e:
        raise UserError(f"cannot write in the work directory {workdir}: {e.strerror or e}"
                        f"{': ' + str(e.filename) if e.filename else ''}; fix its permissions or use another "
                        "--workdir") from None


def _write_skipped(workdir: str, skipped: list[tuple[str, str]]) -> None:
    path = os.path.join(workdir, SKIPPED_FILE)
    if not skipped:
        if os.path.exists(path):
            os.remove(path)
        return
    with open(path, "w") as f:
        f.writelines(f"{folders.display_path(p)}\t{reason}\n" for p, reason in skipped)
    log.warning("Skipped %d unusable file(s) (listed in %s):", len(skipped), path)
    for p, reason in skipped[:10]:
        log.warning("  %s: %s", folders.display_path(p), reason)
    if len(skipped) > 10:
        log.warning("  ... and %d more", len(skipped) - 10)


def train_epoch(
    train_fn: Callable, state: TrainState, batches: Iterable[dict[str, np.ndarray]], steps: int,
    batch_size: int, description: str,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Runs `train_fn` over one epoch's batches with a progress bar; returns the state and per-step metrics.

    The bar (shown on terminals only) fetches metrics every 10 steps, so dispatch stays asynchronous.
    """
    step_metrics = []
    start = time.perf_counter()
    show_bar = None if parallel.is_main_process() else True  # None: on terminals only.
    with tqdm.tqdm(total=steps, desc=description, unit="step", disable=show_bar, leave=False,
                   file=sys.stderr) as bar:
        for i, batch in enumerate(batches):
            state, metrics = train_fn(state, batch)
            step_metrics.append(metrics)
            bar.update(1)
            if not bar.disable and (i % 10 == 9 or i == steps - 1):
                last = jax.device_get(metrics)
                bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.3f}",
                                img_s=f"{(i + 1) * batch_size / (time.perf_counter() - start):.0f}")
    return state, jax.device_get(step_metrics)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every number in the pytree `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _first_nonfinite(step_metrics: list[dict[str, Any]]) -> Optional[int]:
    for i, m in enumerate(step_metrics):
        if not math.isfinite(float(m["loss"])):
            return i
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Trains (resuming from the latest checkpoint in `workdir` if any) and returns the metrics records.

    Process 0 holds the work directory's lock for the whole run (another run on it is refused), and nothing
    in it is written before the run is known to fit it: its classes and, on resume, its checkpoints."""
    with contextlib.ExitStack() as cleanup:  # The lock, orbax's threads: released however the run ends.
        return _train_and_evaluate(config, workdir, cleanup)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        cleanup: contextlib.ExitStack) -> list[dict[str, Any]]:
    run_start = time.perf_counter()
    config_lib.validate(config)
    config = config.copy_and_resolve_references()  # A time budget sets its epochs; the caller's stays as it is.
    mesh = parallel.create_mesh()
    parallel.check_batch_size("batch_size", config.batch_size, mesh.devices.size)
    is_main = parallel.is_main_process()
    source = input_pipeline.load_source(config)
    if config.strict and source.skipped:
        listed = "; ".join(f"{p}: {reason}" for p, reason in source.skipped[:5])
        more = f" (and {len(source.skipped) - 5} more)" if len(source.skipped) > 5 else ""
        raise UserError(f"{len(source.skipped)} unusable file(s) and --strict is set: {listed}{more}")
    class_names = source.class_names
    train_split, val_split = source.splits["train"], source.splits["validation"]
    if train_split.num_examples < config.batch_size:
        raise UserError(
            f"batch_size {config.batch_size} is larger than the training set ({train_split.num_examples} "
            "images); lower --batch_size"
        )
    loss_kind = losses.resolve_loss(config.loss, len(class_names))

    if config.data_dir and folders.is_within(os.path.realpath(workdir), os.path.realpath(config.data_dir)):
        raise UserError(f"--workdir {workdir} is inside the data folder {config.data_dir}: its files would be "
                        "read as photos by the next run; use a work directory outside it")
    _make_workdir(workdir)
    if is_main:
        cleanup.enter_context(WorkdirLock(workdir))
    _check_workdir_classes(workdir, class_names)
    config_path = os.path.join(workdir, CONFIG_FILE)
    log.info(
        "Data: %s; %d classes (%s); %d training and %d validation images (validation: %s).",
        source.description, len(class_names), ", ".join(class_names[:10]) + (" ..." if len(class_names) > 10 else ""),
        train_split.num_examples, val_split.num_examples, source.validation_note,
    )

    steps_per_epoch = train_split.num_examples // config.batch_size
    model = models.create_model(config, losses.num_outputs(loss_kind, len(class_names)))
    state_sharding, data_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    augment_config = config.augment if config.augment.enabled else None
    train_fns = {}  # Image size -> the train step jitted for it (progressive resizing uses a few sizes).

    def train_step_fn(state, batch, image_size):
        if image_size not in train_fns:
            train_fns[image_size] = jax.jit(
                functools.partial(train_step, loss_kind=loss_kind, label_smoothing=config.label_smoothing,
                                  mix_config=config.mix, ema_decay=config.ema_decay,
                                  augment_config=augment_config, image_size=image_size),
                in_shardings=(state_sharding, data_sharding),
                out_shardings=(state_sharding, parallel.replicated(mesh)),
                donate_argnums=0,
                compiler_options=xla_cpu.compiler_options(),
            )
        return train_fns[image_size](state, parallel.global_batch(mesh, batch))

    jitted_eval = jax.jit(functools.partial(eval_step, loss_kind=loss_kind),
                          in_shardings=(state_sharding, data_sharding), compiler_options=xla_cpu.compiler_options())
    eval_fn = lambda state, batch: jitted_eval(state, parallel.global_batch(mesh, batch))
    rows = parallel.process_rows(mesh, config.batch_size)
    train_images = input_pipeline.prepare(train_split, config.image_size, config.resize, config.cache)
    val_images = input_pipeline.prepare(val_split, config.image_size, config.resize, config.cache)

    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoints_to_keep)
    cleanup.callback(checkpointer.close)
    # Restored before anything is written, so that a refused resume (another model) leaves the run as it was.
    state = create_train_state(model, config.image_size,
                               create_optimizer(config, create_learning_rate_fn(config, steps_per_epoch)),
                               config.seed, mesh, ema=config.ema_decay > 0)
    restored = checkpointer.restore(state)
    if is_main:
        config_lib.write_json(os.path.join(workdir, CLASSES_FILE), class_names)
        _write_skipped(workdir, source.skipped)
    timed_estimate = None  # Set when this run plans its epochs to a time budget.
    most_epochs = config.epochs  # The most a time budget may plan (it may plan fewer).
    if config.time_budget_minutes:
        if restored is not None and os.path.exists(config_path):
            saved = config_lib.load_saved_config(config_path)  # A damaged one: one line naming it.
            config.epochs, config.progressive.stage_epochs = saved.epochs, saved.progressive.stage_epochs
            log.info("Time budget: resuming, so the run keeps the %d epochs it planned at its start.", config.epochs)
        else:
            probe = create_train_state(model, config.image_size,
                                       create_optimizer(config, create_learning_rate_fn(config, steps_per_epoch)),
                                       config.seed, mesh, ema=config.ema_decay > 0)
            config.epochs, timed_estimate = _fit_to_time_budget(
                config, run_start, probe, train_step_fn, eval_fn, train_images, val_images, train_split, val_split,
                steps_per_epoch, rows)
    config_changes = config_lib.changes_from_saved(config_path, config) if os.path.exists(config_path) else []
    if is_main:
        config_lib.save_config(config, config_path)

    learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
    # The optimizer's state does not depend on the schedule, which the time budget may have re-planned.
    state = state.replace(tx=create_optimizer(config, learning_rate_fn))
    log.info(
        "Model: %s, %s parameters, %s cross-entropy, %s compute; %d steps of %d images per epoch on %s.",
        config.model, f"{models.count_params(state.params):,}", loss_kind, config.dtype, steps_per_epoch,
        config.batch_size, parallel.describe(),
    )

    metrics_log = MetricsLog(workdir) if is_main else None
    start_epoch = 0
    if restored is not None:
        restored_state, meta, step = restored
        state = restored_state.replace(tx=state.tx)
        start_epoch = int(meta["epoch"])
        log.info("Resuming from the checkpoint of epoch %d (step %d) in %s.", start_epoch, step, workdir)
        recipe_changes = [c for c in config_changes if c.split(":", 1)[0] not in _NOT_TRAINING_FIELDS]
        if recipe_changes:
            log.warning("The run in %s was started with another config; it goes on with this one's values, "
                        "which mixes two recipes (use a new --workdir to start afresh): %s", workdir,
                        "; ".join(recipe_changes))
        if len(recipe_changes) < len(config_changes):
            log.info("Changed since the run started, without changing what it trains: %s",
                     "; ".join(c for c in config_changes if c not in recipe_changes))
    if is_main:
        metrics_log.keep_up_to(start_epoch)
    if start_epoch >= config.epochs:
        log.info("Already trained for %d of %d epochs; nothing to do.", start_epoch, config.epochs)

    # The report's scores of the best epoch, collected while validating, spare it a second pass over the photos.
    keep_scores = config.report and is_main and jax.process_count() == 1
    if keep_scores:
        from imgclf_jax import report  # report -> evaluate -> inference -> train.
    # The best validation accuracy of this run so far: an epoch at least as good may be the best, so it is
    # saved (after a resume, the first validated epoch is saved whatever its accuracy).
    best_scores, best_accuracy = None, 0.0
    last_save = time.perf_counter()

    # A run planned here checks the pace of real epochs against its timed estimate on epochs 2-4 (the first
    # compiles its step), while the learning rate is still near its peak: cutting a plan of 160 epochs to 80
    # would have changed theirs by under 0.3%. With progressive resizing it checks again before the last
    # stage (`fit_last_stage`), so the first check counts only part of the lag it sees: the small early epochs
    # trail their timing by more than the later, larger ones do (docs/accuracy.md). That second
    # check shortens the last stage where time runs short, or lengthens it, up to the config's epochs, where
    # the time left allows more than planned: the first check cut too much, or the timing was slow.
    planned_here = timed_estimate is not None and start_epoch == 0
    paced = range(2, 5) if planned_here and config.epochs > 4 else None
    checks_last_stage = (planned_here and last_stage_start(config) is not None
                         and not config.progressive.stage_epochs and config.epochs % config.progressive.stages == 0)
    epoch_starts = {}  # Epoch -> when it started, for the pace checks.

    def replan(epochs: int) -> None:
        nonlocal learning_rate_fn, state
        config.epochs = epochs
        learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
        state = state.replace(tx=create_optimizer(config, learning_rate_fn))  # Compiles anew.
        if is_main:
            config_lib.save_config(config, config_path)  # A resume keeps this plan.

    try:
        epoch = start_epoch
        while epoch < config.epochs:  # A pace check may plan fewer epochs, or a longer last stage.
            epoch += 1
            epoch_start = epoch_starts[epoch] = time.perf_counter()
            image_size = train_image_size(config, epoch)
            if config.progressive.start_scale and (
                    epoch == start_epoch + 1 or image_size != train_image_size(config, epoch - 1)):
                log.info("Progressive resizing: training at %d px from epoch %d.", image_size, epoch)
            batches = input_pipeline.train_batches(
                train_images, train_split.num_examples, config.batch_size, config.seed, epoch, rows)
            state, step_metrics = train_epoch(functools.partial(train_step_fn, image_size=image_size), state,
                                              batches, steps_per_epoch, config.batch_size,
                                              f"epoch {epoch}/{config.epochs}")
            train_seconds = time.perf_counter() - epoch_start
            bad = _first_nonfinite(step_metrics)
            if bad is not None:
                raise TrainingDiverged(
                    f"the training loss became {float(step_metrics[bad]['loss'])} at epoch {epoch}, step "
                    f"{int(state.step) - len(step_metrics) + bad + 1}; stopped without saving this epoch "
                    f"(the last good checkpoint stays the latest). Try a lower --learning_rate"
                )
            if not bool(all_finite(state.params)):
                raise TrainingDiverged(
                    f"the weights became NaN or infinite in epoch {epoch}; stopped without saving this epoch (the "
                    "last good checkpoint stays the latest). Try a lower --learning_rate")
            record = {
                "epoch": epoch,
                "step": int(state.step),
                "train_loss": float(np.mean([m["loss"] for m in step_metrics])),
                "train_accuracy": float(np.mean([m["accuracy"] for m in step_metrics])),
            }
            validated, may_be_best = validates_after(config, epoch), False
            if validated:
                scorer = report.ValidationScorer(report.GALLERY_SIZE) if keep_scores else None
                val = evaluate_batches(eval_fn, state,
                                       input_pipeline.eval_batches(val_images, config.batch_size, rows),
                                       on_batch=scorer.add if scorer else None)
                if not math.isfinite(val["loss"]):
                    raise TrainingDiverged(
                        f"the validation loss became {val['loss']} at epoch {epoch} (training loss "
                        f"{record['train_loss']:.4g}): the model's outputs overflow; stopped without saving this "
                        "epoch (the last good checkpoint stays the latest). Try a lower --learning_rate")
                may_be_best = val["accuracy"] >= best_accuracy  # Ties: the later epoch.
                if may_be_best:
                    best_accuracy = val["accuracy"]
                if scorer and may_be_best:
                    best_scores = scorer.scores(config, class_names, int(state.step), epoch, val_split.paths,
                                                f"{source.description} (validation)")
                record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            record.update({
                "learning_rate": float(learning_rate_fn(int(state.step) - 1)),
                "epoch_time_s": time.perf_counter() - epoch_start,
                "train_images_per_s": len(step_metrics) * config.batch_size / train_seconds,
                "train_image_size": image_size,
            })
            if is_main:
                metrics_log.append(record)
            # Saved with metrics only if validated: an epoch without validation cannot become the best. The
            # choice is process 0's, as orbax saves collectively and the clocks differ.
            if parallel.value_of_main_process(int(
                    epoch == config.epochs or (validated and may_be_best)
                    or time.perf_counter() - last_save >= 60 * config.checkpoint_every_minutes)):
                checkpointer.save(int(state.step), state, {"epoch": epoch}, record if validated else None)
                last_save = time.perf_counter()
            log.info(
                "epoch %d/%d  train loss %.4f acc %.4f | %s | %.0f img/s | %.1f s",
                epoch, config.epochs, record["train_loss"], record["train_accuracy"],
                f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f}" if validated
                else "not validated", record["train_images_per_s"], record["epoch_time_s"],
            )
            if paced and epoch == paced.stop - 1:
                epochs = _check_pace(config, run_start, paced, time.perf_counter() - epoch_starts[paced.start],
                                     timed_estimate, _EARLY_LAG_SHARE if checks_last_stage else 1.0)
                if epochs != config.epochs:
                    replan(epochs)
            if checks_last_stage and epoch == last_stage_start(config) - 1:
                epochs = _check_last_stage(config, run_start, epoch_starts, timed_estimate, most_epochs)
                if epochs != config.epochs:
                    config.progressive.stage_epochs = config.epochs // config.progressive.stages
                    replan(epochs)
    finally:
        checkpointer.wait_until_finished()  # The last good checkpoint is on disk, whatever stopped the loop.

    if not is_main:
        return []
    records = read_metrics(workdir)
    best = best_record(records)
    if best is not None:
        plotting.plot_training_curves({config.name: records}, os.path.join(workdir, CURVES_FILE))
        log.info("Best validation accuracy %.4f at epoch %d. Work directory: %s",
                 best["val_accuracy"], best["epoch"], workdir)
        if config.report:
            # Scores from before a resume are not at hand: then the report scores the best checkpoint itself.
            _write_report(workdir, best_scores if best_scores and best_scores.epoch == best["epoch"] else None)
    return records


# Config fields that do not change what a resumed run trains (its scoring, reports, saving, name; a resumed
# run keeps the epochs its time budget planned), so changing them is no reason to warn of mixed recipes.
_NOT_TRAINING_FIELDS = ("tta", "report", "name", "strict", "checkpoint_every_minutes", "checkpoints_to_keep",
                        "time_budget_minutes")

# Kept free of the time budget for what the estimate leaves out: the report at the end, checkpoints, logging.
_BUDGET_RESERVE_S = 15.0
# The estimate is stretched by this much before it has to fit, as the loop costs a little more than its steps.
_BUDGET_SAFETY = 1.05
# The share of epochs 2-4's lag behind their timing that the first pace check counts when the last stage is
# checked again. Epochs 2-4 say little of the later ones (docs/accuracy.md): on nine cats-vs-dogs
# runs alone they lagged by 5-31% and all later epochs by 0.1-2.3 times as much (e108: 31%, then 4%; e110:
# 6%, then 14%). So the first check cuts only for half of what it sees, and the check before the last stage,
# on the pace of the stage before it, fits the last stage to the time that is really left.
_EARLY_LAG_SHARE = 0.5


def _fit_to_time_budget(
    config: ml_collections.ConfigDict, run_start: float, probe: TrainState, train_step_fn: Callable,
    eval_fn: Callable, train_images: Any, val_images: Any, train_split: Any, val_split: Any, steps_per_epoch: int,
    rows: tuple[int, int],
) -> tuple[int, Callable[..., float]]:
    """The epochs that fit config.time_budget_minutes, from the time already spent since `run_start` and the
    measured cost of what is left: the images are decoded (and cached, as the first epoch would), then the
    train step at every training size and a whole validation pass are timed, on `probe` (a throwaway state).
    Also the timed estimate, as a function of (config, epochs, first_epoch=1, last_epoch=None), for
    `refit_epochs` once real epochs have set the pace."""
    cached = {}
    decode_seconds = {}
    for name, images, split in (("train", train_images, train_split), ("validation", val_images, val_split)):
        start = time.perf_counter()
        for _ in input_pipeline.iterate(images):  # A whole pass fills tf.data's cache; later epochs read from it.
            pass
        decode_seconds[name] = time.perf_counter() - start
        cached[name] = config.cache and input_pipeline.fits_in_memory(split, config.image_size)
    batch = next(input_pipeline.train_batches(train_images, train_split.num_examples, config.batch_size,
                                              config.seed, 0, rows))
    sizes = sorted({train_image_size(config, epoch) for epoch in range(1, config.epochs + 1)})
    step_seconds = {}
    # The fastest of three rounds over the sizes: the first, right after decoding and compiling, timed steps up
    # to 1.6x as long as training then took, and a noisy spell should not hit one size alone.
    for _ in range(3):
        for size in sizes:
            probe, seconds = _seconds_per_call(
                functools.partial(train_step_fn, image_size=size), probe, batch, calls=8)
            step_seconds[size] = min(seconds, step_seconds.get(size, math.inf))
    jax.block_until_ready(eval_fn(probe, next(input_pipeline.eval_batches(val_images, config.batch_size, rows))))
    start = time.perf_counter()
    evaluate_batches(eval_fn, probe, input_pipeline.eval_batches(val_images, config.batch_size, rows))
    validation_seconds = time.perf_counter() - start
    # Without the cache every epoch decodes its images again.
    epoch_extra = 0.0 if cached["train"] else decode_seconds["train"]
    validation_seconds += 0.0 if cached["validation"] else decode_seconds["validation"]

    spent = time.perf_counter() - run_start
    available = config.time_budget_minutes * 60 - spent - _BUDGET_RESERVE_S
    timed_estimate = lambda cfg, epochs, first_epoch=1, last_epoch=None: estimate_training_seconds(
        cfg, epochs, step_seconds, steps_per_epoch, epoch_extra, validation_seconds, first_epoch, last_epoch)
    estimate = lambda epochs: _BUDGET_SAFETY * timed_estimate(config, epochs)
    epochs = parallel.value_of_main_process(fit_epochs(config, available, estimate))
    log.info(
        "Time budget %.1f min: %d epoch(s) (at most %d) estimated at %.1f min after %.0f s of reading, decoding and "
        "timing (a step of %d images: %s; validation %.1f s).",
        config.time_budget_minutes, epochs, config.epochs, estimate(epochs) / 60, spent, config.batch_size,
        ", ".join(f"{1000 * step_seconds[size]:.0f} ms at {size} px" for size in sizes), validation_seconds)
    if estimate(epochs) > available:
        log.warning("The time budget of %.1f min is too short for even %d epoch(s) of this recipe; training %d.",
                    config.time_budget_minutes, epochs, epochs)
    return epochs, timed_estimate


def _check_pace(config: ml_collections.ConfigDict, run_start: float, paced: range, paced_seconds: float,
                timed_estimate: Callable[..., float], lag_share: float) -> int:
    """The epochs to train now that the `paced` epochs took `paced_seconds` (`refit_epochs`), logged."""
    seconds_left = config.time_budget_minutes * 60 - (time.perf_counter() - run_start) - _BUDGET_RESERVE_S
    epochs = parallel.value_of_main_process(
        refit_epochs(config, seconds_left, paced, paced_seconds, timed_estimate, lag_share))
    pace = paced_seconds / timed_estimate(config, config.epochs, paced.start, paced.stop - 1)
    what = (f"the plan of {config.epochs} stands" if epochs == config.epochs
            else f"re-planned to {epochs} epochs (was {config.epochs}) to end within the budget")
    counted = "" if lag_share == 1.0 or pace <= 1.0 else (
        f" (counting {lag_share:.0%} of the lag: the last stage is checked again before it starts)")
    log.info("Time budget: epochs %d-%d took %.1f s, %.2fx their timed estimate%s; %s.",
             paced.start, paced.stop - 1, paced_seconds, pace, counted, what)
    return epochs


def _check_last_stage(config: ml_collections.ConfigDict, run_start: float, epoch_starts: dict[int, float],
                      timed_estimate: Callable[..., float], most_epochs: int) -> int:
    """The epochs to train now that the stage before the last has ended (`fit_last_stage`, at that stage's
    pace, checkpoints and validation included, up to `most_epochs`), logged."""
    now = time.perf_counter()
    last = last_stage_start(config)
    first = min(epoch for epoch in range(1, last) if _progressive_stage(config, epoch) == config.progressive.stages - 2)
    pace = (now - epoch_starts[first]) / timed_estimate(config, config.epochs, first, last - 1)
    seconds_left = config.time_budget_minutes * 60 - (now - run_start) - _BUDGET_RESERVE_S
    epochs = parallel.value_of_main_process(fit_last_stage(config, seconds_left, pace, timed_estimate, most_epochs))
    what = (f"the plan of {config.epochs} stands" if epochs == config.epochs else
            f"the last stage {'shortened' if epochs < config.epochs else 'lengthened'} to {epochs - last + 1} "
            f"epoch(s) (was {config.epochs - last + 1}), {epochs} in all, to "
            f"{'end within' if epochs < config.epochs else 'use'} the budget")
    log.info("Time budget: epochs %d-%d (the stage before the last) took %.1f s, %.2fx their timed estimate; %s.",
             first, last - 1, now - epoch_starts[first], pace, what)
    return epochs


def _seconds_per_call(call: Callable, state: TrainState, batch: dict[str, np.ndarray],
                      calls: int) -> tuple[TrainState, float]:
    """Seconds per `call(state, batch) -> (state, outputs)`, after one untimed call (which compiles it)."""
    state, outputs = call(state, batch)
    jax.block_until_ready(outputs)
    start = time.perf_counter()
    for _ in range(calls):
        state, outputs = call(state, batch)
    jax.block_until_ready((state, outputs))
    return state, (time.perf_counter() - start) / calls


def _write_report(workdir: str, scores: Any = None) -> None:
    """The HTML run report (`scores`: the best checkpoint's `report.ValidationScores`, if at hand); a failure
    here is logged, since the trained run itself is complete."""
    if jax.process_count() > 1:  # Restoring in one process would wait for the others forever.
        log.info("Multi-process run: write the report with `python -m imgclf_jax.report %s`.", workdir)
        return
    from imgclf_jax import report  # report -> evaluate -> inference -> train.

    try:
        log.info("Report: %s", report.build_report(workdir, scores=scores))
    except Exception as e:  # noqa: BLE001 - the checkpoints and metrics are already safe.
        log.warning("Could not write the run report (%s: %s); try `python -m imgclf_jax.report %s`.",
                    type(e).__name__, e, workdir)


# ----------------------------------------------------------------------------------------------------
# Command line.


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
    flags.DEFINE_integer("epochs", None, "Number of training epochs.")
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


def main(argv) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed)
    if not parallel.is_main_process():
        logging.getLogger().setLevel(logging.WARNING)  # Process 0 speaks for the run.
    config = FLAGS.config
    config_lib.apply_overrides(
        config, data_dir=FLAGS.data_dir, dataset=FLAGS.dataset, epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate, image_size=FLAGS.image_size,
        seed=FLAGS.seed, strict=FLAGS.strict,
    )
    train_and_evaluate(config, config_lib.default_workdir(config, FLAGS.workdir))


def run() -> None:
    _define_flags()
    cli.run("imgclf_jax.train", main, lambda: config_lib.default_config_argv(sys.argv))


if __name__ == "__main__":
    run()
