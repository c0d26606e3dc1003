"""Helpers shared by the tests: small generated images and folders (never the shared datasets), a tiny
config, fresh states and copies of a trained run."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

try:  # The tests write HEIC files, which Pillow saves only with pillow-heif's plug-in.
    import pillow_heif
except ImportError:
    pass
else:
    pillow_heif.register_heif_opener()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


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
