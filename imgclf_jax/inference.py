"""Loading a trained run from its work directory and turning images into class probabilities.

Shared by `evaluate` and `predict`. Everything is read from plain files (config.json, classes.json, orbax
checkpoints): nothing is unpickled and no code from the work directory runs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imgclf_jax import augmentation, checkpointing, config_lib, losses, models, xla_cpu
from imgclf_jax import workdir as workdir_lib
from imgclf_jax.schedule import create_learning_rate_fn
from imgclf_jax.train_state import TrainState, abstract_train_state, all_finite, create_optimizer, eval_variables
from imgclf_jax.errors import UserError
from imgclf_jax.workdir import CHECKPOINTS_DIR, CLASSES_FILE, CONFIG_FILE


@dataclasses.dataclass
class TrainedRun:
    workdir: str
    config: ml_collections.ConfigDict
    class_names: list[str]
    loss_kind: str
    state: TrainState
    step: int
    epoch: int


# The --checkpoint flag of evaluate, predict, export and report.
CHECKPOINT_HELP = ("'kept' (the epoch the run keeps as its result: its config's keep_epoch, the best or the last), "
                   "'best' (by validation accuracy), 'latest' or a step number.")


def checkpoint_to_restore(config: ml_collections.ConfigDict, checkpoint: Union[str, int]) -> Union[str, int]:
    """`checkpoint` with 'kept' resolved to what the run's config keeps: 'best', or 'latest' for the last epoch
    (the latest checkpoint of a finished run is its last epoch)."""
    if checkpoint != "kept":
        return checkpoint
    return "latest" if config.keep_epoch == "last" else "best"


def load_run(workdir: str, checkpoint: Union[str, int] = "kept", conv_impl: Optional[str] = None) -> TrainedRun:
    """Restores the checkpoint `checkpoint` ('kept', 'best', 'latest' or a step number) of the run in `workdir`;
    `conv_impl` overrides the run's convolution implementation (export uses XLA's, which every runtime has)."""
    config_path = os.path.join(workdir, CONFIG_FILE)
    classes_path = os.path.join(workdir, CLASSES_FILE)
    if not os.path.isdir(workdir):
        raise UserError(f"work directory {workdir} does not exist")
    if not (os.path.isfile(config_path) and os.path.isfile(classes_path)):
        raise UserError(f"{workdir} is not a training work directory (no config.json / classes.json)")
    config = workdir_lib.load_saved_config(config_path)
    if conv_impl is not None:
        config.conv_impl = conv_impl
    class_names = workdir_lib.read_class_names(classes_path)
    loss_kind = losses.resolve_loss(config.loss, len(class_names))
    model = models.create_model(config, losses.num_outputs(loss_kind, len(class_names)))
    optimizer = create_optimizer(config, create_learning_rate_fn(config, steps_per_epoch=1))
    target = abstract_train_state(model, config.image_size, optimizer, ema=config.ema_decay > 0)

    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, CHECKPOINTS_DIR), read_only=True)
    steps = checkpointer.all_steps()
    if not steps:
        raise UserError(f"no checkpoint in {workdir}: train first (python -m imgclf_jax.train --workdir {workdir})")
    checkpoint = checkpoint_to_restore(config, checkpoint)
    if checkpoint not in ("best", "latest"):
        try:
            checkpoint = int(checkpoint)
        except ValueError:
            raise UserError(f"--checkpoint must be 'kept', 'best', 'latest' or a step number (got {checkpoint!r})"
                            ) from None
        if checkpoint not in steps:
            raise UserError(f"no checkpoint at step {checkpoint} in {workdir} (steps: {steps})")
    try:
        state, meta, step = checkpointer.restore(target, checkpoint)
    finally:
        checkpointer.close()
    if not bool(all_finite(eval_variables(state))):
        raise UserError(f"the checkpoint at step {step} in {workdir} holds NaN or infinite weights (its training "
                        "diverged); use another --checkpoint, or train again with a lower learning rate")
    return TrainedRun(workdir, config, class_names, loss_kind, state, step, int(meta["epoch"]))


# flip_scale's second scale: the photo enlarged 1.1x (176 px for a 160 px run). Chosen on cats-vs-dogs
# validation among 1.1x, 1.2x and both (docs/accuracy.md). On seventeen cats-vs-dogs runs that
# played no part in the choice it beat flip by 0.004 on average, so the cats_vs_dogs recipe uses
# it; it lost to the photo alone on small folders, so the default recipe does not.
TTA_SCALE = 1.1


def resolve_tta(run: TrainedRun, tta: Optional[str]) -> str:
    """`tta`, or with None the run's own `config.tta` (the test-time augmentation its config asks for)."""
    tta = run.config.tta if tta is None else tta
    config_lib.check_tta(run.config, tta, "--tta")
    return tta


def make_predict_fn(run: TrainedRun, tta: Optional[str] = None) -> Callable[[np.ndarray], np.ndarray]:
    """Returns a jitted images (N, S, S, 3) float [0, 1] -> (N, num_classes) probabilities function.

    Test-time augmentation (`tta`; None: the run's config.tta) averages the probabilities of several views
    of each image: 'flip' the image and its mirror image; 'flip_scale' those two and both again enlarged
    TTA_SCALE times (resized in the graph, so callers prepare images at one size as always). More views
    cost more time (flip_scale about 4.4x a plain pass) and usually cancel some of a model's mistakes.
    """
    tta = resolve_tta(run, tta)
    variables = eval_variables(run.state)
    apply = functools.partial(run.state.apply_fn, train=False)

    @functools.partial(jax.jit, compiler_options=xla_cpu.compiler_options())
    def predict(images: jnp.ndarray) -> jnp.ndarray:
        views = [images]
        if tta == "flip_scale":
            views.append(augmentation.resize(images, round(images.shape[1] * TTA_SCALE)))
        if tta in ("flip", "flip_scale"):
            views += [view[:, :, ::-1, :] for view in views]
        return sum(losses.probabilities(apply(variables, view), run.loss_kind) for view in views) / len(views)

    return predict

