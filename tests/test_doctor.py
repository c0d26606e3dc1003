"""The dataset doctor on generated folders with planted duplicates, odd files and imbalance."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from helpers import near_copy, smooth_random_image, write_image
from imgclf_jax import doctor, input_pipeline


@pytest.fixture
def planted_dir(tmp_path):
    """train/{cats 8, dogs 5} and validation/{cats 3, dogs 3} of unrelated pictures, with planted copies:
    an identical file train -> validation, a re-encoded copy train/dogs -> validation/cats (wrong class),
    a near copy within train, a grayscale and a transparent image, and a truncated file."""
    root = tmp_path / "data"
    seed = iter(range(1000))
    paths = {}
    for split, counts in (("train", {"cats": 8, "dogs": 5}), ("validation", {"cats": 3, "dogs": 3})):
        for name, count in counts.items():
            for i in range(count):
                paths[f"{split}/{name}/{i}"] = write_image(root / split / name / f"{i}.png",
                                                           smooth_random_image(next(seed)))
    shutil.copy(paths["train/cats/0"], root / "validation" / "cats" / "exact_copy.png")
    write_image(root / "validation" / "cats" / "near_copy.jpg", near_copy(smooth_random_image(8)))  # train/dogs/0
    write_image(root / "train" / "cats" / "near_twin.jpg", near_copy(smooth_random_image(1)))  # train/cats/1
    write_image(root / "train" / "dogs" / "gray.png", smooth_random_image(next(seed)), mode="L")
    write_image(root / "train" / "dogs" / "clear.png", smooth_random_image(next(seed)), mode="RGBA")
    cut = (root / "train" / "cats" / "0.png").read_bytes()
    (root / "train" / "dogs" / "cut.png").write_bytes(cut[: len(cut) // 2])
    return root


def test_planted_duplicates_are_found_and_distinct_images_are_not(planted_dir):
    findings = doctor.diagnose(str(planted_dir))
    d = findings["duplicates"]
    found = {(p["first"]["path"], p["second"]["path"]): p for p in d["pairs"]}
    assert set(found) == {
        ("train/cats/0.png", "validation/cats/exact_copy.png"),
        ("train/dogs/0.png", "validation/cats/near_copy.jpg"),
        ("train/cats/1.png", "train/cats/near_twin.jpg"),
    }
    exact = found[("train/cats/0.png", "validation/cats/exact_copy.png")]
    assert exact["kind"] == "exact" and exact["cross_split"] and not exact["label_conflict"]
    leak = found[("train/dogs/0.png", "validation/cats/near_copy.jpg")]
    assert leak["kind"] == "near" and leak["cross_split"] and leak["label_conflict"]
    assert 0 <= leak["distance"] <= d["near_threshold_bits"]
    twin = found[("train/cats/1.png", "train/cats/near_twin.jpg")]
    assert twin["kind"] == "near" and not twin["cross_split"]
    assert (d["exact_across_splits"], d["near_across_splits"], d["exact_within_split"], d["near_within_split"],
            d["label_conflicts"]) == (1, 1, 0, 1, 1)
    assert d["pairs"][0]["kind"] == "exact" and d["pairs"][0]["cross_split"]  # Leaks come first.


def test_counts_sizes_formats_colour_unreadable_and_imbalance(planted_dir):
    findings = doctor.diagnose(str(planted_dir))
    train, validation = findings["splits"]["train"], findings["splits"]["validation"]
    assert train["images"] == 9 + 7 and validation["images"] == 5 + 3
    cats, dogs = train["classes"]["cats"], train["classes"]["dogs"]
    assert cats["images"] == 9 and cats["formats"] == {"PNG": 8, "JPEG": 1}
    assert cats["width"] == {"min": 72, "median": 96, "max": 96} and cats["aspect"]["median"] == 1.0
    assert (dogs["grayscale"], dogs["alpha"], cats["grayscale"]) == (1, 1, 0)
    assert [u["path"] for u in findings["unreadable"]] == ["train/dogs/cut.png"]
    assert "truncated" in findings["unreadable"][0]["reason"]
    assert any("classes are imbalanced: 'cats' has 9 images, 'dogs' 7" in w for w in findings["warnings"]) is False
    assert any("validation: classes are imbalanced: 'cats' has 5 images, 'dogs' 3 (1.7x)" in w
               for w in findings["warnings"])
    assert any("train: class 'dogs' has only 7 images" in w for w in findings["warnings"])


def test_the_trainer_warns_about_photos_in_two_splits(planted_dir, caplog):
    with caplog.at_level(logging.WARNING):
        input_pipeline.load_folder_source(str(planted_dir), 0.2, 0, 32, 10**8)
    text = caplog.text
    assert "2 photo(s) appear in more than one split" in text
    assert "exact copy:" in text and "exact_copy.png" in text and "near_copy.jpg" in text


def test_a_clean_folder_has_no_duplicates(tmp_path):
    for i in range(12):
        write_image(tmp_path / "d" / ("a" if i % 2 else "b") / f"{i}.png", smooth_random_image(100 + i))
    findings = doctor.diagnose(str(tmp_path / "d"))  # Flat folder: split as the trainer would.
    assert findings["duplicates"]["pairs"] == [] and findings["unreadable"] == []
    assert set(findings["splits"]) == {"train", "validation"}
    assert "held out" in findings["validation"]


@pytest.mark.slow
def test_command_line_prints_the_pairs_and_writes_json(planted_dir, tmp_path):
    out = tmp_path / "report" / "doctor.json"
    result = subprocess.run(
        [sys.executable, "-m", "imgclf_jax.doctor", str(planted_dir), "--output", str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr
    assert "Across splits (leakage" in result.stdout
    assert "train/cats/0.png  ~  validation/cats/exact_copy.png  (identical)" in result.stdout
    assert "[different classes]" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["duplicates"]["exact_across_splits"] == 1 and saved["classes"] == ["cats", "dogs"]

    missing = subprocess.run([sys.executable, "-m", "imgclf_jax.doctor", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "data folder" in missing.stderr and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
