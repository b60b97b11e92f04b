"""Losses for segmentation logits, each returned per image so callers can weight them.

Masks follow the project's convention: ``(N, H, W, 1)`` with values {0, 1} for binary
segmentation, or integer class ids in ``[0, num_classes)`` when the model has several
output channels. Logits are the model's raw output ``(N, H, W, num_classes)``.

* ``bce``: binary cross-entropy on the sigmoid of one logit per pixel, averaged over
  pixels: PyTorch's ``BCEWithLogitsLoss``, the guide's loss. With several classes it is
  the softmax cross-entropy on integer masks, its multi-class generalisation.
* ``dice``: 1 - soft Dice. Dice is a ratio over the object's pixels and the predicted
  ones, and ignores correctly rejected background: missing half of a 20-pixel object
  costs as much as missing half of a car, however much background surrounds it; useful
  where the foreground is a small fraction of the image (the class imbalance the guide
  lists as a weakness).
* ``bce_dice``: their sum, the usual Carvana-competition choice: BCE gives smooth,
  per-pixel gradients early on, Dice optimises the overlap the metric measures.

Two more answer the guide's "Imbalanced Class Segmentation" limitation, where the
background outnumbers the object and a per-pixel loss is low for a model that barely
tries on the object:

* ``focal``: the focal loss of Lin et al. (2017), ``-(1 - p_t)**gamma * log(p_t)`` per
  pixel, p_t the probability given to the true class. The factor ``(1 - p_t)**gamma``
  fades out the pixels the model already gets right (with gamma 2, a pixel at p_t = 0.9
  counts 100 times less than in BCE), so the many easy background pixels no longer
  drown the few hard ones along the object's edges. gamma 0 is BCE.
* ``tversky``: 1 - the Tversky index (the loss of Salehi et al. 2017), a soft Dice
  with separate weights for false positives (alpha) and false negatives (beta = 1 -
  alpha). With alpha 0.3, beta 0.7 a missed object pixel costs more than a false
  alarm, which keeps the model from giving up on small objects; alpha = beta = 0.5 is
  the soft Dice.

``per_image_loss`` takes a loss by name, or as a ``LossSpec`` that also carries these
hyperparameters (``--focal-gamma``, ``--tversky-alpha``) and the label of the pixels
that take no part (``--ignore-index``: Pascal VOC's and Cityscapes' 255, the borders
and unlabelled areas their annotators left open). Each loss then counts only the
other pixels: cross-entropy and focal average over each image's other pixels, the
Dice and Tversky counts leave them out. Like every loss here, that is a mean per
image, then over the batch, so each image weighs the same; PyTorch's
``cross_entropy(..., ignore_index=255)`` pools the kept pixels of the whole batch
instead, weighting an image by how many of its pixels are labelled.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from unet_jax.metrics import check_ignore_index, checked_masks

LOSSES = ("bce", "dice", "bce_dice", "focal", "tversky")

# Smoothing for the soft Dice: keeps the ratio defined for an empty mask and an empty
# prediction (loss 0 there, as the metric's convention says that scores 1).
DICE_SMOOTH = 1.0

# Lin et al.'s choice of gamma, and Salehi et al.'s alpha (beta = 1 - alpha = 0.7).
FOCAL_GAMMA = 2.0
TVERSKY_ALPHA = 0.3


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A loss by name with its hyperparameters, as ``train_step`` and ``eval_step`` take it.

    Frozen, so hashable: the steps take their loss as a static argument, and each spec
    compiles its own program with the hyperparameters as constants in it. A plain name
    means a spec with the defaults below.
    """

    name: str = "bce"
    focal_gamma: float = FOCAL_GAMMA
    tversky_alpha: float = TVERSKY_ALPHA
    ignore_index: int | None = None  # the mask value of pixels left out; the metrics too

    def __post_init__(self):
        if self.name not in LOSSES:
            raise ValueError(f"unknown loss {self.name!r}; choose one of {', '.join(LOSSES)}")
        if not self.focal_gamma >= 0:
            raise ValueError(f"focal_gamma {self.focal_gamma}: give 0 or more")
        if not 0 <= self.tversky_alpha <= 1:
            raise ValueError(f"tversky_alpha {self.tversky_alpha}: give a value in [0, 1]")
        if self.ignore_index is not None and not 2 <= self.ignore_index <= 255:
            raise ValueError(f"ignore_index {self.ignore_index}: give a mask value in "
                             "2..255 that is no class id, e.g. 255, or None")


