"""Checkpoints: latest and best kept, restore by name or step, fallback from a damaged latest one."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from imgclf_jax.checkpointing import Checkpointer


def _state(value):
    return {"params": {"w": jnp.full((3,), value, jnp.float32)}, "step": jnp.asarray(int(value))}


def _save_epochs(directory, accuracies):
    checkpointer = Checkpointer(str(directory), max_to_keep=2)
    for epoch, accuracy in enumerate(accuracies, start=1):
        metrics = None if accuracy is None else {"val_accuracy": accuracy}
        checkpointer.save(epoch * 10, _state(epoch), {"epoch": epoch}, metrics)
    checkpointer.wait_until_finished()
    checkpointer.close()


def test_keeps_latest_two_and_the_best(tmp_path):
    _save_epochs(tmp_path, [0.5, 0.9, 0.6, 0.7, 0.65])
    checkpointer = Checkpointer(str(tmp_path), max_to_keep=2, read_only=True)
    assert checkpointer.all_steps() == [20, 40, 50]
    assert checkpointer.best_step() == 20
    state, meta, step = checkpointer.restore(_state(0), "best")
    assert (meta["epoch"], step) == (2, 20)
    np.testing.assert_array_equal(state["params"]["w"], [2.0, 2.0, 2.0])
    _, meta, step = checkpointer.restore(_state(0), "latest")
    assert (meta["epoch"], step) == (5, 50)
    _, meta, _ = checkpointer.restore(_state(0), 40)
    assert meta["epoch"] == 4


def test_epochs_saved_without_metrics_are_kept_only_among_the_latest(tmp_path):
    _save_epochs(tmp_path, [None, 0.6, None, None, 0.5, None])  # None: an epoch that was not validated.
    checkpointer = Checkpointer(str(tmp_path), max_to_keep=2, read_only=True)
    assert checkpointer.all_steps() == [20, 50, 60]
    assert checkpointer.best_step() == 20
    _, meta, step = checkpointer.restore(_state(0), "latest")
    assert (meta["epoch"], step) == (6, 60)


def test_empty_directory_restores_nothing(tmp_path):
    assert Checkpointer(str(tmp_path / "none"), read_only=True).restore(_state(0)) is None


def test_damaged_latest_falls_back_to_the_previous_one(tmp_path, caplog):
    _save_epochs(tmp_path, [0.5, 0.6, 0.7])
    for f in (tmp_path / "30" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    state, meta, step = Checkpointer(str(tmp_path), read_only=True).restore(_state(0), "latest")
    assert step == 20 and meta["epoch"] == 2
    np.testing.assert_array_equal(state["params"]["w"], [2.0, 2.0, 2.0])
    assert "cannot be read" in caplog.text
    with pytest.raises(Exception):
        Checkpointer(str(tmp_path), read_only=True).restore(_state(0), 30)
