"""The evaluation entry point: counts, report fields, class matching and clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers import copy_run_with_config, fresh_state, make_class_folder
from imgclf_jax import evaluate, inference
from imgclf_jax.errors import UserError


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_report_counts_every_image_once_for_any_batch_size(trained_run, batch_size):
    workdir, data = trained_run
    report = evaluate.evaluate(str(workdir), data_dir=str(data), batch_size=batch_size, name=f"bs{batch_size}")
    matrix = np.array(report["confusion_matrix"])
    assert matrix.sum() == report["num_examples"] == 13
    assert np.trace(matrix) / matrix.sum() == pytest.approx(report["accuracy"])
    assert [report["per_class"][c]["support"] for c in ("cats", "dogs")] == [7, 6]
    assert matrix.sum(axis=1).tolist() == [7, 6]
    assert 0.0 <= report["roc_auc"] <= 1.0 and "top5_accuracy" not in report
    saved = json.loads((workdir / f"eval_bs{batch_size}.json").read_text())
    assert saved["confusion_matrix"] == report["confusion_matrix"] and saved["classes"] == ["cats", "dogs"]
    assert (workdir / f"confusion_matrix_bs{batch_size}.png").stat().st_size > 1000


def test_best_checkpoint_reproduces_the_logged_validation_accuracy(trained_run):
    workdir, _ = trained_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    report = evaluate.evaluate(str(workdir))  # The run's own data: its validation folder.
    (evaluated,) = [r for r in records if r["epoch"] == report["epoch"]]
    assert evaluated["val_accuracy"] == max(r["val_accuracy"] for r in records)
    assert report["accuracy"] == pytest.approx(evaluated["val_accuracy"])
    assert report["loss"] == pytest.approx(evaluated["val_loss"], rel=1e-4)
    assert report["name"] == "validation"


def test_a_folder_of_class_folders_and_a_missing_class(trained_run, tmp_path):
    workdir, data = trained_run
    only_dogs = tmp_path / "only_dogs"
    shutil.copytree(data / "validation" / "dogs", only_dogs / "dogs")
    report = evaluate.evaluate(str(workdir), data_dir=str(only_dogs), checkpoint="latest")
    assert report["name"] == "only_dogs" and report["num_examples"] == 6
    assert report["per_class"]["cats"]["support"] == 0 and "roc_auc" not in report


def test_flip_tta_averages_the_image_and_its_mirror(trained_run):
    workdir, _ = trained_run
    run = inference.load_run(str(workdir))
    images = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32)
    plain = np.asarray(inference.make_predict_fn(run)(images))
    mirrored = np.asarray(inference.make_predict_fn(run)(images[:, :, ::-1]))
    np.testing.assert_allclose(inference.make_predict_fn(run, "flip")(images), (plain + mirrored) / 2, rtol=1e-5)
    report = evaluate.evaluate(str(workdir), tta="flip", name="tta")
    assert report["tta"] == "flip" and report["num_examples"] == 13


def _untrained_resnet_run(tmp_path) -> inference.TrainedRun:
    """A TrainedRun around a fresh ResNet (which pools globally, so it takes any image size)."""
    from imgclf_jax import config_lib

    config = config_lib.base_config()
    config.model, config.image_size, config.resnet.widths = "resnet", 20, (4, 8, 8, 8)
    return inference.TrainedRun(str(tmp_path), config, ["a", "b", "c"], "softmax", fresh_state(config, 3), 0, 0)


@pytest.mark.slow
def test_flip_scale_tta_averages_four_views(tmp_path):
    from imgclf_jax import augmentation

    run = _untrained_resnet_run(tmp_path)
    images = np.random.default_rng(1).uniform(size=(3, 20, 20, 3)).astype(np.float32)
    plain = inference.make_predict_fn(run, "none")
    enlarged = np.asarray(augmentation.resize(images, 22))  # 1.1x of 20 px.
    views = [images, images[:, :, ::-1], enlarged, enlarged[:, :, ::-1]]
    per_view = [np.asarray(plain(v)) for v in views]
    # The views must disagree, or dropping one of them would go unnoticed.
    assert min(np.abs(a - b).max() for i, a in enumerate(per_view) for b in per_view[i + 1:]) > 1e-4
    expected = np.mean(per_view, axis=0)
    got = np.asarray(inference.make_predict_fn(run, "flip_scale")(images))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.shape == (3, 3) and np.allclose(got.sum(-1), 1.0, atol=1e-5)
    run.config.tta = "flip_scale"  # What a run's config asks for is the default.
    np.testing.assert_allclose(inference.make_predict_fn(run)(images), got, rtol=1e-6)


def test_evaluate_uses_the_runs_configured_tta_unless_told_otherwise(trained_run, tmp_path):
    workdir, data = trained_run
    copy = copy_run_with_config(workdir, tmp_path / "work", tta="flip")
    flipped = evaluate.evaluate(str(copy), data_dir=str(data))
    assert flipped["tta"] == "flip"
    assert flipped["loss"] == pytest.approx(evaluate.evaluate(str(workdir), data_dir=str(data), tta="flip")["loss"])
    assert evaluate.evaluate(str(copy), data_dir=str(data), tta="none")["tta"] == "none"
    assert "(flip TTA)" in evaluate.format_report(flipped)


def test_tta_errors_name_the_problem(trained_run):
    workdir, _ = trained_run
    with pytest.raises(UserError, match="--tta flip_scale needs a model that pools globally"):
        evaluate.evaluate(str(workdir), tta="flip_scale")  # trained_run's cnn flattens its features.
    with pytest.raises(UserError, match="--tta must be one of none, flip, flip_scale"):
        inference.make_predict_fn(inference.load_run(str(workdir)), "rotate")


def test_unknown_class_folder_is_a_clear_error(trained_run, tmp_path):
    workdir, _ = trained_run
    make_class_folder(tmp_path / "zoo", {"cats": 2, "zebras": 2})
    with pytest.raises(UserError, match="\\['zebras'\\] that are not among the trained classes"):
        evaluate.evaluate(str(workdir), data_dir=str(tmp_path / "zoo"))


def test_missing_split_and_missing_folder(trained_run, tmp_path):
    workdir, data = trained_run
    with pytest.raises(UserError, match="has no 'test' split"):
        evaluate.evaluate(str(workdir), data_dir=str(data), split="test")
    with pytest.raises(UserError, match="does not exist"):
        evaluate.evaluate(str(workdir), data_dir=str(tmp_path / "nowhere"))


def test_empty_or_untrained_work_directories(tmp_path, trained_run):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a training work directory"):
        evaluate.evaluate(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist"):
        evaluate.evaluate(str(tmp_path / "missing"))
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    for name in ("config.json", "classes.json"):
        shutil.copy(trained_run[0] / name, untrained / name)
    with pytest.raises(UserError, match="no checkpoint in"):
        evaluate.evaluate(str(untrained))
    with pytest.raises(UserError, match="no checkpoint at step 999"):
        evaluate.evaluate(str(trained_run[0]), checkpoint="999")


def test_scoring_validation_does_not_open_the_test_folder(trained_run, tmp_path):
    """The run report scores validation: a test/ folder with a class the model never saw must not stop it."""
    workdir, data = trained_run
    shutil.copytree(data, tmp_path / "data")
    make_class_folder(tmp_path / "data" / "test", {"cats": 2, "zebras": 2})
    run = inference.load_run(str(workdir))
    run.config.unlock()
    run.config.data_dir = str(tmp_path / "data")
    split, name, _, _ = evaluate.resolve_eval_data(run, None, None, "validation")
    assert name == "validation" and split.num_examples == 13
    with pytest.raises(UserError, match="zebras"):  # Asked for (the default picks test), it is refused.
        evaluate.resolve_eval_data(run, None, None, None)


@pytest.mark.parametrize("name, content, message", [
    ("config.json", "{garbage", "config.json cannot be read"),
    ("config.json", "[1, 2]", "config.json is damaged: it holds a JSON list, not a dict"),
    ("classes.json", '["cats",', "classes.json cannot be read"),
    ("classes.json", '{"a": 1}', "classes.json is damaged: it holds a JSON dict, not a list"),
    ("classes.json", "[1, 2]", "classes.json is damaged: it should list the class names"),
])
def test_damaged_run_files_are_named_in_one_error(trained_run, tmp_path, name, content, message):
    workdir = tmp_path / "w"
    shutil.copytree(trained_run[0], workdir)
    (workdir / name).write_text(content)
    with pytest.raises(UserError, match=message):
        evaluate.evaluate(str(workdir))


def test_a_run_with_nan_weights_is_refused_by_its_readers(trained_run, tmp_path):
    import jax

    from imgclf_jax.checkpointing import Checkpointer

    workdir = tmp_path / "w"
    shutil.copytree(trained_run[0], workdir)
    run = inference.load_run(str(workdir), "latest")
    poisoned = run.state.replace(params=jax.tree_util.tree_map(lambda p: p * np.nan, run.state.params))
    checkpointer = Checkpointer(str(workdir / "checkpoints"))
    checkpointer.save(run.step + 1, poisoned, {"epoch": run.epoch + 1}, None)
    checkpointer.close()
    with pytest.raises(UserError, match="holds NaN or infinite weights"):
        evaluate.evaluate(str(workdir), checkpoint="latest")
