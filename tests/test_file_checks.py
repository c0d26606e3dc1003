"""The scan's decode checks: cached per file, checked again when the file changes."""

from __future__ import annotations

from pathlib import Path

from helpers import class_image, make_class_folder, write_image
from imgclf_jax import file_checks, folders


def test_scan_verdicts_are_cached(tmp_path, monkeypatch):
    root = make_class_folder(tmp_path / "d", {"x": 3, "y": 3})
    folders.load_folder_dataset(str(root), validation_split=0.34)
    checked = []
    monkeypatch.setattr(file_checks, "check_file", lambda p, m: checked.append(p) or file_checks.FileCheck(""))
    folders.load_folder_dataset(str(root), validation_split=0.34)
    assert checked == []
    write_image(root / "x" / "img_0.jpg", class_image(0, seed=99))  # Changed file: checked again.
    folders.load_folder_dataset(str(root), validation_split=0.34)
    assert [Path(p).name for p in checked] == ["img_0.jpg"]


def test_the_scan_records_each_photos_shorter_side_and_the_split_its_median(tmp_path):
    from imgclf_jax import input_pipeline

    root = tmp_path / "d"
    for i, (width, height) in enumerate([(40, 30), (50, 70), (90, 90)]):
        write_image(root / "x" / f"{i}.jpg", class_image(0, (width, height), seed=i))
        write_image(root / "y" / f"{i}.png", class_image(1, (width, height), seed=i))
    found = folders.load_folder_dataset(str(root), validation_split=0.34)
    examples = found.splits["train"] + found.splits["validation"]
    assert sorted(e.short_side for e in examples) == [30, 30, 50, 50, 90, 90]
    cached = folders.load_folder_dataset(str(root), validation_split=0.34)  # From the scan cache.
    assert [e.short_side for e in cached.splits["train"]] == [e.short_side for e in found.splits["train"]]
    split = input_pipeline.folder_split(examples, 32, 10**8)
    assert split.median_short_side == 50
