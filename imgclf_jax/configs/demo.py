"""The built-in demo (used when no data is given): scikit-learn's 1,797 real handwritten digits, written
to data/digits/ as PNG files, trained with a small batch-norm CNN at 32 px in well under a minute."""

from imgclf_jax import config_lib


def get_config():
    config = config_lib.base_config()
    config.name = "demo"
    config.dataset = "demo"
    config.image_size = 32
    config.model = "cnn"
    config.cnn.filters = (32, 64)
    config.cnn.batch_norm = True
    config.cnn.dense_units = 128
    config.cnn.dropout = 0.2
    config.epochs = 8
    config.batch_size = 32
    config.learning_rate = 2e-3
    config.lr_schedule = "cosine"
    return config
