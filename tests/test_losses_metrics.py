"""Losses and metrics against values worked out by hand."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import per_image_loss, segmentation_metrics
from unet_jax.losses import DICE_SMOOTH


def as_logits(*rows):
    """(1, H, W, 1) logits from nested lists."""
    return jnp.asarray(rows, jnp.float32)[None, ..., None]


def test_bce_equals_the_formula_averaged_over_pixels():
    logits = as_logits([0.0, 2.0], [-1.0, 3.0])
    mask = as_logits([1.0, 0.0], [0.0, 1.0])
    sig = lambda z: 1 / (1 + math.exp(-z))
    expected = np.mean([-math.log(sig(0.0)), -math.log(1 - sig(2.0)),
                        -math.log(1 - sig(-1.0)), -math.log(sig(3.0))])
    np.testing.assert_allclose(per_image_loss("bce", logits, mask), [expected], rtol=1e-6)


def test_bce_is_finite_for_confident_wrong_pixels():
    loss = per_image_loss("bce", as_logits([200.0]), as_logits([0.0]))
    np.testing.assert_allclose(loss, [200.0], rtol=1e-6)


def test_soft_dice_loss_by_hand():
    logits = as_logits([0.0, 0.0], [100.0, -100.0])  # probabilities .5 .5 / 1 0
    mask = as_logits([1.0, 0.0], [1.0, 0.0])
    inter, total = 0.5 + 1.0, (0.5 + 0.5 + 1.0) + 2.0
    expected = 1 - (2 * inter + DICE_SMOOTH) / (total + DICE_SMOOTH)
    np.testing.assert_allclose(per_image_loss("dice", logits, mask), [expected], rtol=1e-5)
    np.testing.assert_allclose(
        per_image_loss("bce_dice", logits, mask),
        per_image_loss("bce", logits, mask) + per_image_loss("dice", logits, mask), rtol=1e-6)


def test_dice_loss_is_zero_for_an_empty_mask_predicted_empty():
    np.testing.assert_allclose(per_image_loss("dice", as_logits([-100.0, -100.0]), as_logits([0.0, 0.0])), [0.0], atol=1e-6)


def test_multiclass_cross_entropy_uses_integer_masks():
    logits = jnp.asarray([[[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]]])  # (1, 1, 2, 3)
    mask = jnp.asarray([[[[0], [2]]]], jnp.float32)
    lse = math.log(math.exp(2) + 1 + math.exp(-1))
    expected = ((lse - 2.0) + math.log(3.0)) / 2
    np.testing.assert_allclose(per_image_loss("bce", logits, mask), [expected], rtol=1e-6)


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="focal.*bce, dice, bce_dice"):
        per_image_loss("focal", as_logits([0.0]), as_logits([0.0]))


def test_dice_iou_accuracy_by_hand():
    # Prediction (logit > 0): 1 1 0 0; truth: 1 0 1 0 -> TP 1, FP 1, FN 1, TN 1.
    logits = as_logits([1.0, 0.5, -0.5, -1.0])
    mask = as_logits([1.0, 0.0, 1.0, 0.0])
    m = segmentation_metrics(logits, mask)
    np.testing.assert_allclose(m["dice"], [2 * 1 / (2 + 2)])
    np.testing.assert_allclose(m["iou"], [1 / 3])
    np.testing.assert_allclose(m["pixel_accuracy"], [0.5])


def test_threshold_is_logit_zero():
    m = segmentation_metrics(as_logits([0.0, 1e-3]), as_logits([0.0, 1.0]))
    np.testing.assert_allclose(m["dice"], [1.0])


def test_empty_truth_and_empty_prediction_score_one():
    m = segmentation_metrics(as_logits([-1.0, -2.0]), as_logits([0.0, 0.0]))
    assert float(m["dice"][0]) == 1.0 and float(m["iou"][0]) == 1.0
    m = segmentation_metrics(as_logits([1.0, -2.0]), as_logits([0.0, 0.0]))
    assert float(m["dice"][0]) == 0.0 and float(m["iou"][0]) == 0.0


def test_metrics_are_per_image_then_averaged():
    logits = jnp.concatenate([as_logits([1.0, 1.0, 1.0, 1.0]), as_logits([1.0, -1.0, -1.0, -1.0])])
    mask = jnp.concatenate([as_logits([1.0, 1.0, 1.0, 1.0]), as_logits([0.0, 1.0, 0.0, 0.0])])
    m = segmentation_metrics(logits, mask)
    np.testing.assert_allclose(m["dice"], [1.0, 0.0])
    np.testing.assert_allclose(m["pixel_accuracy"], [1.0, 0.5])


def test_multiclass_metrics_average_foreground_classes():
    # 3 classes; predicted argmax 0 1 2 2; truth 0 1 1 2.
    logits = jnp.asarray([[[[5, 0, 0], [0, 5, 0], [0, 0, 5], [0, 0, 5]]]], jnp.float32)
    mask = jnp.asarray([[[[0], [1], [1], [2]]]], jnp.float32)
    m = segmentation_metrics(logits, mask)
    dice1, dice2 = 2 * 1 / (1 + 2), 2 * 1 / (2 + 1)
    np.testing.assert_allclose(m["dice"], [(dice1 + dice2) / 2], rtol=1e-6)
    np.testing.assert_allclose(m["iou"], [(1 / 2 + 1 / 2) / 2], rtol=1e-6)
    np.testing.assert_allclose(m["pixel_accuracy"], [0.75])
