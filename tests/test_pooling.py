"""The reshape max-pool equals flax's max_pool, gradients included (ties go to the first maximum)."""

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
