"""Losses and metrics against values worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import eval_step, per_image_loss, segmentation_metrics, segmentation_scores
from unet_jax.losses import (DICE_SMOOTH, FOCAL_GAMMA, LOSSES, LossSpec, focal_loss,
                             tversky_loss)


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
    with pytest.raises(ValueError, match="hinge.*bce, dice, bce_dice, focal, tversky"):
        per_image_loss("hinge", as_logits([0.0]), as_logits([0.0]))


def random_logits_and_mask(shape, classes, scale):
    rng = np.random.default_rng(0)
    logits = scale * rng.standard_normal((*shape, classes)).astype(np.float32)
    mask = rng.integers(0, max(classes, 2), (*shape, 1)).astype(np.float32)
    return jnp.asarray(logits), jnp.asarray(mask)


# One compiled program per loss, rather than one per operation.
jitted_loss = jax.jit(per_image_loss, static_argnums=0)


def focal(logits, mask, gamma=FOCAL_GAMMA):
    return jitted_loss(LossSpec("focal", focal_gamma=gamma), logits, mask)


def test_focal_loss_by_hand():
    # The BCE example above: p_t = 0.5, 1 - sig(2), 1 - sig(-1), sig(3); gamma 2.
    logits = as_logits([0.0, 2.0], [-1.0, 3.0])
    mask = as_logits([1.0, 0.0], [0.0, 1.0])
    p_t = [0.5, 0.11920292202, 0.73105857863, 0.95257412682]
    per_pixel = [-(1 - p) ** 2 * math.log(p) for p in p_t]
    # = 0.1732868, 1.6500782, 0.0226581, 0.0001093: the confident right pixel counts
    # 1/443 of its BCE (0.0485874), the badly wrong one 78% of its (2.1269280).
    np.testing.assert_allclose(per_pixel, [0.1732868, 1.6500782, 0.0226581, 0.0001093],
                               atol=1e-7)
    np.testing.assert_allclose(focal(logits, mask), [0.4615331], rtol=1e-6)
    # alpha 0.25 on the object pixels (1 and 4), 0.75 on the background (2 and 3).
    weighted = focal_loss(logits, mask, alpha=0.25)
    np.testing.assert_allclose(weighted, [(0.25 * per_pixel[0] + 0.75 * per_pixel[1]
                                           + 0.75 * per_pixel[2] + 0.25 * per_pixel[3]) / 4],
                               rtol=1e-6)
    np.testing.assert_allclose(weighted, [0.3244753], rtol=1e-6)


def test_multiclass_focal_loss_by_hand():
    logits = jnp.asarray([[[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]]])  # (1, 1, 2, 3)
    mask = jnp.asarray([[[[0], [2]]]], jnp.float32)
    p1 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))  # 0.8437947
    p2 = 1 / 3
    expected = (-(1 - p1) ** 2 * math.log(p1) - (1 - p2) ** 2 * math.log(p2)) / 2
    np.testing.assert_allclose(expected, 0.2462082, rtol=1e-6)
    np.testing.assert_allclose(focal(logits, mask), [expected], rtol=1e-5)
    # alpha weighs object pixels (class 2 here) alpha and background 1 - alpha.
    weighted = (-(1 - 0.25) * (1 - p1) ** 2 * math.log(p1)
                - 0.25 * (1 - p2) ** 2 * math.log(p2)) / 2
    np.testing.assert_allclose(focal_loss(logits, mask, 2.0, alpha=0.25), [weighted], rtol=1e-5)


@pytest.mark.parametrize("classes", [1, 3])
def test_focal_with_gamma_zero_is_bce(classes):
    logits, mask = random_logits_and_mask((2, 4, 5), classes, scale=4.0)
    np.testing.assert_allclose(focal(logits, mask, gamma=0.0),
                               jitted_loss("bce", logits, mask), rtol=1e-6)
    grad = lambda name: jax.jit(jax.grad(lambda z: per_image_loss(name, z, mask).sum()))(logits)
    np.testing.assert_allclose(grad(LossSpec("focal", focal_gamma=0.0)), grad("bce"),
                               rtol=1e-5, atol=1e-8)
    # gamma > 0 only ever lowers each pixel's loss: (1 - p_t)**gamma <= 1.
    assert np.all(np.asarray(focal(logits, mask)) < np.asarray(jitted_loss("bce", logits, mask)))


def test_focal_is_finite_for_confident_pixels():
    # Confidently wrong: the full BCE of 200; confidently right: 0, with finite gradients.
    np.testing.assert_allclose(focal(as_logits([200.0]), as_logits([0.0])), [200.0], rtol=1e-6)
    np.testing.assert_allclose(focal(as_logits([200.0]), as_logits([1.0])), [0.0], atol=1e-30)
    logits = jnp.asarray([[[[100.0, -100.0, 0.0], [-100.0, 100.0, 0.0]]]])
    mask = jnp.asarray([[[[0], [0]]]], jnp.float32)
    grads = jax.jit(jax.grad(lambda z: focal(z, mask, gamma=0.5).sum()))(logits)
    assert np.all(np.isfinite(grads))
    np.testing.assert_allclose(focal(logits, mask, gamma=0.5), [100.0], rtol=1e-6)


def test_tversky_loss_by_hand():
    logits = as_logits([0.0, 100.0], [100.0, -100.0])  # probabilities .5 1 / 1 0
    mask = as_logits([1.0, 0.0], [1.0, 1.0])
    tp, fp, fn = 0.5 + 1.0, 1.0, 0.5 + 1.0
    # alpha 0.3 on the false positives, beta 0.7 on the false negatives:
    # (2*1.5 + 1) / (2*1.5 + 2*0.3*1 + 2*0.7*1.5 + 1) = 4 / 6.7.
    expected = 1 - (2 * tp + DICE_SMOOTH) / (2 * tp + 0.6 * fp + 1.4 * fn + DICE_SMOOTH)
    np.testing.assert_allclose(expected, 1 - 4 / 6.7)
    np.testing.assert_allclose(jitted_loss("tversky", logits, mask), [expected], rtol=1e-5)
    # alpha and beta swapped: the misses now weigh less, so the loss is lower (1 - 4 / 6.3).
    np.testing.assert_allclose(tversky_loss(logits, mask, alpha=0.7), [1 - 4 / 6.3], rtol=1e-5)
    np.testing.assert_allclose(
        jitted_loss(LossSpec("tversky", tversky_alpha=0.7), logits, mask), [1 - 4 / 6.3],
        rtol=1e-5)


@pytest.mark.parametrize("classes", [1, 3])
def test_tversky_with_equal_weights_is_soft_dice(classes):
    logits, mask = random_logits_and_mask((3, 6, 4), classes, scale=3.0)
    dice = jitted_loss("dice", logits, mask)
    np.testing.assert_allclose(tversky_loss(logits, mask, 0.5, 0.5), dice, rtol=1e-6)
    np.testing.assert_allclose(
        jitted_loss(LossSpec("tversky", tversky_alpha=0.5), logits, mask), dice, rtol=1e-6)
    assert not np.allclose(jitted_loss("tversky", logits, mask), dice, rtol=1e-3)


def test_tversky_is_zero_for_an_empty_mask_predicted_empty():
    np.testing.assert_allclose(
        per_image_loss("tversky", as_logits([-100.0, -100.0]), as_logits([0.0, 0.0])), [0.0],
        atol=1e-6)


# Two images of one row of three pixels, three classes. Class 2 is absent from image 1,
# where the model still gives it some probability; image 0's background pixel is missed.
MULTI_LOGITS = [[[0.0, 2.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 3.0]],
                [[0.0, 2.0, 0.0], [1.0, 1.0, 1.0], [3.0, 0.0, 1.0]]]
MULTI_MASK = [[0, 1, 2], [1, 1, 0]]


def _multiclass_counts():
    """Soft TP, FP, FN per (image, class), shape (2, 3), by the formulas, in numpy."""
    logits = np.asarray(MULTI_LOGITS, np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    tp, fp, fn = (np.zeros((2, 3)) for _ in range(3))
    for n in range(2):
        for k in range(3):
            for pixel in range(3):
                p, t = probs[n, pixel, k], float(MULTI_MASK[n][pixel] == k)
                tp[n, k] += p * t
                fp[n, k] += p * (1 - t)
                fn[n, k] += (1 - p) * t
    return tp, fp, fn


def _multiclass_inputs():
    logits = jnp.asarray(MULTI_LOGITS, jnp.float32)[:, None]  # (2, 1, 3, 3)
    mask = jnp.asarray(MULTI_MASK, jnp.float32)[:, None, :, None]  # (2, 1, 3, 1)
    return logits, mask


def test_multiclass_soft_dice_by_hand_leaves_out_the_background():
    tp, fp, fn = _multiclass_counts()
    # Dice per (image, class): (2 TP + 1) / (sum p + sum t + 1), sum p + sum t = 2 TP + FP + FN.
    dice = (2 * tp + DICE_SMOOTH) / (2 * tp + fp + fn + DICE_SMOOTH)
    expected = 1 - dice[:, 1:].mean(axis=1)  # classes 1 and 2 of each image
    np.testing.assert_allclose(expected, [0.2393641, 0.2889752], rtol=1e-6)
    with_background = 1 - dice.mean(axis=1)
    over_images = 1 - dice[:, 1:].mean(axis=0)  # the mean over the wrong axis
    assert np.abs(expected - with_background).min() > 0.005  # far beyond rtol 1e-5
    assert np.abs(expected - over_images).min() > 0.005  # far beyond rtol 1e-5
    logits, mask = _multiclass_inputs()
    np.testing.assert_allclose(jitted_loss("dice", logits, mask), expected, rtol=1e-5)
    np.testing.assert_allclose(jitted_loss("bce_dice", logits, mask),
                               jitted_loss("bce", logits, mask) + expected, rtol=1e-5)


def test_multiclass_tversky_by_hand_leaves_out_the_background():
    tp, fp, fn = _multiclass_counts()
    for alpha, value in ((0.3, [0.2107039, 0.2644640]), (0.8, [0.2781058, 0.2922096])):
        beta = 1 - alpha
        index = (2 * tp + DICE_SMOOTH) / (2 * tp + 2 * alpha * fp + 2 * beta * fn + DICE_SMOOTH)
        expected = 1 - index[:, 1:].mean(axis=1)
        np.testing.assert_allclose(expected, value, rtol=1e-6)
        assert np.abs(expected - (1 - index.mean(axis=1))).min() > 0.005
        assert np.abs(expected - (1 - index[:, 1:].mean(axis=0))).min() > 0.005
        logits, mask = _multiclass_inputs()
        np.testing.assert_allclose(
            jitted_loss(LossSpec("tversky", tversky_alpha=alpha), logits, mask), expected,
            rtol=1e-5)


def _logits_as_params(variables, images):
    return variables["params"]["logits"]


def test_loss_hyperparameters_reach_the_jitted_eval_step():
    """The spec is a static argument of the jitted step: its gamma and alpha are used."""
    logits = as_logits([0.0, 2.0], [-1.0, 3.0])
    mask = as_logits([1.0, 0.0], [0.0, 1.0])
    batch = {"image": jnp.zeros((1, 2, 2, 3)), "mask": mask}
    cases = [(LossSpec("focal", focal_gamma=0.0), per_image_loss("bce", logits, mask)),
             (LossSpec("focal", focal_gamma=1.0), focal_loss(logits, mask, 1.0)),
             (LossSpec("tversky", tversky_alpha=0.9), tversky_loss(logits, mask, 0.9, 0.1))]
    for spec, expected in cases:
        sums = eval_step({"logits": logits}, batch, _logits_as_params, loss=spec)
        np.testing.assert_allclose(sums["loss"], expected[0], rtol=1e-6)
    assert LossSpec("focal") != LossSpec("focal", focal_gamma=1.0)
    assert hash(LossSpec("focal")) == hash(LossSpec("focal", focal_gamma=2.0))


@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize("loss", LOSSES)
def test_ignored_pixels_count_in_no_loss_no_gradient_and_no_score(loss, classes):
    """Rows labelled 255 with --ignore-index 255 change nothing: every loss and every
    score equals that of the image without those rows, whatever the model predicts
    there, and the ignored pixels' logits get no gradient."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 6, 5, classes)), jnp.float32)
    masks = rng.integers(0, max(classes, 2), (2, 6, 5, 1)).astype(np.float32)
    void = masks.copy()
    void[:, :2] = 255
    spec = LossSpec(loss, ignore_index=255)
    np.testing.assert_allclose(per_image_loss(spec, logits, void),
                               per_image_loss(loss, logits[:, 2:], masks[:, 2:]), rtol=1e-5)
    grad = jax.grad(lambda x: per_image_loss(spec, x, void).sum())(logits)
    assert not np.asarray(grad[:, :2]).any() and np.asarray(grad[:, 2:]).any()
    scored, kept = segmentation_metrics(logits, void, 255), segmentation_metrics(
        logits[:, 2:], masks[:, 2:])
    assert scored.keys() == kept.keys()
    for name in kept:
        np.testing.assert_allclose(scored[name], kept[name], rtol=1e-6, err_msg=name)
    # Through the jitted step too: the spec carries the value to the metrics.
    batch = {"image": jnp.zeros((2, 6, 5, 3)), "mask": void}
    sums = eval_step({"logits": logits}, batch, _logits_as_params, loss=spec)
    np.testing.assert_allclose(sums["pixel_accuracy"], kept["pixel_accuracy"].sum(), rtol=1e-6)


