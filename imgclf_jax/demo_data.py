"""The built-in demo dataset: scikit-learn's 1,797 real 8x8 handwritten digits, written as an image folder.

It ships inside a dependency, so the default run works offline and goes through the same folder pipeline
as a user's photos.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

_COMPLETE_MARKER = ".complete"


def ensure_digits(data_root: str = "data") -> str:
    """Writes `data_root/digits/<digit>/<index>.png` once (atomically) and returns that folder."""
    target = Path(data_root) / "digits"
    if (target / _COMPLETE_MARKER).exists():
        return str(target)
    from sklearn.datasets import load_digits  # Imported here: only the demo needs scikit-learn.

    digits = load_digits()
    staging = target.with_name(f"digits.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = staging / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
    (staging / _COMPLETE_MARKER).write_text(f"{len(digits.images)} images\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    log.info("Wrote the built-in demo dataset (%d digit images) to %s", len(digits.images), target)
    return str(target)
