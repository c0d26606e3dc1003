"""The tf.data input pipeline: decode, resize, cache, shuffle, batch, prefetch.

Every source (an image folder, a TFDS dataset, the built-in demo) becomes a `Split`: a tf.data dataset of
(uint8 RGB image of any size, int label). From there one path resizes and caches the images, and builds
per-epoch training batches whose order is a function of (seed, epoch) alone, so an interrupted run that
resumes sees exactly the batches an uninterrupted one would. (Augmentation runs in the train step:
imgclf_jax.augmentation.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from typing import Any, Iterator, Optional, Sequence

import ml_collections
import numpy as np
import tensorflow as tf

from imgclf_jax import demo_data, folders, image_io
from imgclf_jax.errors import UserError

log = logging.getLogger(__name__)


RESIZE_METHODS = ("squash", "crop", "pad")
# Where TFDS downloads prepared datasets from, looked at before a first download (`load_tfds_source`).
TFDS_DOWNLOAD_HOST = ("storage.googleapis.com", 443)
TFDS_PROBE_SECONDS = 5.0
_MAX_SHUFFLE_BUFFER = 16_384

# tf.data traces every function it maps through AutoGraph, which re-parses the function's Python source to
# rewrite control flow that depends on tensors. Ours branch on Python values only, so AutoGraph is pure cost:
# about 0.25 s per function at every start (1.3 s of a run report's 14 s), and a warning where it cannot
# read the source. Every function handed to tf.data here goes through this.
_plain_graph = tf.autograph.experimental.do_not_convert


@dataclasses.dataclass
class Split:
    """One split: `images` yields (uint8 [H, W, 3] image, int32 label); decoding happens on iteration."""

    num_examples: int
    images: tf.data.Dataset
    paths: Optional[list[str]] = None  # The files, in order, for splits read from a folder.
    median_short_side: int = 0  # The photos' median shorter side in pixels as stored; 0 if unknown.


@dataclasses.dataclass
class DataSource:
    description: str
    class_names: list[str]
    splits: dict[str, Split]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    validation_note: str = ""


# ----------------------------------------------------------------------------------------------------
# Sources.


def folder_split(
    examples: Sequence[folders.Example], decode_size: int, max_pixels: int
) -> Split:
    """A split read from image files, decoded with Pillow in parallel inside tf.data."""
    paths = [e.path for e in examples]
    labels = np.array([e.label for e in examples], dtype=np.int32)

    def decode(path: bytes) -> np.ndarray:
        name = os.fsdecode(path)
        try:
            return image_io.load_image(name, min_size=decode_size, max_pixels=max_pixels)
        except Exception as e:  # noqa: BLE001 - named to the user by `_named_read_errors`.
            raise RuntimeError(f"{_READ_ERROR_MARK}{folders.display_path(name)}: {e}{_READ_ERROR_MARK}") from None

    def load(path, label):
        image = tf.numpy_function(decode, [path], tf.uint8, stateful=False)
        image.set_shape([None, None, 3])
        return image, label

    # As bytes: a file name that is not UTF-8 (old archives, other systems' disks) is still a valid path.
    ds = tf.data.Dataset.from_tensor_slices(([os.fsencode(p) for p in paths], labels)).map(
        _plain_graph(load), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    sides = [e.short_side for e in examples if e.short_side]
    return Split(len(paths), ds, paths, int(np.median(sides)) if sides else 0)


def load_folder_source(
    data_dir: str,
    validation_split: float,
    seed: int,
    image_size: int,
    max_pixels: int,
    splits: Sequence[str] = ("train", "validation"),
    min_photos_per_class_to_hold_out: int = 0,
) -> DataSource:
    found = folders.load_folder_dataset(data_dir, validation_split, seed, max_pixels, splits,
                                        min_photos_per_class_to_hold_out)
    folders.warn_about_leaks(found)
    return DataSource(
        description=f"folder {found.root}",
        class_names=found.class_names,
        splits={
            name: folder_split(examples, image_size, max_pixels)
            for name, examples in found.splits.items()
        },
        skipped=found.skipped,
        validation_note=found.validation_note,
    )


def _tfds_image_to_rgb(image: tf.Tensor) -> tf.Tensor:
    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 4:
        return image[..., :3]
    return image


def load_tfds_source(
    name: str, validation_split: float, data_dir: Optional[str] = None
) -> DataSource:
    """A TFDS dataset; downloads and prepares it on first use (needs internet access then)."""
    import tensorflow_datasets as tfds  # Heavy import; only this source needs it.

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises several types for unknown names.
        raise UserError(f"unknown TFDS dataset '{name}' ({_first_line(e)})") from None
    offline = lambda why: UserError(
        f"could not download or prepare TFDS dataset '{name}': {why}. TFDS needs internet access the first "
        "time it prepares a dataset; offline, train on a local image folder with --data_dir DIR")
    if not builder.is_prepared():
        # Offline, TFDS's own retries take minutes to give up; a look at its download host takes seconds.
        try:
            socket.create_connection(TFDS_DOWNLOAD_HOST, timeout=TFDS_PROBE_SECONDS).close()
        except OSError as e:
            raise offline(f"{TFDS_DOWNLOAD_HOST[0]} cannot be reached ({e.strerror or e})") from None
    try:
        builder.download_and_prepare()
    except Exception as e:
        raise offline(_first_line(e)) from None
    info = builder.info
    if not info.supervised_keys:
        raise UserError(f"TFDS dataset '{name}' has no (image, label) supervised keys")
    image_key, label_key = info.supervised_keys[:2]
    label_feature = info.features[label_key]
    if not hasattr(label_feature, "names"):
        raise UserError(f"TFDS dataset '{name}' has no class names for its label")
    class_names = list(label_feature.names)

    available = set(info.splits.keys())
    if "train" not in available:
        raise UserError(f"TFDS dataset '{name}' has no 'train' split (it has {sorted(available)})")
    if "validation" in available:
        split_specs = {"train": "train", "validation": "validation"}
        note = "TFDS validation split"
    elif validation_split == 0:
        split_specs = {"train": "train"}
        note = "none (validation_split 0): the whole TFDS train split trains"
    else:
        if not 0.0 < validation_split < 1.0:
            raise UserError(f"validation_split must be between 0 and 1, or 0 to train on the whole train split "
                            f"without validation (got {validation_split})")
        cut = int(round(100 * (1.0 - validation_split)))
        split_specs = {"train": f"train[:{cut}%]", "validation": f"train[{cut}%:]"}
        note = f"last {100 - cut}% of the TFDS train split held out"
    if "test" in available:
        split_specs["test"] = "test"

    splits = {}
    for split_name, spec in split_specs.items():
        ds = builder.as_dataset(split=spec, as_supervised=True, shuffle_files=False)
        ds = ds.map(
            _plain_graph(lambda image, label: (_tfds_image_to_rgb(image), tf.cast(label, tf.int32))),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        splits[split_name] = Split(int(info.splits[spec].num_examples), ds)
    return DataSource(f"TFDS {name}", class_names, splits, [], note)


# Brackets the file and reason of a failed decode inside TensorFlow's error text (`_named_read_errors`).
_READ_ERROR_MARK = "<<imgclf-read-error>>"


def _named_read_errors(batches: Iterator[Any]) -> Iterator[Any]:
    """`batches`, with an image that can no longer be read (deleted, moved or changed on disk after the scan)
    ending in one UserError naming the file, not a TensorFlow traceback."""
    try:
        yield from batches
    except tf.errors.OpError as e:
        text = e.message or str(e)
        parts = text.split(_READ_ERROR_MARK)
        if len(parts) < 3:
            raise
        raise UserError(f"cannot read {parts[1]} (it was readable when the folder was scanned: was it moved, "
                        "deleted or changed while the command ran?); run the command again to scan anew") from None


def iterate(dataset: tf.data.Dataset) -> Iterator[Any]:
    """The dataset's elements as numpy values, with unreadable images named (`_named_read_errors`)."""
    return _named_read_errors(dataset.as_numpy_iterator())


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_source(config: ml_collections.ConfigDict, splits: Sequence[str] = ("train", "validation")) -> DataSource:
    """Opens the data named by the config: `dataset` ('demo' or 'tfds:NAME') or `data_dir` (a folder)."""
    if config.dataset and config.data_dir:
        raise UserError("give either a data folder (--data_dir) or a dataset (--dataset), not both")
    if config.dataset == "demo":
        data_dir = demo_data.ensure_digits()
    elif config.dataset.startswith("tfds:"):
        return load_tfds_source(
            config.dataset[len("tfds:"):], config.validation_split, config.tfds_data_dir or None
        )
    elif config.dataset:
        raise UserError(f"unknown dataset '{config.dataset}': use 'tfds:NAME', 'demo', or --data_dir DIR")
    elif config.data_dir:
        data_dir = config.data_dir
    else:
        raise UserError("no data given: use --data_dir DIR (a folder of class sub-folders) or --dataset tfds:NAME")
    return load_folder_source(
        data_dir, config.validation_split, config.seed, config.image_size, config.max_image_pixels, splits,
        config.min_photos_per_class_to_hold_out,
    )


