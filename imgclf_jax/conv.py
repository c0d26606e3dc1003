"""2-D convolution with a custom gradient, for XLA:CPU: weight gradients as well-shaped matmuls, or native kernels.

Two implementations share one `jax.custom_vjp`:
- 'native': forward pass, input gradient (stride 1) and weight gradient in the AVX2/FMA kernels of
  `cpu_conv` (compiled on first use), which run this project's small-channel convolutions and weight
  gradients 1.5-4x faster than XLA:CPU's own (docs/performance.md).
- 'matmul_grad': for an XLA that runs convolutions in YNNPACK, whose weight gradients are 7-15x slower than
  the forward pass. The forward pass and the input gradient stay XLA convolutions, and the weight gradient
  is computed image by image as patches^T @ output_gradient (so each image's patch matrix stays in cache),
  summed in a scan.
Results equal `jax.grad` of the plain convolution up to float rounding (tests/test_conv.py).

`conv_general_dilated` has the signature flax's `nn.Conv(conv_general_dilated=...)` expects; cases it does
not cover (dilation, feature groups, other layouts; for 'native', dtypes other than float32, small outputs
where XLA's convolutions are faster (`cpu_conv.worth_it`), or a machine where the kernels did not build) go to
`lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from imgclf_jax import cpu_conv, pooling

_NHWC = ("NHWC", "HWIO", "NHWC")
Padding = cpu_conv.Padding


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


IMPLS = ("native", "matmul_grad")


def _forward(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding, impl: str) -> jax.Array:
    return cpu_conv.forward(x, kernel, strides, padding) if impl == "native" else _conv(x, kernel, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding,
           impl: str) -> jax.Array:
    """NHWC x HWIO convolution with explicit padding, computed by `impl` (one of IMPLS)."""
    return _forward(x, kernel, strides, padding, impl)


def _conv2d_fwd(x, kernel, strides, padding, impl):
    return _forward(x, kernel, strides, padding, impl), (x, kernel)


def _transposed_padding(kernel_hw: Sequence[int], padding: Padding) -> Optional[Padding]:
    """Padding of the stride-1 convolution of dy with the flipped kernel that gives the input gradient."""
    pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_hw, padding))
    return pads if min(min(p) for p in pads) >= 0 else None


def _conv2d_bwd(strides, padding, impl, residuals, dy):
    x, kernel = residuals
    dx_padding = _transposed_padding(kernel.shape[:2], padding) if strides == (1, 1) else None
    if impl == "native" and dx_padding is not None:
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        dx = cpu_conv.forward(dy, flipped, (1, 1), dx_padding)
    else:
        (dx,) = jax.linear_transpose(lambda v: _conv(v, kernel, strides, padding), x)(dy)
    if impl == "native":
        dkernel = cpu_conv.weight_gradient(x, dy, kernel.shape, strides, padding)
    else:
        dkernel = weight_gradient(x, dy, kernel.shape, strides, padding)
    return dx, dkernel.astype(kernel.dtype)


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
                         impl: str = "matmul_grad", **kwargs: Any) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated` that uses `conv2d` (with `impl`) for plain 2-D NHWC convolutions."""
    if impl not in IMPLS:
        raise ValueError(f"unknown convolution implementation {impl!r} (choose from {', '.join(IMPLS)})")
    plain = (
        lhs.ndim == 4 and feature_group_count == 1 and precision is None and not kwargs
        and (impl != "native" or (lhs.dtype == rhs.dtype == jnp.float32 and cpu_conv.available()))
        and all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    pads = explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], window_strides) if plain else None
    if pads is not None and impl == "native" and not cpu_conv.worth_it(lhs.shape, rhs.shape, window_strides, pads):
        pads = None
    if pads is None:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision,
                                        **kwargs)
    return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), pads, impl)


def conv_relu_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str) -> jax.Array:
    """max_pool_2x2(relu(conv(x, kernel, stride 1, 'SAME') + bias)): a CNN block (flax's nn.Conv, nn.relu and
    `pooling.max_pool` compute the same). With impl 'native' and float32 this is one fused op whose
    full-size output (and its gradient) is never written to memory: on this project's tutorial CNN those
    passes over 66 MB arrays cost more than the first layer's convolution (docs/performance.md). Its gradients
    equal jax.grad of the unfused layers up to float rounding (tests/test_conv.py); other impls, dtypes and
    small outputs compute the unfused layers.
    """
    pads = explicit_padding("SAME", x.shape[1:3], kernel.shape[:2], (1, 1))
    full_hw = cpu_conv.output_hw(x.shape, kernel.shape, (1, 1), pads)
    fused = (impl == "native" and x.dtype == kernel.dtype == bias.dtype == jnp.float32 and min(full_hw) >= 2
             and _transposed_padding(kernel.shape[:2], pads) is not None and cpu_conv.available()
             and cpu_conv.worth_it(x.shape, kernel.shape, (1, 1), pads))
    if fused:
        return _fused_conv_relu_pool(x, kernel, bias, pads)
    conv_fn = lax.conv_general_dilated if impl == "xla" else functools.partial(conv_general_dilated, impl=impl)
    y = conv_fn(x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC) + bias
    return pooling.max_pool(jax.nn.relu(y), (2, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_conv_relu_pool(x, kernel, bias, padding):
    return cpu_conv.relu_pool(x, kernel, bias, (1, 1), padding)[0]


def _fused_fwd(x, kernel, bias, padding):
    y, choice = cpu_conv.relu_pool(x, kernel, bias, (1, 1), padding)
    return y, (x, kernel, choice)


def _fused_bwd(padding, residuals, dy):
    x, kernel, choice = residuals
    dbias = jnp.sum(jnp.where(choice < 4, dy, 0.0), axis=(0, 1, 2))  # Over the pooled gradient: 4x less to read.
    dkernel = cpu_conv.pooled_weight_gradient(x, dy, choice, kernel.shape, (1, 1), padding)
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    full_hw = cpu_conv.output_hw(x.shape, kernel.shape, (1, 1), padding)
    dx = cpu_conv.pooled_forward(dy, choice, flipped, full_hw, _transposed_padding(kernel.shape[:2], padding))
    return dx, dkernel, dbias


_fused_conv_relu_pool.defvjp(_fused_fwd, _fused_bwd)
