"""Evaluate a trained run: mean Dice, IoU and pixel accuracy at each image's full size.

Masks are predicted as ``experiments.predict`` does (the run's own way, or as
``--tile``, ``--overlap`` and ``--tta`` say) and scored against the true masks at their
original resolution, which is how Kaggle scored Carvana; the validation Dice printed
during training is computed at the training size (or scale) and is usually slightly
higher. The result, with the seconds per image and each image's own scores, is
printed and written as JSON (``RUN_DIR/evaluation-<split>.json``, or
``evaluation-all-<folder>.json`` for all of another data folder than the run's, unless
``--output`` says otherwise); ``--compare`` adds every way of predicting that fits the
run, side by side.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from experiments import common

EXAMPLES = """
python -m experiments.evaluate --checkpoint RUN_DIR                      # its validation split
python -m experiments.evaluate --checkpoint RUN_DIR --data-dir ~/carvana --split all
python -m experiments.evaluate --checkpoint RUN_DIR --compare   # whole/tile x TTA, timed
python -m experiments.evaluate --checkpoint RUN_DIR --thresholds 0.3 0.4 0.5 0.6 0.7
"""


def parse_args(argv=None):
    p = common.make_parser("experiments.evaluate", __doc__.split("\n\n")[0], EXAMPLES)
    common.add_checkpoint_flags(p)
    p.add_argument("--data-dir", help="dataset folder (default: the run's own data; for "
                   "a run with --val-data-dir, its validation folder)")
    p.add_argument("--split", choices=("validation", "all"), default="validation",
                   help="the run's validation images (from split.json), or every pair in --data-dir")
    p.add_argument("--output", help="JSON file for the results")
    p.add_argument("--compare", action="store_true",
                   help="also score every way of predicting that fits the run (resized, "
                   "or whole and tiled, each with and without test-time flips), with the "
                   "time per image, under 'compare' in the JSON")
    p.add_argument("--thresholds", type=float, nargs="+", metavar="P",
                   help="one-class runs: also score these thresholds (from the same "
                   "prediction pass), under 'thresholds' in the JSON, to choose "
                   "predict's --threshold on validation images")
    return p.parse_args(argv)


def select_pairs(args, config):
    """(the image/mask pairs to score, the data folder they are in)."""
    import data_pipeline

    run_dir = Path(args.checkpoint)
    data_dir = (args.data_dir or config.val_data_dir or config.data_dir
                or str(data_pipeline.sample_dataset_dir()))
    if args.split == "all":
        # Unchecked: scoring reads every file anyway, and names a bad one there (or with
        # --skip-bad, skips it and counts it in "skipped").
        return data_pipeline.find_pairs(data_dir, skip_bad=args.skip_bad, check=False), data_dir
    split_file = run_dir / "split.json"
    if not split_file.is_file():
        raise common.UserError(f"{run_dir} has no split.json, so its validation images are "
                               "unknown; pass --data-dir DIR --split all")
    # Moved data is found in --data-dir (data_pipeline.read_split); a file that is there but
    # unreadable is named when it is scored, not taken for missing. A run with a
    # validation set of its own (--val-data-dir) finds it there.
    otherwise = "score every pair of a folder instead (--data-dir DIR --split all)"
    if config.val_data_dir is not None:
        given = args.data_dir and Path(args.data_dir).expanduser().resolve()
        if given and config.data_dir and given == Path(config.data_dir):
            # Images of one name on both sides (img000.png in train/ and val/) would be
            # found there, and training images scored as validation.
            raise common.UserError(
                f"--data-dir {args.data_dir} is this run's training folder; its validation "
                f"images are in {config.val_data_dir}: drop --data-dir (or give the folder "
                "they moved to), or add --split all to score the training folder")
        return data_pipeline.read_split(split_file, otherwise=otherwise,
                                        val_data_dir=args.data_dir, val_flag="--data-dir",
                                        sides=("validation",))[1], data_dir
    return data_pipeline.read_split(split_file, args.data_dir, otherwise=otherwise,
                                    sides=("validation",))[1], data_dir


def ways_to_compare(config, tile_given: bool, overlap, tta_given: str | None,
                    threshold: float | None = None) -> list:
    """The ``PredictionMode``s --compare scores: each way of predicting that fits the
    run (a run trained on crops: whole images and tiles; one trained on resized
    images: resized, and tiles only if --tile asks), each without and with
    test-time flips."""
    from unet_jax.prediction import PredictionMode

    hows = [None]  # the run's own: resized, or whole (tiled beyond the memory budget)
    if config.crop is not None or tile_given:
        hows.append("tile")
    flips = tta_given if tta_given not in (None, "none") else "hflip"
    return [PredictionMode.from_config(config, how, overlap, tta, threshold=threshold)
            for how in hows for tta in ("none", flips)]


def threshold_modes(predictor, thresholds) -> list:
    """The predictor's ``PredictionMode`` with each of ``thresholds`` (--thresholds)."""
    import dataclasses

    from unet_jax.prediction import check_threshold

    for threshold in thresholds or ():
        check_threshold(threshold, predictor.config.num_classes, "--thresholds")
    return [dataclasses.replace(predictor.mode, threshold=float(threshold))
            for threshold in thresholds or ()]


