"""Batched training augmentation in the train step: crops, resizing, flips, rotation/zoom, colour jitter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

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


@pytest.mark.parametrize("size", [16, 8])
def test_full_augmentation_is_a_function_of_the_key(size):
    cfg = _augment_config(flip=True, rotation=0.1, zoom=0.2, crop_area_min=0.5, brightness=0.1, contrast=0.2)
    images = _images()
    augment = jax.jit(lambda key, x: augmentation.training_images(key, x, cfg, size))
    first, again = augment(jax.random.key(7), images), augment(jax.random.key(7), images)
    other = augment(jax.random.key(8), images)
    assert first.shape == (8, size, size, 3) and first.dtype == jnp.float32
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
