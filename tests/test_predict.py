"""Prediction on files and folders, with unreadable files reported in place."""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys

import numpy as np

from helpers import class_image, write_image
from imgclf_jax import inference, predict


def test_folders_are_searched_recursively_and_problems_kept_in_place(tmp_path):
    write_image(tmp_path / "in" / "b.png", class_image(0))
    write_image(tmp_path / "in" / "sub" / "a.jpg", class_image(1))
    (tmp_path / "in" / "broken.jpg").write_text("<html>")
    (tmp_path / "in" / ".DS_Store").write_bytes(b"\x00")
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    files = predict.collect_files([str(tmp_path / "in"), str(tmp_path / "gone.png")])
    names = [(os.path.relpath(p, tmp_path), problem) for p, problem in files]
    assert names == [("in/b.png", None), ("in/broken.jpg", "not an image (HTML/XML text)"),
                     ("in/sub/a.jpg", None), ("gone.png", "no such file or folder")]


def test_predictions_in_batches_match_one_by_one(trained_run, tmp_path):
    workdir, data = trained_run
    run = inference.load_run(str(workdir))
    paths = sorted(str(p) for p in (data / "validation").rglob("*.*"))
    files = [(p, None) for p in paths] + [(str(tmp_path / "x.jpg"), "no such file or folder")]
    batched = list(predict.predict_files(run, files, batch_size=4))
    single = list(predict.predict_files(run, files, batch_size=1))
    assert [p for p, _, _ in batched] == [p for p, _ in files]
    for (_, a, error_a), (_, b, _) in zip(batched, single):
        if a is None:
            assert error_a == "no such file or folder"
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            assert a.shape == (2,) and abs(a.sum() - 1) < 1e-5
    correct = [np.argmax(probs) == (0 if "/cats/" in path else 1) for path, probs, _ in batched if probs is not None]
    assert np.mean(correct) >= 0.8


@pytest.mark.slow
def test_command_line_json_lines(trained_run, tmp_path):
    workdir, data = trained_run
    (tmp_path / "bad.png").write_bytes(b"")
    image = next((data / "validation" / "dogs").iterdir())
    result = subprocess.run(
        [sys.executable, "-m", "imgclf_jax.predict", "--workdir", str(workdir), "--json", "--top_k", "2",
         str(image), str(tmp_path / "bad.png")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["path"] == str(image) and lines[0]["label"] in ("cats", "dogs")
    assert [t["label"] for t in lines[0]["top_k"]][0] == lines[0]["label"] and len(lines[0]["top_k"]) == 2
    assert lines[0]["probability"] >= 0.5
    assert lines[1] == {"path": str(tmp_path / "bad.png"), "error": "empty file"}


def test_a_file_name_with_a_newline_stays_on_one_line():
    line = predict.format_line("photos/a\nb.jpg", np.array([0.25, 0.75]), None, ["cat", "dog"], 1, False)
    assert line == "photos/a\\nb.jpg\tdog\t0.7500"
    nan = predict.format_line("x.jpg", np.array([np.nan, np.nan]), None, ["cat", "dog"], 1, False)
    assert nan == "x.jpg\tERROR: the model's output for this image is not finite (NaN or infinite)"
