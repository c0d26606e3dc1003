"""Data parallelism: batch splitting rules, process rows, and one device = two devices = two processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from imgclf_jax import parallel, recipes, train
from imgclf_jax.errors import UserError
from imgclf_jax.metrics import read_metrics

CONFIG_TEXT = """from imgclf_jax import config_lib

def get_config():
    c = config_lib.base_config()
    c.name = 'parallel'
    c.image_size, c.model = 16, 'cnn'
    c.cnn.filters, c.cnn.dense_units, c.cnn.batch_norm, c.cnn.dropout = (8, 16), 16, True, 0.1
    c.augment.enabled, c.augment.flip, c.augment.crop_area_min = True, True, 0.6
    c.epochs, c.batch_size, c.learning_rate, c.conv_impl = 3, 8, 3e-3, 'xla'
    c.report = False
    return c
"""


def test_one_device_holds_every_row():
    mesh = parallel.create_mesh()
    assert parallel.process_rows(mesh, 8) == (0, 8)
    assert parallel.is_main_process()


def test_batch_size_must_split_evenly_over_the_devices():
    parallel.check_batch_size("batch_size", 8, 4)
    with pytest.raises(UserError, match="batch_size 6 does not split evenly over 4 devices; use a multiple of 4"):
        parallel.check_batch_size("batch_size", 6, 4)


def test_multi_process_flags_come_together():
    parallel.initialize()  # Nothing asked: single process, nothing to do.
    with pytest.raises(UserError, match="--num_processes N and --process_id I together"):
        parallel.initialize("localhost:1234", None, None)
    with pytest.raises(UserError, match=r"process_id must be in 0..1 \(got 2\)"):
        parallel.initialize("localhost:1234", 2, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_one_device_two_devices_and_two_processes_train_the_same(two_class_dir, tmp_path):
    config_file = tmp_path / "parallel_config.py"
    config_file.write_text(CONFIG_TEXT)
    config = recipes.load_config_file(str(config_file))
    config.data_dir = str(two_class_dir)
    one_device = train.train_and_evaluate(config, str(tmp_path / "one_device"))

    def command(workdir, *extra):
        return [sys.executable, "-m", "imgclf_jax.train", "--config", str(config_file),
                "--data_dir", str(two_class_dir), "--workdir", str(tmp_path / workdir), *extra]

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    two_devices = subprocess.Popen(
        command("two_devices"), env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"localhost:{_free_port()}"
    processes = [
        subprocess.Popen(command("two_processes", "--coordinator_address", address, "--num_processes", "2",
                                 "--process_id", str(i)),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in [two_devices, *processes]]
    for p, out in zip([two_devices, *processes], outputs):
        assert p.returncode == 0, out
    assert "on 2 CPU device(s) in 1 process(es), 2 local" in outputs[0]
    assert "on 2 CPU device(s) in 2 process(es), 1 local; this is process 0" in outputs[1]
    assert "epoch 3/3" in outputs[1] and "epoch 3/3" not in outputs[2]  # Process 0 alone logs.

    final_losses = [one_device[-1]["val_loss"]]
    for workdir in ("two_devices", "two_processes"):
        records = read_metrics(str(tmp_path / workdir))
        assert [r["epoch"] for r in records] == [1, 2, 3]  # Written once, by process 0.
        final_losses.append(records[-1]["val_loss"])
    assert one_device[-1]["val_loss"] != one_device[0]["val_loss"]  # It trained.
    assert final_losses[1] == pytest.approx(final_losses[0], rel=1e-4)
    assert final_losses[2] == pytest.approx(final_losses[0], rel=1e-4)


@pytest.mark.slow
def test_batch_size_that_does_not_split_is_refused_on_two_devices(two_class_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "imgclf_jax.train", "--data_dir", str(two_class_dir), "--batch_size", "7",
         "--workdir", str(tmp_path / "w")],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "batch_size 7 does not split evenly over 2 devices; use a multiple of 2" in result.stderr
