"""Losses for segmentation logits, each returned per image so callers can weight them.

Masks follow the project's convention: ``(N, H, W, 1)`` with values {0, 1} for binary
segmentation, or integer class ids in ``[0, num_classes)`` when the model has several
output channels. Logits are the model's raw output ``(N, H, W, num_classes)``.

* ``bce``: binary cross-entropy on the sigmoid of one logit per pixel, averaged over
  pixels: PyTorch's ``BCEWithLogitsLoss``, the guide's loss. With several classes it is
  the softmax cross-entropy on integer masks, its multi-class generalisation.
* ``dice``: 1 - soft Dice. Dice compares the predicted and true areas as a whole, so a
  small object counts as much as a large background; useful where the foreground is a
  small fraction of the image (the class imbalance the guide lists as a weakness).
* ``bce_dice``: their sum, the usual Carvana-competition choice: BCE gives smooth,
  per-pixel gradients early on, Dice optimises the overlap the metric measures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOSSES = ("bce", "dice", "bce_dice")

# Smoothing for the soft Dice: keeps the ratio defined for an empty mask and an empty
# prediction (loss 0 there, as the metric's convention says that scores 1).
DICE_SMOOTH = 1.0


def _one_hot_targets(logits, masks):
    """Per-pixel probabilities and matching targets, both (N, H, W, K)."""
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits), masks.astype(logits.dtype)
    labels = masks[..., 0].astype(jnp.int32)
    return jax.nn.softmax(logits, axis=-1), jax.nn.one_hot(labels, logits.shape[-1])


def cross_entropy(logits, masks):
    """Mean per-pixel cross-entropy of each image, shape (N,).

    Computed from logits (log-sum-exp form), never from probabilities: sigmoid then
    log underflows for confident pixels.
    """
    if logits.shape[-1] == 1:
        per_pixel = optax.sigmoid_binary_cross_entropy(logits, masks.astype(logits.dtype))
    else:
        per_pixel = optax.softmax_cross_entropy_with_integer_labels(
            logits, masks[..., 0].astype(jnp.int32))
    return per_pixel.reshape(per_pixel.shape[0], -1).mean(axis=1)


def soft_dice_loss(logits, masks, smooth: float = DICE_SMOOTH):
    """1 - soft Dice of each image, shape (N,).

    Soft because it uses probabilities instead of thresholded predictions, so it has a
    gradient. With several classes the background channel is left out and the Dice of
    the foreground classes averaged.
    """
    probs, targets = _one_hot_targets(logits, masks)
    if probs.shape[-1] > 1:
        probs, targets = probs[..., 1:], targets[..., 1:]
    inter = jnp.sum(probs * targets, axis=(1, 2))
    total = jnp.sum(probs, axis=(1, 2)) + jnp.sum(targets, axis=(1, 2))
    dice = (2.0 * inter + smooth) / (total + smooth)
    return 1.0 - dice.mean(axis=-1)


def per_image_loss(name: str, logits, masks):
    """The loss called ``name`` (one of LOSSES) for each image, shape (N,)."""
    if name == "bce":
        return cross_entropy(logits, masks)
    if name == "dice":
        return soft_dice_loss(logits, masks)
    if name == "bce_dice":
        return cross_entropy(logits, masks) + soft_dice_loss(logits, masks)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
