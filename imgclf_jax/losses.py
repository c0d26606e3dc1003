"""Losses, accuracy and class probabilities for the two output kinds.

'sigmoid': two classes, one logit (probability of class 1), sigmoid cross-entropy.
'softmax': any number of classes, one logit per class, softmax cross-entropy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from imgclf_jax.errors import UserError

LOSS_NAMES = ("auto", "sigmoid", "softmax")


def resolve_loss(loss: str, num_classes: int) -> str:
    """'auto' -> 'sigmoid' for two classes, 'softmax' for more; checks a forced choice."""
    if loss not in LOSS_NAMES:
        raise UserError(f"unknown loss '{loss}' (choose from {', '.join(LOSS_NAMES)})")
    if loss == "auto":
        return "sigmoid" if num_classes == 2 else "softmax"
    if loss == "sigmoid" and num_classes != 2:
        raise UserError(f"loss 'sigmoid' needs exactly two classes; this data has {num_classes}")
    return loss


def num_outputs(loss_kind: str, num_classes: int) -> int:
    return 1 if loss_kind == "sigmoid" else num_classes


def per_example_loss(
    logits: jnp.ndarray, labels: jnp.ndarray, loss_kind: str, label_smoothing: float = 0.0
) -> jnp.ndarray:
    """Cross-entropy per example; label smoothing moves `label_smoothing` of the target mass to uniform."""
    logits = logits.astype(jnp.float32)
    if loss_kind == "sigmoid":
        targets = labels.astype(jnp.float32) * (1.0 - label_smoothing) + 0.5 * label_smoothing
        return optax.sigmoid_binary_cross_entropy(logits[:, 0], targets)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def predicted_class(logits: jnp.ndarray, loss_kind: str) -> jnp.ndarray:
    if loss_kind == "sigmoid":
        return (logits[:, 0] > 0).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def probabilities(logits: jnp.ndarray, loss_kind: str) -> jnp.ndarray:
    """(N, num_classes) class probabilities for either output kind."""
    logits = logits.astype(jnp.float32)
    if loss_kind == "sigmoid":
        p = jax.nn.sigmoid(logits[:, 0])
        return jnp.stack([1.0 - p, p], axis=-1)
    return jax.nn.softmax(logits, axis=-1)
