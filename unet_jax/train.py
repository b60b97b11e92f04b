"""Training state and the pure, jit-compiled train and eval steps.

The guide's loop does, per batch: forward pass, loss, ``zero_grad``, ``backward``,
``optimizer.step``. In JAX the same work is one pure function of (state, batch) that
returns a new state: ``jax.grad(..., has_aux=True)`` gives the gradients and, as
auxiliary outputs, the logits and per-image losses of the same forward pass, and
``state.apply_gradients`` runs AdamW. ``jax.jit`` compiles the whole step once per
input shape into a single XLA program; the old state is donated, so XLA updates the
parameter and optimizer buffers in place instead of holding two copies.

Nothing in a step leaves the device: metrics come back as small arrays that the caller
pulls (``jax.device_get``) when it logs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax import cpu_kernels, losses, metrics, optim, tiling
from unet_jax.config import DTYPES, Config
from unet_jax.models import UNet
from unet_jax.optim import TrainState, create_optimizer


def create_model(config: Config, backend: str | None = None) -> UNet:
    """The U-Net that ``config`` describes, for ``backend`` (JAX's default if None).

    On a CPU (unless ``config.kernels == "stock"``) the model gets the CPU backward
    kernels of ``cpu_kernels``; the parameters and forward values are the same either
    way, so a checkpoint trained on one backend serves the other. The model options
    (skip connections, attention gates, separable convolutions) work with both.
    """
    _require_config(config)
    cpu = config.kernels == "auto" and (backend or jax.default_backend()) == "cpu"
    return _unet(config.num_classes, config.base_features, config.depth, config.dtype,
                 config.skip_connections, config.attention, config.separable, config.remat,
                 cpu)


def _require_config(config) -> None:
    if not isinstance(config, Config):  # swapped arguments, a dict: not "no attribute 'kernels'"
        raise TypeError(f"config is a {type(config).__name__}; give a unet_jax.Config "
                        "(the model's channels, width and depth come from it; from a "
                        "dict: Config.from_dict(settings))")


# The same settings give the very same model and optimizer objects: jit keys its
# compiled programs on them (the train state's ``apply_fn`` and ``tx``), so a second
# run in one process (a notebook, a sweep, the tests) reuses the first one's programs
# instead of compiling them again.
@functools.lru_cache(maxsize=64)
def _unet(num_classes, base_features, depth, dtype, skip_connections, attention, separable,
          remat, cpu_kernels_on) -> UNet:
    kernels = {}
    if cpu_kernels_on:
        kernels = dict(conv=cpu_kernels.CpuConv, pool=cpu_kernels.max_pool_2x2)
    return UNet(num_classes=num_classes, base_features=base_features, depth=depth,
                dtype=DTYPES[dtype], skip_connections=skip_connections, attention=attention,
                separable=separable, remat=remat, **kernels)


def loss_spec(config: Config) -> losses.LossSpec:
    """The loss that ``config`` trains with, with its hyperparameters and the mask
    value it ignores, for the steps' ``loss`` argument."""
    return losses.LossSpec(config.loss, focal_gamma=config.focal_gamma,
                           tversky_alpha=config.tversky_alpha,
                           ignore_index=config.ignore_index)


def init_params(rng, config: Config, model: UNet | None = None):
    """Freshly initialised parameters (initialised on a tiny input: the U-Net's weights
    do not depend on the image size).

    The random numbers come from an "rbg" key derived from ``rng`` (the same ``rng``
    gives the same parameters on a backend): XLA compiles JAX's default threefry
    generator slowly for the U-Net's 46 initialisers, 26 s on a 2-core CPU against
    6 s with rbg, a cost every run and every command that restores a run would pay.
    """
    if isinstance(rng, (int, np.integer)):  # JAX's own error names neither rng nor the fix
        raise TypeError(f"rng {rng!r} is a number; give a key: jax.random.key({rng})")
    _require_config(config)
    model = model or create_model(config)
    side = 2 ** config.depth
    dummy = jnp.zeros((1, side, side, config.in_channels), jnp.float32)
    init_rng = jax.random.key(jax.random.bits(rng, dtype=jnp.uint32), impl="rbg")
    return _jitted_init(model)(init_rng, dummy)["params"]


@functools.lru_cache(maxsize=64)
def _jitted_init(model: UNet):
    return jax.jit(model.init)


def create_train_state(rng, config: Config, model: UNet | None = None,
                       steps_per_epoch: int | None = None) -> TrainState:
    """Parameters, AdamW state and a step counter for a new run (of ``model``, by
    default the one ``config`` describes), and with ``config.ema`` the average of the
    weights, which starts as a copy of them. A schedule other than a constant rate
    needs ``steps_per_epoch`` (``optim.create_optimizer``)."""
    model = model or create_model(config)
    params = init_params(rng, config, model)
    averaging = {}
    if config.ema:  # a copy: the state is donated, and one buffer cannot be donated twice
        averaging = dict(ema_params=jax.tree.map(jnp.copy, params), ema_decay=config.ema)
    return TrainState.create(apply_fn=model.apply, params=params,
                             tx=create_optimizer(config, steps_per_epoch), **averaging)


def _batch_metrics(logits, batch, per_image_loss, loss):
    scores = metrics.segmentation_metrics(logits, batch["mask"],
                                          losses.as_spec(loss).ignore_index)
    return {"loss": per_image_loss, **scores}


@functools.partial(jax.jit, static_argnames=("loss",), donate_argnames=("state",))
def train_step(state: TrainState, batch, loss: str | losses.LossSpec = "bce"):
    """One AdamW update on ``batch`` = {"image": (N,H,W,C), "mask": (N,H,W,1)}, and
    of the weights' moving average where the state keeps one (``optim``).

    ``image`` holds floats in [0, 1]; ``mask`` {0, 1} for one class, else class ids
    0..C-1 (what ``data_pipeline`` makes of mask files: a 0/255 mask read as it is
    gives a BCE that turns negative and falls without end as training raises every
    logit, and a meaningless Dice). They are not checked inside the compiled step.

    Returns the new state and the batch means of loss, dice, iou and pixel_accuracy
    (computed from the logits of the forward pass that produced the gradients); with
    several classes also ``dice_per_class`` and ``iou_per_class`` (C-1,), each class's
    mean over the images where it is present (NaN where it is in none).
    ``loss`` is a name from ``losses.LOSSES`` or a ``losses.LossSpec`` (``loss_spec``
    makes the one a Config asks for); it is static, so each loss compiles once. A
    spec's ``ignore_index`` leaves its pixels out of the loss and the metrics alike.
    ``state`` is donated (its buffers become the new state's, so memory holds one
    copy): use the returned state, never the one passed in.
    """

    labelled = losses.labelled_images(loss, batch["mask"])  # None: every image counts

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, batch["image"])
        per_image = losses.per_image_loss(loss, logits, batch["mask"])
        return losses.batch_mean(per_image, labelled), (logits, per_image)

    grads, (logits, per_image) = jax.grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads)
    if state.ema_decay is not None:
        new_state = new_state.replace(ema_params=optim.update_ema(
            state.ema_params, new_state.params, state.step, state.ema_decay))
    batch_metrics = _batch_metrics(jax.lax.stop_gradient(logits), batch, per_image, loss)
    return new_state, _batch_means(batch_metrics, labelled)


