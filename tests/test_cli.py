"""The command line as a user meets it: bad invocations end in one clear line and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from imgclf_jax import recipes


def _train(*args, cwd, env=None):
    env = env or dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "imgclf_jax.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--data_dir", "no/such/folder"], "imgclf_jax.train: error: data folder no/such/folder does not exist"),
    (["--config", "missing_config.py"], "imgclf_jax.train: error: config file missing_config.py does not exist"),
    (["--epochs", "0"], "imgclf_jax.train: error: epochs must be a positive whole number (got 0)"),
    (["--learning_rate=-1"], "imgclf_jax.train: error: learning_rate must be a non-negative number (got -1.0)"),
])
def test_bad_invocations_print_one_line_and_exit_2(tmp_path, args, message):
    result = _train(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_unknown_config_field_is_an_error(tmp_path):
    result = _train("--config", str(recipes.CONFIGS_DIR / "demo.py"), "--config.no_such_field=3", cwd=tmp_path)
    assert result.returncode != 0
    assert "no_such_field" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_one_epoch_of_the_default_demo_from_the_command_line(tmp_path):
    quiet_env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # As a user runs it.
    result = _train("--epochs", "1", "--workdir", str(tmp_path / "w"), cwd=tmp_path, env=quiet_env)
    assert result.returncode == 0, result.stderr
    # The first screen is ours: no TensorFlow C++ banner, no leak warning about the demo's distinct digits.
    assert "oneDNN" not in result.stderr and "cpu_feature_guard" not in result.stderr, result.stderr[:2000]
    assert "more than one split" not in result.stderr
    assert result.stderr.splitlines()[0].split(" ", 1)[1].startswith(("Wrote the built-in demo", "Data: "))
    assert "epoch 1/1" in result.stderr
    assert (tmp_path / "data" / "digits").is_dir()
    assert (tmp_path / "w" / "training_curves.png").is_file()
    assert "Report: " in result.stderr and (tmp_path / "w" / "report.html").is_file()


# Compiles one small function in a fresh process after turning the cache on, with JAX imported before
# (as the entry points do) or after (JAX then reads the settings from the environment).
_COMPILE_ONE = """
import sys
if sys.argv[1] == "jax_first":
    import jax
from imgclf_jax import cli
print(cli.use_compilation_cache())
import jax, jax.numpy as jnp
jax.monitoring.register_event_listener(lambda event, **kwargs: print(event.rsplit("/", 1)[-1]))
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
"""


@pytest.mark.slow
def test_compiled_functions_are_kept_on_disk_for_the_next_run(tmp_path):
    env = dict(os.environ, IMGCLF_CACHE_DIR=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    def run(order, **extra):
        result = subprocess.run([sys.executable, "-c", _COMPILE_ONE, order], env=dict(env, **extra),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    first, second = run("cli_first"), run("jax_first")
    cache = first[0]
    assert os.path.dirname(cache) == str(tmp_path) and os.path.basename(cache).startswith("xla-")
    assert "cache_misses" in first and "cache_hits" not in first  # Compiled, then written to disk...
    assert os.listdir(cache)
    assert second[0] == cache
    assert "cache_hits" in second and "cache_misses" not in second  # ...and loaded by the next process.
    off = run("jax_first", IMGCLF_COMPILATION_CACHE="0")
    assert off[0] == "None" and "cache_hits" not in off


@pytest.mark.slow
def test_version_and_a_recipe_by_name_ignore_the_current_folder(tmp_path):
    from imgclf_jax import __version__

    result = _train("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"imgclf_jax.train (imgclf_jax) {__version__}"
    (tmp_path / "cats_vs_dogs.py").write_text("raise SystemExit('a stray file ran')\n")
    (tmp_path / "cats_vs_dogs").write_text("raise SystemExit('a stray file ran')\n")
    result = _train("--config", "cats_vs_dogs", "--data_dir", "no/such/folder", cwd=tmp_path)
    assert "imgclf_jax.train: error: data folder no/such/folder does not exist" in result.stderr
    result = _train("--config", "no_such_recipe", cwd=tmp_path)
    assert "no recipe named 'no_such_recipe': choose one of cats_vs_dogs, default, demo, tutorial_cnn" in result.stderr


def test_tensorflow_starts_quietly_with_its_onednn_operations_off_unless_the_user_says(monkeypatch):
    from imgclf_jax import cli

    for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):
        monkeypatch.delenv(name, raising=False)
    cli.prepare_environment([], tensorflow=False)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2" and os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    cli.prepare_environment(["--verbose"], tensorflow=False)
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1" and "TF_CPP_MIN_LOG_LEVEL" not in os.environ


@pytest.mark.slow
def test_entry_points_load_tensorflow_without_keras_and_keras_still_loads_afterwards():
    code = ("import sys\n"
            "from imgclf_jax import cli\n"
            "assert 'tensorflow' not in sys.modules\n"
            "cli.prepare_environment([])\n"
            "from imgclf_jax import input_pipeline\n"
            "assert 'keras' not in sys.modules and 'keras.src.optimizers' not in sys.modules, 'keras loaded'\n"
            "from keras.src import optimizers\n"
            "assert optimizers.Adam and input_pipeline.tf.keras.layers.Dense\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_a_photo_deleted_while_training_ends_the_command_in_one_line_without_hanging(tmp_path):
    from helpers import make_class_folder

    make_class_folder(tmp_path / "d" / "train", {"a": 8, "b": 8})
    make_class_folder(tmp_path / "d" / "validation", {"a": 2, "b": 2}, start=50)
    code = ("import os, sys\n"
            "from imgclf_jax import cli\n"
            "cli.prepare_environment(sys.argv)\n"
            "from imgclf_jax import input_pipeline, train\n"
            "scan = input_pipeline.load_folder_source\n"
            "def scan_then_delete(*args, **kwargs):\n"
            "    source = scan(*args, **kwargs)\n"
            "    os.remove(sys.argv[2] + '/train/b/img_3.png')\n"
            "    return source\n"
            "input_pipeline.load_folder_source = scan_then_delete\n"
            "sys.argv = ['imgclf_jax.train', '--data_dir', sys.argv[2], '--workdir', sys.argv[1], '--epochs', '1',\n"
            "            '--image_size', '16', '--batch_size', '4']\n"
            "train.run()\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w"), str(tmp_path / "d")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("imgclf_jax.train: error: cannot read ")
    assert "img_3.png" in result.stderr and "Traceback" not in result.stderr
