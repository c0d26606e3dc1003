"""Shared fixtures: small generated image folders, a tiny config, a trained run, an isolated scan cache.
Helpers that are plain functions live in helpers.py."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import make_class_folder, tiny_base_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Session-wide fixtures must not write the scan cache into ~/.cache either.
os.environ["IMGCLF_CACHE_DIR"] = tempfile.mkdtemp(prefix="imgclf_scan_cache_")
atexit.register(shutil.rmtree, os.environ["IMGCLF_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_scan_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own scan cache, so verdicts never leak between tests or into ~/.cache."""
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path_factory.mktemp("scan_cache")))


@pytest.fixture
def two_class_dir(tmp_path) -> Path:
    """DIR/train/{cats,dogs} (24 each) and DIR/validation/{cats,dogs} (8 each)."""
    make_class_folder(tmp_path / "data" / "train", {"cats": 24, "dogs": 24})
    make_class_folder(tmp_path / "data" / "validation", {"cats": 8, "dogs": 8}, start=100)
    return tmp_path / "data"


@pytest.fixture
def flat_three_class_dir(tmp_path) -> Path:
    """DIR/{a,b,c}/ directly (no split folders): 15 images each."""
    return make_class_folder(tmp_path / "flat", {"a": 15, "b": 15, "c": 15})


@pytest.fixture
def tiny_config():
    """A fast config for end-to-end tests on generated folders."""
    return tiny_base_config()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny two-class run trained once per session: (workdir, data_dir)."""
    from imgclf_jax import train

    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    make_class_folder(data / "train", {"cats": 24, "dogs": 24})
    make_class_folder(data / "validation", {"cats": 7, "dogs": 6}, start=100)
    config = tiny_base_config()
    config.data_dir, config.report = str(data), True
    train.train_and_evaluate(config, str(root / "work"))
    return root / "work", data
