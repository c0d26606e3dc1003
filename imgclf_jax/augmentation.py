"""Training augmentation as batched JAX ops, run inside the jitted train step.

Why in the step and not in tf.data: per-image tf.data ops cost about 0.6 ms of CPU per image whatever its
size (op overhead), and on a 2-core machine those threads pre-empt XLA's, so the step waits: at 48 px the
training loop ran 20-35% slower than on the same batches held in memory (docs/performance.md). Here the
whole batch is cropped, resized, flipped and jittered by a handful of vectorised ops that XLA fuses into the
step, on every backend (on GPUs/TPUs it also takes the work off the host and ships uint8 instead of float).

Every random draw comes from the key the step passes in (derived from the run's seed and the step number),
so a run is reproducible and a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

_CROP_ATTEMPTS = 10
_ASPECT_RANGE = (3 / 4, 4 / 3)


def to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1] (the models' input range); float images are taken as already in it."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def training_images(key: jax.Array, images: jax.Array, cfg: Optional[ml_collections.ConfigDict],
                    size: Optional[int] = None) -> jax.Array:
    """The float32 (N, size, size, 3) images a train step trains on: `images` (N, H, W, 3), uint8 or float in
    [0, 1], augmented as `cfg` (config.augment, None = no augmentation) says, at `size` px (default: H)."""
    images = to_float(images)
    size = size or images.shape[1]
    if cfg is None:
        return images if images.shape[1:3] == (size, size) else resize(images, size)
    keys = jax.random.split(key, 5)
    n, height, width = images.shape[:3]
    if cfg.crop_area_min < 1.0:
        boxes = sample_crop_boxes(keys[0], n, height, width, cfg.crop_area_min)
        images = crop_and_resize(images, boxes, size)
    elif (height, width) != (size, size):
        images = resize(images, size)
    if cfg.flip:
        flipped = jax.random.bernoulli(keys[1], 0.5, (n,))
        images = jnp.where(flipped[:, None, None, None], images[:, :, ::-1], images)
    if cfg.rotation > 0.0 or cfg.zoom > 0.0:
        angle_key, zoom_key = jax.random.split(keys[2])
        angles = jax.random.uniform(angle_key, (n,), minval=-cfg.rotation, maxval=cfg.rotation) * 2.0 * math.pi
        zooms = jax.random.uniform(zoom_key, (n,), minval=1.0 - cfg.zoom, maxval=1.0 + cfg.zoom)
        images = rotate_and_zoom(images, angles, zooms)
    if cfg.brightness > 0.0:
        images = images + jax.random.uniform(keys[3], (n, 1, 1, 1), minval=-cfg.brightness, maxval=cfg.brightness)
    if cfg.contrast > 0.0:  # As tf.image.adjust_contrast: scale each channel's deviation from its mean.
        factors = jax.random.uniform(keys[4], (n, 1, 1, 1), minval=1.0 - cfg.contrast, maxval=1.0 + cfg.contrast)
        means = jnp.mean(images, axis=(1, 2), keepdims=True)
        images = (images - means) * factors + means
    return jnp.clip(images, 0.0, 1.0)


def resize(images: jax.Array, size: int) -> jax.Array:
    """(N, H, W, C) -> (N, size, size, C), bilinear with antialiasing when shrinking (as tf.image.resize's
    antialias=True)."""
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "linear", antialias=True)


def sample_crop_boxes(key: jax.Array, n: int, height: int, width: int, area_min: float) -> jax.Array:
    """Random-resized-crop boxes (top, left, box height, box width) in pixels, shape (n, 4): area a uniform
    fraction in [area_min, 1] of the image's, aspect ratio log-uniform in [3/4, 4/3], position uniform. As
    torchvision's RandomResizedCrop, up to 10 draws per image; the first that fits is used, else the whole
    image."""
    area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
    area = jax.random.uniform(area_key, (n, _CROP_ATTEMPTS), minval=area_min, maxval=1.0) * (height * width)
    log_ratio = jax.random.uniform(ratio_key, (n, _CROP_ATTEMPTS), minval=math.log(_ASPECT_RANGE[0]),
                                   maxval=math.log(_ASPECT_RANGE[1]))
    box_w = jnp.sqrt(area * jnp.exp(log_ratio))
    box_h = jnp.sqrt(area / jnp.exp(log_ratio))
    fits = (box_w <= width) & (box_h <= height)
    first = jnp.argmax(fits, axis=1)[:, None]
    any_fits = jnp.any(fits, axis=1)
    box_h = jnp.where(any_fits, jnp.take_along_axis(box_h, first, axis=1)[:, 0], height)
    box_w = jnp.where(any_fits, jnp.take_along_axis(box_w, first, axis=1)[:, 0], width)
    top = jax.random.uniform(top_key, (n,)) * (height - box_h)
    left = jax.random.uniform(left_key, (n,)) * (width - box_w)
    return jnp.stack([top, left, box_h, box_w], axis=1)


def crop_and_resize(images: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """Each image's box (top, left, height, width; fractional pixels allowed) resampled to size x size,
    bilinear with antialiasing where the box shrinks."""

    def one(image, box):
        top, left, box_h, box_w = box[0], box[1], box[2], box[3]
        scale = jnp.stack([size / box_h, size / box_w])
        return jax.image.scale_and_translate(image, (size, size, image.shape[2]), (0, 1), scale,
                                             -jnp.stack([top, left]) * scale, "linear", antialias=True)

    return jax.vmap(one)(images, boxes)


def rotate_and_zoom(images: jax.Array, angles: jax.Array, zooms: jax.Array) -> jax.Array:
    """Rotates each image by its angle (radians, counter-clockwise on screen) about the centre and zooms
    (zoom > 1 shows more, as Keras's RandomZoom), bilinear, reflecting at the edges."""
    height, width = images.shape[1:3]
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    centre_r, centre_c = (height - 1) / 2.0, (width - 1) / 2.0

    def one(image, angle, zoom):
        cos, sin = jnp.cos(angle) * zoom, jnp.sin(angle) * zoom
        # The input pixel each output pixel samples (the inverse map of the rotation).
        src_c = cos * (cols - centre_c) - sin * (rows - centre_r) + centre_c
        src_r = sin * (cols - centre_c) + cos * (rows - centre_r) + centre_r
        channel = lambda plane: jax.scipy.ndimage.map_coordinates(plane, [src_r, src_c], order=1, mode="reflect")
        return jax.vmap(channel, in_axes=2, out_axes=2)(image)

    return jax.vmap(one)(images, angles, zooms)
