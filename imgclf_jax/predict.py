"""Prediction on new images with a trained run.

    python -m imgclf_jax.predict --workdir W IMAGE_OR_FOLDER... [--top_k K] [--json] [--checkpoint kept]

One line per image: path, predicted class and its probability (and the top k for several classes).
Folders are searched recursively; files that cannot be read are reported on their own line and the rest
are still predicted. Exit status 0 if at least one image was predicted, 1 if none could be.
"""

from __future__ import annotations

if __name__ == "__main__":  # Before TensorFlow loads, so that its C++ start-up lines stay quiet.
    import sys

    from imgclf_jax import cli

    cli.prepare_environment(sys.argv)

import concurrent.futures
import json
import os
import sys
from typing import Iterator, Optional, Sequence

import numpy as np

from imgclf_jax import cli, config_lib, folders, image_io, inference, input_pipeline
from imgclf_jax.errors import UserError


def collect_files(inputs: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """(path, problem) for every named file and every image found under named folders, in order.

    A named file is always listed (and its problem reported if it is not an image); inside folders, system
    litter and non-image files without an image extension are passed over silently.
    """
    found: list[tuple[str, Optional[str]]] = []
    for item in inputs:
        if os.path.isdir(item):
            candidates, not_images = folders.list_candidate_files(item)
            problems = dict(not_images)
            found.extend((p, problems.get(p)) for p in sorted(candidates + list(problems)))
        elif os.path.exists(item):
            found.append((item, None))
        else:
            found.append((item, "no such file or folder"))
    return found


def _load(path: str, image_size: int, resize: str, max_pixels: int) -> np.ndarray:
    """The model's input for one file, exactly as evaluation prepares it (resize, then scale)."""
    image = image_io.load_image(path, min_size=image_size, max_pixels=max_pixels)
    return input_pipeline.to_float(input_pipeline.resize_image(image, image_size, resize)).numpy()


def predict_files(
    run: inference.TrainedRun, files: Sequence[tuple[str, Optional[str]]], batch_size: int = 64,
    tta: Optional[str] = None,
) -> Iterator[tuple[str, Optional[np.ndarray], Optional[str]]]:
    """Yields (path, probabilities or None, error or None) in input order, decoding in parallel batches."""
    config = run.config
    predict = inference.make_predict_fn(run, tta)
    size = config.image_size
    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]

            def load(item):
                path, problem = item
                if problem:
                    return None, problem
                try:
                    return _load(path, size, config.resize, config.max_image_pixels), None
                except image_io.UnusableImageError as e:
                    return None, str(e)

            loaded = list(pool.map(load, chunk))
            images = np.zeros((batch_size, size, size, 3), np.float32)  # Fixed shape: one compilation.
            for i, (image, _) in enumerate(loaded):
                if image is not None:
                    images[i] = image
            probabilities = np.asarray(predict(images)) if any(im is not None for im, _ in loaded) else None
            for i, ((path, _), (image, error)) in enumerate(zip(chunk, loaded)):
                yield path, (probabilities[i] if image is not None else None), error


def format_line(path: str, probabilities: Optional[np.ndarray], error: Optional[str],
                class_names: Sequence[str], top_k: int, as_json: bool) -> str:
    path = folders.display_path(path)  # One line per image, whatever the file is called.
    if probabilities is not None and not np.all(np.isfinite(probabilities)):
        probabilities, error = None, "the model's output for this image is not finite (NaN or infinite)"
    if probabilities is None:
        return json.dumps({"path": path, "error": error}) if as_json else f"{path}\tERROR: {error}"
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    top = [{"label": class_names[i], "probability": round(float(probabilities[i]), 6)} for i in order]
    if as_json:
        return json.dumps({"path": path, "label": top[0]["label"], "probability": top[0]["probability"],
                           "top_k": top})
    return "\t".join([path] + [f"{t['label']}\t{t['probability']:.4f}" for t in top])


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Work directory of a training run.", required=True)
    flags.DEFINE_string("checkpoint", "kept", inference.CHECKPOINT_HELP)
    flags.DEFINE_integer("top_k", None, "Classes listed per image (default: 1 for two classes, else 3).")
    flags.DEFINE_bool("json", False, "One JSON object per line: path, label, probability, top_k.")
    flags.DEFINE_integer("batch_size", 64, "Images per batch.")
    flags.DEFINE_enum("tta", None, list(config_lib.TTA_MODES), "'flip' averages with the mirror image's "
                      "prediction, 'flip_scale' also with both at 1.1x the size. Default: the run's config.tta.")


def main(argv) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    inputs = argv[1:]
    if not inputs:
        raise UserError("name at least one image or folder to predict")
    config_lib.require_positive_int("batch_size", FLAGS.batch_size)
    run = inference.load_run(FLAGS.workdir, FLAGS.checkpoint)
    n_classes = len(run.class_names)
    top_k = FLAGS.top_k if FLAGS.top_k is not None else (1 if n_classes == 2 else min(3, n_classes))
    config_lib.require_positive_int("top_k", top_k)
    files = collect_files(inputs)
    if not files:
        raise UserError(f"no images found in {' '.join(inputs)}")
    predicted = 0
    for path, probabilities, error in predict_files(run, files, FLAGS.batch_size, FLAGS.tta):
        print(format_line(path, probabilities, error, run.class_names, min(top_k, n_classes), FLAGS.json),
              flush=True)
        predicted += probabilities is not None and bool(np.all(np.isfinite(probabilities)))
    if not predicted:
        sys.exit(1)


def run() -> None:
    _define_flags()
    cli.run("imgclf_jax.predict", main)


if __name__ == "__main__":
    run()
