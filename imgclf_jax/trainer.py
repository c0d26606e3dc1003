"""The training loop: data, model and jitted steps set up from the config, then epochs of `train_step`, with
validation, logging, metrics, checkpoints (and resume) and the time budget around them.

`fit(config, workdir)` is the whole run; the steps themselves are pure (imgclf_jax.steps) and the state is
a pytree (imgclf_jax.train_state). Everything here that touches files or clocks is in this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Optional

import jax
import ml_collections
import numpy as np
import tqdm

from imgclf_jax import (checkpointing, config_lib, folders, input_pipeline, losses, models, parallel, time_budget,
                        xla_cpu)
from imgclf_jax import workdir as workdir_lib
from imgclf_jax.errors import UserError
from imgclf_jax.metrics import MetricsLog, read_metrics
from imgclf_jax.schedule import (cooldown_plan, create_learning_rate_fn, last_stage_start, train_image_size,
                                 validates_after)
from imgclf_jax.steps import eval_step, evaluate_batches, train_step
from imgclf_jax.train_state import TrainState, all_finite, create_optimizer, create_train_state

log = logging.getLogger(__name__)

# Config fields that do not change what a resumed run trains (its scoring, reports, saving, name; a resumed
# run keeps the epochs its time budget planned), so changing them is no reason to warn of mixed recipes.
_NOT_TRAINING_FIELDS = ("tta", "report", "name", "strict", "checkpoint_every_minutes", "checkpoints_to_keep",
                        "time_budget_minutes", "auto_time_budget.seconds_per_image",
                        "auto_time_budget.min_minutes", "auto_time_budget.max_minutes", "early_stopping_share")


class TrainingDiverged(UserError):
    """The loss, the validation loss or the weights became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    """What a run leaves besides its work directory: its records, and the validation scorer (from
    `scorer_factory`) of the epoch it keeps (config.keep_epoch) with the facts needed to read it."""

    records: list[dict[str, Any]]
    config: ml_collections.ConfigDict  # As trained (a time budget sets its epochs).
    class_names: list[str]
    data_description: str
    validation_paths: Optional[list[str]]
    kept_scorer: Any = None
    kept_step: int = 0
    kept_epoch: int = 0


@dataclasses.dataclass
class _Run:
    """One run's data and jitted steps (`_prepare`)."""

    source: input_pipeline.DataSource
    loss_kind: str
    mesh: jax.sharding.Mesh
    model: Any
    steps_per_epoch: int
    rows: tuple[int, int]
    train_images: Any
    val_images: Any  # None without a validation split: every epoch trains, none is validated.
    train_step: Callable  # (state, batch, image_size) -> (state, metrics)
    eval_step: Callable  # (state, batch) -> sums, logits, probabilities
    # (learning-rate schedule, optimizer) by the config they were made for. The optimizer is part of the
    # state's static structure, so a new but equal one would compile every train step again (8-12 s a size
    # on a 2-core CPU): a plan that keeps the epochs the steps were timed with reuses them.
    optimizers: dict = dataclasses.field(default_factory=dict)

    def optimizer(self, config: ml_collections.ConfigDict) -> tuple[Callable, Any]:
        key = config.to_json_best_effort(sort_keys=True)
        if key not in self.optimizers:
            learning_rate_fn = create_learning_rate_fn(config, self.steps_per_epoch)
            self.optimizers[key] = learning_rate_fn, create_optimizer(config, learning_rate_fn)
        return self.optimizers[key]


