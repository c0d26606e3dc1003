"""The tf.data pipeline: sources, resizing, deterministic per-epoch batches, padded evaluation, TFDS."""

from __future__ import annotations


import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from helpers import write_image
from imgclf_jax import config_lib, input_pipeline
from imgclf_jax.errors import UserError


def _prepared(data_dir, image_size=16, split="train"):
    source = input_pipeline.load_folder_source(str(data_dir), 0.2, 0, image_size, 10**8)
    s = source.splits[split]
    return source, s, input_pipeline.prepare(s, image_size, "squash", cache=True)


def test_folder_source_decodes_mixed_files_to_fixed_size(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "d"
    write_image(root / "a" / "rgb.jpg", rng.integers(0, 255, (37, 23, 3), np.uint8))
    write_image(root / "a" / "gray.png", rng.integers(0, 255, (9, 40), np.uint8))
    write_image(root / "a" / "rgba.png", rng.integers(0, 255, (50, 50, 4), np.uint8))
    write_image(root / "b" / "odd.bmp", rng.integers(0, 255, (3, 101, 3), np.uint8))
    write_image(root / "b" / "tiny.png", rng.integers(0, 255, (1, 1, 3), np.uint8))
    write_image(root / "b" / "palette.gif", rng.integers(0, 255, (12, 12, 3), np.uint8))
    source = input_pipeline.load_folder_source(str(root), 0.34, 0, 16, 10**8)
    images = [(img, label) for s in source.splits.values() for img, label in s.images.as_numpy_iterator()]
    assert len(images) == 6
    for resize in input_pipeline.RESIZE_METHODS:
        for s in source.splits.values():
            for image, label in input_pipeline.prepare(s, 16, resize, cache=False).as_numpy_iterator():
                assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and label in (0, 1)


def test_resize_methods_keep_or_ignore_aspect():
    wide = tf.concat([tf.zeros([10, 10, 3], tf.uint8), tf.fill([10, 30, 3], tf.constant(255, tf.uint8))], 1)
    squash = input_pipeline.resize_image(wide, 8, "squash").numpy()
    crop = input_pipeline.resize_image(wide, 8, "crop").numpy()
    pad = input_pipeline.resize_image(wide, 8, "pad").numpy()
    assert squash[:, 0].max() < 10 and squash[:, -1].min() > 245  # Whole width squashed in.
    assert crop.min() > 245  # The centre square is all white.
    assert pad[0].max() == 0 and pad[4, -1].min() > 245  # Black bars above and below.
    with pytest.raises(UserError, match="unknown resize"):
        input_pipeline.resize_image(wide, 8, "stretch")


def test_train_batches_are_a_function_of_seed_and_epoch(two_class_dir):
    _, split, prepared = _prepared(two_class_dir)

    def epoch(seed, n):
        return list(input_pipeline.train_batches(prepared, split.num_examples, 8, seed, n))

    first, again, second = epoch(0, 1), epoch(0, 1), epoch(0, 2)
    assert len(first) == 48 // 8
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["image"], second[0]["image"])
    assert not np.array_equal(first[0]["image"], epoch(1, 1)[0]["image"])
    images = np.concatenate([b["image"] for b in first])
    # The prepared uint8 images as they are: the train step converts and augments them.
    assert images.dtype == np.uint8 and images.shape[1:] == (16, 16, 3)
    assert sorted(map(bytes, images)) == sorted(bytes(image) for image, _ in prepared.as_numpy_iterator())
    # Every training image appears once per epoch (48 images, 6 full batches).
    assert sorted(np.concatenate([b["label"] for b in first]).tolist()) == [0] * 24 + [1] * 24


