"""Cats vs dogs from scratch (no pretrained weights): a small ResNet at 128 px with flip,
random-resized-crop and colour augmentation, AdamW with warmup + cosine decay and label smoothing.

Train:  python -m imgclf_jax.train --config configs/cats_vs_dogs.py --data_dir ../shared/datasets/cats_vs_dogs
"""

from imgclf_jax import config_lib


def get_config():
    config = config_lib.base_config()
    config.name = "cats_vs_dogs"
    config.image_size = 128
    config.resize = "squash"
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