def scores_file(run_dir: Path, name: str, data_dir: str | None) -> Path:
    """``RUN/<name>.json``; for another folder's scores (``data_dir``), the first of
    ``<name>.json``, ``<name>-2.json``, ... that is free or holds that folder's: two
    folders of one name (site_a/test, site_b/test) each keep their own file."""
    for n in itertools.count(1):
        path = run_dir / (f"{name}.json" if n == 1 else f"{name}-{n}.json")
        if data_dir is None or not path.exists():
            return path
        try:
            if json.loads(path.read_text()).get("data_dir") == data_dir:
                return path
        except (OSError, ValueError, AttributeError):  # not our file: leave it be
            pass


def _trained_on(split_file: Path, pairs) -> int:
    """How many of ``pairs`` the run trained on, by its split.json (by path, or by
    file name where the data has moved); 0 where it has none."""
    try:
        train = json.loads(split_file.read_text())["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    paths = {str(Path(p).expanduser().absolute()) for p in train}
    names = {Path(p).name for p in train}
    by_path = sum(str(pair.image.absolute()) in paths for pair in pairs)
    return by_path or sum(pair.image.name in names for pair in pairs)


def check_output(out: Path) -> Path:
    """``--output`` checked before any scoring (``common.check_output_file``): it had
    replaced RUN/config.json, a checkpoint's file or a script with the scores."""
    return common.check_output_file(out, "evaluation.json", _is_evaluation,
                                    "an evaluation's JSON")


def _is_evaluation(path: Path) -> bool:
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(earlier, dict) and {"dice", "checkpoint"} <= earlier.keys()


def main(argv=None):
    args = parse_args(argv)
    common.start_platform(args.platform, args)
    from unet_jax import rundir
    from unet_jax.evaluation import score
    from unet_jax.optim import weights_name

    if args.output:
        check_output(Path(args.output))
    predictor = common.make_predictor(args)
    sweep = threshold_modes(predictor, args.thresholds)  # each checked before any scoring
    pairs, data_dir = select_pairs(args, predictor.config)
    result = score(predictor, pairs, args.skip_bad, sweep)
    trained = _trained_on(Path(args.checkpoint) / "split.json", pairs) if args.split == "all" else 0
    print(f"{result['images']} images ({args.split}"
          f"{f', {trained} of them trained on' if trained else ''}; predicted "
          f"{predictor.describe()}, scored at each image's own size): Dice "
          f"{result['dice']:.4f}, IoU {result['iou']:.4f}, pixel accuracy "
          f"{result['pixel_accuracy']:.4f}, {result['seconds_per_image']:.3f} s/image")
    if result.get("unlabelled"):
        print(f"  {result['unlabelled']} image(s) not scored: every pixel of the mask is "
              f"--ignore-index {predictor.config.ignore_index}")
    if sweep:
        for row in result["thresholds"]:
            print(f"  threshold {row['threshold']:g}: Dice {row['dice']:.4f}, IoU "
                  f"{row['iou']:.4f}")
        best = max(result["thresholds"], key=lambda row: row["dice"])
        if len({row["dice"] for row in result["thresholds"]}) > 1:
            print(f"  best of these by Dice: --threshold {best['threshold']:g}")
        else:  # a tie names no threshold: the model's probabilities do not reach them
            print("  every threshold scores the same Dice: the sweep does not tell them "
                  "apart")
    if args.compare:
        result["compare"] = []
        for mode in ways_to_compare(predictor.config, bool(args.tile), args.overlap,
                                    args.tta, args.threshold):
            predictor.mode = mode
            row = score(predictor, pairs, args.skip_bad)
            del row["per_image"]  # the run's own way's are above
            result["compare"].append(row)
            print(f"  {row['mode']:>6}, tta {row['tta']:<5}: Dice {row['dice']:.4f}, IoU "
                  f"{row['iou']:.4f}, {row['seconds_per_image']:.3f} s/image")
    data_dir = str(Path(data_dir).expanduser().resolve())
    result.update(split=args.split, data_dir=data_dir, checkpoint=str(args.checkpoint),
                  epoch=predictor.epoch,
                  weights=weights_name(predictor.config),
                  image_size=list(predictor.config.image_size),
                  crop=list(predictor.config.crop) if predictor.config.crop else None,
                  scale=predictor.config.scale)
    # The scores first: a run directory that cannot be written still shows them.
    # --split all of another folder than the run's own gets a file of its own: scoring
    # a second dataset does not overwrite the first one's scores. (The validation
    # split is the run's own images wherever they were moved to.)
    import data_pipeline

    own = predictor.config.data_dir or str(data_pipeline.sample_dataset_dir())
    other = args.split == "all" and data_dir != str(Path(own).expanduser().resolve())
    name = f"evaluation-{args.split}" + (f"-{Path(data_dir).name}" if other else "")
    out = Path(args.output) if args.output else scores_file(
        Path(args.checkpoint), name, data_dir if other else None)
    try:
        rundir.write_text_atomic(out, json.dumps(result, indent=2))
    except OSError as e:
        raise common.UserError(f"cannot write {out} ({e.strerror or e}); the scores are "
                               "above; pass --output with a writable path") from None
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.evaluate")