def test_eval_batches_count_every_example_once(two_class_dir):
    _, split, prepared = _prepared(two_class_dir, split="validation")
    for batch_size in (1, 5, 16, 64):
        batches = list(input_pipeline.eval_batches(prepared, batch_size))
        assert all(b["image"].shape[0] == batch_size for b in batches)
        mask = np.concatenate([b["mask"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])[mask == 1]
        assert mask.sum() == 16 and sorted(labels.tolist()) == [0] * 8 + [1] * 8


def test_load_source_picks_the_configured_data(two_class_dir, monkeypatch, tmp_path):
    config = config_lib.base_config()
    with pytest.raises(UserError, match="no data given"):
        input_pipeline.load_source(config)
    config.data_dir = str(two_class_dir)
    assert input_pipeline.load_source(config).class_names == ["cats", "dogs"]
    config.dataset = "tfds:mnist"
    with pytest.raises(UserError, match="not both"):
        input_pipeline.load_source(config)
    config.data_dir = ""
    config.dataset = "imagenet"
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        input_pipeline.load_source(config)
    monkeypatch.chdir(tmp_path)
    config.dataset = "demo"
    demo = input_pipeline.load_source(config)
    assert demo.class_names == [str(d) for d in range(10)]
    assert sum(s.num_examples for s in demo.splits.values()) == 1797
    assert (tmp_path / "data" / "digits" / "7").is_dir()


def _write_tfds_metadata(data_dir, name, split_sizes):
    """Writes real TFDS metadata (no images) so `mock_data(policy=USE_FILES)` knows the splits."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    splits = [
        tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0,
                            filename_template=tfds.core.ShardedFileTemplate(
                                data_dir=builder.data_path, dataset_name=name, split=split,
                                filetype_suffix="tfrecord",
                                template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"))
        for split, n in split_sizes.items()
    ]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


def test_tfds_source_with_mock_data(tmp_path):
    _write_tfds_metadata(tmp_path, "tf_flowers", {"train": 40})
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(tmp_path)):
        source = input_pipeline.load_tfds_source("tf_flowers", 0.25, data_dir=str(tmp_path))
        assert source.class_names == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
        assert source.splits["train"].num_examples == 30
        assert source.splits["validation"].num_examples == 10
        assert "held out" in source.validation_note
        prepared = input_pipeline.prepare(source.splits["train"], 16, "crop", cache=True)
        for image, label in prepared.take(5).as_numpy_iterator():
            assert image.shape == (16, 16, 3) and 0 <= label < 5


def test_tfds_validation_split_is_used_when_present(tmp_path):
    _write_tfds_metadata(tmp_path, "tf_flowers", {"train": 20, "validation": 7, "test": 5})
    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(tmp_path)):
        source = input_pipeline.load_tfds_source("tf_flowers", 0.25, data_dir=str(tmp_path))
    assert {k: s.num_examples for k, s in source.splits.items()} == {"train": 20, "validation": 7, "test": 5}


def test_tfds_without_a_validation_split_and_validation_split_0_trains_on_the_whole_train_split(tmp_path):
    _write_tfds_metadata(tmp_path, "tf_flowers", {"train": 40})
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(tmp_path)):
        source = input_pipeline.load_tfds_source("tf_flowers", 0.0, data_dir=str(tmp_path))
    assert {k: s.num_examples for k, s in source.splits.items()} == {"train": 40}
    assert "validation_split 0" in source.validation_note


def test_tfds_offline_is_one_clear_error(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise ConnectionError("Failed to establish a new connection: [Errno -3] name resolution")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    with pytest.raises(UserError, match="could not download or prepare TFDS dataset 'tf_flowers'.*--data_dir"):
        input_pipeline.load_tfds_source("tf_flowers", 0.2, data_dir=str(tmp_path))
    with pytest.raises(UserError, match="unknown TFDS dataset 'no_such_set_xyz'"):
        input_pipeline.load_tfds_source("no_such_set_xyz", 0.2, data_dir=str(tmp_path))


def test_process_rows_of_train_and_eval_batches_make_up_the_global_batches(two_class_dir):
    # Two processes each feeding half of every global batch train on exactly the single-process batches.
    _, split, prepared = _prepared(two_class_dir)
    whole = list(input_pipeline.train_batches(prepared, split.num_examples, 8, 0, 3))
    halves = [list(input_pipeline.train_batches(prepared, split.num_examples, 8, 0, 3, rows))
              for rows in ((0, 4), (4, 8))]
    assert len(halves[0]) == len(halves[1]) == len(whole)
    for full, first, second in zip(whole, *halves):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), full[key])

    _, val_split, val_prepared = _prepared(two_class_dir, split="validation")
    whole = list(input_pipeline.eval_batches(val_prepared, 6))
    halves = [list(input_pipeline.eval_batches(val_prepared, 6, rows)) for rows in ((0, 3), (3, 6))]
    for full, first, second in zip(whole, *halves):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), full[key])


def test_a_photo_deleted_after_the_scan_is_named_in_one_error(tmp_path):
    root = tmp_path / "d"
    for name in ("a", "b"):
        for i in range(3):
            write_image(root / name / f"{i}.png", np.full((8, 8, 3), 40 * i, np.uint8))
    source = input_pipeline.load_folder_source(str(root), 0.34, 0, 8, 10**8)
    (root / "b" / "1.png").unlink()
    prepared = [input_pipeline.prepare(s, 8, "squash", cache=True) for s in source.splits.values()]
    with pytest.raises(UserError, match=r"cannot read .*b/1\.png: cannot read file \(No such file or directory\) "
                                        r"\(it was readable when the folder was scanned"):
        for ds in prepared:
            list(input_pipeline.eval_batches(ds, 2))


def test_tfds_without_network_fails_in_seconds_before_tfds_retries(tmp_path, monkeypatch):
    import socket

    def unreachable(address, timeout=None):
        assert timeout is not None and timeout <= 10
        raise socket.gaierror(-2, "Name or service not known")

    def must_not_run(*args, **kwargs):
        pytest.fail("download_and_prepare ran although the download host was unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_run)
    with pytest.raises(UserError, match="storage.googleapis.com cannot be reached \\(Name or service not known\\)"
                                        ".*--data_dir DIR"):
        input_pipeline.load_tfds_source("tf_flowers", 0.2, data_dir=str(tmp_path))
