"""Evaluate a trained run: mean Dice, IoU and pixel accuracy at each image's full size.

Masks are predicted as ``experiments.predict`` does (at the trained size, logits
resized back) and scored against the true masks at their original resolution, which
is how Kaggle scored Carvana; the validation Dice printed during training is computed
at the training size and is usually slightly higher. The result is printed and written
as JSON (``RUN_DIR/evaluation-<split>.json`` unless ``--output`` says otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments import common

EXAMPLES = """
python -m experiments.evaluate --checkpoint RUN_DIR                      # its validation split
python -m experiments.evaluate --checkpoint RUN_DIR --data-dir ~/carvana --split all
"""


def parse_args(argv=None):
    p = common.make_parser("experiments.evaluate", __doc__.split("\n\n")[0], EXAMPLES)
    common.add_checkpoint_flags(p)
    p.add_argument("--data-dir", help="dataset folder (default: the run's own data)")
    p.add_argument("--split", choices=("validation", "all"), default="validation",
                   help="the run's validation images (from split.json), or every pair in --data-dir")
    p.add_argument("--output", help="JSON file for the results")
    return p.parse_args(argv)


def select_pairs(args, config):
    """The image/mask pairs to score."""
    import data_pipeline

    run_dir = Path(args.checkpoint)
    data_dir = args.data_dir or config.data_dir or str(data_pipeline.sample_dataset_dir())
    if args.split == "all":
        return data_pipeline.find_pairs(data_dir, skip_bad=config.skip_bad)
    split_file = run_dir / "split.json"
    if not split_file.is_file():
        raise common.UserError(f"{run_dir} has no split.json, so its validation images are "
                               "unknown; pass --data-dir DIR --split all")
    _, val_pairs = data_pipeline.read_split(split_file)
    if args.data_dir:  # the data moved: find the same files, by name, in --data-dir
        by_name = {p.image.name: p for p in data_pipeline.find_pairs(args.data_dir, skip_bad=True)}
        missing = [p.image.name for p in val_pairs if p.image.name not in by_name]
        if missing:
            raise common.UserError(f"--data-dir {args.data_dir} lacks {len(missing)} of the "
                                   f"run's validation images (e.g. {missing[0]})")
        val_pairs = [by_name[p.image.name] for p in val_pairs]
    return val_pairs


def main(argv=None):
    args = parse_args(argv)
    common.start_platform(args.platform)
    import numpy as np
    from tqdm import tqdm

    from experiments import inference

    predictor = inference.Predictor(args.checkpoint, args.epoch, args.batch_size)
    pairs = select_pairs(args, predictor.config)
    scores = {"dice": [], "iou": [], "pixel_accuracy": []}
    results = predictor.predict_files([p.image for p in pairs])
    for pair, (_, _, predicted) in tqdm(zip(pairs, results), total=len(pairs), unit="image"):
        truth = inference.load_mask(pair.mask)
        if predicted.dtype == bool:
            truth = truth > 0
        if truth.shape != predicted.shape:
            raise common.UserError(f"{pair.mask}: mask is {truth.shape[1]}x{truth.shape[0]} but "
                                   f"its image is {predicted.shape[1]}x{predicted.shape[0]}")
        for name, value in score(predicted, truth, predictor.config.num_classes).items():
            scores[name].append(value)
    result = {name: float(np.mean(v)) for name, v in scores.items()}
    result.update(images=len(pairs), split=args.split, checkpoint=str(args.checkpoint),
                  epoch=predictor.epoch, image_size=list(predictor.config.image_size))
    out = Path(args.output or Path(args.checkpoint) / f"evaluation-{args.split}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"{len(pairs)} images ({args.split}): Dice {result['dice']:.4f}, IoU {result['iou']:.4f}, "
          f"pixel accuracy {result['pixel_accuracy']:.4f}; written to {out}")
    return 0


def score(predicted, truth, num_classes: int) -> dict:
    """Dice, IoU, pixel accuracy of one full-size mask (same conventions as unet_jax.metrics)."""
    import numpy as np

    classes = [True] if num_classes == 1 else range(1, num_classes)
    dice, iou = [], []
    for c in classes:
        p, t = predicted == c, truth == c
        inter, total = np.logical_and(p, t).sum(), p.sum() + t.sum()
        dice.append(1.0 if total == 0 else 2 * inter / total)
        iou.append(1.0 if total == 0 else inter / (total - inter))
    return {"dice": float(np.mean(dice)), "iou": float(np.mean(iou)),
            "pixel_accuracy": float(np.mean(predicted == truth))}


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.evaluate")
