"""Segmentation metrics: Dice, IoU and pixel accuracy, per image and per class.

One implementation serves validation during training (on the model's logits at the
training size) and evaluation at full resolution (on predicted and true class-id maps):
``segmentation_scores`` takes class ids, ``segmentation_metrics`` turns logits into
class ids first.

A pixel is predicted foreground when its logit is above 0, i.e. its sigmoid
probability above 0.5, the guide's threshold; with several classes the prediction is
the argmax. Dice (the Carvana leaderboard's metric) is ``2 |P ∩ T| / (|P| + |T|)``;
IoU (Jaccard) is ``|P ∩ T| / |P ∪ T|``. Both are computed per image and per foreground
class, and averaged over images, as Kaggle scored Carvana, so that a small car counts
as much as a big one. ``dice`` and ``iou`` are the mean over the foreground classes
(1..C-1; for a binary model, class 1 alone); pixel accuracy counts every pixel,
background included.

Empty masks: where a class is absent from both the truth and the prediction of an
image, its Dice = IoU = 1 (nothing to find, nothing found); absent from the truth but
predicted, 0. Without this convention the ratio is 0/0. That is Kaggle's rule for
Carvana's binary masks, and it holds for a binary model's scores. With several
classes it would flatter a rare class (present in one image of twenty and missed
there, it would score 0.95), so each class's figure is averaged over the images where
it is present, in the truth or the prediction, as nnU-Net and MONAI do; a class present
in no image has no figure (NaN), and ``dice`` and ``iou`` are the mean of the classes
that have one (``means``).

Pixels labelled ``ignore_index`` (``--ignore-index``: Pascal VOC's 255 on object
borders) are in no count: not in the truth, not in the prediction, not in the pixel
accuracy, whatever the model predicts there, as VOC's and Cityscapes' own scoring does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def predicted_classes(logits):
    """Class ids (N, H, W) int32 from logits (N, H, W, C): logit > 0 for one channel,
    else the argmax."""
    if logits.shape[-1] == 1:
        return (logits[..., 0] > 0).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def checked_masks(logits, masks):
    """``masks`` once they fit ``logits`` (N, H, W, C): (N, H, W, 1), bool made float.
    The slips of a hand-made batch (no channel axis, another size) are named in one
    line, not left to a broadcasting error deep inside JAX; checked as the step is
    traced, so they cost nothing per step."""
    if len(logits.shape) != 4:
        raise ValueError(f"logits have shape {tuple(logits.shape)}; give a batch (N, H, W, "
                         "C) (a single image as image[None])")
    want = (*logits.shape[:-1], 1)
    if tuple(masks.shape) != want:
        raise ValueError(f"masks have shape {tuple(masks.shape)}; logits of shape "
                         f"{tuple(logits.shape)} need masks of shape {want}: (N, H, W, 1) "
                         "at the images' size (mask[..., None] adds the channel axis)")
    return masks.astype(jnp.float32) if masks.dtype == bool else masks


def true_classes(masks):
    """Class ids (N, H, W) int32 of masks (N, H, W, 1) holding {0, 1} or class ids."""
    return jnp.round(masks[..., 0]).astype(jnp.int32)


def check_ignore_index(ignore_index: int | None, num_classes: int) -> None:
    """Raises ValueError where ``ignore_index`` is a class id of a ``num_classes``
    model (0 and 1 for a binary one): its pixels would be left out of a class."""
    if ignore_index is not None and 0 <= ignore_index < max(num_classes, 2):
        raise ValueError(f"ignore_index {ignore_index} is a class id of a {num_classes}-"
                         "class model; give a value that is none, e.g. 255")


def _check_ids(name: str, ids, num_classes: int, ignore_index: int | None) -> None:
    """ValueError where a concrete class map holds values that are no class id (nor
    ``ignore_index``): a 0/255 mask or probabilities match no class, so every image
    scored as empty (Dice 1 for disjoint masks, 0 for equal ones). Traced maps (the
    train and eval steps, whose masks the pipeline made) are not checked."""
    if isinstance(ids, jax.core.Tracer):
        return
    ids = np.asarray(ids)
    k = max(num_classes, 2)
    whole = ids.dtype.kind in "biu" or bool(np.all(ids == np.round(ids)))
    if whole and ids.size and ids.min() >= 0 and ids.max() < k:
        return  # two reductions: the usual case costs no full-size temporaries
    bad = (ids < 0) | (ids >= k)
    if ignore_index is not None:
        bad &= ids != ignore_index
    if np.issubdtype(ids.dtype, np.floating):
        bad |= ids != np.round(ids)
    if bad.any():
        raise ValueError(
            f"{name} holds {ids[bad].flat[0]:g}, which is no class id of a {num_classes}-class "
            f"model (0 to {k - 1}{'' if ignore_index is None else f', or {ignore_index}'}): "
            "give class ids, e.g. mask > 0 for a 0/255 mask, probabilities > 0.5")


def segmentation_scores(pred, true, num_classes: int,
                        ignore_index: int | None = None) -> dict:
    """Per-image scores of class-id maps ``pred`` and ``true``, each (N, H, W).

    Returns ``dice``, ``iou`` and ``pixel_accuracy`` of shape (N,), and for
    ``num_classes`` > 1 also ``dice_per_class`` and ``iou_per_class`` of shape (N, C-1)
    (classes 1..C-1), 0 where the class is in neither map, and ``present_per_class``,
    1 where it is in either; an image's ``dice`` and ``iou`` are then the mean over
    its present classes (1 where none is). ``num_classes`` 1 means a binary model: ids
    {0, 1}. Pixels where ``true`` is ``ignore_index`` are left out of every count.
    """
    # Checked as given (a host array), before int64 values are cut to int32.
    _check_ids("pred", pred, num_classes, None)
    _check_ids("true", true, num_classes, ignore_index)
    pred, true = jnp.asarray(pred), jnp.asarray(true)
    if pred.ndim != 3 or pred.shape != true.shape:
        raise ValueError(f"class maps of shapes {pred.shape} and {true.shape}: give two "
                         "(N, H, W) maps of one shape (a single image as image[None])")
    check_ignore_index(ignore_index, num_classes)
    classes = jnp.arange(1, max(num_classes, 2))
    p = pred[..., None] == classes  # (N, H, W, K)
    t = true[..., None] == classes
    counted = jnp.ones(true.shape, bool) if ignore_index is None else true != ignore_index
    p = p & counted[..., None]  # t is False there already: no class is ignore_index
    inter = jnp.sum(p & t, axis=(1, 2)).astype(jnp.float32)
    total = (jnp.sum(p, axis=(1, 2)) + jnp.sum(t, axis=(1, 2))).astype(jnp.float32)
    empty = total == 0
    dice = jnp.where(empty, 1.0, 2.0 * inter / jnp.maximum(total, 1.0))
    iou = jnp.where(empty, 1.0, inter / jnp.maximum(total - inter, 1.0))
    correct = jnp.sum((pred == true) & counted, axis=(1, 2)).astype(jnp.float32)
    scores = {"dice": dice.mean(axis=-1), "iou": iou.mean(axis=-1),
              "pixel_accuracy": correct / jnp.maximum(jnp.sum(counted, axis=(1, 2)), 1)}
    if num_classes > 1:
        present = (~empty).astype(jnp.float32)
        dice, iou = dice * present, iou * present
        classes_present = present.sum(axis=-1)
        none = classes_present == 0
        scores.update(
            dice=jnp.where(none, 1.0, dice.sum(-1) / jnp.maximum(classes_present, 1.0)),
            iou=jnp.where(none, 1.0, iou.sum(-1) / jnp.maximum(classes_present, 1.0)),
            dice_per_class=dice, iou_per_class=iou, present_per_class=present)
    return scores


def means(sums: dict) -> dict:
    """Means over images (host numpy) of per-image scores summed over ``count``
    images. A class's Dice and IoU are averaged over the images where it is present
    (``present_per_class``; NaN where it is in none), and with several classes
    ``dice`` and ``iou`` are the mean of those per-class figures (1 where no class is
    present anywhere: nothing to find, nothing found)."""
    total = {k: np.asarray(v, np.float64) for k, v in sums.items()}
    count = max(float(total.pop("count")), 1.0)
    present = total.pop("present_per_class", None)
    result = {k: v / count for k, v in total.items()}
    if present is not None:
        for name in ("dice", "iou"):
            per_class = np.full(present.shape, np.nan)
            np.divide(total[f"{name}_per_class"], present, out=per_class, where=present > 0)
            result[f"{name}_per_class"] = per_class
            result[name] = float(np.nanmean(per_class)) if (present > 0).any() else 1.0
    return result


def segmentation_metrics(logits, masks, ignore_index: int | None = None) -> dict:
    """``segmentation_scores`` of the model's logits (N, H, W, C) against masks (N, H, W, 1)."""
    masks = checked_masks(logits, masks)
    return segmentation_scores(predicted_classes(logits), true_classes(masks),
                               logits.shape[-1], ignore_index)