def as_spec(loss: str | LossSpec) -> LossSpec:
    """A loss given by name as the spec with the defaults."""
    if isinstance(loss, str):
        return LossSpec(loss)
    if not isinstance(loss, LossSpec):  # per_image_loss(logits, masks, "bce"), say
        raise TypeError(f"a loss is one of {', '.join(LOSSES)} or a LossSpec, not "
                        f"{type(loss).__name__}: per_image_loss(loss, logits, masks)")
    return loss


def ignored(masks, ignore_index: int | None):
    """(masks, weight): the masks with their ignored pixels made background, and a
    float (N, H, W, 1) weight, 0 on those pixels and 1 elsewhere; weight None where
    nothing is ignored. Made background so that every loss can read them as labels;
    the weight then takes them out."""
    if ignore_index is None:
        return masks, None
    keep = masks != ignore_index
    return jnp.where(keep, masks, 0), keep.astype(jnp.float32)


def _pixel_mean(per_pixel, weight):
    """Each image's mean of ``per_pixel`` (N, H, W[, 1]) over the pixels of weight 1
    (all of them for None); 0 for an image whose pixels are all ignored."""
    per_pixel = per_pixel.reshape(per_pixel.shape[0], -1)
    if weight is None:
        return per_pixel.mean(axis=1)
    weight = weight.reshape(weight.shape[0], -1)
    return jnp.sum(per_pixel * weight, axis=1) / jnp.maximum(jnp.sum(weight, axis=1), 1.0)


def _one_hot_targets(logits, masks, weight=None):
    """Per-pixel probabilities and matching targets, both (N, H, W, K); both 0 where
    ``weight`` is, so that the pixels it leaves out add nothing to a soft count."""
    if logits.shape[-1] == 1:
        probs, targets = jax.nn.sigmoid(logits), masks.astype(logits.dtype)
    else:
        labels = masks[..., 0].astype(jnp.int32)
        probs = jax.nn.softmax(logits, axis=-1)
        targets = jax.nn.one_hot(labels, logits.shape[-1])
    if weight is not None:
        probs, targets = probs * weight, targets * weight
    return probs, targets


def cross_entropy(logits, masks, weight=None):
    """Mean per-pixel cross-entropy of each image, shape (N,), over the pixels of
    ``weight`` 1 (every pixel without it; ``ignored`` makes it).

    Computed from logits (log-sum-exp form), never from probabilities: sigmoid then
    log underflows for confident pixels.
    """
    if logits.shape[-1] == 1:
        per_pixel = optax.sigmoid_binary_cross_entropy(logits, masks.astype(logits.dtype))
    else:
        per_pixel = optax.softmax_cross_entropy_with_integer_labels(
            logits, masks[..., 0].astype(jnp.int32))[..., None]
    return _pixel_mean(per_pixel, weight)


def soft_dice_loss(logits, masks, smooth: float = DICE_SMOOTH, weight=None):
    """1 - soft Dice of each image, shape (N,).

    Soft because it uses probabilities instead of thresholded predictions, so it has a
    gradient. With several classes the background channel is left out and the Dice of
    the foreground classes averaged. Pixels of ``weight`` 0 count in neither sum.
    """
    probs, targets = _one_hot_targets(logits, masks, weight)
    if probs.shape[-1] > 1:
        probs, targets = probs[..., 1:], targets[..., 1:]
    inter = jnp.sum(probs * targets, axis=(1, 2))
    total = jnp.sum(probs, axis=(1, 2)) + jnp.sum(targets, axis=(1, 2))
    dice = (2.0 * inter + smooth) / (total + smooth)
    return 1.0 - dice.mean(axis=-1)


