"""Non-overlapping max- and average-pooling with cheap gradients.

`nn.max_pool`'s gradient is XLA's select-and-scatter, which on CPU costs 25-50x the forward pass (for the
tutorial CNN it was about half of a whole training step: docs/performance.md). For the common case of
window == stride (2x2 pooling with stride 2), pooling is a reshape and a max, and its gradient is a mask
times the upsampled output gradient: one fused elementwise pass on any backend.

Gradient semantics match XLA's: where several inputs of a window tie for the maximum, the first one in
row-major order receives the gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _windows(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """(N, Ho, kh, Wo, kw, C) view of x, dropping the rows/columns that do not fill a window (VALID)."""
    n, h, w, c = x.shape
    kh, kw = window
    ho, wo = h // kh, w // kw
    return x[:, :ho * kh, :wo * kw, :].reshape(n, ho, kh, wo, kw, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, window: tuple[int, int] = (2, 2)) -> jax.Array:
    """Max over non-overlapping windows (stride = window, VALID padding) of an NHWC array."""
    return jnp.max(_windows(x, window), axis=(2, 4))


def _max_pool_fwd(x, window):
    y = max_pool(x, window)
    return y, (x, y)


def _max_pool_bwd(window, residuals, dy):
    x, y = residuals
    n, h, w, c = x.shape
    kh, kw = window
    windows = _windows(x, window)
    zero = jnp.zeros((), dy.dtype)
    taken = jnp.zeros(y.shape, bool)
    rows = []
    for i in range(kh):
        columns = []
        for j in range(kw):
            is_max = windows[:, :, i, :, j, :] == y
            columns.append(jnp.where(is_max & ~taken, dy, zero))
            taken = taken | is_max
        rows.append(jnp.stack(columns, axis=3))  # (N, Ho, Wo, kw, C)
    dx = jnp.stack(rows, axis=2)  # (N, Ho, kh, Wo, kw, C)
    dx = dx.reshape(n, y.shape[1] * kh, y.shape[2] * kw, c)
    dx = jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0)))
    return (dx,)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def avg_pool(x: jax.Array, window: tuple[int, int] = (2, 2)) -> jax.Array:
    """Mean over non-overlapping windows (stride = window) of an NHWC array, with SAME output size (rounded
    up, as a strided convolution's): a window that overhangs the bottom or right edge averages the entries it
    covers. A pad, a reshape and a sum, so its gradient is elementwise (as for `max_pool`)."""
    n, h, w, c = x.shape
    kh, kw = window
    ho, wo = -(-h // kh), -(-w // kw)
    padded = jnp.pad(x, ((0, 0), (0, ho * kh - h), (0, wo * kw - w), (0, 0)))
    sums = jnp.sum(_windows(padded, window), axis=(2, 4))
    counts = np.outer(np.minimum(kh, h - kh * np.arange(ho)), np.minimum(kw, w - kw * np.arange(wo)))
    return sums / jnp.asarray(counts[None, :, :, None], sums.dtype)