def _batch_means(per_image: dict, labelled=None) -> dict:
    """Means over the batch of per-image scores (of the ``labelled`` images), a
    class's over the images where it is present (as ``metrics.means`` averages a
    whole validation set)."""
    out = {k: losses.batch_mean(v, labelled) for k, v in per_image.items()
           if not k.endswith("_per_class")}
    if "present_per_class" in per_image:
        present = per_image["present_per_class"].sum(axis=0)
        for k in ("dice_per_class", "iou_per_class"):
            out[k] = jnp.where(present > 0, per_image[k].sum(axis=0) / jnp.maximum(present, 1),
                               jnp.nan)
    return out


@functools.partial(jax.jit, static_argnames=("loss",))
def score_logits(logits, batch, loss: str | losses.LossSpec = "bce"):
    """Sums of per-image loss and metrics of ``logits`` over the valid images of ``batch``.

    Evaluation batches may be padded to a fixed size (so one compiled program serves
    the last, partial batch too); ``batch["valid"]`` (N,) marks the real images. Sums
    and a count, rather than means, let the caller merge batches exactly.
    """
    per_image = _batch_metrics(logits, batch, losses.per_image_loss(loss, logits, batch["mask"]),
                               loss)
    valid = batch.get("valid", jnp.ones(logits.shape[0], bool)).astype(jnp.float32)
    labelled = losses.labelled_images(loss, batch["mask"])
    if labelled is not None:  # an image whose every pixel is ignored has no score
        valid = valid * labelled
    sums = {k: jnp.tensordot(valid, v, axes=1) for k, v in per_image.items()}
    sums["count"] = jnp.sum(valid)
    return sums


@functools.partial(jax.jit, static_argnames=("apply_fn", "loss"))
def eval_step(params, batch, apply_fn, loss: str | losses.LossSpec = "bce"):
    """``score_logits`` of the model's logits for ``batch``: the validation step.
    Sums over the batch's images and their ``count``, not means: ``merge_sums`` of the
    host copies of several batches gives the means."""
    return score_logits(apply_fn({"params": params}, batch["image"]), batch, loss)


@functools.partial(jax.jit, static_argnames=("apply_fn", "tta"))
def predict_step(params, images, apply_fn, tta: str = "none"):
    """Logits for a batch of images (N, H, W, C) -> (N, H, W, num_classes), averaged
    over mirrored views with ``tta`` 'hflip' or 'flips' (``tiling.flip_average``)."""
    return tiling.flip_average(lambda x: apply_fn({"params": params}, x), images, tta)


def merge_sums(sums: list[dict]) -> dict:
    """Means over images from the host copies of several ``eval_step`` results
    (``metrics.means``): floats, and (C-1,) arrays for the per-class scores."""
    return metrics.means({k: np.sum([np.asarray(s[k], np.float64) for s in sums], axis=0)
                          for k in sums[0]})
