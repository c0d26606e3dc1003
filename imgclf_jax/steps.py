"""The jitted steps: `train_step(state, batch) -> (state, metrics)` and `eval_step`, pure functions of their
arguments; and `evaluate_batches`, the one masked evaluation loop that training's validation, evaluate and
the report run."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imgclf_jax import augmentation, losses, mixing
from imgclf_jax.train_state import EmaTrainState, TrainState, eval_variables, update_ema

# Folded into the step's dropout key for augmentation and MixUp/CutMix, so that dropout draws stay as they
# are with or without them.
_AUGMENT_KEY_STREAM = 0x617567
_MIX_KEY_STREAM = 0x6D6978


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
    eval_fn: Callable, state: Optional[TrainState], batches: Iterable[dict[str, np.ndarray]],
    on_batch: Optional[Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = None,
) -> dict[str, float]:
    """The one evaluation loop (training's validation, evaluate, the report): runs `eval_fn(state, batch)` over
    padded batches (mask 0 on padding) and returns the mean loss and accuracy over every real example, where
    `eval_fn` returns the sums `eval_step` does; one that returns only "probabilities" (a prediction function)
    is run for `on_batch` alone.

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
        sums.append({k: out[k] for k in keys if k in out})
        if on_batch is not None:
            if pending is not None:
                hand_over(*pending)
            pending = (batch, out)
    if pending is not None:
        hand_over(*pending)
    sums = jax.device_get(sums)
    if not all(k in s for s in sums for k in keys):
        return {}
    totals = {k: sum(float(s[k]) for s in sums) for k in keys}
    count = totals["count"]
    return {
        "loss": float(totals["loss_sum"]) / max(count, 1.0),
        "accuracy": float(totals["correct"]) / max(count, 1.0),
        "num_examples": int(count),
    }
