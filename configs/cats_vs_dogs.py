"""Cats vs dogs from scratch (no pretrained weights): the default photo recipe (configs/default.py) with 88
epochs (22 in each of the four progressive-resizing stages), which fit in under 20 minutes on a 2-core CPU
for 2,000 training photos (docs/accuracy.md has the runs behind it and their scores).

Train:  python -m imgclf_jax.train --config configs/cats_vs_dogs.py --data_dir ../shared/datasets/cats_vs_dogs
"""

from imgclf_jax import config_lib


def get_config():
    config = config_lib.load_config_file("default.py")
    config.name = "cats_vs_dogs"
    config.epochs = 88
    return config
