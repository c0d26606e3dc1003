"""The jitted steps and the one evaluation loop: a step lowers the loss, mixes, augments, keeps the weights' average; evaluation counts each example once."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from helpers import fresh_state
from imgclf_jax import augmentation, losses, mixing, steps, train_state


@pytest.mark.parametrize("loss_kind, num_classes", [("sigmoid", 2), ("softmax", 3)])
def test_train_step_lowers_the_loss_on_a_batch(tiny_config, loss_kind, num_classes):
    tiny_config.cnn.batch_norm = True
    tiny_config.cnn.dropout = 0.1
    state = fresh_state(tiny_config, losses.num_outputs(loss_kind, num_classes))
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(8, 16, 16, 3)).astype(np.float32),
             "label": (np.arange(8) % num_classes).astype(np.int32)}
    step = jax.jit(functools.partial(steps.train_step, loss_kind=loss_kind, label_smoothing=0.0),
                   donate_argnums=0)
    state, first = step(state, batch)
    for _ in range(30):
        state, last = step(state, batch)
    assert int(state.step) == 31
    assert float(last["loss"]) < 0.5 * float(first["loss"])
    assert float(last["accuracy"]) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("loss_kind, num_classes", [("sigmoid", 2), ("softmax", 3)])
def test_mixed_train_step_loss_is_the_lam_weighted_loss_of_both_labels(tiny_config, loss_kind, num_classes):
    tiny_config.mix.update(mixup_alpha=0.4, cutmix_alpha=1.0)
    state = fresh_state(tiny_config, losses.num_outputs(loss_kind, num_classes))
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(8, 16, 16, 3)).astype(np.float32),
             "label": (np.arange(8) % num_classes).astype(np.int32)}
    step = jax.jit(functools.partial(steps.train_step, loss_kind=loss_kind, label_smoothing=0.1,
                                     mix_config=tiny_config.mix))
    _, reported = step(state, batch)

    # The same mix, recomputed from the step's key, scored with the untrained parameters.
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    mixed = mixing.mix_batch(jax.random.fold_in(dropout_key, steps._MIX_KEY_STREAM), batch["image"],
                             batch["label"], 0.4, 1.0, 1.0)
    assert 0.0 < float(mixed.lam) < 1.0
    logits, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, mixed.images,
                               train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key})
    expected = (float(mixed.lam) * losses.per_example_loss(logits, mixed.labels, loss_kind, 0.1)
                + (1 - float(mixed.lam)) * losses.per_example_loss(logits, mixed.partner_labels, loss_kind, 0.1))
    assert float(reported["loss"]) == pytest.approx(float(expected.mean()), rel=1e-5)

    plain = jax.jit(functools.partial(steps.train_step, loss_kind=loss_kind, label_smoothing=0.1))
    _, unmixed = plain(state, batch)
    assert float(unmixed["loss"]) != pytest.approx(float(reported["loss"]), rel=1e-3)


@pytest.mark.slow
def test_train_step_trains_on_the_augmented_resized_batch(tiny_config):
    tiny_config.update(model="cnn")
    tiny_config.cnn.global_pool = True
    tiny_config.augment.update(enabled=True, flip=True, crop_area_min=0.5, brightness=0.1)
    state = fresh_state(tiny_config, 1)
    batch = {"image": np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
             "label": (np.arange(8) % 2).astype(np.int32)}
    step = jax.jit(functools.partial(steps.train_step, loss_kind="sigmoid", label_smoothing=0.0,
                                     augment_config=tiny_config.augment, image_size=8))
    _, reported = step(state, batch)

    # The same augmentation, recomputed from the step's key, scored with the untrained parameters.
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    images = augmentation.training_images(jax.random.fold_in(dropout_key, steps._AUGMENT_KEY_STREAM),
                                          batch["image"], tiny_config.augment, 8)
    assert images.shape == (8, 8, 8, 3)
    logits, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images,
                               train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key})
    expected = losses.per_example_loss(logits, batch["label"], "sigmoid").mean()
    assert float(reported["loss"]) == pytest.approx(float(expected), rel=1e-5)

    plain = jax.jit(functools.partial(steps.train_step, loss_kind="sigmoid", label_smoothing=0.0))
    _, unaugmented = plain(state, batch)
    assert float(unaugmented["loss"]) != pytest.approx(float(reported["loss"]), rel=1e-3)


@pytest.mark.slow
def test_weight_average_follows_each_step_and_is_what_evaluation_uses(tiny_config):
    tiny_config.cnn.batch_norm = True
    tiny_config.ema_decay = 0.5
    state = fresh_state(tiny_config, 1)
    assert isinstance(state, train_state.EmaTrainState)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(8, 16, 16, 3)).astype(np.float32),
             "label": (np.arange(8) % 2).astype(np.int32)}
    step = jax.jit(functools.partial(steps.train_step, loss_kind="sigmoid", label_smoothing=0.0, ema_decay=0.5))
    average = {"params": state.params, "batch_stats": state.batch_stats}
    for n in range(1, 4):
        state, _ = step(state, batch)
        rate = min(0.5, (1 + n) / (10 + n))  # The step number after the update is n.
        average = jax.tree_util.tree_map(lambda a, x: rate * a + (1 - rate) * x, average,
                                         {"params": state.params, "batch_stats": state.batch_stats})
    for a, b in zip(jax.tree_util.tree_leaves(average), jax.tree_util.tree_leaves(state.ema)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(jax.tree_util.tree_leaves(state.ema["params"])[0],
                           jax.tree_util.tree_leaves(state.params)[0])

    evaluated = steps.eval_step(state, {**batch, "mask": np.ones(8, np.float32)}, "sigmoid")
    expected = state.apply_fn(state.ema, batch["image"], train=False)
    np.testing.assert_allclose(evaluated["logits"], expected, rtol=1e-5)


def test_evaluation_counts_each_example_once_whatever_the_batch_size(tiny_config, two_class_dir):
    # Imported here so that the rest of this file runs where TensorFlow is absent (scripts/device_check.sh).
    input_pipeline = pytest.importorskip("imgclf_jax.input_pipeline", reason="needs TensorFlow (tf.data)")
    state = fresh_state(tiny_config, 1)
    source = input_pipeline.load_folder_source(str(two_class_dir), 0.2, 0, 16, 10**8)
    prepared = input_pipeline.prepare(source.splits["validation"], 16, "squash", cache=True)
    eval_fn = jax.jit(functools.partial(steps.eval_step, loss_kind="sigmoid"))
    results = [steps.evaluate_batches(eval_fn, state, input_pipeline.eval_batches(prepared, bs))
               for bs in (3, 16, 50)]
    assert all(r["num_examples"] == 16 for r in results)
    for r in results[1:]:
        assert r["accuracy"] == results[0]["accuracy"]
        assert r["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)
