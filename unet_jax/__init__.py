"""unet-jax: the U-Net of the Carvana annotated guide, in JAX and Flax.

Read the modules in this order to learn the architecture and its training:
``models`` (DoubleConv, DownSample, UpSample, UNet, and the options' AttentionGate
and SeparableConv), ``losses``, ``metrics``, ``train`` (state and jit-compiled
steps), ``trainer`` (``train_and_evaluate``: the whole training loop),
``checkpoints``, ``finetune`` (a run started from another's weights), ``config`` and
``configs`` (a run's settings and the named presets), ``tiling`` (overlap-tile
prediction at full resolution, test-time flips), ``prediction`` (how a run predicts,
as one jitted program per image size), ``inference`` (masks for image files),
``evaluation`` (scores at full resolution), ``rle`` (Kaggle's run-length encoding),
``export`` (ONNX, SavedModel, TFLite and StableHLO files), ``torch_import``.
``cpu_kernels`` holds the faster CPU backward passes that ``train.create_model``
swaps in on a CPU.

Importing the package changes nothing in the process; call ``setup_platform`` first
to choose the platform and the CPU's XLA settings.
"""

from unet_jax import configs
from unet_jax.config import Config, ConfigError
from unet_jax.losses import LOSSES, LossSpec, per_image_loss
from unet_jax.metrics import segmentation_metrics, segmentation_scores
from unet_jax.models import (
    AttentionGate, DoubleConv, DownSample, SeparableConv, UNet, UpConv, UpSample)
from unet_jax.platform import PlatformError, setup_platform
from unet_jax.torch_import import config_from_torch, params_from_torch
from unet_jax.train import (
    TrainState, create_model, create_train_state, eval_step, init_params, predict_step,
    train_step)
from unet_jax.trainer import train_and_evaluate

__all__ = [
    "AttentionGate", "Config", "ConfigError", "DoubleConv", "DownSample", "LOSSES",
    "LossSpec", "PlatformError", "SeparableConv", "TrainState", "UNet", "UpConv", "UpSample", "config_from_torch", "configs",
    "create_model", "create_train_state", "eval_step", "init_params", "params_from_torch",
    "per_image_loss", "predict_step", "segmentation_metrics", "segmentation_scores",
    "setup_platform", "train_and_evaluate", "train_step",
]
