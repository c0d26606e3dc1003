"""Export a trained run for use without JAX: a TensorFlow SavedModel, a TensorFlow Lite (LiteRT) file, or an
ONNX model, each with the run's preprocessing inside and its class names beside it.

    python -m imgclf_jax.export --workdir W --format saved_model|tflite|onnx [--checkpoint kept] [--out PATH]

The exported model takes what a user has: uint8 RGB images of the run's training size, (N, S, S, 3) (N = 1 for
TFLite and ONNX), resized as the run resizes (`resize` in the metadata: 'squash' is the whole photo scaled to
S x S) and returns (N, classes) probabilities (test-time augmentation off). It is built from JAX with
jax2tf (the SavedModel), TensorFlow's TFLite converter (from the SavedModel) and tf2onnx (from the TFLite file);
the convolutions are XLA's portable ones, never the native CPU kernels. After writing, the exporter loads the
file back in its own runtime and checks it against JAX on photos of the run's validation data: every
probability within 1e-4 and the same top class, or the export is an error.
"""

from __future__ import annotations

if __name__ == "__main__":  # Before TensorFlow loads, so that its C++ start-up lines stay quiet.
    import sys

    from imgclf_jax import cli

    cli.prepare_environment(sys.argv)

import dataclasses
import json
import logging
import os
import tempfile
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np

from imgclf_jax import cli, evaluate, inference, input_pipeline, losses
from imgclf_jax import workdir as workdir_lib
from imgclf_jax.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("saved_model", "tflite", "onnx")
SUFFIXES = {"saved_model": "", "tflite": ".tflite", "onnx": ".onnx"}
TOLERANCE = 1e-4  # The largest difference in any probability that the self-check accepts.
_INSTALL = "pip install 'imgclf_jax[export]'"


@dataclasses.dataclass
class ExportResult:
    path: str
    metadata_path: str
    max_difference: float  # Against JAX, on `checked` photos.
    same_top_class: bool
    checked: int


def serving_function(run: inference.TrainedRun) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """uint8 (N, S, S, 3) -> (N, classes) probabilities, as `imgclf_jax.predict` computes them without TTA."""
    variables = inference.eval_variables(run.state)

    def serve(images: jnp.ndarray) -> jnp.ndarray:
        logits = run.state.apply_fn(variables, images.astype(jnp.float32) / 255.0, train=False)
        return losses.probabilities(logits, run.loss_kind)

    return serve


def metadata(run: inference.TrainedRun, fmt: str) -> dict[str, Any]:
    """The model's contract: classes in output order, the input it takes and what it returns."""
    size = run.config.image_size
    return {
        "format": fmt, "classes": run.class_names, "image_size": size, "resize": run.config.resize,
        "input": {"dtype": "uint8", "shape": [None if fmt == "saved_model" else 1, size, size, 3],
                  "layout": "NHWC, RGB, 0-255", "preprocessing": "inside the model (scaled to [0, 1])"},
        "output": {"dtype": "float32", "shape": [None if fmt == "saved_model" else 1, len(run.class_names)],
                   "meaning": "class probabilities, in the order of classes"},
        "source": {"workdir": os.path.abspath(run.workdir), "step": run.step, "epoch": run.epoch,
                   "model": run.config.model},
    }


