"""Batched training augmentation in the train step: crops, resizing, flips, rotation/zoom, colour jitter,
TrivialAugment."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from imgclf_jax import augmentation, config_lib


def _augment_config(**fields):
    cfg = config_lib.base_config().augment
    cfg.update(enabled=True, **fields)
    return cfg


def _images(n=8, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_no_augmentation_is_the_float_image_and_uint8_is_scaled():
    images = _images()
    out = augmentation.training_images(jax.random.key(0), images, None)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, images / 255.0, rtol=1e-6)
    floats = images.astype(np.float32) / 255.0  # Float input is taken as already in [0, 1].
    np.testing.assert_allclose(augmentation.training_images(jax.random.key(0), floats, None), floats, rtol=1e-6)


def test_resize_matches_tensorflows_antialiased_resize():
    images = _images(size=20).astype(np.float32) / 255.0
    for size in (8, 12, 32):
        ours = augmentation.training_images(jax.random.key(0), images, None, size)
        theirs = tf.image.resize(images, [size, size], antialias=True).numpy()
        assert ours.shape == (8, size, size, 3)
        np.testing.assert_allclose(ours, np.clip(theirs, 0, 1), atol=1e-4)


def test_crop_boxes_lie_inside_the_image_with_the_asked_area_and_aspect():
    boxes = np.asarray(augmentation.sample_crop_boxes(jax.random.key(1), 2000, 60, 80, 0.3))
    top, left, height, width = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 60 + 1e-3).all() and (left + width <= 80 + 1e-3).all()
    whole = (height == 60) & (width == 80)  # The fallback when no draw fits.
    area = height * width / (60 * 80)
    ratio = width / height
    assert ((area >= 0.3 - 1e-5) & (area <= 1 + 1e-5)).all()
    assert ((ratio >= 3 / 4 - 1e-5) & (ratio <= 4 / 3 + 1e-5) | whole).all()
    assert area.std() > 0.15 and top.std() > 1 and left.std() > 1  # Really random, not one box.


def test_crop_and_resize_cuts_the_box_out():
    images = _images(n=2, size=16).astype(np.float32)
    # Whole-pixel boxes of the output size are copied exactly; a whole-image box is a plain resize.
    boxes = jnp.array([[3.0, 5.0, 8.0, 8.0], [0.0, 0.0, 16.0, 16.0]])
    out = np.asarray(augmentation.crop_and_resize(images, boxes, 8))
    np.testing.assert_allclose(out[0], images[0, 3:11, 5:13], atol=1e-3)
    np.testing.assert_allclose(out[1], augmentation.resize(images[1:], 8)[0], atol=1e-3)


def test_crop_zooms_in_on_a_ramp():
    ramp = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32)[None, :, None], (32, 1, 3))
    images = np.stack([ramp] * 16)
    out = np.asarray(augmentation.training_images(jax.random.key(3), images, _augment_config(crop_area_min=0.3), 32))
    steps = np.diff(out[:, 16, 2:-2, 0], axis=1)  # Inner columns: away from the edges' antialiasing.
    assert (steps > 0).all()  # Still left-to-right, never flipped without flip=True ...
    # ... and magnified (a box of width w in 32 px stretched to 32 px), never shrunk: w >= sqrt(0.3 * 3/4) * 32.
    assert ((steps.mean(axis=1) <= 1.0 / 31 + 1e-4) & (steps.mean(axis=1) >= 0.47 / 31)).all()
    assert steps.mean(axis=1).std() > 1e-3  # Different crops for different images.


def test_flip_mirrors_some_images_and_keeps_the_rest():
    images = _images(n=32).astype(np.float32) / 255.0
    out = np.asarray(augmentation.training_images(jax.random.key(4), images, _augment_config(flip=True)))
    flipped = [np.allclose(o, i[:, ::-1]) for o, i in zip(out, images)]
    kept = [np.allclose(o, i) for o, i in zip(out, images)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 4 <= sum(flipped) <= 28


def test_brightness_shifts_and_contrast_scales_each_image():
    grey = np.full((16, 8, 8, 3), 0.5, np.float32) + np.linspace(-0.2, 0.2, 8, dtype=np.float32)[None, :, None, None]
    shifted = np.asarray(augmentation.training_images(jax.random.key(5), grey, _augment_config(brightness=0.1)))
    delta = shifted - grey
    assert np.allclose(delta, delta[:, :1, :1, :1], atol=1e-6)  # One shift per image ...
    assert (np.abs(delta[:, 0, 0, 0]) <= 0.1).all() and delta[:, 0, 0, 0].std() > 0.02  # ... of up to 0.1.
    scaled = np.asarray(augmentation.training_images(jax.random.key(6), grey, _augment_config(contrast=0.2)))
    factor = (scaled[:, -1, 0, 0] - scaled[:, 0, 0, 0]) / (grey[:, -1, 0, 0] - grey[:, 0, 0, 0])
    assert ((factor >= 0.8 - 1e-5) & (factor <= 1.2 + 1e-5)).all() and factor.std() > 0.05
    np.testing.assert_allclose(scaled.mean(axis=(1, 2)), grey.mean(axis=(1, 2)), atol=1e-6)  # Mean kept.


def test_rotation_and_zoom():
    images = _images(n=2, size=9).astype(np.float32)
    same = augmentation.rotate_and_zoom(images, jnp.zeros(2), jnp.ones(2))
    np.testing.assert_allclose(same, images, atol=1e-4)
    half_turn = augmentation.rotate_and_zoom(images, jnp.full(2, np.pi), jnp.ones(2))
    np.testing.assert_allclose(half_turn, images[:, ::-1, ::-1], atol=1e-3)
    quarter = augmentation.rotate_and_zoom(images, jnp.full(2, np.pi / 2), jnp.ones(2))
    np.testing.assert_allclose(quarter, np.rot90(images, k=1, axes=(1, 2)), atol=1e-3)
    # Zoom 2 shows twice as much: the centre pixel stays, the pixel one step right samples two steps right.
    zoomed = augmentation.rotate_and_zoom(images, jnp.zeros(2), jnp.full(2, 2.0))
    np.testing.assert_allclose(zoomed[:, 4, 4], images[:, 4, 4], atol=1e-4)
    np.testing.assert_allclose(zoomed[:, 4, 5], images[:, 4, 6], atol=1e-4)


def test_warp_affine_shifts_and_fills_the_outside_with_black():
    images = _images(n=2, size=9).astype(np.float32)
    same = augmentation.warp_affine(images, jnp.tile(jnp.eye(2), (2, 1, 1)), jnp.zeros((2, 2)))
    np.testing.assert_allclose(same, images, atol=1e-4)
    shifted = np.asarray(augmentation.warp_affine(images, jnp.tile(jnp.eye(2), (2, 1, 1)), jnp.array([[0.0, 2.0]] * 2)))
    np.testing.assert_allclose(shifted[:, :, :7], images[:, :, 2:], atol=1e-4)  # Each pixel shows the one 2 right.
    assert (shifted[:, :, 8] == 0).all()  # Beyond the right edge: black.


def _trivial(images, op, magnitude, negative=False):
    n = images.shape[0]
    return np.asarray(augmentation.apply_trivial_augment_ops(
        images, jnp.full(n, augmentation.TRIVIAL_AUGMENT_OPS.index(op)), jnp.full(n, magnitude),
        jnp.full(n, negative)))


def _photo(size=24):
    """A smooth colour picture (PIL's enhancers act on neighbourhoods and grey levels), uint8 (1, H, W, 3)."""
    r, c = np.mgrid[0:size, 0:size] / (size - 1)
    rgb = np.stack([0.2 + 0.6 * r, 0.5 + 0.4 * np.sin(6 * c) * r, 0.9 - 0.7 * c * r], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)[None]


@pytest.mark.parametrize("op, magnitude, negative, pil", [
    ("identity", 0.7, False, lambda im: im),
    ("brightness", 0.5, False, lambda im: ImageEnhance.Brightness(im).enhance(1.495)),
    ("brightness", 0.5, True, lambda im: ImageEnhance.Brightness(im).enhance(0.505)),
    ("color", 0.8, False, lambda im: ImageEnhance.Color(im).enhance(1.792)),
    ("contrast", 0.6, True, lambda im: ImageEnhance.Contrast(im).enhance(0.406)),
    ("sharpness", 0.9, False, lambda im: ImageEnhance.Sharpness(im).enhance(1.891)),
    ("sharpness", 0.9, True, lambda im: ImageEnhance.Sharpness(im).enhance(0.109)),
    ("posterize", 0.9, False, lambda im: ImageOps.posterize(im, 2)),
    ("posterize", 0.4, False, lambda im: ImageOps.posterize(im, 5)),
    ("solarize", 0.2, False, lambda im: ImageOps.solarize(im, 204)),
    ("autocontrast", 0.3, False, ImageOps.autocontrast),
])
def test_trivial_augment_colour_ops_match_pil(op, magnitude, negative, pil):
    photo = _photo()
    ours = _trivial(photo.astype(np.float32) / 255.0, op, magnitude, negative)[0]
    theirs = np.asarray(pil(Image.fromarray(photo[0])), np.float32) / 255.0
    np.testing.assert_allclose(ours, theirs, atol=2.5 / 255)  # PIL rounds its steps to whole grey levels.


def test_trivial_augment_geometric_ops():
    images = np.tile(np.linspace(0.1, 0.9, 15, dtype=np.float32)[None, :, None, None], (1, 1, 15, 3))  # Rows.
    # Shearing along x moves each row sideways: a picture that varies only down the rows keeps its centre
    # column and its middle row, and black comes in at the corners.
    sheared = _trivial(images, "shear_x", 0.5)
    np.testing.assert_allclose(sheared[0, :, 7], images[0, :, 7], atol=1e-5)
    np.testing.assert_allclose(sheared[0, 7], images[0, 7], atol=1e-5)
    assert sheared[0, 0, 0, 0] == 0 or sheared[0, 0, -1, 0] == 0
    # Translating down by the most (32/224 of 15 px = 2.14 px): the top rows turn black, the rest move.
    moved = _trivial(images, "translate_y", 1.0, negative=True)
    assert (moved[0, :2] == 0).all()
    np.testing.assert_allclose(moved[0, 5:, 7, 0], np.interp(np.arange(5, 15) - 15 / 7, np.arange(15),
                                                             images[0, :, 7, 0]), atol=1e-5)
    # 90 degrees (2/3 of the most, 135): the rows become columns.
    turned = _trivial(images, "rotate", 2 / 3)
    np.testing.assert_allclose(turned[0], np.rot90(images[0], k=1), atol=1e-4)


def test_trivial_augment_gives_each_image_one_random_op():
    images = np.repeat(_photo(), 64, axis=0).astype(np.float32) / 255.0
    cfg = _augment_config(trivial_augment=True)
    out = np.asarray(jax.jit(lambda key, x: augmentation.training_images(key, x, cfg))(jax.random.key(9), images))
    again = np.asarray(augmentation.training_images(jax.random.key(9), images, cfg))
    np.testing.assert_allclose(out, again, atol=1e-6)
    changed = np.abs(out - images).max(axis=(1, 2, 3)) > 1e-3
    assert 1 <= (~changed).sum() <= 16  # Identity and near-zero magnitudes: about 1 in 13 or a few more.
    # Mostly each its own change (autocontrast, and posterize at one bit count, give equal images the same).
    assert len({np.round(o, 3).tobytes() for o in out[changed]}) >= 0.75 * changed.sum()
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("size", [16, 8])
def test_full_augmentation_is_a_function_of_the_key(size):
    cfg = _augment_config(flip=True, rotation=0.1, zoom=0.2, crop_area_min=0.5, brightness=0.1, contrast=0.2,
                          trivial_augment=True)
    images = _images()
    augment = jax.jit(lambda key, x: augmentation.training_images(key, x, cfg, size))
    first, again = augment(jax.random.key(7), images), augment(jax.random.key(7), images)
    other = augment(jax.random.key(8), images)
    assert first.shape == (8, size, size, 3) and first.dtype == jnp.float32
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
