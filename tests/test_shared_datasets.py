"""Integration checks on the real photo folders in ../shared/datasets (skipped when they are absent)."""

from __future__ import annotations

import pytest

from helpers import SHARED_DATASETS
from imgclf_jax import folders


def _require(name):
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"{path} is not available")
    return path


@pytest.mark.slow
def test_cats_vs_dogs_layout_and_counts():
    found = folders.load_folder_dataset(str(_require("cats_vs_dogs")))
    assert found.class_names == ["cats", "dogs"]
    assert [sum(e.label == k for e in found.splits["train"]) for k in (0, 1)] == [1000, 1000]
    assert [sum(e.label == k for e in found.splits["validation"]) for k in (0, 1)] == [500, 500]
    assert found.skipped == []


@pytest.mark.slow
def test_flowers5_layout_and_counts():
    found = folders.load_folder_dataset(str(_require("flowers5")))
    assert found.class_names == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert len(found.splits["train"]) == 3457 and len(found.splits["validation"]) == 860