def export(workdir: str, fmt: str, checkpoint: str = "kept", out: Optional[str] = None,
           check_images: Optional[np.ndarray] = None) -> ExportResult:
    """Writes the run's model in `fmt` to `out` (default W/export/model.<suffix>) with `<out>.json` beside it,
    then checks it in its runtime against JAX on `check_images` (uint8, default: up to 16 of the run's
    validation photos)."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if fmt == "onnx":
        _require("tf2onnx", "onnxruntime")
    run = inference.load_run(workdir, checkpoint, conv_impl="xla")
    out = out or os.path.join(workdir, "export", f"model{SUFFIXES[fmt]}")
    if os.path.exists(out):
        raise UserError(f"{out} already exists: remove it or name another --out")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    serve = serving_function(run)
    info = metadata(run, fmt)
    with tempfile.TemporaryDirectory() as tmp:
        saved_model = out if fmt == "saved_model" else os.path.join(tmp, "saved_model")
        _write_saved_model(serve, run, saved_model, batch=None if fmt == "saved_model" else 1)
        if fmt in ("tflite", "onnx"):
            tflite = out if fmt == "tflite" else os.path.join(tmp, "model.tflite")
            _write_tflite(saved_model, tflite)
            if fmt == "onnx":
                _write_onnx(tflite, out, info)
    metadata_path = f"{out.rstrip(os.sep)}.json"
    workdir_lib.write_json(metadata_path, info)
    images = check_images if check_images is not None else _validation_images(run, 16)
    expected = np.asarray(serve(jnp.asarray(images)))
    got = np.concatenate([_runner(fmt, out)(images[i:i + 1] if fmt != "saved_model" else images)
                          for i in (range(len(images)) if fmt != "saved_model" else [0])])
    difference = float(np.abs(got - expected).max())
    same_top = bool(np.array_equal(got.argmax(-1), expected.argmax(-1)))
    if difference > TOLERANCE or not same_top:
        raise UserError(f"the exported {fmt} model disagrees with JAX on the run's photos (largest probability "
                        f"difference {difference:.2g}, same top class: {same_top}); it was left at {out}")
    return ExportResult(out, metadata_path, difference, same_top, len(images))


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"ONNX export needs {' and '.join(missing)}: {_INSTALL}")


def _write_saved_model(serve: Callable, run: inference.TrainedRun, path: str, batch: Optional[int]) -> None:
    import tensorflow as tf
    from jax.experimental import jax2tf

    size = run.config.image_size
    shapes = None if batch else [f"(b, {size}, {size}, 3)"]
    converted = jax2tf.convert(serve, polymorphic_shapes=shapes, with_gradient=False)
    module = tf.Module()
    module.serve = tf.function(converted, autograph=False,
                               input_signature=[tf.TensorSpec([batch, size, size, 3], tf.uint8, name="images")])
    module.class_names = tf.constant(run.class_names)  # Also in the JSON beside the model.
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def _write_tflite(saved_model: str, path: str) -> None:
    import tensorflow as tf

    with open(path, "wb") as f:
        f.write(tf.lite.TFLiteConverter.from_saved_model(saved_model).convert())


def _write_onnx(tflite: str, path: str, info: dict) -> None:
    import tf2onnx

    model, _ = tf2onnx.convert.from_tflite(tflite)
    for key, value in (("classes", json.dumps(info["classes"])), ("image_size", str(info["image_size"])),
                       ("resize", info["resize"])):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def _runner(fmt: str, path: str) -> Callable[[np.ndarray], np.ndarray]:
    """The exported model as a function of uint8 images, run in its own runtime."""
    if fmt == "saved_model":
        import tensorflow as tf

        serve = tf.saved_model.load(path).signatures["serving_default"]
        return lambda images: next(iter(serve(images=tf.constant(images)).values())).numpy()
    if fmt == "tflite":
        import tensorflow as tf

        interpreter = tf.lite.Interpreter(model_path=path)
        interpreter.allocate_tensors()
        (inp,), (outp,) = interpreter.get_input_details(), interpreter.get_output_details()

        def run_tflite(images: np.ndarray) -> np.ndarray:
            interpreter.set_tensor(inp["index"], images)
            interpreter.invoke()
            return interpreter.get_tensor(outp["index"]).copy()

        return run_tflite
    import onnxruntime

    model = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = model.get_inputs()[0].name
    return lambda images: model.run(None, {name: images})[0]


def _validation_images(run: inference.TrainedRun, count: int) -> np.ndarray:
    """Up to `count` of the run's validation photos, uint8 at the run's size, prepared as predict does."""
    data, _, _, _ = evaluate.resolve_eval_data(run, None, None, "validation")
    prepared = input_pipeline.prepare(data, run.config.image_size, run.config.resize, cache=False)
    return np.stack([image for image, _ in input_pipeline.iterate(prepared.take(count))])


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Work directory of a training run.", required=True)
    flags.DEFINE_enum("format", None, list(FORMATS), "saved_model, tflite or onnx.", required=True)
    flags.DEFINE_string("checkpoint", "kept", inference.CHECKPOINT_HELP)
    flags.DEFINE_string("out", None, "Where to write it (default W/export/model[.tflite|.onnx]).")


def main(argv) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    result = export(FLAGS.workdir, FLAGS.format, FLAGS.checkpoint, FLAGS.out)
    print(f"Wrote {result.path} and {result.metadata_path}; checked on {result.checked} photos: largest "
          f"probability difference from JAX {result.max_difference:.1e}, same top class for every photo.")


def run() -> None:
    _define_flags()
    cli.run("imgclf_jax.export", main)


if __name__ == "__main__":
    run()
