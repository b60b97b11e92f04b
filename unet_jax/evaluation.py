"""Scoring a run's masks against the true ones at each image's full size.

This is how Kaggle scored Carvana, and what ``python -m experiments.evaluate`` prints:
the masks predicted as ``inference.Predictor`` makes them (at the image's own size)
against the masks read by the very rule training reads them with
(``preprocess.load_mask``), per image, then averaged (``metrics.means``). The
validation Dice printed during training is computed at the training size (or scale)
and is usually slightly higher.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from data_pipeline import preprocess
from data_pipeline.errors import DataError
from unet_jax.metrics import means, segmentation_scores
from unet_jax.progress import progress

log = logging.getLogger(__name__)


def score(predictor, pairs, skip_bad: bool = False, sweep=()) -> dict:
    """Mean Dice, IoU and pixel accuracy of ``predictor``'s masks (an
    ``inference.Predictor``) for ``pairs`` (``data_pipeline.Pair``) at each image's
    full size, the seconds per image (decoding included), and each image's
    own scores (``per_image``: which images, or which patient, the mean hides).
    With ``sweep`` (the predictor's mode at other thresholds: ``threshold_modes``),
    also the Dice and IoU of each under "thresholds", from the same pass: its logits
    are thresholded on the host, as the device program thresholds them."""
    if not pairs:
        raise DataError("no image/mask pairs to score: give at least one pair")
    num_classes, ignore = predictor.config.num_classes, predictor.config.ignore_index
    masks = {p.image: p.mask for p in pairs}
    scores, scored, unlabelled = [], [], 0
    swept = [(mode.threshold, mode.logit_threshold, []) for mode in sweep]
    sweeping = 0.0  # seconds spent on the other thresholds: not the mode's own time
    start = time.perf_counter()
    paths = [p.image for p in pairs]
    results = predictor.predict_files(paths, skip_bad=skip_bad, logits=bool(swept))
    for image, _, predicted in progress(results, len(pairs), desc=predictor.describe()):
        logits = predicted if swept else None
        if swept:
            predicted = predictor.to_mask(logits)
        try:
            # The true mask by the same rule training reads it with, at its own size.
            truth = preprocess.load_mask(masks[image], None, num_classes,
                                         ignore_index=ignore)[..., 0]
            if truth.shape != predicted.shape:
                raise DataError(f"{masks[image]}: mask is {truth.shape[1]}x{truth.shape[0]} "
                                f"but its image is {predicted.shape[1]}x{predicted.shape[0]}; "
                                "fix or remove the pair")
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{e}, or pass --skip-bad to skip such pairs") from None
            log.warning("skipping %s", e)
            continue
        if ignore is not None and (truth == ignore).all():
            unlabelled += 1  # no pixel to score: no score, rather than 0 or 1
            continue
        scores_of = lambda mask: {k: np.asarray(v[0]) for k, v in segmentation_scores(  # noqa: E731
            mask[None].astype(np.int32), truth[None].astype(np.int32), num_classes,
            ignore).items()}
        scores.append(scores_of(predicted))
        scored.append(str(image))
        began = time.perf_counter()
        for _, logit, rows in swept:
            rows.append(scores_of(predictor.to_mask(logits, logit)))
        sweeping += time.perf_counter() - began
    seconds = time.perf_counter() - start - sweeping
    if not scores:
        raise DataError("no image could be scored (all were skipped as unreadable, or "
                        "all their pixels are --ignore-index's)")
    mean_of = lambda rows: means({"count": len(rows), **{  # noqa: E731
        k: np.sum([s[k] for s in rows], axis=0) for k in rows[0]}})
    averaged = mean_of(scores)
    result = {name: float(averaged[name]) for name in ("dice", "iou", "pixel_accuracy")}
    if num_classes > 1:  # per class 1..C-1, over the images holding it; "dice" and
        for name in ("dice", "iou"):  # "iou" are their means; null: in no image
            result[f"{name}_per_class"] = {str(c): None if np.isnan(v) else float(v)
                                           for c, v in enumerate(averaged[f"{name}_per_class"], 1)}
    mode = predictor.mode
    result.update(mode=mode.how, tta=mode.tta, overlap=mode.overlap, threshold=mode.threshold,
                  seconds_per_image=seconds / len(scores), images=len(scores),
                  skipped=len(pairs) - len(scores) - unlabelled)
    if ignore is not None:
        result["unlabelled"] = unlabelled  # images whose every pixel is ignored
    if swept:
        result["thresholds"] = [{"threshold": threshold, **{
            k: float(v) for k, v in mean_of(rows).items() if k in ("dice", "iou")}}
            for threshold, _, rows in swept]
    result["per_image"] = [{"image": image, **{k: float(s[k]) for k in
                                               ("dice", "iou", "pixel_accuracy")}}
                           for image, s in zip(scored, scores)]
    return result
