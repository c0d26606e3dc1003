"""Finding a dataset in a folder of images: layout, classes, usable files and the train/validation split.

Two layouts are accepted:
  DIR/train/<class>/... with DIR/validation/ (or val/) and an optional DIR/test/, or
  DIR/<class>/... directly.
Class names are the sorted sub-folder names of the training folder. Files are found recursively under
each class folder and recognised by content. Every candidate image is decode-checked once (in parallel),
which also yields its fingerprints (imgclf_jax.file_checks, cached, so a second run does not decode again). Files found in more than one split (the
same file, or the same photo re-encoded) are reported: they inflate validation accuracy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from pathlib import Path
from typing import Sequence

import numpy as np

from imgclf_jax import file_checks, fingerprints, image_io
from imgclf_jax.errors import UserError

log = logging.getLogger(__name__)

SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid"),
    "test": ("test", "testing"),
}


@dataclasses.dataclass(frozen=True)
class Example:
    path: str
    label: int
    digest: str = dataclasses.field(default="", compare=False)  # fingerprints.content_digest
    phash: str = dataclasses.field(default="", compare=False)  # fingerprints.perceptual_hash
    short_side: int = dataclasses.field(default=0, compare=False)  # Pixels, as stored; 0 if unknown.


@dataclasses.dataclass
class FolderDataset:
    """Usable examples per split, the class names in label order, and what was skipped and why."""

    root: str
    class_names: list[str]
    splits: dict[str, list[Example]]
    skipped: list[tuple[str, str]]
    validation_note: str


def find_split_folders(root: Path) -> dict[str, Path]:
    """Maps split names to their folders when `root` uses the train/validation/test layout, else {}."""
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    found = {}
    for split, names in SPLIT_FOLDER_NAMES.items():
        for name in names:
            if name in children:
                found[split] = children[name]
                break
    return found if "train" in found else {}


def list_class_folders(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and not image_io.is_junk_name(p.name)),
        key=lambda p: p.name,
    )


def list_candidate_files(
    folder: Path, other_classes: Sequence[Path] = ()
) -> tuple[list[str], list[tuple[str, str]]]:
    """Files under `folder` (recursively, following links) that are images by content or by name.

    Returns the candidates and the files that carry an image extension but are not images (skipped, with
    the reason). Everything else (junk, notes, other files) is ignored silently. No folder is visited twice
    (by real path), and a link that leads back above `folder` (a loop: `ln -s .. up`) or into one of
    `other_classes` is not followed, with a warning: it would file other classes' photos under this one.
    """
    candidates, skipped = [], []
    root = os.path.realpath(folder)
    others = [os.path.realpath(p) for p in other_classes]
    visited, seen_files = {root}, set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            if image_io.is_junk_name(name):
                continue
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if real in visited:
                continue
            if is_within(root, real) or any(is_within(real, other) or is_within(other, real) for other in others):
                log.warning("Not following the link %s -> %s: it leads %s.", display_path(path), display_path(real),
                            "back above the class folder it is in (a loop)" if is_within(root, real)
                            else "into another class's folder")
                continue
            visited.add(real)
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            if image_io.is_junk_name(name):
                continue
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if real in seen_files:  # The same file through two links: once is enough.
                continue
            seen_files.add(real)
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):  # A pipe would block reading; a device never ends.
                    if image_io.has_image_extension(name):
                        skipped.append((path, "not a regular file (a pipe, socket or device)"))
                    continue
                header = image_io.read_header(path)
            except OSError as e:
                skipped.append((path, f"cannot read file ({e.strerror or e})"))
                continue
            if image_io.sniff_format(header) is not None:
                candidates.append(path)
            elif image_io.has_image_extension(name):
                skipped.append((path, image_io.describe_non_image(header)))
    return candidates, skipped


def is_within(inner: str, outer: str) -> bool:
    """Whether the real path `inner` is `outer` or inside it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def display_path(path: str) -> str:
    """`path` as it can be printed on one line anywhere: bytes that are not UTF-8 as \\xNN, control
    characters (a newline in a file name) escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def stratified_holdout(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Splits off `fraction` of every class (at least one image of any class with two or more)."""
    train, held_out = [], []
    labels = sorted({e.label for e in examples})
    for label in labels:
        members = sorted((e for e in examples if e.label == label), key=lambda e: e.path)
        rng = np.random.default_rng([seed, label])
        order = rng.permutation(len(members))
        n_held = int(round(len(members) * fraction))
        if len(members) >= 2:
            n_held = min(max(n_held, 1), len(members) - 1)
        else:
            n_held = 0
        held_out.extend(members[i] for i in sorted(order[:n_held]))
        train.extend(members[i] for i in sorted(order[n_held:]))
    return train, held_out


