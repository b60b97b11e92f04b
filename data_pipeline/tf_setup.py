"""TensorFlow for tf.data on the host only: it must never take a GPU.

TensorFlow reserves nearly all of a GPU's memory when it first initialises one, which
would leave nothing for JAX. Every module of this package gets TensorFlow through
``tensorflow()``, which hides the GPUs from it before any device is initialised, and
quiets its C++ start-up log unless the user chose a level.
"""

import os
import warnings

_tf = None


def tensorflow():
    """The ``tensorflow`` module, imported on first use with its GPUs hidden."""
    global _tf
    if _tf is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no page of CUDA/oneDNN notes
        import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:
            # Someone initialised TF's devices before us; only warn if that took a GPU.
            if tf.config.get_visible_devices("GPU"):
                warnings.warn("TensorFlow was started before data_pipeline could hide the "
                              "GPUs from it and may hold GPU memory JAX needs; import "
                              "data_pipeline before using TensorFlow", stacklevel=2)
        _tf = tf
    return _tf