def test_an_ignore_index_that_is_a_class_is_refused():
    pred = jnp.zeros((1, 2, 2), jnp.int32)
    with pytest.raises(ValueError, match="ignore_index 2 is a class id of a 3-class model"):
        segmentation_scores(pred, pred, 3, ignore_index=2)
    with pytest.raises(ValueError, match="ignore_index 2 is a class id of a 3-class model"):
        per_image_loss(LossSpec(ignore_index=2), jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 1)))


@pytest.mark.parametrize("classes", [1, 3])
def test_an_image_whose_every_pixel_is_ignored_counts_in_no_mean(classes):
    """Its loss is 0 and its pixel accuracy 0/0: counted, it diluted the batch's loss
    and gradient and the validation means (pixel accuracy 0.69 where every scored
    image had 0.91)."""
    from unet_jax.optim import TrainState
    from unet_jax.train import train_step

    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 4, 4, classes)), jnp.float32)
    masks = rng.integers(0, max(classes, 2), (2, 4, 4, 1)).astype(np.float32)
    masks[1] = 255
    spec = LossSpec("bce", ignore_index=255)
    sums = eval_step({"logits": logits}, {"image": jnp.zeros((2, 4, 4, 3)), "mask": masks},
                     _logits_as_params, loss=spec)
    alone = segmentation_metrics(logits[:1], masks[:1])
    assert float(sums["count"]) == 1
    np.testing.assert_allclose(sums["pixel_accuracy"], alone["pixel_accuracy"][0], rtol=1e-6)
    np.testing.assert_allclose(sums["loss"], per_image_loss("bce", logits[:1], masks[:1])[0],
                               rtol=1e-6)
    # The training step's loss (and so its gradient) is the labelled image's alone.
    import optax

    state = TrainState.create(apply_fn=_logits_as_params, params={"logits": logits},
                              tx=optax.sgd(0.0))
    _, batch_metrics = train_step(state, {"image": jnp.zeros((2, 4, 4, 3)), "mask": masks},
                                  loss=spec)
    np.testing.assert_allclose(batch_metrics["loss"], sums["loss"], rtol=1e-6)
    np.testing.assert_allclose(batch_metrics["pixel_accuracy"], alone["pixel_accuracy"][0],
                               rtol=1e-6)