# ----------------------------------------------------------------------------------------------------
# Preprocessing.


def resize_image(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
    """Resizes a uint8 image to (size, size, 3) uint8: 'squash' (ignore aspect), 'crop' (centre crop to a
    square first) or 'pad' (keep aspect, pad with black)."""
    image = tf.cast(image, tf.float32)
    if method == "squash":
        out = tf.image.resize(image, [size, size], antialias=True)
    elif method == "crop":
        shape = tf.shape(image)
        height, width = shape[0], shape[1]
        side = tf.minimum(height, width)
        image = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2, side, side)
        out = tf.image.resize(image, [size, size], antialias=True)
    elif method == "pad":
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scaled = tf.maximum(tf.cast(tf.round(shape * (size / tf.reduce_max(shape))), tf.int32), 1)
        out = tf.image.resize(image, scaled, antialias=True)
        out = tf.image.pad_to_bounding_box(out, (size - scaled[0]) // 2, (size - scaled[1]) // 2, size, size)
    else:
        raise UserError(f"unknown resize method '{method}' (choose from {', '.join(RESIZE_METHODS)})")
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def prepare(split: Split, image_size: int, resize_method: str, cache: bool) -> tf.data.Dataset:
    """Decoded, resized uint8 images and labels; cached in memory so later epochs skip decoding."""
    ds = split.images.map(
        _plain_graph(lambda image, label: (resize_image(image, image_size, resize_method), label)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if cache:
        if fits_in_memory(split, image_size):
            ds = ds.cache()
        else:
            log.warning(
                "Not caching decoded images: %.1f GiB would exceed a third of this machine's memory; "
                "every epoch will decode again.", _cached_bytes(split, image_size) / 2**30)
    return ds


def fits_in_memory(split: Split, image_size: int) -> bool:
    """Whether `prepare` may cache the split's decoded images: at most a third of the machine's memory."""
    available = _physical_memory_bytes()
    return not available or _cached_bytes(split, image_size) <= available // 3


def _cached_bytes(split: Split, image_size: int) -> int:
    return split.num_examples * image_size * image_size * 3


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] -> float32 [0, 1], the model's input range."""
    return tf.cast(image, tf.float32) / 255.0


def _no_autotune(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Turns tf.data's autotuner off for a per-epoch pipeline.

    Destroying an autotuned iterator waits for the autotuner's background loop to wake up, which sleeps for
    up to a minute as the run goes on: about 4 epochs in 10 then began with the CPU idle for 30-35 s (epochs
    of 80 s instead of 45, docs/performance.md). Without it, parallel maps use one call per core and
    prefetch sizes its buffer itself, which keeps the step fed on the CPUs we measured.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 31-bit seed for one epoch of one run."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


def train_batches(
    prepared: tf.data.Dataset,
    num_examples: int,
    batch_size: int,
    seed: int,
    epoch: int,
    rows: Optional[tuple[int, int]] = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of shuffled full batches of uint8 images as prepared; the same (seed, epoch) gives the same
    batches. Augmentation and resizing to the epoch's size happen in the train step
    (imgclf_jax.augmentation), where they cost far less than per-image tf.data ops.

    `rows` = (start, stop) keeps only those rows of each global batch (a process's share in a multi-process
    run); the order depends on the global position only, so every layout of processes trains on the same
    global batches.
    """
    start, stop = rows if rows is not None else (0, batch_size)
    ds = prepared.shuffle(min(num_examples, _MAX_SHUFFLE_BUFFER), seed=epoch_seed(seed, epoch))
    if (start, stop) != (0, batch_size):
        ds = ds.enumerate().take(num_examples // batch_size * batch_size).filter(
            _plain_graph(lambda index, example: (index % batch_size >= start) & (index % batch_size < stop)))
        ds = ds.map(_plain_graph(lambda index, example: example))
    ds = ds.map(_plain_graph(lambda image, label: {"image": image, "label": label}))
    ds = ds.batch(stop - start, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iterate(_no_autotune(ds))


def eval_batches(prepared: tf.data.Dataset, batch_size: int,
                 rows: Optional[tuple[int, int]] = None) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in order; the last batch is padded to full size with mask 0.

    `rows` = (start, stop) yields only those rows of each (padded) batch, as `train_batches`.
    """
    start, stop = rows if rows is not None else (0, batch_size)
    ds = prepared.map(
        _plain_graph(lambda image, label: {"image": to_float(image), "label": label}),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    ).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    for batch in iterate(_no_autotune(ds)):
        n = len(batch["label"])
        mask = np.ones(batch_size, np.float32)
        if n < batch_size:
            mask[n:] = 0.0
            batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
                     for k, v in batch.items()}
        batch["mask"] = mask
        yield {k: v[start:stop] for k, v in batch.items()}
