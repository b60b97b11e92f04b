"""unet-jax: the U-Net of the Carvana annotated guide, in JAX and Flax.

Read the modules in this order to learn the architecture and its training:
``models`` (DoubleConv, DownSample, UpSample, UNet), ``losses``, ``metrics``,
``train`` (state and jit-compiled steps), ``checkpoints``, ``torch_import``.
"""

# The CPU XLA flags must be in the environment before JAX starts its backend.
from unet_jax import platform as _platform

_platform.apply_xla_flags()

from unet_jax.config import Config  # noqa: E402
from unet_jax.losses import LOSSES, per_image_loss  # noqa: E402
from unet_jax.metrics import segmentation_metrics  # noqa: E402
from unet_jax.models import DoubleConv, DownSample, UNet, UpConv, UpSample  # noqa: E402
from unet_jax.torch_import import config_from_torch, params_from_torch  # noqa: E402
from unet_jax.train import (  # noqa: E402
    TrainState, create_model, create_train_state, eval_step, init_params, predict_step,
    train_step)

__all__ = [
    "Config", "DoubleConv", "DownSample", "LOSSES", "TrainState", "UNet", "UpConv",
    "UpSample", "config_from_torch", "create_model", "create_train_state", "eval_step",
    "init_params", "params_from_torch", "per_image_loss", "predict_step",
    "segmentation_metrics", "train_step",
]
