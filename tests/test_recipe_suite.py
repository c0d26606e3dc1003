"""scripts/recipe_suite.py: the training flags after `--` reach the training command; the Keras column."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import recipe_suite  # noqa: E402


def test_flags_after_the_separator_are_the_training_commands():
    args, overrides = recipe_suite.parse_args(
        ["--out", "o", "a=/x", "held_out:b=/y", "--", "--config.epochs=300", "--config.seed=2"])
    assert args.folders == ["a=/x", "held_out:b=/y"]
    assert overrides == ["--config.epochs=300", "--config.seed=2"]
    assert recipe_suite.parse_args(["--out", "o", "a=/x"])[1] == []


def test_a_training_flag_before_the_separator_is_refused(capsys):
    with pytest.raises(SystemExit):
        recipe_suite.parse_args(["--out", "o", "a=/x", "--config.epochs=300"])
    with pytest.raises(SystemExit):
        recipe_suite.parse_args(["--out", "o", "a=/x", "not-a-folder"])
    assert "NAME=FOLDER" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe_suite.parse_args(["--out", "o", "--keras_seeds", "-1", "a=/x"])
    assert "--keras_seeds must be 0 or more" in capsys.readouterr().err


def test_keras_seeds_run_the_tutorial_once_a_seed_and_the_table_shows_their_mean_and_range(tmp_path, monkeypatch):
    commands = []

    def fake_run(command, log_path):
        commands.append(command)
        seed = int(command[command.index("--seed") + 1]) if "--seed" in command else None
        return f"keras_tutorial: ... test accuracy {0.70 + 0.05 * (seed or 0):.4f}\n", 1.5

    monkeypatch.setattr(recipe_suite, "run", fake_run)
    cache: dict = {}
    accuracies, minutes = recipe_suite.keras_scores("f", tmp_path, tmp_path, cache, seeds=3)
    assert accuracies == pytest.approx([0.70, 0.75, 0.80]) and minutes == 1.5
    assert [c[c.index("--seed") + 1] for c in commands] == ["0", "1", "2"]
    assert recipe_suite.keras_cell(accuracies) == "0.750 (0.700-0.800)"
    again, _ = recipe_suite.keras_scores("f", tmp_path, tmp_path, cache, seeds=3)  # From the cache.
    assert again == accuracies and len(commands) == 3
    unseeded, _ = recipe_suite.keras_scores("f", tmp_path, tmp_path, cache, seeds=0)
    assert unseeded == pytest.approx([0.70]) and "--seed" not in commands[-1]
    assert recipe_suite.keras_cell(unseeded) == "0.700"
