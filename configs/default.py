"""Default recipe for a folder of photos (used when only --data_dir is given): a small ResNet at 128 px
with flip / random-resized-crop / colour augmentation, AdamW with warmup + cosine decay, label smoothing."""

from imgclf_jax import config_lib


def get_config():
    config = config_lib.base_config()
    config.name = "default"
    config.image_size = 128
    config.augment.enabled = True
    config.augment.flip = True
    config.augment.crop_area_min = 0.35
    config.augment.brightness = 0.1
    config.augment.contrast = 0.1
    config.model = "resnet"
    config.resnet.stage_sizes = (1, 1, 1, 1)
    config.resnet.widths = (32, 64, 128, 256)
    config.resnet.dropout = 0.1
    config.label_smoothing = 0.1
    config.epochs = 30
    config.batch_size = 32
    config.learning_rate = 2e-3
    config.weight_decay = 0.05
    config.lr_schedule = "cosine"
    config.warmup_epochs = 1.0
    return config
