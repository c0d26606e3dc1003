"""Config files, default-config selection, overrides and validation."""

from __future__ import annotations

import json
import re

import pytest

from imgclf_jax import config_lib, recipes
from imgclf_jax import workdir as workdir_lib
from imgclf_jax.errors import UserError

CONFIG_FILES = [recipes.CONFIGS_DIR / f"{name}.py" for name in recipes.recipe_names()]


def _load(path):
    return recipes.load_config_file(str(path))


def test_required_configs_exist():
    assert {p.stem for p in CONFIG_FILES} >= {"default", "demo", "cats_vs_dogs", "tutorial_cnn"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_is_valid_and_has_every_base_field(path):
    config = _load(path)
    assert config.name == path.stem
    assert set(config.keys()) == set(config_lib.base_config().keys())
    config_lib.validate(config)


def test_tutorial_config_is_the_keras_recipe():
    config = _load(recipes.CONFIGS_DIR / "tutorial_cnn.py")
    assert (config.model, config.image_size, config.batch_size, config.learning_rate) == (
        "tutorial_cnn", 180, 32, 1e-3)
    assert not config.augment.enabled and config.weight_decay == 0 and config.lr_schedule == "constant"


def test_default_config_depends_on_data_flags():
    assert recipes.default_config_argv(["train"]) == ["train", f"--config={recipes.CONFIGS_DIR / 'demo.py'}"]
    argv = recipes.default_config_argv(["train", "--data_dir", "x", "--config.epochs=3"])
    assert argv[1] == f"--config={recipes.CONFIGS_DIR / 'default.py'}" and argv[2:] == ["--data_dir", "x",
                                                                                           "--config.epochs=3"]
    argv = recipes.default_config_argv(["train", "--config", "tutorial_cnn"])
    assert argv == ["train", "--config", str(recipes.CONFIGS_DIR / "tutorial_cnn.py")]
    with pytest.raises(UserError, match="config file nope.py does not exist"):
        recipes.default_config_argv(["train", "--config=nope.py"])


def test_data_flag_overrides_replace_the_data_source():
    config = _load(recipes.CONFIGS_DIR / "demo.py")
    config_lib.apply_overrides(config, data_dir="photos", epochs=None, batch_size=7)
    assert (config.dataset, config.data_dir, config.batch_size, config.epochs) == ("", "photos", 7, 8)
    config_lib.apply_overrides(config, dataset="tfds:tf_flowers")
    assert (config.dataset, config.data_dir) == ("tfds:tf_flowers", "")


def test_saved_config_round_trips_without_executing_code(tmp_path):
    config = _load(recipes.CONFIGS_DIR / "cats_vs_dogs.py")
    workdir_lib.save_config(config, str(tmp_path / "config.json"))
    loaded = workdir_lib.load_saved_config(str(tmp_path / "config.json"))
    assert loaded.to_dict() == config.to_dict()


def test_bad_augment_setting_is_named():
    config = config_lib.base_config()
    config.augment.crop_area_min = 0.0
    with pytest.raises(UserError, match=r"augment.crop_area_min must be in \(0, 1\] \(got 0.0\)"):
        config_lib.validate(config)


def test_bad_resnet_stem_stride_is_named():
    config = config_lib.base_config()
    config.resnet.stem_strides = 0
    with pytest.raises(UserError, match="resnet.stem_strides"):
        config_lib.validate(config)


@pytest.mark.parametrize("model, field", [("cnn", "dropout"), ("resnet", "dropout"), ("resnet", "drop_path")])
def test_bad_dropout_rate_is_named(model, field):
    config = config_lib.base_config()
    config[model][field] = 1.0
    with pytest.raises(UserError, match=rf"{model}.{field} must be in \[0, 1\) \(got 1.0\)"):
        config_lib.validate(config)


def test_unknown_resnet_activation_is_named():
    config = config_lib.base_config()
    config.resnet.activation = "gelu"
    with pytest.raises(UserError, match=re.escape("resnet.activation must be 'relu' or 'silu' (got 'gelu')")):
        config_lib.validate(config)


def test_changes_from_saved_names_changed_fields_only(tmp_path):
    config = recipes.load_config_file("default")
    path = tmp_path / "config.json"
    workdir_lib.save_config(config, str(path))
    assert workdir_lib.changes_from_saved(str(path), config) == []

    saved = json.loads(path.read_text())
    del saved["ema_decay"]  # As written by a version without the field: read as its default (0.0).
    path.write_text(json.dumps(saved))
    changed = recipes.load_config_file("default")
    changed.epochs = 7
    assert workdir_lib.changes_from_saved(str(path), changed) == [
        f"ema_decay: 0.0 -> {config.ema_decay}", f"epochs: {config.epochs} -> 7"]

    path.write_text("{not json")
    assert "could not be read" in workdir_lib.changes_from_saved(str(path), config)[0]


def test_bad_tta_is_named():
    config = config_lib.base_config()
    config.tta = "rotate"
    with pytest.raises(UserError, match="tta must be one of none, flip, flip_scale \\(got 'rotate'\\)"):
        config_lib.validate(config)
    config.tta, config.model = "flip_scale", "tutorial_cnn"
    with pytest.raises(UserError, match="tta flip_scale needs a model that pools globally"):
        config_lib.validate(config)
    config.model = "resnet"
    with pytest.raises(UserError, match="trains without flips"):
        config_lib.validate(config)  # base_config() does not augment.
    config.augment.enabled = config.augment.flip = True
    config_lib.validate(config)


def test_the_time_budget_grows_with_the_data_within_its_bounds():
    config = config_lib.base_config()
    assert config_lib.time_budget_minutes(config, 1000) == 0.0  # No budget by default.
    config.auto_time_budget.update(seconds_per_image=0.6, min_minutes=2.0, max_minutes=20.0)
    assert config_lib.time_budget_minutes(config, 100) == 2.0  # 1 minute: the least applies.
    assert config_lib.time_budget_minutes(config, 1000) == pytest.approx(10.0)
    assert config_lib.time_budget_minutes(config, 5000) == 20.0  # 50 minutes: the most applies.
    config.time_budget_minutes = 7.5  # A fixed budget wins.
    assert config_lib.time_budget_minutes(config, 1000) == 7.5


@pytest.mark.parametrize("median_side, expected", [
    (0, 160),  # Unknown (TFDS, the demo): the config's size.
    (400, 160),  # Larger photos are resized down, as always.
    (160, 160),
    (130, 128),  # Smaller ones set the size, a multiple of 8...
    (20, 64),  # ...but never below 64 px.
])
def test_image_size_follows_photos_smaller_than_it(median_side, expected):
    config = config_lib.base_config()
    config.image_size, config.image_size_from_photos = 160, True
    assert config_lib.image_size_for_photos(config, median_side) == expected
    config.image_size_from_photos = False
    assert config_lib.image_size_for_photos(config, median_side) == 160


@pytest.mark.parametrize("limit, photos_per_class, kept", [
    (0, 5000.0, True),  # No limit.
    (500, 500.0, True),  # At the limit: still on.
    (500, 553.4, False),  # More photos a class: off.
])
def test_trivial_augment_is_left_out_above_the_photos_a_class_limit(limit, photos_per_class, kept):
    config = config_lib.base_config()
    config.augment.trivial_augment, config.augment.trivial_augment_max_photos_per_class = True, limit
    changes = config_lib.adapt_to_photos(config, 0, photos_per_class)
    assert config.augment.trivial_augment is kept
    assert changes == ([] if kept else ["TrivialAugment off: 553 training photos a class, more than "
                                        "augment.trivial_augment_max_photos_per_class (500)."])


def test_adapting_to_photos_changes_nothing_the_config_does_not_ask_for():
    config = config_lib.base_config()
    config.image_size = 160
    before = config.to_dict()
    assert config_lib.adapt_to_photos(config, 20, 10_000.0) == []  # Neither option is on.
    assert config.to_dict() == before