def _examples_for(
    class_root: Path,
    class_names: Sequence[str],
    split_name: str,
    max_pixels: int,
    skipped: list[tuple[str, str]],
    require_every_class: bool,
) -> list[Example]:
    present = {p.name: p for p in list_class_folders(class_root)}
    unknown = sorted(set(present) - set(class_names))
    if unknown:
        raise UserError(
            f"{class_root} has class folder(s) {unknown} that are not among the trained classes "
            f"{list(class_names)}"
        )
    per_class: dict[int, list[str]] = {}
    non_images: dict[int, list[tuple[str, str]]] = {}
    for label, name in enumerate(class_names):
        if name not in present:
            if require_every_class:
                raise UserError(f"class folder '{name}' is missing from {class_root}")
            continue
        others = [folder for other, folder in present.items() if other != name]
        per_class[label], non_images[label] = list_candidate_files(present[name], others)
    if split_name == "train" and not any(per_class.values()):
        raise UserError(f"no images found in {class_root} (looked in {len(per_class)} class folders)")
    verdicts = file_checks.check_files([p for c in per_class.values() for p in c], class_root, max_pixels)
    examples = []
    for label, candidates in per_class.items():
        usable = [p for p in candidates if not verdicts[p].reason]
        unusable = non_images[label] + [(p, verdicts[p].reason) for p in candidates if verdicts[p].reason]
        skipped.extend(unusable)
        if not usable and split_name == "train":
            raise UserError(
                f"class folder {present[class_names[label]]} has no usable images"
                + (f" ({len(unusable)} image file(s) could not be used)" if unusable else "")
            )
        examples.extend(Example(p, label, verdicts[p].digest, verdicts[p].phash, verdicts[p].short_side)
                        for p in usable)
    return examples


