"""Finding classes, usable files and splits in image folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import class_image, make_class_folder, write_image
from imgclf_jax import folders
from imgclf_jax.errors import UserError


def _counts(examples, n_classes):
    return [sum(e.label == k for e in examples) for k in range(n_classes)]


def test_train_validation_layout(two_class_dir):
    found = folders.load_folder_dataset(str(two_class_dir))
    assert found.class_names == ["cats", "dogs"]
    assert _counts(found.splits["train"], 2) == [24, 24]
    assert _counts(found.splits["validation"], 2) == [8, 8]
    assert "validation folder" in found.validation_note
    assert not found.skipped


def test_val_folder_name_is_accepted(tmp_path):
    make_class_folder(tmp_path / "d" / "train", {"x": 4, "y": 4})
    make_class_folder(tmp_path / "d" / "val", {"x": 2, "y": 2}, start=50)
    found = folders.load_folder_dataset(str(tmp_path / "d"))
    assert len(found.splits["validation"]) == 4


def test_train_test_layout_holds_out_validation_and_keeps_test_apart(tmp_path):
    make_class_folder(tmp_path / "d" / "train", {"x": 10, "y": 10})
    make_class_folder(tmp_path / "d" / "test", {"x": 3, "y": 3}, start=50)
    found = folders.load_folder_dataset(str(tmp_path / "d"), validation_split=0.2)
    assert sorted(found.splits) == ["train", "validation"]
    assert len(found.splits["train"]) == 16 and len(found.splits["validation"]) == 4
    test_folder = str(tmp_path / "d" / "test")
    assert not any(e.path.startswith(test_folder) for split in found.splits.values() for e in split)
    assert "held out" in found.validation_note and f"{test_folder} is kept out of training" in found.validation_note
    with_test = folders.load_folder_dataset(str(tmp_path / "d"), splits=("train", "validation", "test"))
    assert len(with_test.splits["test"]) == 6 and "kept out" not in with_test.validation_note


def test_flat_layout_holds_out_a_stratified_seeded_split(flat_three_class_dir):
    found = folders.load_folder_dataset(str(flat_three_class_dir), validation_split=0.2, seed=3)
    assert found.class_names == ["a", "b", "c"]
    assert _counts(found.splits["validation"], 3) == [3, 3, 3]
    assert _counts(found.splits["train"], 3) == [12, 12, 12]
    train_paths = {e.path for e in found.splits["train"]}
    assert not train_paths & {e.path for e in found.splits["validation"]}
    again = folders.load_folder_dataset(str(flat_three_class_dir), validation_split=0.2, seed=3)
    assert again.splits == found.splits
    other_seed = folders.load_folder_dataset(str(flat_three_class_dir), validation_split=0.2, seed=4)
    assert other_seed.splits["validation"] != found.splits["validation"]


def test_train_and_test_without_validation_holds_out_from_train(tmp_path):
    make_class_folder(tmp_path / "d" / "train", {"x": 10, "y": 10})
    make_class_folder(tmp_path / "d" / "test", {"x": 3, "y": 3}, start=50)
    found = folders.load_folder_dataset(str(tmp_path / "d"), splits=("train", "validation", "test"))
    assert len(found.splits["validation"]) == 4 and len(found.splits["train"]) == 16
    assert len(found.splits["test"]) == 6
    assert all("/test/" in e.path for e in found.splits["test"])


def test_a_folder_with_few_photos_a_class_trains_on_every_photo_without_validation(tmp_path):
    make_class_folder(tmp_path / "d" / "train", {"x": 10, "y": 8})
    make_class_folder(tmp_path / "d" / "test", {"x": 3, "y": 3}, start=50)
    few = folders.load_folder_dataset(str(tmp_path / "d"), 0.2, splits=("train", "validation", "test"),
                                      min_photos_per_class_to_hold_out=10)  # 9 a class on average.
    assert sorted(few.splits) == ["test", "train"] and len(few.splits["train"]) == 18
    assert "every photo trains, as 9 a class are fewer than the 10" in few.validation_note
    enough = folders.load_folder_dataset(str(tmp_path / "d"), 0.2, min_photos_per_class_to_hold_out=9)
    assert len(enough.splits["train"]) + len(enough.splits["validation"]) == 18 and enough.splits["validation"]
    none_asked = folders.load_folder_dataset(str(tmp_path / "d"), 0.0)
    assert sorted(none_asked.splits) == ["train"] and "validation_split 0" in none_asked.validation_note


def test_a_folder_without_a_test_folder_always_holds_validation_out(tmp_path):
    make_class_folder(tmp_path / "d", {"x": 10, "y": 8})  # Validation is then its only measure of the run.
    found = folders.load_folder_dataset(str(tmp_path / "d"), 0.2, min_photos_per_class_to_hold_out=100)
    assert len(found.splits["train"]) + len(found.splits["validation"]) == 18 and found.splits["validation"]


def test_a_validation_folder_is_used_however_few_the_photos(two_class_dir):
    found = folders.load_folder_dataset(str(two_class_dir), 0.2, min_photos_per_class_to_hold_out=10_000)
    assert found.splits["validation"] and "validation folder" in found.validation_note


def test_images_found_recursively_and_junk_ignored(tmp_path):
    root = make_class_folder(tmp_path / "d", {"x": 4, "y": 4})
    write_image(root / "x" / "nested" / "deeper.png", class_image(0))
    (root / "x" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "x" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "y" / "readme.txt").write_text("photos from my phone")
    write_image(root / "y" / "no_extension", class_image(1), "PNG")
    found = folders.load_folder_dataset(str(root), validation_split=0.25)
    paths = [e.path for s in found.splits.values() for e in s]
    assert len(paths) == 10
    assert any(p.endswith("deeper.png") for p in paths) and any(p.endswith("no_extension") for p in paths)
    assert not found.skipped


def test_broken_files_are_skipped_and_named(tmp_path):
    root = make_class_folder(tmp_path / "d", {"x": 4, "y": 4})
    (root / "x" / "page.jpg").write_text("<html><body>Not Found</body></html>")
    (root / "y" / "empty.png").write_bytes(b"")
    good = (root / "x" / "img_0.jpg").read_bytes()
    (root / "y" / "cut.jpg").write_bytes(good[: len(good) // 2])
    found = folders.load_folder_dataset(str(root), validation_split=0.25)
    skipped = {Path(p).name: reason for p, reason in found.skipped}
    assert set(skipped) == {"page.jpg", "empty.png", "cut.jpg"}
    assert "HTML" in skipped["page.jpg"] and "empty" in skipped["empty.png"]
    assert "truncated" in skipped["cut.jpg"]
    assert sum(len(s) for s in found.splits.values()) == 8


@pytest.mark.parametrize("setup, message", [
    (lambda r: None, "does not exist"),
    (lambda r: r.mkdir(), "no class folders"),
    (lambda r: make_class_folder(r, {"only": 3}), "only one class folder \\('only'\\)"),
    (lambda r: (make_class_folder(r, {"x": 3}), (r / "y").mkdir()), "class folder .*y has no usable images"),
    (lambda r: ((r / "x").mkdir(parents=True), (r / "y").mkdir(), (r / "y" / "notes.txt").write_text("hi")),
     "no images found in .*data \\(looked in 2 class folders\\)"),
    (lambda r: (make_class_folder(r, {"x": 3}), (r / "y").mkdir(), (r / "y" / "a.jpg").write_text("hi")),
     "y has no usable images \\(1 image file"),
])
def test_bad_folders_give_clear_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(UserError, match=message):
        folders.load_folder_dataset(str(root))


def test_validation_class_unknown_to_training_is_an_error(two_class_dir):
    make_class_folder(two_class_dir / "validation", {"birds": 2})
    with pytest.raises(UserError, match="birds"):
        folders.load_folder_dataset(str(two_class_dir))


def test_stratified_holdout_keeps_singletons_in_train():
    examples = [folders.Example(f"a{i}", 0) for i in range(10)] + [folders.Example("b0", 1)]
    train, held = folders.stratified_holdout(examples, 0.2, seed=0)
    assert [e.label for e in held] == [0, 0]
    assert folders.Example("b0", 1) in train


def test_links_that_loop_or_lead_into_another_class_are_not_followed(tmp_path, caplog):
    root = make_class_folder(tmp_path / "d", {"cats": 4, "dogs": 4})
    (root / "cats" / "up").symlink_to("..")  # A loop: every dog photo would also be a cat.
    (root / "cats" / "dogs_too").symlink_to("../dogs")
    write_image(tmp_path / "extra" / "more.png", class_image(0))
    (root / "cats" / "extra").symlink_to(tmp_path / "extra")  # An ordinary link to elsewhere: followed.
    (root / "cats" / "extra_again").symlink_to(tmp_path / "extra")  # The same folder twice: once.
    found = folders.load_folder_dataset(str(root), validation_split=0.25)
    examples = found.splits["train"] + found.splits["validation"]
    assert _counts(examples, 2) == [5, 4]
    assert "it leads back above the class folder it is in (a loop)" in caplog.text
    assert "into another class's folder" in caplog.text


def test_file_names_that_are_not_utf8_are_read_and_printable(tmp_path):
    from imgclf_jax import input_pipeline

    root = make_class_folder(tmp_path / "d", {"a": 3, "b": 3})
    os.rename(root / "a" / "img_0.jpg", os.fsencode(root / "a") + b"/caf\xe9\nx.jpg")
    found = folders.load_folder_dataset(str(root), validation_split=0.34)
    split = input_pipeline.folder_split(found.splits["train"] + found.splits["validation"], 16, 10**8)
    labels = [int(label) for _, label in input_pipeline.iterate(split.images)]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    odd = next(p for p in split.paths if "caf" in p)
    assert folders.display_path(odd).endswith("caf\\xe9\\nx.jpg")


def test_a_class_without_a_validation_image_is_warned_about(tmp_path, caplog):
    root = make_class_folder(tmp_path / "d", {"many": 6, "other": 6})
    write_image(root / "single" / "only.png", class_image(2))
    found = folders.load_folder_dataset(str(root))
    assert found.class_names == ["many", "other", "single"]
    assert "have no validation image" in caplog.text and "single (1 training image(s))" in caplog.text


def test_pipes_and_devices_are_skipped_not_read(tmp_path):
    root = make_class_folder(tmp_path / "d", {"a": 3, "b": 3})
    os.mkfifo(root / "a" / "pipe.jpg")  # Reading it would wait forever.
    (root / "b" / "zero.png").symlink_to("/dev/zero")  # Reading it would never end.
    found = folders.load_folder_dataset(str(root), validation_split=0.34)
    assert sorted(Path(p).name for p, _ in found.skipped) == ["pipe.jpg", "zero.png"]
    assert all("not a regular file" in reason for _, reason in found.skipped)
