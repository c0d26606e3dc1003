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
    if cfg.trivial_augment:  # Its key lies outside the split, so the other draws stay as they are without it.
        images = trivial_augment(jax.random.fold_in(key, len(keys)), images)
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
    cos, sin = jnp.cos(angles) * zooms, jnp.sin(angles) * zooms
    matrices = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2)
    return warp_affine(images, matrices, jnp.zeros((images.shape[0], 2)), mode="reflect")


def warp_affine(images: jax.Array, matrices: jax.Array, offsets: jax.Array, mode: str = "constant") -> jax.Array:
    """Each image resampled (bilinear) through its affine map: the output pixel at (row, col) from the centre
    samples the input at matrices[i] @ (row, col) + offsets[i] from the centre (matrices (N, 2, 2), offsets
    (N, 2), in pixels). Outside the image: black ('constant') or the mirror image ('reflect')."""
    height, width = images.shape[1:3]
    centre = jnp.array([(height - 1) / 2.0, (width - 1) / 2.0])
    grid = jnp.stack(jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                                  indexing="ij"), axis=-1) - centre  # (H, W, 2): (row, col) from the centre.

    def one(image, matrix, offset):
        source = jnp.einsum("ij,hwj->ihw", matrix, grid) + (centre + offset)[:, None, None]
        channel = lambda plane: jax.scipy.ndimage.map_coordinates(plane, [source[0], source[1]], order=1,
                                                                  mode=mode, cval=0.0)
        return jax.vmap(channel, in_axes=2, out_axes=2)(image)

    return jax.vmap(one)(images, matrices, offsets)


# TrivialAugment (Mueller & Hutter, 2021) with the op set and ranges of torchvision's TrivialAugmentWide: each
# image gets one op, drawn uniformly, at a magnitude drawn uniformly from [0, its maximum], with a random
# sign where the op has one. Its equalize (a histogram equalisation of each image) is left out.
TRIVIAL_AUGMENT_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
                       "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast")
_MAX_SHEAR = 0.99
_MAX_TRANSLATE = 32.0 / 224.0  # A share of the image's side (32 px of torchvision's 224).
_MAX_ROTATE = math.radians(135.0)
_MAX_ENHANCE = 0.99  # Brightness, colour, contrast and sharpness factors 1 +- this.
_LUMA = (0.299, 0.587, 0.114)  # PIL's grey level (mode 'L') of an RGB pixel.


def trivial_augment(key: jax.Array, images: jax.Array) -> jax.Array:
    """TrivialAugment on a batch of float images (N, H, W, 3) in [0, 1]: one random op per image (above)."""
    n = images.shape[0]
    op_key, magnitude_key, sign_key = jax.random.split(key, 3)
    ops = jax.random.randint(op_key, (n,), 0, len(TRIVIAL_AUGMENT_OPS))
    magnitude = jax.random.uniform(magnitude_key, (n,))
    return apply_trivial_augment_ops(images, ops, magnitude, jax.random.bernoulli(sign_key, 0.5, (n,)))


def apply_trivial_augment_ops(images: jax.Array, ops: jax.Array, magnitude: jax.Array,
                              negative: jax.Array) -> jax.Array:
    """Applies op TRIVIAL_AUGMENT_OPS[ops[i]] at magnitude[i] in [0, 1] (of the op's maximum; negated where
    negative[i], for the ops with a sign) to image i. Every op is computed for the whole batch and each image
    keeps its own, so the step stays one branch-free graph; the geometric ops share one affine warp."""
    height, width = images.shape[1:3]
    signed = jnp.where(negative, -magnitude, magnitude)
    chosen = {name: ops == i for i, name in enumerate(TRIVIAL_AUGMENT_OPS)}

    shear = _MAX_SHEAR * signed
    angle = jnp.where(chosen["rotate"], _MAX_ROTATE * signed, 0.0)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # (row, col) source offsets: rotation, then shear along the columns (x) or rows (y).
    matrices = jnp.stack([jnp.stack([cos, sin + jnp.where(chosen["shear_y"], shear, 0.0)], -1),
                          jnp.stack([-sin + jnp.where(chosen["shear_x"], shear, 0.0), cos], -1)], -2)
    shift = _MAX_TRANSLATE * signed
    offsets = jnp.stack([jnp.where(chosen["translate_y"], shift * height, 0.0),
                         jnp.where(chosen["translate_x"], shift * width, 0.0)], -1)
    geometric = sum(chosen[name] for name in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")) > 0
    warped = warp_affine(images, matrices, offsets)
    images = jnp.where(geometric[:, None, None, None], warped, images)

    factor = (1.0 + _MAX_ENHANCE * signed)[:, None, None, None]
    # PIL's grey level; a sum of slices, as XLA on CPUs reduces a trailing axis of 3 about 50x slower.
    grey = sum(weight * images[..., i:i + 1] for i, weight in enumerate(_LUMA))
    bits = jnp.floor(8.0 - 6.0 * magnitude)[:, None, None, None]  # 8 (unchanged) down to 2 bits.
    levels = 2.0 ** (8.0 - bits)
    low = jnp.min(images, axis=(1, 2), keepdims=True)
    high = jnp.max(images, axis=(1, 2), keepdims=True)
    stretched = jnp.where(high > low, (images - low) / jnp.maximum(high - low, 1e-6), images)
    candidates = {
        "brightness": images * factor,
        "color": grey + factor * (images - grey),
        "contrast": jnp.mean(grey, axis=(1, 2, 3), keepdims=True) * (1.0 - factor) + factor * images,
        "sharpness": _blend_with_smoothed(images, factor),
        "posterize": jnp.floor(jnp.round(images * 255.0) / levels) * levels / 255.0,
        "solarize": jnp.where(images >= (1.0 - magnitude)[:, None, None, None], 1.0 - images, images),
        "autocontrast": stretched,
    }
    for name, candidate in candidates.items():
        images = jnp.where(chosen[name][:, None, None, None], candidate, images)
    return jnp.clip(images, 0.0, 1.0)


def _blend_with_smoothed(images: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL's ImageEnhance.Sharpness: blends each image with its 3x3 smoothed version (centre weight 5, the
    rest 1, over 13), borders kept; factor 0 is the smoothed image, 1 the image, 2 sharper."""
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    height, width = images.shape[1:3]
    total = sum(padded[:, r:r + height, c:c + width] for r in range(3) for c in range(3))
    smoothed = (total + 4.0 * images) / 13.0
    inner = jnp.zeros(images.shape[1:3], bool).at[1:-1, 1:-1].set(True)[None, :, :, None]
    smoothed = jnp.where(inner, smoothed, images)
    return smoothed + factor * (images - smoothed)
