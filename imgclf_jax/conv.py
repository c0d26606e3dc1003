"""2-D convolution whose weight gradient is computed as well-shaped matmuls (fast on XLA:CPU).

Where XLA:CPU runs convolutions in YNNPACK (`xla_cpu.compiler_options` turns that off where it can), it
computes a weight gradient as another convolution whose kernel is as large as the image, 7-15x slower than
the forward pass (docs/performance.md has the measurements). Here
the forward pass and the input gradient stay XLA convolutions, and the weight gradient is computed image by
image as patches^T @ output_gradient (so each image's patch matrix stays in cache), summed in a scan.
Results equal `jax.grad` of the plain convolution up to float rounding (tests/test_conv.py).

`conv_general_dilated` has the signature flax's `nn.Conv(conv_general_dilated=...)` expects; cases it does
not cover (dilation, feature groups, other layouts) go to `lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _patches_channel_major(image: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int],
                           padding: Padding, out_hw: tuple[int, int]) -> jax.Array:
    """(kh*kw*C, Ho*Wo) patch matrix of one (H, W, C) image, rows ordered (kh, kw, C) like an HWIO kernel.

    Built from the image in channel-major layout, so each of the kh*kw slices copies whole contiguous rows
    (building it pixel-major interleaves narrow columns and costs about twice as much).
    """
    (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
    padded = jnp.pad(image.transpose(2, 0, 1), ((0, 0), padding[0], padding[1]))
    slices = [padded[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw]
              for i in range(kh) for j in range(kw)]
    return jnp.concatenate(slices, axis=0).reshape(kh * kw * image.shape[-1], ho * wo)


def weight_gradient(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], strides: tuple[int, int],
                    padding: Padding) -> jax.Array:
    """d(loss)/d(kernel) from the input x (N, H, W, C) and output gradient dy (N, Ho, Wo, O)."""
    kh, kw, cin, cout = kernel_shape
    out_hw = dy.shape[1:3]

    def add_image(total, image_and_grad):
        image, grad = image_and_grad
        patches = _patches_channel_major(image, (kh, kw), strides, padding, out_hw)
        update = lax.dot(patches, grad.reshape(-1, cout), preferred_element_type=jnp.float32)
        return total + update, None

    total, _ = lax.scan(add_image, jnp.zeros((kh * kw * cin, cout), jnp.float32), (x, dy))
    return total.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding) -> jax.Array:
    """NHWC x HWIO convolution with explicit padding; its weight gradient uses `weight_gradient`."""
    return _conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    (dx,) = jax.linear_transpose(lambda v: _conv(v, kernel, strides, padding), x)(dy)
    dkernel = weight_gradient(x, dy, kernel.shape, strides, padding).astype(kernel.dtype)
    return dx, dkernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def explicit_padding(padding: Union[str, Sequence[tuple[int, int]]], in_hw: Sequence[int],
                     kernel_hw: Sequence[int], strides: Sequence[int]) -> Optional[Padding]:
    """'SAME' / 'VALID' / pairs -> ((lo, hi), (lo, hi)) as lax computes them; None if unsupported."""
    if isinstance(padding, str):
        if padding == "VALID":
            return ((0, 0), (0, 0))
        if padding != "SAME":
            return None
        pads = []
        for size, k, s in zip(in_hw, kernel_hw, strides):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    return pads if len(pads) == 2 and all(len(p) == 2 and min(p) >= 0 for p in pads) else None


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         **kwargs: Any) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated` that uses `conv2d` for plain 2-D NHWC convolutions."""
    plain = (
        lhs.ndim == 4 and feature_group_count == 1 and precision is None and not kwargs
        and all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    pads = explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], window_strides) if plain else None
    if pads is None:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision,
                                        **kwargs)
    return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), pads)
