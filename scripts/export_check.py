"""Checks exported models against JAX on real photos and times them (not part of the tests).

    python scripts/export_check.py --workdir W --data_dir ../shared/datasets/cats_vs_dogs/validation \\
        [--count 200] [--formats saved_model,tflite,onnx] [--out /tmp/exported]

Exports the run in each format (imgclf_jax.export), prepares `count` photos of the folder as predict does
(uint8 at the run's size) and prints, per format: the file's size, the largest probability difference from
JAX and how many photos get the same top class, and the mean batch-1 latency in its runtime beside JAX's
per-image time at batch 1 (`predict`'s model function, no test-time augmentation), with the host named.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from imgclf_jax import export, folders, inference, input_pipeline  # noqa: E402


def folder_photos(run: inference.TrainedRun, data_dir: str, count: int) -> np.ndarray:
    """`count` photos of `data_dir` (class sub-folders), spread over its classes, uint8 at the run's size."""
    examples, _ = folders.load_class_folder(data_dir, run.class_names, run.config.max_image_pixels)
    picked = [examples[i] for i in np.linspace(0, len(examples) - 1, min(count, len(examples))).astype(int)]
    split = input_pipeline.folder_split(picked, run.config.image_size, run.config.max_image_pixels)
    prepared = input_pipeline.prepare(split, run.config.image_size, run.config.resize, cache=False)
    return np.stack([image for image, _ in input_pipeline.iterate(prepared)])


def seconds_per_photo(call, photos: np.ndarray, repeats: int = 3) -> float:
    """The best of `repeats` passes over `photos` one at a time, per photo, after a warm-up call."""
    call(photos[:1])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(photos)):
            call(photos[i:i + 1])
        best = min(best, (time.perf_counter() - start) / len(photos))
    return best


def size_of(path: str) -> int:
    target = Path(path)
    return sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) if target.is_dir() else target.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", required=True, help="a folder of class sub-folders")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--formats", default="saved_model,tflite,onnx")
    parser.add_argument("--out", default="/tmp/exported")
    args = parser.parse_args()
    run = inference.load_run(args.workdir, conv_impl="xla")
    photos = folder_photos(run, args.data_dir, args.count)
    serve = jax.jit(export.serving_function(run))
    jax_seconds = seconds_per_photo(lambda x: np.asarray(serve(x)), photos[:50])
    print(f"{len(photos)} photos of {args.data_dir}; {os.cpu_count()}-core {platform.processor() or platform.machine()}; "
          f"JAX (XLA convolutions) batch 1: {1000 * jax_seconds:.2f} ms a photo")
    print("| format | size | max abs difference | same top class | batch-1 latency |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for fmt in args.formats.split(","):
        out = os.path.join(args.out, f"{Path(args.workdir).name}{export.SUFFIXES[fmt] or '_saved_model'}")
        result = export.export(args.workdir, fmt, out=out, check_images=photos)
        runner = export._runner(fmt, out)
        latency = seconds_per_photo(runner, photos[:50])
        print(f"| {fmt} | {size_of(out) / 1e6:.2f} MB | {result.max_difference:.1e} | "
              f"{result.checked}/{result.checked} | {1000 * latency:.2f} ms |")


if __name__ == "__main__":
    main()
