"""The models of imgclf_jax written again in Keras and PyTorch, for `scripts/benchmark.py` (yardsticks only:
the package imports neither framework).

Each twin has the same layers, shapes and parameter count as our model for the config (`benchmark.py` prints
every side's parameter count, so a twin that drifts shows), and trains with the same
optimizer (Adam, or AdamW with the config's weight decay) and loss (one logit with sigmoid cross-entropy for
two classes, softmax otherwise). Augmentation and the weight average are left out on every side: the
benchmark times the model's step alone.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np

from imgclf_jax import losses


def _outputs(num_classes: int) -> int:
    """Our logits for `num_classes` with the 'auto' loss: one (sigmoid) for two classes, else one a class."""
    return losses.num_outputs(losses.resolve_loss("auto", num_classes), num_classes)


# ---------------------------------------------------------------------------------------------------------
# Keras.


def keras_resnet(config, num_classes: int):
    """Our `models.ResNet` (config.resnet) in Keras, compiled."""
    import keras
    from keras import layers

    r = config.resnet
    act = "silu" if r.activation == "silu" else "relu"
    norm = lambda **kw: layers.BatchNormalization(momentum=0.9, epsilon=1e-5, **kw)  # flax's defaults.
    inputs = keras.Input((config.image_size, config.image_size, 3))
    x = layers.Conv2D(r.widths[0], 3, strides=r.stem_strides, padding="same", use_bias=False)(inputs)
    x = layers.Activation(act)(norm()(x))
    if r.stem_pool:
        x = layers.MaxPooling2D(2)(x)
    for stage, (blocks, width) in enumerate(zip(r.stage_sizes, r.widths)):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            y = layers.Conv2D(width, 3, strides=strides, padding="same", use_bias=False)(x)
            y = layers.Activation(act)(norm()(y))
            y = layers.Conv2D(width, 3, padding="same", use_bias=False)(y)
            y = norm(gamma_initializer="zeros")(y)
            residual = x
            if x.shape[-1] != width or strides > 1:
                shortcut_strides = strides
                if r.avg_pool_shortcut and strides > 1:
                    residual, shortcut_strides = layers.AveragePooling2D(strides)(residual), 1
                residual = layers.Conv2D(width, 1, strides=shortcut_strides, use_bias=False)(residual)
                residual = norm()(residual)
            x = layers.Activation(act)(layers.Add()([residual, y]))
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(_outputs(num_classes))(x))
    optimizer = (keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay)
                 if config.weight_decay else keras.optimizers.Adam(config.learning_rate))
    loss = (keras.losses.BinaryCrossentropy(from_logits=True) if num_classes == 2
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.compile(optimizer=optimizer, loss=loss)
    return model


def keras_model(config, num_classes: int):
    """The Keras twin of the config's model: the tutorial's CNN (scripts/keras_tutorial.py) or our ResNet."""
    import keras_tutorial  # scripts/, beside this file.

    if config.model == "tutorial_cnn":
        return keras_tutorial.build_model(config.image_size, num_classes, config.learning_rate, rescale=False)
    if config.model == "resnet":
        return keras_resnet(config, num_classes)
    raise SystemExit(f"no Keras twin of model '{config.model}' (tutorial_cnn and resnet have one)")


def keras_runner(config, num_classes: int, batches) -> Callable[[int], None]:
    """`run(steps)`: that many Keras training steps on our [0, 1] float batches."""
    import tensorflow as tf

    model = keras_model(config, num_classes)
    tensors = [(tf.constant(b["image"]), tf.constant(b["label"].reshape(-1, 1) if num_classes == 2 else b["label"]))
               for b in batches]

    def run(steps: int) -> None:
        for i in range(steps):
            x, y = tensors[i % len(tensors)]
            result = model.train_on_batch(x, y)
        float(np.asarray(result[0] if isinstance(result, (list, tuple)) else result))

    return run


def keras_param_count(config, num_classes: int) -> int:
    return sum(math.prod(w.shape) for w in keras_model(config, num_classes).trainable_weights)


# ---------------------------------------------------------------------------------------------------------
# PyTorch (eager, channels-last: the layout oneDNN's CPU convolutions prefer).


def torch_model(config, num_classes: int):
    """The PyTorch twin of the config's model: the tutorial's CNN or our ResNet."""
    import torch
    from torch import nn

    outputs = _outputs(num_classes)
    if config.model == "tutorial_cnn":
        size = config.image_size // 8
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * size * size, 128), nn.ReLU(), nn.Linear(128, outputs))
    if config.model != "resnet":
        raise SystemExit(f"no PyTorch twin of model '{config.model}' (tutorial_cnn and resnet have one)")
    r = config.resnet
    act = nn.SiLU if r.activation == "silu" else nn.ReLU
    norm = lambda c: nn.BatchNorm2d(c, momentum=0.1, eps=1e-5)  # PyTorch's momentum is 1 - flax's 0.9.

    class Block(nn.Module):
        def __init__(self, cin: int, width: int, strides: int):
            super().__init__()
            self.branch = nn.Sequential(
                nn.Conv2d(cin, width, 3, strides, 1, bias=False), norm(width), act(),
                nn.Conv2d(width, width, 3, 1, 1, bias=False), norm(width))
            nn.init.zeros_(self.branch[-1].weight)
            self.shortcut = nn.Identity()
            if cin != width or strides > 1:
                pool = [nn.AvgPool2d(strides)] if r.avg_pool_shortcut and strides > 1 else []
                conv_strides = 1 if pool else strides
                self.shortcut = nn.Sequential(*pool, nn.Conv2d(cin, width, 1, conv_strides, bias=False), norm(width))
            self.act = act()

        def forward(self, x):
            return self.act(self.shortcut(x) + self.branch(x))

    layers = [nn.Conv2d(3, r.widths[0], 3, r.stem_strides, 1, bias=False), norm(r.widths[0]), act()]
    if r.stem_pool:
        layers.append(nn.MaxPool2d(2))
    cin = r.widths[0]
    for stage, (blocks, width) in enumerate(zip(r.stage_sizes, r.widths)):
        for block in range(blocks):
            layers.append(Block(cin, width, 2 if stage > 0 and block == 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, outputs)]
    return nn.Sequential(*layers).to(memory_format=torch.channels_last)


def torch_runner(config, num_classes: int, batches) -> Callable[[int], None]:
    """`run(steps)`: that many eager PyTorch training steps on the same batches (NHWC -> NCHW views)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = torch_model(config, num_classes)
    model.train()
    optimizer = (torch.optim.AdamW(model.parameters(), config.learning_rate, weight_decay=config.weight_decay)
                 if config.weight_decay else torch.optim.Adam(model.parameters(), config.learning_rate))
    loss_fn = torch.nn.BCEWithLogitsLoss() if num_classes == 2 else torch.nn.CrossEntropyLoss()
    tensors = [(torch.from_numpy(np.ascontiguousarray(b["image"])).permute(0, 3, 1, 2),
                torch.from_numpy(b["label"].astype(np.float32 if num_classes == 2 else np.int64)))
               for b in batches]

    def run(steps: int) -> None:
        for i in range(steps):
            x, y = tensors[i % len(tensors)]
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = loss_fn(logits[:, 0], y) if num_classes == 2 else loss_fn(logits, y)
            loss.backward()
            optimizer.step()
        loss.item()

    return run


def torch_param_count(config, num_classes: int) -> int:
    return sum(p.numel() for p in torch_model(config, num_classes).parameters())


def torch_matmul_peak_gflops(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """A square matmul's GFLOP/s through PyTorch (oneDNN; AMX tiles for bfloat16 where the CPU has them)."""
    import time

    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