def fit(config: ml_collections.ConfigDict, workdir: str, scorer_factory: Optional[Callable[[], Any]] = None,
        clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    """Trains (resuming from the latest checkpoint in `workdir` if any) and returns the result.

    Process 0 holds the work directory's lock for the whole run (another run on it is refused), and nothing
    in it is written before the run is known to fit it: its classes and, on resume, its checkpoints.
    `scorer_factory()` makes an object whose `add(images, probabilities, labels)` sees each validation batch;
    that of the epoch the run keeps (config.keep_epoch) is returned."""
    run_start = clock()
    config_lib.validate(config)
    config = config.copy_and_resolve_references()  # A time budget sets its epochs; the caller's stays as it is.
    run = _prepare(config)
    is_main = parallel.is_main_process()
    if config.data_dir and folders.is_within(os.path.realpath(workdir), os.path.realpath(config.data_dir)):
        raise UserError(f"--workdir {workdir} is inside the data folder {config.data_dir}: its files would be "
                        "read as photos by the next run; use a work directory outside it")
    workdir_lib.make(workdir)
    with contextlib.ExitStack() as cleanup:  # The lock, orbax's threads: released however the run ends.
        if is_main:
            cleanup.enter_context(workdir_lib.WorkdirLock(workdir))
        class_names, train_split = run.source.class_names, run.source.splits["train"]
        workdir_lib.check_classes(workdir, class_names)
        config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
        log.info("Data: %s; %d classes (%s); %d training and %d validation images (validation: %s).",
                 run.source.description, len(class_names),
                 ", ".join(class_names[:10]) + (" ..." if len(class_names) > 10 else ""), train_split.num_examples,
                 getattr(run.source.splits.get("validation"), "num_examples", 0), run.source.validation_note)
        checkpointer = checkpointing.Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR),
                                                  config.checkpoints_to_keep)
        cleanup.callback(checkpointer.close)
        # Restored before anything is written, so that a refused resume (another model) leaves the run as it was.
        state = _fresh_state(config, run)
        restored = checkpointer.restore(state)
        if is_main:
            workdir_lib.write_json(os.path.join(workdir, workdir_lib.CLASSES_FILE), class_names)
            workdir_lib.write_skipped(workdir, run.source.skipped)
        budget, budget_minutes = None, config_lib.time_budget_minutes(config, train_split.num_examples)
        if budget_minutes and restored is not None and os.path.exists(config_path):
            saved = workdir_lib.load_saved_config(config_path)
            config.epochs, config.progressive.stage_epochs = saved.epochs, saved.progressive.stage_epochs
            log.info("Time budget: resuming, so the run keeps the %d epochs it planned at its start.", config.epochs)
        elif budget_minutes:
            if not config.time_budget_minutes:
                auto = config.auto_time_budget
                log.info("Time budget: %.1f min for %d training images (%.2f s an image, within %g-%g min; set "
                         "--time_budget_minutes or --epochs to choose).", budget_minutes, train_split.num_examples,
                         auto.seconds_per_image, auto.min_minutes, auto.max_minutes)
            budget = time_budget.TimeBudget(budget_minutes, run_start, clock)
            config.epochs = budget.plan(config, measure_costs(config, run, _fresh_state(config, run), clock))
        config_changes = workdir_lib.changes_from_saved(config_path, config) if os.path.exists(config_path) else []
        if is_main:
            workdir_lib.save_config(config, config_path)
        # The optimizer's state does not depend on the schedule, which the time budget may have re-planned.
        learning_rate_fn, optimizer = run.optimizer(config)
        state = state.replace(tx=optimizer)
        log.info("Model: %s, %s parameters, %s cross-entropy, %s compute; %d steps of %d images per epoch on %s.",
                 config.model, f"{models.count_params(state.params):,}", run.loss_kind, config.dtype,
                 run.steps_per_epoch, config.batch_size, parallel.describe())
        start_epoch = 0
        if restored is not None:
            state, start_epoch = _resume(state, restored, config_changes, workdir)
        metrics_log = MetricsLog(workdir) if is_main else None
        if is_main:
            metrics_log.keep_up_to(start_epoch)
        if config.early_stopping_share and any(r.get("epoch") == start_epoch and r.get("stopped_early")
                                               for r in (read_metrics(workdir) if start_epoch else [])):
            log.info("The run stopped early at epoch %d (set --config.early_stopping_share=0 to train on).",
                     start_epoch)
            config.epochs = start_epoch
        if start_epoch >= config.epochs:
            log.info("Already trained for %d of %d epochs; nothing to do.", start_epoch, config.epochs)
        if start_epoch:
            budget = None  # A resumed run keeps its plan.

        # The best validation accuracy of this run so far: an epoch at least as good may be the best, so it is
        # saved (after a resume, the first validated epoch is saved whatever its accuracy).
        best_accuracy, last_save = 0.0, clock()
        kept = (None, 0, 0)  # (scorer, step, epoch) of the validated epoch the run keeps so far.
        # Early stopping's view of progress: (accuracy, -loss) of the best validated epoch, and that epoch.
        progress, last_improved, stopped_early = (-math.inf, -math.inf), start_epoch, False
        try:
            epoch = start_epoch
            while epoch < config.epochs:  # The time budget may plan fewer epochs, or a longer last stage.
                epoch += 1
                if budget:
                    budget.epoch_started(epoch)
                state, record, scorer = _train_one_epoch(config, run, state, epoch, start_epoch, learning_rate_fn,
                                                         scorer_factory, clock)
                may_be_best = "val_accuracy" in record and record["val_accuracy"] >= best_accuracy  # Ties: later.
                if may_be_best:
                    best_accuracy = record["val_accuracy"]
                if may_be_best or ("val_accuracy" in record and config.keep_epoch == "last"):
                    kept = (scorer, int(state.step), epoch)
                if "val_accuracy" in record and (record["val_accuracy"], -record["val_loss"]) > progress:
                    progress, last_improved = (record["val_accuracy"], -record["val_loss"]), epoch
                cooldown = None  # Early stopping's shorter plan: (epochs, progressive.stage_epochs).
                if parallel.value_of_main_process(int(_stops_early(config, record, epoch, last_improved))):
                    cooldown = cooldown_plan(config, epoch)
                    log.info("Early stopping: no better validation for %d epochs (accuracy %.4f, loss %.4f at epoch "
                             "%d): the run ends after epoch %d instead of %d.", epoch - last_improved, progress[0],
                             -progress[1], last_improved, cooldown[0], config.epochs)
                    config.epochs, config.progressive.stage_epochs = cooldown
                    stopped_early = True
                if stopped_early and epoch == config.epochs:
                    record["stopped_early"] = True  # A rerun on this work directory has nothing left to do.
                if is_main:
                    metrics_log.append(record)
                # Saved with metrics only if validated: an epoch without validation cannot become the best. The
                # choice is process 0's, as orbax saves collectively and the clocks differ.
                if parallel.value_of_main_process(int(epoch == config.epochs or may_be_best or
                                                      clock() - last_save >= 60 * config.checkpoint_every_minutes)):
                    checkpointer.save(int(state.step), state, {"epoch": epoch}, record if "val_accuracy" in record
                                      else None)
                    last_save = clock()
                _log_epoch(config, record)
                new_plan = budget.after_epoch(config, epoch) if budget and not stopped_early else None
                if new_plan:
                    config.epochs, config.progressive.stage_epochs = new_plan
                if (new_plan or cooldown) and epoch < config.epochs:
                    learning_rate_fn, optimizer = run.optimizer(config)
                    state = state.replace(tx=optimizer)  # Compiles anew.
                    if is_main:
                        workdir_lib.save_config(config, config_path)  # A resume keeps this plan.
        finally:
            checkpointer.wait_until_finished()  # The last good checkpoint is on disk, whatever stopped the loop.
    return TrainResult(read_metrics(workdir) if is_main else [], config, class_names, run.source.description,
                       getattr(run.source.splits.get("validation"), "paths", None), *kept)


