"""Flax CNNs. All take float32 images in [0, 1], shape (N, H, W, 3), and return (N, num_outputs) logits.

- `tutorial_cnn`: the Keras tutorial's network exactly (conv 16/32/64 + max-pool, dense 128).
- `cnn`: the same family, configurable (filters per block, convs per block, batch-norm, dropout, pooling).
- `resnet`: a small residual network with batch-norm for photos.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from imgclf_jax import conv, cpu_conv, pooling, xla_cpu
from imgclf_jax.errors import UserError

MODEL_NAMES = ("tutorial_cnn", "cnn", "resnet")
CONV_IMPLS = ("auto", "xla", "native", "matmul_grad")
DTYPES = ("float32", "bfloat16")
# The ResNet's nonlinearity (`resnet.activation`), for each of config_lib.RESNET_ACTIVATIONS.
ACTIVATIONS = {"relu": nn.relu, "silu": nn.silu}

# Models take their convolution as callables, built by `create_model` from the resolved `conv_impl` ('xla',
# 'native' or 'matmul_grad'; see `resolve_conv_impl`): `conv`, a layer like nn.Conv, and for the CNNs
# `conv_relu_pool`, the fused block's function (x, kernel, bias) -> y.
ConvFn = Optional[Callable[..., jax.Array]]
ModuleDef = Any
ConvReluPoolFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
_XLA_CONV_RELU_POOL = functools.partial(conv.conv_relu_pool, impl="xla")


def _conv_layer(conv_impl: str, dtype: Any, **kwargs: Any):
    return functools.partial(nn.Conv, conv_general_dilated=_conv_fn(conv_impl), dtype=dtype, **kwargs)


class ConvReluPool(nn.Module):
    """[3x3 'SAME' conv with bias, ReLU, 2x2 max-pool]: nn.Conv's parameters (so checkpoints and initial values
    are those of the three separate layers), computed by `conv.conv_relu_pool` (one fused op with the native
    kernels)."""

    features: int
    conv_relu_pool: ConvReluPoolFn = _XLA_CONV_RELU_POOL
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return self.conv_relu_pool(x, kernel, bias)


def _batch_norm(train: bool, dtype: Any, **kwargs: Any) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype, **kwargs)


class TutorialCNN(nn.Module):
    """Keras tutorial CNN: three [conv 3x3 same + ReLU, max-pool 2x2] blocks, flatten, dense 128, output."""

    num_outputs: int
    conv_relu_pool: ConvReluPoolFn = _XLA_CONV_RELU_POOL
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = x.astype(self.dtype)
        for index, filters in enumerate((16, 32, 64)):
            x = ConvReluPool(filters, self.conv_relu_pool, self.dtype, name=f"Conv_{index}")(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128, dtype=self.dtype)(x))
        return nn.Dense(self.num_outputs, dtype=self.dtype)(x).astype(jnp.float32)


class CNN(nn.Module):
    """Configurable plain CNN: blocks of [conv (+BN) + ReLU] x convs_per_block then 2x2 max-pool."""

    num_outputs: int
    filters: Sequence[int] = (32, 64, 128)
    convs_per_block: int = 1
    batch_norm: bool = False
    dense_units: int = 128
    dropout: float = 0.0
    global_pool: bool = False
    conv: ModuleDef = nn.Conv
    conv_relu_pool: ConvReluPoolFn = _XLA_CONV_RELU_POOL
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = x.astype(self.dtype)
        index = 0  # Convolutions are named Conv_0, Conv_1, ... in order, fused or not.
        for filters in self.filters:
            for block_conv in range(self.convs_per_block):
                name = f"Conv_{index}"
                index += 1
                if not self.batch_norm and block_conv == self.convs_per_block - 1:
                    x = ConvReluPool(filters, self.conv_relu_pool, self.dtype, name=name)(x)
                    break
                x = self.conv(filters, (3, 3), padding="SAME", use_bias=not self.batch_norm, dtype=self.dtype,
                              name=name)(x)
                if self.batch_norm:
                    x = _batch_norm(train, self.dtype)(x)
                x = nn.relu(x)
            else:  # No fused block ended the loop (batch-norm sits between convolution and ReLU).
                x = pooling.max_pool(x, (2, 2))
        x = jnp.mean(x, axis=(1, 2)) if self.global_pool else x.reshape((x.shape[0], -1))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        if self.dense_units:
            x = nn.relu(nn.Dense(self.dense_units, dtype=self.dtype)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_outputs, dtype=self.dtype)(x).astype(jnp.float32)


class ResidualBlock(nn.Module):
    """Basic (two 3x3 convs) pre-activation-free ResNet block with a projection shortcut when needed. With
    `avg_pool_shortcut`, a downsampling shortcut averages 2x2 windows before its 1x1 conv (ResNet-D, He et al.
    2019, "Bag of Tricks") instead of a stride-2 1x1 conv that reads only a quarter of its input positions.
    `drop_path`: in training, the chance that a photo skips the block's residual branch (stochastic depth, Huang
    et al. 2016: a regulariser for long training; the kept branches are scaled up to keep the expected sum).
    `conv`: the convolution layer (nn.Conv, or it with another convolution function and dtype); `act`: the
    nonlinearity."""

    filters: int
    strides: int = 1
    conv: ModuleDef = nn.Conv
    act: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Any = jnp.float32
    avg_pool_shortcut: bool = False
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        act, conv_layer = self.act, self.conv
        norm = functools.partial(_batch_norm, train, self.dtype)
        residual = x
        y = conv_layer(self.filters, (3, 3), (self.strides, self.strides), padding="SAME", use_bias=False)(x)
        y = act(norm()(y))
        y = conv_layer(self.filters, (3, 3), padding="SAME", use_bias=False)(y)
        y = norm(scale_init=nn.initializers.zeros)(y)  # Each block starts as the identity.
        # One draw per photo (broadcast over height, width and channels).
        y = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)(y)
        if residual.shape != y.shape:
            shortcut_strides = self.strides
            if self.avg_pool_shortcut and self.strides > 1:
                residual = pooling.avg_pool(residual, (self.strides, self.strides))
                shortcut_strides = 1
            residual = conv_layer(self.filters, (1, 1), (shortcut_strides, shortcut_strides), use_bias=False)(residual)
            residual = norm()(residual)
        return act(residual + y)


class ResNet(nn.Module):
    """Small ResNet: a strided 3x3 stem (optionally followed by a 2x2 max-pool, as ImageNet ResNets do, so
    the blocks cost the same at twice the input size), stages of residual blocks (stride 2 between stages),
    global pool. `avg_pool_shortcut`: see ResidualBlock. `drop_path`: the last block's stochastic-depth rate,
    rising linearly from 0 at the first block (as in Huang et al. and timm). `conv` and `act` as for
    ResidualBlock (`act`: ReLU, or SiLU as in EfficientNet)."""

    num_outputs: int
    stage_sizes: Sequence[int] = (1, 1, 1, 1)
    widths: Sequence[int] = (32, 64, 128, 256)
    stem_strides: int = 2
    stem_pool: bool = False
    dropout: float = 0.0
    conv: ModuleDef = nn.Conv
    act: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Any = jnp.float32
    avg_pool_shortcut: bool = False
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = self.conv(self.widths[0], (3, 3), (self.stem_strides, self.stem_strides), padding="SAME",
                      use_bias=False)(x.astype(self.dtype))
        x = self.act(_batch_norm(train, self.dtype)(x))
        if self.stem_pool:
            x = pooling.max_pool(x, (2, 2))
        block_count = sum(self.stage_sizes)
        block_index = 0
        for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                drop_path = self.drop_path * block_index / max(block_count - 1, 1)
                block_index += 1
                x = ResidualBlock(width, strides=strides, conv=self.conv, act=self.act, dtype=self.dtype,
                                  avg_pool_shortcut=self.avg_pool_shortcut, drop_path=drop_path)(x, train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_outputs)(x)


def resolve_conv_impl(conv_impl: str) -> str:
    """'xla': lax's convolution; 'native': `conv.conv_general_dilated` with the AVX2/FMA kernels of `cpu_conv`
    (x86-64 CPUs), and CNN blocks fused (`conv.conv_relu_pool`); 'matmul_grad': XLA's convolutions with
    matmul weight gradients. 'auto' on one CPU device: native where its kernels build here, else matmul_grad
    where this XLA does not take `xla_cpu.compiler_options` (its YNNPACK weight gradients are several times
    slower), else xla; 'xla' on GPUs/TPUs and on several CPU devices (a test set-up: the custom calls would
    not be split)."""
    if conv_impl not in CONV_IMPLS:
        raise UserError(f"unknown conv_impl '{conv_impl}' (choose from {', '.join(CONV_IMPLS)})")
    single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    if conv_impl == "auto":
        if single_cpu and cpu_conv.available():
            conv_impl = "native"
        elif single_cpu and not xla_cpu.compiler_options():
            conv_impl = "matmul_grad"
        else:
            conv_impl = "xla"
    if conv_impl == "native" and (jax.default_backend() != "cpu" or not cpu_conv.available()):
        raise UserError("conv_impl='native' needs to run on an x86-64 CPU with AVX2/FMA and a C++ compiler "
                        "(see the log for why the kernels did not build); use conv_impl='auto'")
    return conv_impl


def _conv_fn(resolved_impl: str) -> ConvFn:
    """The convolution function nn.Conv layers use for a resolved impl (None: lax's)."""
    return None if resolved_impl == "xla" else functools.partial(conv.conv_general_dilated, impl=resolved_impl)


def compute_dtype(name: str) -> Any:
    """The activations' dtype; parameters and optimizer state stay float32 either way."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return jnp.dtype(name)


def create_model(config: ml_collections.ConfigDict, num_outputs: int) -> nn.Module:
    """Builds the model named by `config.model`, with its settings from `config.<model name>`."""
    name = config.model
    conv_impl = resolve_conv_impl(config.conv_impl)
    dtype = compute_dtype(config.dtype)
    fused = functools.partial(conv.conv_relu_pool, impl=conv_impl)
    if name == "tutorial_cnn":
        return TutorialCNN(num_outputs=num_outputs, conv_relu_pool=fused, dtype=dtype)
    if name == "cnn":
        c = config.cnn
        return CNN(num_outputs=num_outputs, filters=tuple(c.filters), convs_per_block=c.convs_per_block,
                   batch_norm=c.batch_norm, dense_units=c.dense_units, dropout=c.dropout, global_pool=c.global_pool,
                   conv=_conv_layer(conv_impl, dtype), conv_relu_pool=fused, dtype=dtype)
    if name == "resnet":
        c = config.resnet
        if len(c.stage_sizes) != len(c.widths):
            raise UserError("resnet.stage_sizes and resnet.widths must have the same length")
        return ResNet(num_outputs=num_outputs, stage_sizes=tuple(c.stage_sizes), widths=tuple(c.widths),
                      stem_strides=c.stem_strides, stem_pool=c.stem_pool, dropout=c.dropout,
                      conv=_conv_layer(conv_impl, dtype), act=ACTIVATIONS[c.activation], dtype=dtype,
                      avg_pool_shortcut=c.avg_pool_shortcut, drop_path=c.drop_path)
    raise UserError(f"unknown model '{name}' (choose from {', '.join(MODEL_NAMES)})")


def count_params(params: Any) -> int:
    import jax

    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
