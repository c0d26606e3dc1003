"""scripts/recipe_suite.py's command line: the training flags after `--` reach the training command."""

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
