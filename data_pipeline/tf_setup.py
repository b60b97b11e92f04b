"""TensorFlow for tf.data on the host only: it must never take a GPU.

TensorFlow reserves nearly all GPU memory when it starts, which would leave nothing
for JAX. Every module of this package gets TensorFlow through ``tensorflow()``, which
hides the GPUs from it before it initialises any device.
"""

import os

_tf = None


def tensorflow():
    """The ``tensorflow`` module, with GPUs hidden from it."""
    global _tf
    if _tf is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no banner of CUDA warnings
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
        _tf = tf
    return _tf
