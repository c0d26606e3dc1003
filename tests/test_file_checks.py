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