def focal_loss(logits, masks, gamma: float = FOCAL_GAMMA, alpha: float | None = None,
               weight=None):
    """Mean per-pixel focal loss ``-(1 - p_t)**gamma * log(p_t)`` of each image, shape (N,).

    Both ``log(p_t)`` and ``log(1 - p_t)`` come from the logits (log-sigmoid for one
    channel; log-softmax, and the log-sum-exp of the other classes, for several), so a
    confident pixel never takes the log of 0, and ``(1 - p_t)**gamma`` is computed as
    ``exp(gamma * log(1 - p_t))``: exactly 1 at gamma 0 (the loss is then BCE, the
    gradients too), with a finite gradient for every gamma >= 0.

    ``alpha`` (off by default) is Lin et al.'s class weight: object pixels (class > 0)
    count ``alpha``, background pixels ``1 - alpha``. Their 0.25, tuned for object
    detection together with gamma 2, down-weights the rare class, because gamma
    already quiets the easy background; how much weighting helps segmentation depends
    on the data, so the default is the plain focal loss. The mean is over the
    pixels of ``weight`` 1, as in ``cross_entropy``.
    """
    if logits.shape[-1] == 1:
        targets = masks.astype(logits.dtype)
        log_fg, log_bg = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
        log_p = targets * log_fg + (1 - targets) * log_bg
        log_not_p = targets * log_bg + (1 - targets) * log_fg
        foreground = targets
    else:
        labels = masks[..., 0].astype(jnp.int32)
        true_class = labels[..., None] == jnp.arange(logits.shape[-1])
        log_total = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        log_p = jnp.sum(jnp.where(true_class, logits, 0.0), axis=-1, keepdims=True) - log_total
        log_not_p = jax.nn.logsumexp(logits, axis=-1, keepdims=True,
                                     where=~true_class) - log_total
        foreground = (labels > 0)[..., None].astype(logits.dtype)
    per_pixel = -jnp.exp(gamma * log_not_p) * log_p
    if alpha is not None:
        per_pixel = per_pixel * (alpha * foreground + (1 - alpha) * (1 - foreground))
    return _pixel_mean(per_pixel, weight)


def tversky_loss(logits, masks, alpha: float = TVERSKY_ALPHA, beta: float | None = None,
                 smooth: float = DICE_SMOOTH, weight=None):
    """1 - the soft Tversky index of each image, shape (N,); ``beta`` defaults to 1 - alpha.

    ``TI = TP / (TP + alpha FP + beta FN)`` with the soft counts TP = sum(p t),
    FP = sum(p (1 - t)), FN = sum((1 - p) t). The smoothing enters as in
    ``soft_dice_loss``, on the doubled ratio ``(2 TP + smooth) / (2 TP + 2 alpha FP +
    2 beta FN + smooth)``: at alpha = beta = 0.5 the denominator is sum(p) + sum(t) +
    smooth and the loss is exactly the soft Dice loss, and an empty mask predicted empty
    scores 1. With several classes the background channel is left out and the index of
    the foreground classes averaged. Pixels of ``weight`` 0 count in none of the sums.
    """
    beta = 1.0 - alpha if beta is None else beta
    probs, targets = _one_hot_targets(logits, masks, weight)
    if probs.shape[-1] > 1:
        probs, targets = probs[..., 1:], targets[..., 1:]
    tp = jnp.sum(probs * targets, axis=(1, 2))
    fp = jnp.sum(probs * (1 - targets), axis=(1, 2))  # 0 where ignored: probs are
    fn = jnp.sum((1 - probs) * targets, axis=(1, 2))  # and so are the targets
    index = (2 * tp + smooth) / (2 * tp + 2 * alpha * fp + 2 * beta * fn + smooth)
    return 1.0 - index.mean(axis=-1)


def labelled_images(loss: str | LossSpec, masks):
    """(N,) float: 1 for each image with a pixel that is not ignored, 0 for one whose
    every pixel is (its loss is 0 and its scores mean nothing: it must not count in a
    mean over images); None where the loss ignores nothing."""
    ignore = as_spec(loss).ignore_index
    if ignore is None:
        return None
    return jnp.any(masks != ignore, axis=tuple(range(1, masks.ndim))).astype(jnp.float32)


def batch_mean(per_image, labelled=None):
    """The mean of per-image values over the images that count (``labelled_images``)."""
    if labelled is None:
        return per_image.mean()
    return jnp.sum(per_image * labelled) / jnp.maximum(jnp.sum(labelled), 1.0)


def per_image_loss(loss: str | LossSpec, logits, masks):
    """The loss ``loss`` (one of LOSSES, or a LossSpec) for each image, shape (N,);
    a spec's ``ignore_index`` pixels take no part."""
    spec = as_spec(loss)
    check_ignore_index(spec.ignore_index, logits.shape[-1])
    masks, weight = ignored(checked_masks(logits, masks), spec.ignore_index)
    if spec.name == "bce":
        return cross_entropy(logits, masks, weight)
    if spec.name == "dice":
        return soft_dice_loss(logits, masks, weight=weight)
    if spec.name == "bce_dice":
        return cross_entropy(logits, masks, weight) + soft_dice_loss(logits, masks,
                                                                     weight=weight)
    if spec.name == "focal":
        return focal_loss(logits, masks, spec.focal_gamma, weight=weight)
    if spec.name == "tversky":
        return tversky_loss(logits, masks, spec.tversky_alpha, weight=weight)
    raise ValueError(f"unknown loss {spec.name!r}; choose one of {', '.join(LOSSES)}")
