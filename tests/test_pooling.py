"""The reshape pools equal flax's max_pool / avg_pool, gradients included (max: ties go to the first maximum;
average: a window that overhangs the edge averages only the entries it covers)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgclf_jax import pooling


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 9, 7, 2), (1, 5, 5, 1)])
def test_matches_flax_max_pool_with_gradients(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    x = jnp.round(x * 2) / 2  # Coarse values: many ties inside windows.
    x = x.at[0, :2, :2, 0].set(1.5)  # A window where all four tie.
    reference = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(pooling.max_pool(x), reference(x))
    weights = jax.random.normal(jax.random.key(1), reference(x).shape)
    want = jax.grad(lambda v: jnp.sum(reference(v) * weights))(x)
    got = jax.jit(jax.grad(lambda v: jnp.sum(pooling.max_pool(v) * weights)))(x)
    np.testing.assert_array_equal(got, want)


def test_relu_then_pool_gradient_unchanged():
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 4))
    f = lambda pool: jax.grad(lambda v: jnp.sum(jnp.sin(pool(jax.nn.relu(v)))))(x)
    np.testing.assert_allclose(f(pooling.max_pool), f(lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 9, 7, 2), (1, 5, 5, 1)])
def test_avg_pool_matches_flax_avg_pool_over_the_covered_entries_with_gradients(shape):
    x = jax.random.normal(jax.random.key(3), shape)
    reference = lambda v: nn.avg_pool(v, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)
    h, w = shape[1:3]
    assert pooling.avg_pool(x).shape == (shape[0], -(-h // 2), -(-w // 2), shape[3])
    np.testing.assert_allclose(pooling.avg_pool(x), reference(x), rtol=1e-6, atol=1e-6)
    weights = jax.random.normal(jax.random.key(4), reference(x).shape)
    want = jax.grad(lambda v: jnp.sum(reference(v) * weights))(x)
    got = jax.jit(jax.grad(lambda v: jnp.sum(pooling.avg_pool(v) * weights)))(x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_avg_pool_of_an_odd_edge_keeps_the_edge_value():
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    np.testing.assert_array_equal(pooling.avg_pool(x)[0, :, :, 0], [[2.0, 3.5], [6.5, 8.0]])