def _stops_early(config: ml_collections.ConfigDict, record: dict[str, Any], epoch: int, last_improved: int) -> bool:
    """Whether the run ends after `epoch` (validated in `record`) for early stopping: validation last improved
    (a higher accuracy, or as high with a lower loss) at epoch `last_improved`, at least early_stopping_share
    of the planned epochs (and 5) ago. With progressive resizing, not before the last stage, where the
    learning rate comes down and a network gains most (docs/accuracy.md, e153); there the run ends after a
    cooldown instead (`schedule.cooldown_plan`)."""
    if not config.early_stopping_share or "val_accuracy" not in record or epoch >= config.epochs:
        return False
    patience = max(5, math.ceil(config.early_stopping_share * config.epochs))
    if epoch < (last_stage_start(config) or 0) or epoch - last_improved < patience:
        return False
    return cooldown_plan(config, epoch)[0] < config.epochs  # Not once the plan is that short.


def _prepare(config: ml_collections.ConfigDict) -> _Run:
    """Opens the data and builds the model and its jitted steps (nothing is written). Adapts the config to the
    training photos first (`config_lib.adapt_to_photos`), so the rest of the run sees what trains."""
    mesh = parallel.create_mesh()
    parallel.check_batch_size("batch_size", config.batch_size, mesh.devices.size)
    source = input_pipeline.load_source(config)
    train_split, val_split = source.splits["train"], source.splits.get("validation")
    for change in config_lib.adapt_to_photos(config, train_split.median_short_side,
                                             train_split.num_examples / len(source.class_names)):
        log.info("%s", change)
    if config.strict and source.skipped:
        listed = "; ".join(f"{p}: {reason}" for p, reason in source.skipped[:5])
        more = f" (and {len(source.skipped) - 5} more)" if len(source.skipped) > 5 else ""
        raise UserError(f"{len(source.skipped)} unusable file(s) and --strict is set: {listed}{more}")
    if train_split.num_examples < config.batch_size:
        raise UserError(f"batch_size {config.batch_size} is larger than the training set ({train_split.num_examples} "
                        "images); lower --batch_size")
    loss_kind = losses.resolve_loss(config.loss, len(source.class_names))
    model = models.create_model(config, losses.num_outputs(loss_kind, len(source.class_names)))
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
    return _Run(
        source, loss_kind, mesh, model, train_split.num_examples // config.batch_size,
        parallel.process_rows(mesh, config.batch_size),
        input_pipeline.prepare(train_split, config.image_size, config.resize, config.cache),
        input_pipeline.prepare(val_split, config.image_size, config.resize, config.cache) if val_split else None,
        train_step_fn, lambda state, batch: jitted_eval(state, parallel.global_batch(mesh, batch)))


