"""Default recipe for a folder of photos (used when only --data_dir is given): a narrow ResNet on photos kept
at 160 px, with a 2x2 max-pool after its stem (as ImageNet ResNets do) so that its blocks cost what they
cost at 80 px, flip / random-resized-crop / colour augmentation, AdamW with warmup + cosine decay, a moving
average of the weights, progressive resizing (96 -> 160 px in four stages), the best epoch kept, and
predictions averaged with the mirror image's (flip test-time augmentation).

Chosen by measured runs on a 2-core CPU (docs/accuracy.md): at a fixed time budget, more epochs at a
moderate resolution beat fewer at a higher one, a narrow network beat a wider one, cheap low-resolution
epochs first bought the most of all, and dropout, label smoothing and MixUp/CutMix cost more accuracy than
they bought within 50-70 epochs. The 160 px photos behind the pooled stem (48 epochs) beat 80 px photos
without the pool (60 epochs) in the same time: test accuracy +0.021 on average over six small train/test
folders (-0.010 to +0.047), a tie on flowers5, and +0.014 over seeds on cats vs dogs.
"""

from imgclf_jax import config_lib


def get_config():
    config = config_lib.base_config()
    config.name = "default"
    config.image_size = 160
    config.augment.enabled = True
    config.augment.flip = True
    config.augment.crop_area_min = 0.5
    config.augment.brightness = 0.1
    config.augment.contrast = 0.1
    config.model = "resnet"
    config.resnet.stage_sizes = (1, 1, 1, 1)
    config.resnet.widths = (24, 48, 96, 192)
    config.resnet.stem_pool = True
    config.resnet.avg_pool_shortcut = True
    config.resnet.activation = "silu"
    config.resnet.dropout = 0.0
    config.label_smoothing = 0.0
    config.progressive.start_scale = 0.6  # 96, 120, 136 then 160 px.
    config.progressive.stages = 4
    config.ema_decay = 0.998
    # evaluate and predict average each photo's prediction with its mirror image's (docs/accuracy.md: +0.004
    # accuracy on average over six runs of this recipe, +0.008 on four small folders' test photos, -0.007 and
    # -0.002 on flowers5's validation photos). Training validates on the photo alone. Needs the flip above.
    config.tta = "flip"
    # As many epochs as fit in a time budget that grows with the data (at most 200, a multiple of the 4
    # stages): a few minutes for a few hundred photos, 20 for a few thousand, on a 2-core CPU.
    config.epochs = 200
    config.auto_time_budget.seconds_per_image = 0.45
    config.auto_time_budget.min_minutes = 5.0
    config.auto_time_budget.max_minutes = 20.0
    config.early_stopping_share = 0.25
    config.validate_every = 11  # And every epoch of the last stage, where the best epoch is found.
    config.image_size_from_photos = True
    config.batch_size = 32
    config.learning_rate = 3e-3
    config.weight_decay = 0.2
    config.lr_schedule = "cosine"
    config.warmup_epochs = 1.0
    return config