@pytest.mark.parametrize("fields,message", [
    (dict(name="hinge"), "hinge"), (dict(focal_gamma=-1.0), "focal_gamma"),
    (dict(tversky_alpha=1.5), "tversky_alpha"), (dict(ignore_index=1), "ignore_index 1"),
    (dict(ignore_index=256), "ignore_index 256")])
def test_loss_spec_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        LossSpec(**fields)


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


def summed(scores: dict) -> dict:
    """Per-image scores as eval_step sums them over a batch, with their count."""
    count = len(np.asarray(scores["dice"]))
    return {"count": count, **{k: np.sum(np.asarray(v), axis=0) for k, v in scores.items()}}


def test_a_rare_class_is_scored_on_the_images_that_hold_it():
    """Class 2 is in one image of twenty and missed there: its Dice is 0, not the 0.95
    that counting the nineteen images without it as perfect would give. A class in no
    image has no figure, and the overall Dice is the mean of the classes that do."""
    from unet_jax.metrics import means, segmentation_scores

    true = np.zeros((20, 4, 4), np.int32)
    true[:, :2] = 1  # class 1 in every image, found
    true[0, 3, 3] = 2  # class 2 in image 0 alone, predicted as background
    pred = np.where(true == 1, 1, 0).astype(np.int32)
    scores = segmentation_scores(pred, true, num_classes=4)
    averaged = means(summed(scores))
    np.testing.assert_allclose(averaged["dice_per_class"][:2], [1.0, 0.0])
    assert np.isnan(averaged["dice_per_class"][2])  # class 3: in no image
    assert averaged["dice"] == pytest.approx(0.5) and averaged["iou"] == pytest.approx(0.5)
    np.testing.assert_allclose(scores["dice"][:2], [0.5, 1.0])  # image 0 holds both classes


