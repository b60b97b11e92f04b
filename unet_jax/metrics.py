"""Segmentation metrics from logits: Dice, IoU and pixel accuracy, per image.

A pixel is predicted foreground when its logit is above 0, i.e. its sigmoid
probability above 0.5, the guide's threshold. Dice (the Carvana leaderboard's metric)
is ``2 |P ∩ T| / (|P| + |T|)``; IoU (Jaccard) is ``|P ∩ T| / |P ∪ T|``. Both are
computed per image and then averaged over images, as Kaggle scored Carvana, so that a
small car counts as much as a big one.

Empty masks: an image whose true mask is empty and whose prediction is empty too scores
Dice = IoU = 1 (nothing to find, nothing found); an empty true mask with any predicted
pixel scores 0. Without this convention the ratio is 0/0.

With several classes the prediction is the argmax over classes, and Dice/IoU are the
mean over the foreground classes 1..C-1 of the per-class scores (with the same empty
convention per class); pixel accuracy counts every class, background included.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _hard_masks(logits, masks):
    """Predicted and true foreground indicators, (N, H, W, K) booleans, K = classes - 1."""
    if logits.shape[-1] == 1:
        return logits > 0, masks > 0.5
    num_classes = logits.shape[-1]
    pred = jnp.argmax(logits, axis=-1)
    true = masks[..., 0].astype(jnp.int32)
    classes = jnp.arange(1, num_classes)
    return pred[..., None] == classes, true[..., None] == classes


def segmentation_metrics(logits, masks):
    """Per-image ``dice``, ``iou`` and ``pixel_accuracy``, each of shape (N,)."""
    pred, true = _hard_masks(logits, masks)
    inter = jnp.sum(pred & true, axis=(1, 2)).astype(jnp.float32)
    p = jnp.sum(pred, axis=(1, 2)).astype(jnp.float32)
    t = jnp.sum(true, axis=(1, 2)).astype(jnp.float32)
    union = p + t - inter
    empty = (p + t) == 0
    dice = jnp.where(empty, 1.0, 2.0 * inter / jnp.maximum(p + t, 1.0)).mean(axis=-1)
    iou = jnp.where(empty, 1.0, inter / jnp.maximum(union, 1.0)).mean(axis=-1)

    if logits.shape[-1] == 1:
        correct = (logits > 0) == (masks > 0.5)
    else:
        correct = jnp.argmax(logits, axis=-1)[..., None] == masks.astype(jnp.int32)
    accuracy = correct.reshape(correct.shape[0], -1).mean(axis=1)
    return {"dice": dice, "iou": iou, "pixel_accuracy": accuracy.astype(jnp.float32)}


def dice_numpy(pred, true) -> float:
    """Dice of two boolean arrays of any shape (for tools that work on full-size masks)."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    total = pred.sum() + true.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(pred, true).sum() / total)