def load_class_folder(
    root: str, class_names: Sequence[str], max_pixels: int = image_io.DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[list[Example], list[tuple[str, str]]]:
    """Usable images of `root/<class>/...`, labelled by each class's position in `class_names`.

    Every sub-folder must be one of `class_names` (classes may be missing). Returns (examples, skipped).
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"folder {root} does not exist")
    if not list_class_folders(path):
        raise UserError(f"no class folders in {root}: expected {root}/<class>/<images>")
    skipped: list[tuple[str, str]] = []
    examples = _examples_for(path, class_names, "evaluation", max_pixels, skipped, False)
    if not examples:
        raise UserError(f"no usable images found in {root}")
    return examples, skipped


def load_folder_dataset(
    data_dir: str,
    validation_split: float = 0.2,
    seed: int = 0,
    max_pixels: int = image_io.DEFAULT_MAX_IMAGE_PIXELS,
    splits: Sequence[str] = ("train", "validation"),
    min_photos_per_class_to_hold_out: int = 0,
) -> FolderDataset:
    """Finds classes and usable images of `data_dir`; holds out validation when there is no such folder, unless
    `validation_split` is 0, or there is a test folder (to score the run on) and the training photos are fewer
    than `min_photos_per_class_to_hold_out` a class on average: then every photo trains, without validation."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise UserError(f"data folder {data_dir} does not exist")
    if not root.is_dir():
        raise UserError(f"data folder {data_dir} is not a folder")
    split_folders = find_split_folders(root)
    train_root = split_folders.get("train", root)
    class_folders = list_class_folders(train_root)
    if not class_folders:
        raise UserError(
            f"no class folders in {train_root}: expected {root}/<class>/<images> "
            f"or {root}/train/<class>/<images>"
        )
    class_names = [p.name for p in class_folders]
    if len(class_names) < 2:
        raise UserError(
            f"{train_root} has only one class folder ('{class_names[0]}'); a classifier needs at least two"
        )

    skipped: list[tuple[str, str]] = []
    result: dict[str, list[Example]] = {}
    train = _examples_for(train_root, class_names, "train", max_pixels, skipped, True)
    if not train:
        raise UserError(f"no usable images found in {train_root}")
    wants_validation = "validation" in splits
    if "validation" in split_folders:
        if wants_validation:
            result["validation"] = _examples_for(
                split_folders["validation"], class_names, "validation", max_pixels, skipped, False
            )
            if not result["validation"]:
                raise UserError(f"no usable images found in {split_folders['validation']}")
        note = f"validation folder {split_folders['validation']}"
    elif validation_split == 0 or ("test" in split_folders and
                                   len(train) < min_photos_per_class_to_hold_out * len(class_names)):
        wants_validation = False
        note = (f"none: every photo trains, as {len(train) / len(class_names):.0f} a class are fewer than the "
                f"{min_photos_per_class_to_hold_out} that a validation split is held out from"
                if validation_split else "none (validation_split 0): every photo trains")
    else:
        if not 0.0 < validation_split < 1.0:
            raise UserError(
                f"{root} has no validation folder, so validation_split must be between 0 and 1, or 0 to train "
                f"on every photo without validation (got {validation_split})"
            )
        train, held_out = stratified_holdout(train, validation_split, seed)
        if not held_out:
            raise UserError(f"too few images in {train_root} to hold out a validation split")
        if wants_validation:
            result["validation"] = held_out
        note = f"{validation_split:.0%} of the training images held out (stratified, seed {seed})"
    if wants_validation:
        _warn_about_unvalidated_classes(class_names, train, result["validation"])
    if "test" in split_folders and "test" not in splits:  # Say where it went: not in training, not lost.
        note += f"; {split_folders['test']} is kept out of training, for `python -m imgclf_jax.evaluate`"
    if "train" in splits:
        result["train"] = train
    if "test" in splits and "test" in split_folders:
        result["test"] = _examples_for(
            split_folders["test"], class_names, "test", max_pixels, skipped, False
        )
    return FolderDataset(str(root), class_names, result, skipped, note)


def _warn_about_unvalidated_classes(class_names: Sequence[str], train: Sequence[Example],
                                    validation: Sequence[Example]) -> None:
    """Warns of classes without a validation image: their accuracy is never measured, so the best epoch is
    chosen without them (a class of one photo keeps it for training)."""
    in_validation = {e.label for e in validation}
    missing = [name for label, name in enumerate(class_names) if label not in in_validation]
    if missing:
        counts = {name: sum(e.label == label for e in train) for label, name in enumerate(class_names)}
        log.warning("%d class(es) have no validation image, so their accuracy is not measured during training: %s. "
                    "Add photos of them (a class needs at least 2 to hold one out).", len(missing),
                    ", ".join(f"{name} ({counts[name]} training image(s))" for name in missing))


def file_fingerprints(dataset: FolderDataset) -> list[fingerprints.FileFingerprint]:
    """Every usable file of every split (train first), with its split, class name and fingerprints."""
    order = sorted(dataset.splits, key=lambda s: list(SPLIT_FOLDER_NAMES).index(s))
    return [
        fingerprints.FileFingerprint(e.path, split, dataset.class_names[e.label], e.digest, e.phash)
        for split in order for e in dataset.splits[split]
    ]


def warn_about_leaks(dataset: FolderDataset, threshold: int = fingerprints.DEFAULT_NEAR_THRESHOLD) -> None:
    """Logs the photos that are in more than one split (exact or near copies), which inflate validation
    accuracy; `python -m imgclf_jax.doctor` lists every duplicate."""
    if len(dataset.splits) < 2:
        return
    leaks = [p for p in fingerprints.find_duplicates(file_fingerprints(dataset), threshold) if p.cross_split]
    if not leaks:
        return
    log.warning("%d photo(s) appear in more than one split (same file or near copy); validation accuracy "
                "will look better than it is. Run `python -m imgclf_jax.doctor %s` for the full list.",
                len(leaks), dataset.root)
    for pair in leaks[:5]:
        log.warning("  %s copy: %s (%s) ~ %s (%s)", pair.kind, pair.first.path, pair.first.split,
                    pair.second.path, pair.second.split)