def test_images_with_background_alone_score_one_and_count_every_image():
    """No foreground class in any image, none predicted: nothing to find, nothing
    found, Dice and IoU 1 (as for one image with an empty mask). The pixel accuracy is
    the mean over all the images, so one wrong pixel in one of four weighs a quarter."""
    from unet_jax.metrics import means, segmentation_scores

    true = np.zeros((4, 4, 4), np.int32)
    pred = true.copy()  # background everywhere, predicted so
    scores = segmentation_scores(pred, true, num_classes=3)
    averaged = means(summed(scores))
    assert averaged["dice"] == 1.0 and averaged["iou"] == 1.0
    assert np.isnan(averaged["dice_per_class"]).all()
    true[3, 0, 0] = 1  # one pixel of class 1 in the last image, missed
    scores = segmentation_scores(pred, true, num_classes=3)
    averaged = means(summed(scores))
    assert averaged["pixel_accuracy"] == pytest.approx(1 - 1 / 16 / 4)
    assert averaged["dice"] == 0.0


def test_values_that_are_no_class_id_are_named_not_scored():
    """A 0/255 mask or probabilities matched no class, so every image scored as empty:
    Dice 1 for disjoint masks, 0 for equal ones, without a word."""
    left = np.zeros((1, 8, 8), np.uint8)
    left[:, :, :4] = 255
    right = 255 - left
    for pred, true, named in [(left, right, "pred holds 255"),
                              (left > 0, left, "true holds 255"),
                              (np.where(left > 0, 0.9, 0.1), left > 0, "pred holds 0.9")]:
        with pytest.raises(ValueError, match=rf"^{named}, which is no class id of a "
                           r"1-class model \(0 to 1\): give class ids, e\.g\. mask > 0"):
            segmentation_scores(pred, true, 1)
    with pytest.raises(ValueError, match="true holds 255"):  # via the logits' metrics
        segmentation_metrics(jnp.ones((1, 8, 8, 1)), jnp.asarray(left[..., None], jnp.float32))
    # The class ids themselves, and the ignored value where one is given, are scored.
    assert segmentation_scores(left > 0, right > 0, 1)["dice"][0] == 0.0
    assert segmentation_scores(left > 0, left.astype(np.float32) / 255, 1)["dice"][0] == 1.0
    assert segmentation_scores(left > 0, np.where(left > 0, 1, 255), 1,
                               ignore_index=255)["dice"][0] == 1.0
    with pytest.raises(ValueError, match="true holds 4.29497e"):  # before int32 cuts it
        segmentation_scores(np.zeros((1, 1, 1), np.int64), np.full((1, 1, 1), 2**32), 1)
    with pytest.raises(ValueError, match="pred holds 3, .* 3-class model"):
        segmentation_scores(np.full((1, 2, 2), 3), np.zeros((1, 2, 2), int), 3)


def test_a_single_image_or_swapped_arguments_are_named():
    """An (H, W, C) image had given one loss per row of pixels; the loss given last
    failed with an AttributeError about ndarray."""
    logits = np.random.default_rng(0).normal(size=(8, 8, 1)).astype(np.float32)
    masks = (logits > 0).astype(np.float32)
    with pytest.raises(ValueError, match=r"image\[None\]"):
        per_image_loss("bce", logits, masks)
    with pytest.raises(TypeError, match=r"per_image_loss\(loss, logits, masks\)"):
        per_image_loss(logits[None], masks[None], "bce")
