"""Export to SavedModel, TFLite and ONNX: the same probabilities as JAX, the contract beside the model, clear
errors."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from helpers import make_class_folder, tiny_base_config
from imgclf_jax import export, inference, train
from imgclf_jax.errors import UserError

needs_onnx = pytest.mark.skipif(importlib.util.find_spec("tf2onnx") is None
                                or importlib.util.find_spec("onnxruntime") is None,
                                reason="ONNX export needs the export extra (tf2onnx, onnxruntime)")


def _photos(run, count=6):
    return export._validation_images(run, count)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["saved_model", "tflite", pytest.param("onnx", marks=needs_onnx)])
def test_each_format_gives_jaxs_probabilities_and_carries_the_contract(trained_run, tmp_path, fmt):
    workdir, _ = trained_run
    out = str(tmp_path / f"model{export.SUFFIXES[fmt]}")
    result = export.export(str(workdir), fmt, out=out)
    assert result.path == out and result.checked == 13 and result.same_top_class
    assert result.max_difference <= export.TOLERANCE
    info = json.loads((tmp_path / f"model{export.SUFFIXES[fmt]}.json").read_text())
    run = inference.load_run(str(workdir), conv_impl="xla")
    assert info["classes"] == ["cats", "dogs"] and info["image_size"] == run.config.image_size
    assert info["input"]["dtype"] == "uint8" and info["resize"] == "squash"
    # In its runtime, on photos it was not checked on (mirrored): the same answers as JAX.
    photos = _photos(run)[:, :, ::-1, :].copy()
    expected = np.asarray(export.serving_function(run)(photos))
    runner = export._runner(fmt, out)
    got = runner(photos) if fmt == "saved_model" else np.concatenate([runner(p[None]) for p in photos])
    np.testing.assert_allclose(got, expected, atol=export.TOLERANCE)
    assert got.shape == (len(photos), 2)


@pytest.mark.slow
@needs_onnx
def test_a_softmax_resnet_with_batch_norm_and_weight_average_exports_to_onnx(tmp_path):
    make_class_folder(tmp_path / "data", {"a": 12, "b": 12, "c": 12})
    config = tiny_base_config()
    config.update(data_dir=str(tmp_path / "data"), model="resnet", ema_decay=0.9, epochs=2)
    config.resnet.update(stage_sizes=(1, 1), widths=(8, 16))
    train.train_and_evaluate(config, str(tmp_path / "w"))
    with open(tmp_path / "w" / "config.json") as f:
        assert json.load(f)["ema_decay"] == 0.9
    result = export.export(str(tmp_path / "w"), "onnx", out=str(tmp_path / "model.onnx"))
    assert result.max_difference <= export.TOLERANCE and result.same_top_class
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(metadata["classes"]) == ["a", "b", "c"]


def test_bad_requests_are_one_clear_error(trained_run, tmp_path, monkeypatch):
    workdir, _ = trained_run
    with pytest.raises(UserError, match="--format must be one of saved_model, tflite, onnx"):
        export.export(str(workdir), "keras")
    (tmp_path / "taken.tflite").write_bytes(b"")
    with pytest.raises(UserError, match="already exists"):
        export.export(str(workdir), "tflite", out=str(tmp_path / "taken.tflite"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"ONNX export needs tf2onnx: pip install 'imgclf_jax\[export\]'"):
        export.export(str(workdir), "onnx", out=str(tmp_path / "m.onnx"))
