"""Config helpers shared by the recipes and the command-line entry points.

A recipe is a file that defines `get_config()`, starting from `base_config()` here so every config has the same
fields (an override of a field that does not exist is an error, not a silent no-op). The shipped recipes live
in imgclf_jax/configs/ and are chosen by name (`--config cats_vs_dogs`); a user's own by path
(`--config my_recipe.py`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import ml_collections

from imgclf_jax import image_io
from imgclf_jax.errors import UserError

TTA_MODES = ("none", "flip", "flip_scale")  # Test-time augmentations: imgclf_jax.inference.make_predict_fn.


# The ResNet's nonlinearities by name (`resnet.activation`); models.ACTIVATIONS maps each to its function.
RESNET_ACTIVATIONS = ("relu", "silu")
KEPT_EPOCHS = ("best", "last")  # config.keep_epoch: which epoch a run keeps as its result.


def base_config() -> ml_collections.ConfigDict:
    """Every field a config may set, with neutral defaults."""
    c = ml_collections.ConfigDict()
    c.name = "base"

    # Data: `dataset` is 'demo' or 'tfds:NAME'; otherwise `data_dir` is an image folder.
    c.dataset = ""
    c.data_dir = ""
    c.tfds_data_dir = ""  # Where TFDS keeps prepared data ('' = TFDS's default, ~/tensorflow_datasets).
    c.validation_split = 0.2  # Held out (stratified, seeded) when there is no validation folder/split.
    # A folder with a test folder but no validation folder holds validation_split out only where its training
    # photos are at least this many a class on average (0: always). Below it, or with validation_split 0, every
    # photo trains, there is no validation (no best-epoch choice, no early stopping), the run keeps its last
    # epoch, and its report scores the test photos. A folder without a test folder always holds validation out,
    # its only measure of the run.
    c.min_photos_per_class_to_hold_out = 0
    c.image_size = 128
    # True: where the training photos' median shorter side is below image_size, train (and score) at that
    # side instead, a multiple of 8 and at least MIN_PHOTO_IMAGE_SIZE: enlarged photos add cost, not detail.
    # Folders only (TFDS sets and the demo keep image_size).
    c.image_size_from_photos = False
    c.resize = "squash"  # 'squash' | 'crop' (centre square) | 'pad' (keep aspect, black borders).
    c.cache = True  # Keep decoded, resized images in memory after the first epoch.
    c.max_image_pixels = image_io.DEFAULT_MAX_IMAGE_PIXELS  # Larger images are skipped (bombs).
    c.strict = False  # True: any unusable file is an error instead of being skipped.
    c.augment = ml_collections.ConfigDict(dict(
        enabled=False,
        flip=False,  # Random horizontal flip.
        rotation=0.0,  # Max rotation as a fraction of a full turn (Keras RandomRotation factor).
        zoom=0.0,  # Zoom factor range 1 +- zoom (Keras RandomZoom factor).
        crop_area_min=1.0,  # < 1: random-resized crop keeping this much of the area at least.
        brightness=0.0,  # Max brightness shift, in [0, 1] units.
        contrast=0.0,  # Contrast factor range 1 +- contrast.
        # TrivialAugment: one random op (shear, translate, rotate, colour, posterize, ...) per image, after
        # the crop and flip (imgclf_jax.augmentation.trivial_augment).
        trivial_augment=False,
        # > 0: TrivialAugment only where the training photos are at most this many a class on average; with
        # more, they regularise enough by themselves, and the op's time buys epochs instead.
        trivial_augment_max_photos_per_class=0,
    ))

    # MixUp / CutMix on whole batches in the train step (imgclf_jax/mixing.py); alpha 0 = off. With both
    # on, each mixed batch uses one of them at random; `prob` is the share of batches mixed at all.
    c.mix = ml_collections.ConfigDict(dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0))

    # Progressive resizing: with start_scale > 0, the epochs run in `stages` equal parts whose training image
    # sizes rise evenly from start_scale * image_size to image_size (multiples of 8); validation, evaluate and
    # predict always use image_size. An early epoch costs about (size / image_size)^2 of a full one, so the
    # same time buys more epochs. Needs a model that pools globally (resnet, or cnn with global_pool).
    # stage_epochs > 0 gives every stage but the last that many epochs and the last the rest; the time budget
    # sets it when it shortens or lengthens the last stage (below), and a resumed run keeps it.
    c.progressive = ml_collections.ConfigDict(dict(start_scale=0.0, stages=4, stage_epochs=0))

    # Model: `model` picks the network; its settings live in the sub-config of the same name.
    c.model = "cnn"
    # Convolution implementation: 'auto' (on a CPU, our AVX2/FMA kernels where they compile, else XLA's own;
    # XLA's on GPUs/TPUs), 'xla', 'native', 'matmul_grad'. Results agree up to float rounding; only speed
    # differs (docs/performance.md).
    c.conv_impl = "auto"
    # Compute dtype: 'float32', or 'bfloat16' on GPUs/TPUs (parameters and optimizer state stay float32).
    c.dtype = "float32"
    c.cnn = ml_collections.ConfigDict(dict(
        filters=(32, 64, 128), convs_per_block=1, batch_norm=False, dense_units=128, dropout=0.0,
        global_pool=False,
    ))
    c.resnet = ml_collections.ConfigDict(dict(
        stage_sizes=(1, 1, 1, 1), widths=(32, 64, 128, 256), stem_strides=2, stem_pool=False, dropout=0.0,
        avg_pool_shortcut=False,  # ResNet-D's shortcut: a 2x2 average pool before the 1x1 conv (models.ResidualBlock).
        drop_path=0.0,  # Stochastic depth: the last block's rate (models.ResNet).
        activation="relu",  # One of RESNET_ACTIVATIONS.
    ))

    # Loss: 'auto' = sigmoid (one logit) for two classes, softmax for more.
    c.loss = "auto"
    c.label_smoothing = 0.0

    # Optimisation: 'adam' (AdamW when weight_decay > 0: decoupled decay, scaled by the learning rate) or
    # 'sgd' (Nesterov momentum; weight_decay is then an L2 term added to the gradient, as in
    # torch.optim.SGD, typically 5e-4); optional warmup + cosine decay. Biases and norm scales never decay.
    c.optimizer = "adam"
    c.momentum = 0.9  # sgd only.
    c.epochs = 10
    c.batch_size = 32
    c.learning_rate = 1e-3
    c.weight_decay = 0.0
    c.lr_schedule = "constant"  # 'constant' | 'cosine'
    c.warmup_epochs = 0.0
    # > 0: also keep an exponential moving average of the weights (and batch-norm statistics), updated
    # every step with this decay; validation, checkpoints' "best", evaluate and predict then use it.
    c.ema_decay = 0.0
    c.seed = 0

    # Validate after every N-th epoch only, and after the last one; with progressive resizing also after every
    # epoch of the last stage (at the validation size, where the best epoch is found). Validating costs a
    # forward pass over the validation set: in the cheap early stages about a quarter of an epoch's time.
    # Epochs not validated cannot be the best one.
    c.validate_every = 1
    # > 0: fit the run into about this many minutes of the whole training command (reading and decoding the
    # images, compiling, training, validating, the report). Before training, the images are decoded, the train
    # step is timed at each training image size and a validation pass as a whole, and the run trains the most
    # epochs that fit, with `epochs` the most it may train (with progressive resizing, a multiple of the
    # stages). After epoch 4 (later for epochs of under a few seconds: time_budget.MIN_PACED_SECONDS) the plan
    # is checked against the pace of the epochs from the second on and cut if the rest would not fit at that
    # pace (never lengthened); with progressive resizing the last stage is checked again
    # before it starts, against the pace of the stage before it, and shortened if it would not fit, or
    # lengthened (up to `epochs`) if more time is left than it needs. A resumed run keeps its plan. The plan
    # is an estimate: a machine that slows down during the last stage makes it late.
    c.time_budget_minutes = 0.0
    # With time_budget_minutes 0 and seconds_per_image > 0: a time budget that grows with the data, this many
    # seconds per training image, kept between min_minutes and max_minutes (so a few hundred photos get a
    # few minutes and thousands get the most). The run's log states the minutes it chose.
    c.auto_time_budget = ml_collections.ConfigDict(dict(seconds_per_image=0.0, min_minutes=2.0, max_minutes=20.0))
    # > 0: stop early once this share of the planned epochs (at least 5) has passed since validation last
    # improved (a higher accuracy, or as high with a lower loss): the run has stopped learning anything the
    # validation photos can see. With progressive resizing, not before the last stage, where the learning rate
    # comes down. The epoch keep_epoch names stays what evaluate and predict use.
    c.early_stopping_share = 0.0
    # A checkpoint is saved after an epoch once this many minutes have passed since the last one (0: after
    # every epoch), after every validated epoch that may be the best (its accuracy at least that of the
    # earlier ones), and after the last: a crash or Ctrl-C loses at most about this much training, and short
    # epochs do not pay for a save each (orbax: ~0.4 s of CPU for the default ResNet's 11 MB state, taken
    # from a 3-8 s cats-vs-dogs epoch on a 2-core CPU).
    c.checkpoint_every_minutes = 1.0
    c.checkpoints_to_keep = 2  # Latest checkpoints kept, besides the best by validation accuracy.
    # The epoch a run keeps as its result, which evaluate, predict, export and the report use unless
    # --checkpoint names another: 'best', the highest validation accuracy, or 'last', the end of the run, where
    # the learning rate has come down (after early stopping too) and the weight average has settled. On a
    # validation set of a few dozen photos a class the best epoch is partly chance, can be an early one, and
    # its validation accuracy flatters it; the last epoch's is a fair estimate.
    c.keep_epoch = "best"
    # Test-time augmentation that evaluate and predict use unless --tta says otherwise: 'none', 'flip' (the
    # photo and its mirror image, averaged) or 'flip_scale' (those and both again at 1.1x the size; needs a
    # model that pools globally). Validation during training always scores the plain photo, so a run's
    # logged accuracy is without it (the views would cost about 4.4x a validation pass).
    c.tta = "none"
    c.report = True  # Write report.html (imgclf_jax.report) at the end of training.
    return c


def has_time_budget(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's epochs are planned by a time budget (a fixed one, or one that grows with the data)."""
    return bool(config.time_budget_minutes or config.auto_time_budget.seconds_per_image)


