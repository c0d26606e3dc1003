"""The training state and its optimizer."""

from __future__ import annotations


import numpy as np

from imgclf_jax import schedule, train_state


def test_sgd_step_is_nesterov_momentum_with_l2_on_weights_only(tiny_config):
    tiny_config.update(optimizer="sgd", momentum=0.9, weight_decay=0.01, learning_rate=0.1)
    optimizer = train_state.create_optimizer(tiny_config, schedule.create_learning_rate_fn(tiny_config, 10))
    params = {"kernel": np.full((2, 2), 2.0, np.float32), "bias": np.full((2,), 2.0, np.float32)}
    grads = {"kernel": np.full((2, 2), 0.5, np.float32), "bias": np.full((2,), 0.5, np.float32)}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    # First step: momentum buffer m = g (+ 0.01 * p for weights); Nesterov steps by lr * (g + 0.9 * m).
    np.testing.assert_allclose(updates["kernel"], -0.1 * 1.9 * (0.5 + 0.01 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], -0.1 * 1.9 * 0.5, rtol=1e-6)
