"""The seeds' exact Keras-tutorial recipe, our like-for-like comparison with Keras: the tutorial CNN
(conv 16/32/64 + dense 128), 180x180 squashed, batch 32, Adam 1e-3, no augmentation, no dropout."""

from imgclf_jax import config_lib


def get_config():
    config = config_lib.base_config()
    config.name = "tutorial_cnn"
    config.image_size = 180
    config.resize = "squash"
    config.augment.enabled = False
    config.model = "tutorial_cnn"
    config.epochs = 10
    config.batch_size = 32
    config.learning_rate = 1e-3
    config.lr_schedule = "constant"
    return config
