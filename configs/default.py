"""Default recipe for a folder of photos (used when only --data_dir is given): a narrow ResNet at 80 px with
flip / random-resized-crop / colour augmentation, AdamW with warmup + cosine decay, a moving average of the
weights, progressive resizing (48 -> 80 px in four stages), the best epoch kept.

Chosen by measured runs on a 2-core CPU (docs/accuracy.md): at a fixed time budget, more epochs at a
moderate resolution beat fewer at a higher one, a narrow network at 80 px beat a wider one at 64 px,
cheap low-resolution epochs first bought the most of all, and dropout, label smoothing and MixUp/CutMix
cost more accuracy than they bought within 50-70 epochs.
"""

from imgclf_jax import config_lib


def get_config():
    config = config_lib.base_config()
    config.name = "default"
    config.image_size = 80
    config.augment.enabled = True
    config.augment.flip = True
    config.augment.crop_area_min = 0.5
    config.augment.brightness = 0.1
    config.augment.contrast = 0.1
    config.model = "resnet"
    config.resnet.stage_sizes = (1, 1, 1, 1)
    config.resnet.widths = (24, 48, 96, 192)
    config.resnet.dropout = 0.0
    config.label_smoothing = 0.0
    config.progressive.start_scale = 0.6  # 48, 56, 72 then 80 px.
    config.progressive.stages = 4
    config.ema_decay = 0.998
    config.epochs = 60
    config.batch_size = 32
    config.learning_rate = 3e-3
    config.weight_decay = 0.05
    config.lr_schedule = "cosine"
    config.warmup_epochs = 1.0
    return config
