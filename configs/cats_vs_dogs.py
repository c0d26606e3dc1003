"""Cats vs dogs from scratch (no pretrained weights). For now the general photo recipe of
configs/default.py (a small ResNet at 128 px with flip, random-resized-crop and colour augmentation, AdamW
with warmup + cosine decay, label smoothing), under its own name and work directory.

Train:  python -m imgclf_jax.train --config configs/cats_vs_dogs.py --data_dir ../shared/datasets/cats_vs_dogs
"""

from imgclf_jax import config_lib


def get_config():
    config = config_lib.load_config_file("default.py")
    config.name = "cats_vs_dogs"
    return config
