"""MixUp and CutMix on whole batches, inside the jitted train step.

Each mixed batch pairs every image with the image at the mirrored position of the batch (the batch is already
shuffled) and draws one mixing weight `lam` ~ Beta(alpha, alpha) for the batch, as timm does by default:
MixUp blends the two images; CutMix pastes a box of the partner image covering a (1 - lam) share of the area.
The loss is `lam * loss(labels) + (1 - lam) * loss(partner labels)`, which is the cross-entropy with the
mixed soft target. Doing it on device keeps the tf.data pipeline per-image and the result a function of
(seed, step) alone, so resumed runs and every device layout mix identically.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections


class MixedBatch(NamedTuple):
    images: jax.Array
    labels: jax.Array  # The labels of the images as given.
    partner_labels: jax.Array  # The labels of the images mixed in.
    lam: jax.Array  # Weight of `labels` in the target, a scalar in [0, 1].


def is_enabled(mix_config: ml_collections.ConfigDict) -> bool:
    return mix_config.prob > 0.0 and (mix_config.mixup_alpha > 0.0 or mix_config.cutmix_alpha > 0.0)


def mix_batch(
    key: jax.Array, images: jax.Array, labels: jax.Array, mixup_alpha: float, cutmix_alpha: float, prob: float
) -> MixedBatch:
    """Mixes the batch with probability `prob`; with both alphas > 0, MixUp or CutMix half the time each."""
    apply_key, choice_key, lam_key, box_key = jax.random.split(key, 4)
    partner_images, partner_labels = images[::-1], labels[::-1]
    use_cutmix = _choose_cutmix(choice_key, mixup_alpha, cutmix_alpha)
    alpha = jnp.where(use_cutmix, cutmix_alpha if cutmix_alpha > 0 else 1.0, mixup_alpha if mixup_alpha > 0 else 1.0)
    lam = jax.random.beta(lam_key, alpha, alpha)

    inside, box_lam = _cutmix_box(box_key, images.shape[1], images.shape[2], lam)
    cutmix_images = jnp.where(inside[None, :, :, None], partner_images, images)
    mixup_images = lam * images + (1.0 - lam) * partner_images
    mixed_images = jnp.where(use_cutmix, cutmix_images, mixup_images)
    lam = jnp.where(use_cutmix, box_lam, lam)

    apply = jax.random.uniform(apply_key) < prob
    return MixedBatch(
        images=jnp.where(apply, mixed_images, images).astype(images.dtype),
        labels=labels,
        partner_labels=partner_labels,
        lam=jnp.where(apply, lam, 1.0),
    )


def _choose_cutmix(key: jax.Array, mixup_alpha: float, cutmix_alpha: float) -> jax.Array:
    if mixup_alpha > 0 and cutmix_alpha > 0:
        return jax.random.bernoulli(key, 0.5)
    return jnp.asarray(cutmix_alpha > 0)


def _cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A box of about (1 - lam) of the image's area, centred uniformly and clipped to the image; returns the
    (H, W) mask of the box and the share of the image outside it (the exact weight of the original labels)."""
    cut_ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = jnp.round(height * cut_ratio), jnp.round(width * cut_ratio)
    centre_key_y, centre_key_x = jax.random.split(key)
    centre_y = jax.random.randint(centre_key_y, (), 0, height)
    centre_x = jax.random.randint(centre_key_x, (), 0, width)
    top = jnp.clip(centre_y - cut_h // 2, 0, height)
    bottom = jnp.clip(centre_y + cut_h // 2, 0, height)
    left = jnp.clip(centre_x - cut_w // 2, 0, width)
    right = jnp.clip(centre_x + cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    box_lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return inside, box_lam
