"""Losses against optax and hand-computed values; accuracy and probabilities for both output kinds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imgclf_jax import losses
from imgclf_jax.errors import UserError


def test_auto_picks_sigmoid_for_two_classes_and_softmax_for_more():
    assert losses.resolve_loss("auto", 2) == "sigmoid"
    assert losses.resolve_loss("auto", 5) == "softmax"
    assert losses.resolve_loss("softmax", 2) == "softmax"
    assert losses.num_outputs("sigmoid", 2) == 1 and losses.num_outputs("softmax", 5) == 5
    with pytest.raises(UserError, match="exactly two classes"):
        losses.resolve_loss("sigmoid", 3)
    with pytest.raises(UserError, match="unknown loss"):
        losses.resolve_loss("hinge", 2)


def test_sigmoid_loss_matches_optax_and_the_formula():
    logits = jnp.array([[2.0], [-1.0], [0.5]])
    labels = jnp.array([1, 0, 0])
    got = losses.per_example_loss(logits, labels, "sigmoid")
    np.testing.assert_allclose(got, optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(float)),
                               rtol=1e-6)
    p = jax.nn.sigmoid(logits[:, 0])
    np.testing.assert_allclose(got, -(labels * jnp.log(p) + (1 - labels) * jnp.log(1 - p)), rtol=1e-5)


def test_sigmoid_label_smoothing_targets():
    logits = jnp.array([[1.5]])
    got = losses.per_example_loss(logits, jnp.array([1]), "sigmoid", label_smoothing=0.2)
    np.testing.assert_allclose(got, optax.sigmoid_binary_cross_entropy(logits[:, 0], jnp.array([0.9])),
                               rtol=1e-6)


def test_softmax_loss_matches_optax_and_the_formula():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]])
    labels = jnp.array([0, 2])
    got = losses.per_example_loss(logits, labels, "softmax")
    np.testing.assert_allclose(got, optax.softmax_cross_entropy_with_integer_labels(logits, labels), rtol=1e-6)
    smoothed = losses.per_example_loss(logits, labels, "softmax", label_smoothing=0.3)
    targets = 0.7 * jax.nn.one_hot(labels, 3) + 0.1
    np.testing.assert_allclose(smoothed, -jnp.sum(targets * jax.nn.log_softmax(logits), -1), rtol=1e-5)


def test_predictions_and_probabilities():
    sig = jnp.array([[3.0], [-0.2]])
    np.testing.assert_array_equal(losses.predicted_class(sig, "sigmoid"), [1, 0])
    probs = losses.probabilities(sig, "sigmoid")
    assert probs.shape == (2, 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs[0, 1], jax.nn.sigmoid(3.0), rtol=1e-6)
    soft = jnp.array([[0.0, 5.0, 1.0]])
    np.testing.assert_array_equal(losses.predicted_class(soft, "softmax"), [1])
    np.testing.assert_allclose(losses.probabilities(soft, "softmax").sum(-1), 1.0, rtol=1e-6)
