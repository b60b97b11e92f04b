"""Evaluate a trained run: mean Dice, IoU and pixel accuracy at each image's full size.

Masks are predicted as ``experiments.predict`` does (at the trained size, logits
resized back) and scored against the true masks at their original resolution, which
is how Kaggle scored Carvana; the validation Dice printed during training is computed
at the training size and is usually slightly higher. The result is printed and written
as JSON (``RUN_DIR/evaluation-<split>.json`` unless ``--output`` says otherwise).
"""

from __future__ import annotations

import json
import logging
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
        return data_pipeline.find_pairs(data_dir, skip_bad=args.skip_bad or config.skip_bad)
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

    from data_pipeline import preprocess
    from data_pipeline.errors import DataError
    from unet_jax import rundir
    from unet_jax.inference import Predictor
    from unet_jax.metrics import segmentation_scores

    predictor = Predictor(args.checkpoint, args.epoch, args.batch_size)
    num_classes = predictor.config.num_classes
    pairs = select_pairs(args, predictor.config)
    masks = {p.image: p.mask for p in pairs}
    scores = []
    results = predictor.predict_files([p.image for p in pairs], skip_bad=args.skip_bad)
    # disable=None: a progress bar on terminals only, not in logs or pipes.
    for image, _, predicted in tqdm(results, total=len(pairs), unit="image", disable=None):
        # The true mask by the same rule training reads it with, at its own size.
        try:
            truth = preprocess.load_mask(masks[image], None, num_classes)[..., 0]
        except DataError as e:
            if not args.skip_bad:
                raise
            logging.getLogger(__name__).warning("skipping %s", e)
            continue
        if truth.shape != predicted.shape:
            raise common.UserError(f"{masks[image]}: mask is {truth.shape[1]}x{truth.shape[0]} "
                                   f"but its image is {predicted.shape[1]}x{predicted.shape[0]}")
        scores.append({k: np.asarray(v[0]) for k, v in segmentation_scores(
            predicted[None].astype(np.int32), truth[None].astype(np.int32), num_classes).items()})
    if not scores:
        raise common.UserError("no image could be scored (all were skipped as unreadable)")
    result = {name: float(np.mean([s[name] for s in scores]))
              for name in ("dice", "iou", "pixel_accuracy")}
    if num_classes > 1:  # per class 1..C-1; "dice" and "iou" are their means
        for name in ("dice", "iou"):
            per_class = np.mean([s[f"{name}_per_class"] for s in scores], axis=0)
            result[f"{name}_per_class"] = {str(c): float(v) for c, v in enumerate(per_class, 1)}
    result.update(images=len(scores), skipped=len(pairs) - len(scores), split=args.split,
                  checkpoint=str(args.checkpoint), epoch=predictor.epoch,
                  image_size=list(predictor.config.image_size))
    # The scores first: a run directory that cannot be written still shows them.
    print(f"{len(scores)} images ({args.split}): Dice {result['dice']:.4f}, IoU "
          f"{result['iou']:.4f}, pixel accuracy {result['pixel_accuracy']:.4f}")
    out = Path(args.output or Path(args.checkpoint) / f"evaluation-{args.split}.json")
    try:
        rundir.write_text_atomic(out, json.dumps(result, indent=2))
    except OSError as e:
        raise common.UserError(f"cannot write {out} ({e.strerror or e}); the scores are "
                               "above; pass --output with a writable path") from None
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.evaluate")
