"""imgclf_jax: image classification in JAX/Flax.

Train on a folder of images or a TFDS dataset (`imgclf-train` or `python -m imgclf_jax.train`), with a
tf.data input pipeline, Flax CNNs and ResNets, a jit-compiled train step and orbax checkpoints; then
`imgclf-evaluate`, `imgclf-predict`, `imgclf-report` and `imgclf-doctor`.
"""

__version__ = "0.2.0"
