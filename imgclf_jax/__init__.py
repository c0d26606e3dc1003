"""imgclf_jax: image classification in JAX/Flax.

Train on a folder of images or a TFDS dataset (`python -m imgclf_jax.train`), with a tf.data input
pipeline, Flax CNNs, a jit-compiled train step and orbax checkpoints.
"""

__version__ = "0.1.0"