def _fresh_state(config: ml_collections.ConfigDict, run: _Run) -> TrainState:
    return create_train_state(run.model, config.image_size, run.optimizer(config)[1], config.seed, run.mesh,
                              ema=config.ema_decay > 0)


def _resume(state: TrainState, restored: tuple[Any, dict, int], config_changes: list[str],
            workdir: str) -> tuple[TrainState, int]:
    """The restored state (with this run's optimizer) and its epoch; warns where the config changed."""
    restored_state, meta, step = restored
    start_epoch = int(meta["epoch"])
    log.info("Resuming from the checkpoint of epoch %d (step %d) in %s.", start_epoch, step, workdir)
    recipe_changes = [c for c in config_changes if c.split(":", 1)[0] not in _NOT_TRAINING_FIELDS]
    if recipe_changes:
        log.warning("The run in %s was started with another config; it goes on with this one's values, which "
                    "mixes two recipes (use a new --workdir to start afresh): %s", workdir, "; ".join(recipe_changes))
    if len(recipe_changes) < len(config_changes):
        log.info("Changed since the run started, without changing what it trains: %s",
                 "; ".join(c for c in config_changes if c not in recipe_changes))
    return restored_state.replace(tx=state.tx), start_epoch


def _train_one_epoch(config: ml_collections.ConfigDict, run: _Run, state: TrainState, epoch: int, start_epoch: int,
                     learning_rate_fn: Callable, scorer_factory: Optional[Callable[[], Any]],
                     clock: Callable[[], float]) -> tuple[TrainState, dict[str, Any], Any]:
    """Trains `epoch` and validates after it where the schedule says; returns the state, the epoch's record
    and its validation scorer (None if not validated). A NaN or infinite loss or weight stops the run."""
    epoch_start = clock()
    image_size = train_image_size(config, epoch)
    if config.progressive.start_scale and (
            epoch == start_epoch + 1 or image_size != train_image_size(config, epoch - 1)):
        log.info("Progressive resizing: training at %d px from epoch %d.", image_size, epoch)
    batches = input_pipeline.train_batches(run.train_images, run.source.splits["train"].num_examples,
                                           config.batch_size, config.seed, epoch, run.rows)
    state, step_metrics = train_epoch(functools.partial(run.train_step, image_size=image_size), state, batches,
                                      run.steps_per_epoch, config.batch_size, f"epoch {epoch}/{config.epochs}")
    train_seconds = clock() - epoch_start
    stopped = "stopped without saving this epoch (the last good checkpoint stays the latest). Try a lower " \
              "--learning_rate"
    bad = next((i for i, m in enumerate(step_metrics) if not math.isfinite(float(m["loss"]))), None)
    if bad is not None:
        raise TrainingDiverged(f"the training loss became {float(step_metrics[bad]['loss'])} at epoch {epoch}, step "
                               f"{int(state.step) - len(step_metrics) + bad + 1}; {stopped}")
    if not bool(all_finite(state.params)):
        raise TrainingDiverged(f"the weights became NaN or infinite in epoch {epoch}; {stopped}")
    record = {"epoch": epoch, "step": int(state.step),
              "train_loss": float(np.mean([m["loss"] for m in step_metrics])),
              "train_accuracy": float(np.mean([m["accuracy"] for m in step_metrics]))}
    scorer = None
    if run.val_images is not None and validates_after(config, epoch):
        scorer = scorer_factory() if scorer_factory else None
        val = evaluate_batches(run.eval_step, state,
                               input_pipeline.eval_batches(run.val_images, config.batch_size, run.rows),
                               on_batch=scorer.add if scorer else None)
        if not math.isfinite(val["loss"]):
            raise TrainingDiverged(f"the validation loss became {val['loss']} at epoch {epoch} (training loss "
                                   f"{record['train_loss']:.4g}): the model's outputs overflow; {stopped}")
        record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
    record.update({
        "learning_rate": float(learning_rate_fn(int(state.step) - 1)),
        "epoch_time_s": clock() - epoch_start,
        "train_images_per_s": len(step_metrics) * config.batch_size / train_seconds,
        "train_image_size": image_size,
    })
    return state, record, scorer