def time_budget_minutes(config: ml_collections.ConfigDict, train_images: int) -> float:
    """The run's time budget in minutes: time_budget_minutes if set, else auto_time_budget's seconds per
    training image within its bounds; 0 without a budget."""
    if config.time_budget_minutes:
        return config.time_budget_minutes
    auto = config.auto_time_budget
    if not auto.seconds_per_image:
        return 0.0
    return min(auto.max_minutes, max(auto.min_minutes, auto.seconds_per_image * train_images / 60))


MIN_PHOTO_IMAGE_SIZE = 64


def image_size_for_photos(config: ml_collections.ConfigDict, median_short_side: int) -> int:
    """The image size to train at for photos whose median shorter side is `median_short_side` (0: unknown):
    config.image_size, or with image_size_from_photos the photos' own size where that is smaller."""
    if not config.image_size_from_photos or not median_short_side or median_short_side >= config.image_size:
        return config.image_size
    return min(config.image_size, max(MIN_PHOTO_IMAGE_SIZE, median_short_side // 8 * 8))


def adapt_to_photos(config: ml_collections.ConfigDict, median_short_side: int, photos_per_class: float) -> list[str]:
    """Sets what the config adapts to its training photos (image_size_from_photos,
    augment.trivial_augment_max_photos_per_class), so the rest of the run and its saved config see what
    trains; returns a line for the log for each change."""
    changes = []
    size = image_size_for_photos(config, median_short_side)
    if size != config.image_size:
        changes.append(f"Image size: {size} px, the training photos' median shorter side ({median_short_side} px), "
                       f"instead of {config.image_size} (image_size_from_photos).")
        config.image_size = size
    limit = config.augment.trivial_augment_max_photos_per_class
    if config.augment.trivial_augment and limit and photos_per_class > limit:
        changes.append(f"TrivialAugment off: {photos_per_class:.0f} training photos a class, more than "
                       f"augment.trivial_augment_max_photos_per_class ({limit}).")
        config.augment.trivial_augment = False
    return changes


def pools_globally(config: ml_collections.ConfigDict) -> bool:
    """Whether the config's model averages its features over the image, so that it takes any image size
    (progressive resizing and the 'flip_scale' test-time augmentation need it)."""
    return config.model == "resnet" or (config.model == "cnn" and config.cnn.global_pool)


def check_tta(config: ml_collections.ConfigDict, tta: str, name: str) -> None:
    """Rejects a test-time augmentation (`tta`, given as `name`) that is unknown or that the config's model
    cannot run."""
    if tta not in TTA_MODES:
        raise UserError(f"{name} must be one of {', '.join(TTA_MODES)} (got {tta!r})")
    if tta == "flip_scale" and not pools_globally(config):
        raise UserError(f"{name} flip_scale needs a model that pools globally (resnet, or cnn with "
                        f"cnn.global_pool=True), not '{config.model}'; use flip")


def apply_overrides(config: ml_collections.ConfigDict, **overrides: Any) -> None:
    """Applies plain-flag overrides (None = not given). A data flag replaces the config's data source."""
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "data_dir":
            config.dataset = ""
        elif key == "dataset":
            config.data_dir = ""
        setattr(config, key, value)


def require_positive_int(name: str, value: Any) -> None:
    """Raises a UserError naming `name` unless `value` is a whole number > 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{name} must be a positive whole number (got {value!r})")


def _field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Rejects values that cannot work, with the field named, before any data is read."""
    for field in ("epochs", "batch_size", "image_size", "validate_every", "checkpoints_to_keep", "max_image_pixels"):
        require_positive_int(field, config[field])
    if not math.isfinite(config.learning_rate) or config.learning_rate < 0:
        raise UserError(f"learning_rate must be a non-negative number (got {config.learning_rate!r})")
    require_positive_int("resnet.stem_strides", config.resnet.stem_strides)
    for field in ("time_budget_minutes", "checkpoint_every_minutes", "auto_time_budget.seconds_per_image",
                  "auto_time_budget.min_minutes", "auto_time_budget.max_minutes"):
        value = _field(config, field)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UserError(f"{field} must be a non-negative number (got {value!r})")
    if config.auto_time_budget.min_minutes > config.auto_time_budget.max_minutes:
        raise UserError(f"auto_time_budget.min_minutes ({config.auto_time_budget.min_minutes}) is above "
                        f"auto_time_budget.max_minutes ({config.auto_time_budget.max_minutes})")
    if not 0.0 <= config.validation_split < 1.0:
        raise UserError(f"validation_split must be in [0, 1) (0: every photo trains, without validation; got "
                        f"{config.validation_split!r})")
    for field in ("min_photos_per_class_to_hold_out", "augment.trivial_augment_max_photos_per_class"):
        value = _field(config, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{field} must be a non-negative whole number (got {value!r})")
    if not 0.0 <= config.early_stopping_share < 1.0:
        raise UserError(f"early_stopping_share must be in [0, 1) (got {config.early_stopping_share!r})")
    if config.optimizer not in ("adam", "sgd"):
        raise UserError(f"optimizer must be 'adam' or 'sgd' (got {config.optimizer!r})")
    if not 0.0 <= config.momentum < 1.0:
        raise UserError(f"momentum must be in [0, 1) (got {config.momentum!r})")
    if config.weight_decay < 0:
        raise UserError(f"weight_decay must be >= 0 (got {config.weight_decay!r})")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise UserError(f"label_smoothing must be in [0, 1) (got {config.label_smoothing!r})")
    if config.resnet.activation not in RESNET_ACTIVATIONS:
        choices = " or ".join(map(repr, RESNET_ACTIVATIONS))
        raise UserError(f"resnet.activation must be {choices} (got {config.resnet.activation!r})")
    for model, field in (("cnn", "dropout"), ("resnet", "dropout"), ("resnet", "drop_path")):
        if not 0.0 <= config[model][field] < 1.0:
            raise UserError(f"{model}.{field} must be in [0, 1) (got {config[model][field]!r})")
    if config.progressive.start_scale:
        if not 0.0 < config.progressive.start_scale <= 1.0:
            raise UserError(f"progressive.start_scale must be in [0, 1] (got {config.progressive.start_scale!r})")
        require_positive_int("progressive.stages", config.progressive.stages)
        stage_epochs = config.progressive.stage_epochs
        if stage_epochs < 0 or stage_epochs * (config.progressive.stages - 1) >= config.epochs:
            raise UserError(
                f"progressive.stage_epochs must be 0 (equal stages) or a whole number of epochs that leaves the "
                f"last of the {config.progressive.stages} stages at least one of the {config.epochs} epochs "
                f"(got {stage_epochs!r})")
        if stage_epochs and has_time_budget(config):
            raise UserError("progressive.stage_epochs is for the time budget to set (it plans the stages itself); "
                            "set --config.progressive.stage_epochs=0 or --config.time_budget_minutes=0")
        if not pools_globally(config):
            raise UserError(f"progressive resizing needs a model that pools globally (resnet, or cnn with "
                            f"cnn.global_pool=True), not '{config.model}'; or train at one size with "
                            "--config.progressive.start_scale=0")
    check_tta(config, config.tta, "tta")
    if config.tta != "none" and not (config.augment.enabled and config.augment.flip):
        raise UserError(f"tta '{config.tta}' averages each photo with its mirror image, but this config trains "
                        "without flips (augment.enabled and augment.flip), so the model never learned that a "
                        "mirrored photo is the same class: set --config.tta=none, or train with flips")
    if config.keep_epoch not in KEPT_EPOCHS:
        raise UserError(f"keep_epoch must be one of {', '.join(KEPT_EPOCHS)} (got {config.keep_epoch!r})")
    if not 0.0 <= config.ema_decay < 1.0:
        raise UserError(f"ema_decay must be in [0, 1) (got {config.ema_decay!r})")
    if config.warmup_epochs < 0:
        raise UserError(f"warmup_epochs must be >= 0 (got {config.warmup_epochs!r})")
    if config.lr_schedule not in ("constant", "cosine"):
        raise UserError(f"lr_schedule must be 'constant' or 'cosine' (got {config.lr_schedule!r})")
    if config.resize not in ("squash", "crop", "pad"):
        raise UserError(f"resize must be 'squash', 'crop' or 'pad' (got {config.resize!r})")
    for field in ("mixup_alpha", "cutmix_alpha"):
        if not config.mix[field] >= 0:
            raise UserError(f"mix.{field} must be >= 0 (got {config.mix[field]!r})")
    if not 0.0 <= config.mix.prob <= 1.0:
        raise UserError(f"mix.prob must be in [0, 1] (got {config.mix.prob!r})")
    if not 0.0 <= config.augment.crop_area_min <= 1.0 or config.augment.crop_area_min == 0.0:
        raise UserError(f"augment.crop_area_min must be in (0, 1] (got {config.augment.crop_area_min!r})")


def default_workdir(config: ml_collections.ConfigDict, workdir: Optional[str]) -> str:
    return workdir or os.path.join("checkpoints", config.name)
