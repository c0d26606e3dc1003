"""Checkpoints: latest and best kept, restore by name or step, fallback from a damaged latest one."""

from __future__ import annotations

import errno
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest

from imgclf_jax.checkpointing import DAMAGED_DIR, Checkpointer, IncompatibleCheckpoint, WriteFailed, damage_of
from imgclf_jax.errors import UserError


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
    with pytest.raises(UserError, match="step 30 .* cannot be read"):
        Checkpointer(str(tmp_path), read_only=True).restore(_state(0), 30)


def test_a_writer_sets_a_damaged_latest_step_aside_and_saves_that_step_again(tmp_path, caplog):
    root = tmp_path / "w"
    _save_epochs(root / "checkpoints", [0.5, 0.6, 0.7])
    for f in (root / "checkpoints" / "30" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[:10])  # Truncated, as by a crash or a full disk.
    checkpointer = Checkpointer(str(root / "checkpoints"), max_to_keep=2)
    _, meta, step = checkpointer.restore(_state(0), "latest")
    assert (step, meta["epoch"]) == (20, 2)
    assert "moved it to" in caplog.text
    assert [p.name.split("-")[0] for p in (root / DAMAGED_DIR).iterdir()] == ["30"]  # Renamed, not deleted.
    checkpointer.save(30, _state(3), {"epoch": 3}, {"val_accuracy": 0.7})  # The same step, saved anew.
    checkpointer.close()
    reader = Checkpointer(str(root / "checkpoints"), read_only=True)
    _, meta, step = reader.restore(_state(0), "latest")
    assert (step, meta["epoch"]) == (30, 3)


@pytest.mark.parametrize("read_only", [True, False])
def test_garbage_metrics_of_a_step_do_not_stop_opening_the_checkpoints(tmp_path, read_only, caplog):
    _save_epochs(tmp_path / "checkpoints", [0.5, 0.9, 0.7])
    (tmp_path / "checkpoints" / "30" / "metrics" / "metrics").write_text("garbage{")
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), read_only=read_only)
    assert checkpointer.all_steps() == [20]  # Step 30 passed over (reader) or set aside (writer).
    _, meta, step = checkpointer.restore(_state(0), "best")
    assert step == 20
    assert "metrics/metrics" in caplog.text
    assert (tmp_path / "checkpoints" / "30").exists() == read_only  # A reader never moves anything.
    checkpointer.close()


def test_a_reader_falls_back_from_a_damaged_best_step_and_names_readable_steps_for_a_number(tmp_path, caplog):
    _save_epochs(tmp_path, [0.5, 0.9, 0.7])
    for f in (tmp_path / "20" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    reader = Checkpointer(str(tmp_path), read_only=True)
    _, meta, step = reader.restore(_state(0), "best")
    assert step == 30  # The next best by validation accuracy.
    with pytest.raises(UserError, match=r"step 20 .* cannot be read .*another step \(\[30\]\)"):
        reader.restore(_state(0), 20)
    assert (tmp_path / "20").is_dir()


def test_a_checkpoint_of_another_model_is_refused_as_such_not_as_damage(tmp_path):
    _save_epochs(tmp_path, [0.5, 0.6])
    wider = {"params": {"w": jnp.zeros((5,), jnp.float32)}, "step": jnp.asarray(0)}
    checkpointer = Checkpointer(str(tmp_path))
    with pytest.raises(IncompatibleCheckpoint, match=r"params.w has shape \(3,\), this config's \(5,\)"):
        checkpointer.restore(wider)
    checkpointer.close()
    assert Checkpointer(str(tmp_path), read_only=True).all_steps() == [10, 20]  # Nothing set aside.


def test_a_save_that_cannot_be_written_is_one_clear_error(tmp_path, monkeypatch):
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    checkpointer.save(10, _state(1), {"epoch": 1}, {"val_accuracy": 0.5})
    checkpointer.wait_until_finished()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints"))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_space)
    with pytest.raises(WriteFailed, match="No space left on device.*saved before it are intact"):
        checkpointer.save(20, _state(2), {"epoch": 2}, {"val_accuracy": 0.6})
    monkeypatch.undo()
    checkpointer.close()
    assert Checkpointer(str(tmp_path / "checkpoints"), read_only=True).all_steps() == [10]


def test_damage_is_read_from_the_small_metadata_files(tmp_path):
    _save_epochs(tmp_path, [0.5])
    assert damage_of(str(tmp_path / "10")) == ""
    (tmp_path / "10" / "meta" / "metadata").write_text("[1, 2")
    assert damage_of(str(tmp_path / "10")).startswith("meta/metadata")