def _log_epoch(config: ml_collections.ConfigDict, record: dict[str, Any]) -> None:
    validation = (f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f}" if "val_accuracy" in record
                  else "not validated")
    log.info("epoch %d/%d  train loss %.4f acc %.4f | %s | %.0f img/s | %.1f s", record["epoch"], config.epochs,
             record["train_loss"], record["train_accuracy"], validation, record["train_images_per_s"],
             record["epoch_time_s"])


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


def measure_costs(config: ml_collections.ConfigDict, run: _Run, probe: TrainState,
                  clock: Callable[[], float] = time.perf_counter) -> time_budget.Costs:
    """What the run's parts cost, for the time budget: the images are decoded (and cached, as the first epoch
    would), then the train step at every training size and a whole validation pass are timed, on `probe` (a
    throwaway state)."""
    cached, decode_seconds = {}, {}
    for name, images in (("train", run.train_images), ("validation", run.val_images)):
        if images is None:
            continue
        start = clock()
        for _ in input_pipeline.iterate(images):  # A whole pass fills tf.data's cache; later epochs read from it.
            pass
        decode_seconds[name] = clock() - start
        cached[name] = config.cache and input_pipeline.fits_in_memory(run.source.splits[name], config.image_size)
    batch = next(input_pipeline.train_batches(run.train_images, run.source.splits["train"].num_examples,
                                              config.batch_size, config.seed, 0, run.rows))
    sizes = sorted({train_image_size(config, epoch) for epoch in range(1, config.epochs + 1)})
    step_seconds = {}
    # The fastest of three rounds over the sizes: the first, right after decoding and compiling, timed steps up
    # to 1.6x as long as training then took, and a noisy spell should not hit one size alone.
    for _ in range(3):
        for size in sizes:
            probe, seconds = time_call(functools.partial(run.train_step, image_size=size), probe, batch, 8, clock)
            step_seconds[size] = min(seconds, step_seconds.get(size, math.inf))
    extra = {name: 0.0 if cached[name] else decode_seconds[name] for name in cached}  # Uncached: decoded each epoch.
    if run.val_images is not None:
        val_batches = lambda: input_pipeline.eval_batches(run.val_images, config.batch_size, run.rows)
        jax.block_until_ready(run.eval_step(probe, next(val_batches())))
        start = clock()
        evaluate_batches(run.eval_step, probe, val_batches())
        extra["validation"] += clock() - start
    return time_budget.Costs(step_seconds, run.steps_per_epoch, extra["train"], extra.get("validation", 0.0))


def time_call(call: Callable, state: TrainState, batch: dict[str, np.ndarray], calls: int,
              clock: Callable[[], float] = time.perf_counter) -> tuple[TrainState, float]:
    """Seconds per `call(state, batch) -> (state, outputs)`, after one untimed call (which compiles it)."""
    state, outputs = call(state, batch)
    jax.block_until_ready(outputs)
    start = clock()
    for _ in range(calls):
        state, outputs = call(state, batch)
    jax.block_until_ready((state, outputs))
    return state, (clock() - start) / calls
