"""Shared fixtures: small generated image folders (never the shared datasets), an isolated scan cache."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Session-wide fixtures must not write the scan cache into ~/.cache either.
os.environ["IMGCLF_CACHE_DIR"] = tempfile.mkdtemp(prefix="imgclf_scan_cache_")
atexit.register(shutil.rmtree, os.environ["IMGCLF_CACHE_DIR"], ignore_errors=True)

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(autouse=True)
def isolated_scan_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own scan cache, so verdicts never leak between tests or into ~/.cache."""
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path_factory.mktemp("scan_cache")))


def class_image(label: int, size: tuple[int, int] = (24, 20), seed: int = 0) -> np.ndarray:
    """An RGB image whose class is easy to learn: class 0 is dark with a bright left half, class 1 bright
    with a dark left half (and so on for more classes), plus noise."""
    rng = np.random.default_rng([label, seed])
    width, height = size
    base = 40 + 170 * (label % 2)
    image = np.full((height, width, 3), base, np.float64)
    image[:, : width // 2] = 255 - base
    image[..., label % 3] += 30 * (label // 2)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def smooth_random_image(seed: int, size: int = 96) -> np.ndarray:
    """A photo-like image: random low-frequency colour fields (distinct seeds look unrelated)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (5, 5, 3), np.uint8))
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))


def near_copy(pixels: np.ndarray) -> np.ndarray:
    """The same picture re-encoded as a smaller, slightly brighter JPEG."""
    image = Image.fromarray(np.clip(pixels.astype(int) + 6, 0, 255).astype(np.uint8))
    image = image.resize((pixels.shape[1] * 3 // 4, pixels.shape[0] * 3 // 4), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return np.asarray(Image.open(buffer).convert("RGB"))


def write_image(path: Path, pixels: np.ndarray, fmt: str | None = None, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


def make_class_folder(root: Path, classes: dict[str, int], start: int = 0, size=(24, 20)) -> Path:
    """`root/<class>/img_<i>.png|jpg`: `classes` maps names to image counts; formats alternate."""
    for label, (name, count) in enumerate(sorted(classes.items())):
        for i in range(start, start + count):
            ext = "png" if i % 2 else "jpg"
            write_image(root / name / f"img_{i}.{ext}", class_image(label, size, seed=i))
    return root


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


def tiny_base_config():
    from imgclf_jax import config_lib

    config = config_lib.base_config()
    config.name = "tiny"
    config.image_size = 16
    config.model = "cnn"
    config.cnn.filters = (8, 16)
    config.cnn.dense_units = 16
    config.epochs = 2
    config.batch_size = 8
    config.learning_rate = 3e-3
    config.report = False  # tests/test_report.py covers it, on `trained_run`.
    return config


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


def fresh_state(config, num_outputs: int):
    """An untrained TrainState for `config`'s model with `num_outputs` logits (seeded by config.seed)."""
    from imgclf_jax import models, schedule, train_state

    model = models.create_model(config, num_outputs)
    lr = schedule.create_learning_rate_fn(config, steps_per_epoch=10)
    return train_state.create_train_state(model, config.image_size, train_state.create_optimizer(config, lr),
                                          config.seed, ema=config.ema_decay > 0)


def copy_run_with_config(workdir: Path, dest: Path, **changes) -> Path:
    """A copy of the trained run in `workdir` at `dest` whose saved config.json has `changes` applied (as a
    run trained with them would have saved it; the weights stay the same)."""
    import json

    shutil.copytree(workdir, dest)
    saved = json.loads((dest / "config.json").read_text())
    saved.update(changes)
    (dest / "config.json").write_text(json.dumps(saved))
    return dest


def png_bomb_bytes(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header declares width x height RGB pixels (7.5 GB decoded at 50k x 50k)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))
