"""Train the U-Net: flags -> ``unet_jax.Config`` -> ``unet_jax.train_and_evaluate``.

With no arguments it trains a narrow U-Net (the guide's topology at an eighth of its
width) on the built-in synthetic sample dataset, on the CPU, in a few minutes;
``--preset full`` is the guide's full-width model. Point ``--data-dir`` at Kaggle's
Carvana download (``train/`` and ``train_masks/``) or at a folder with ``images/`` and
``masks/`` for real work. What the run directory receives is listed in
``unet_jax/trainer.py``.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path

from experiments import common

EXAMPLES = """
python -m experiments.train --platform cpu                    # sample data, CPU, minutes
python -m experiments.train --platform cpu --preset full      # the guide's full width
python -m experiments.train --platform gpu --data-dir ~/carvana --preset seed-gpu
python -m experiments.train --data-dir ~/carvana --preset seed-cpu --epochs 3
python -m experiments.train --workdir runs/my-run --resume --epochs 20   # continue a run
python -m experiments.train --data-dir ~/my-data --preset full --init-from runs/carvana --lr 1e-4
python -m experiments.train --data-dir ~/carvana --preset full --schedule cosine --warmup-epochs 1 --ema 0.999
"""


def parse_args(argv=None):
    from unet_jax import config as config_lib, configs

    p = common.make_parser("experiments.train", __doc__.split("\n\n")[0], EXAMPLES)
    common.add_platform_flag(p)
    p.add_argument("--preset", choices=list(configs.PRESETS),
                   help="named settings (unet_jax/configs.py): default (quick, narrow), full "
                   "(the guide's width), seed-gpu and seed-cpu (the guide's runs), tiny "
                   "(seconds); flags given with it override it")
    p.add_argument("--workdir", help="run directory (default: runs/unet-<date>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --workdir from its newest intact checkpoint; "
                   "flags must equal its settings, except --epochs (and --data-dir and "
                   "--val-data-dir, for data that moved, and --cache)")
    config_lib.add_arguments(p, configs.default())
    common.add_distributed_flags(p)
    return p.parse_args(argv)


def build_config(args):
    """The run's Config: preset < flags. On --resume without --preset, the saved
    settings < flags, so a resume needs no flag but --epochs; the trainer then refuses
    any setting that differs from the run's, except --epochs (repeating the first
    command, preset included, with --resume and more --epochs works)."""
    from unet_jax import checkpoints, config as config_lib, configs, rundir

    given = config_lib.overrides(args)
    if args.resume:
        rundir.check_start(args.workdir, resume=True)
        saved = checkpoints.load_config(args.workdir)
        if not args.preset:
            return dataclasses.replace(saved, **given)
        # The settings a resume may change, and the run's starting weights, are the
        # run's own unless given again (data that moved): its --epochs, not the
        # preset's (a run of 6 epochs resumed with its --preset alone would otherwise
        # stop at the preset's 2), and no preset sets the others.
        for name in (*config_lib.RESUME_MAY_CHANGE, "init_from"):
            given.setdefault(name, getattr(saved, name))
        config = configs.get(args.preset, **given)
        # A setting the preset brings, not a flag the user typed: say so.
        for name in saved.differences(config):
            if name not in given:
                # The run's value came from its own preset or from a flag typed with it.
                add = config_lib.as_flag(name, getattr(saved, name))
                fix = (f"add {add}, or resume with no --preset at all" if add else
                       "resume with the run's own --preset, or with no --preset at all")
                raise common.UserError(
                    f"--preset {args.preset} sets {config_lib.flag(name)} "
                    f"{config_lib.shown(getattr(config, name), name)}, but the run in "
                    f"{args.workdir} has {config_lib.shown(getattr(saved, name), name)}; "
                    f"{fix} (the run's settings come from its config.json)")
        return config
    config = configs.get(args.preset or "default", **given)
    if "image_size" in given and config.crop is not None:
        raise common.UserError(
            "--image-size has no effect with --crop: a run on crops keeps every image at "
            "its own size times --scale; drop --image-size (or --crop, to train on whole "
            "images resized to it)")
    return config


def sample_sized_note(args) -> str | None:
    """A note when a user's data would be trained with the sample set's sizes: the
    default preset (a narrow model at 64x96) fits the built-in set and a first run on
    a laptop, not photographs or scans, and nothing else would say so."""
    from unet_jax import config as config_lib

    given = config_lib.overrides(args)
    if args.resume or args.preset or "data_dir" not in given or {
            "base_features", "image_size", "crop"} & given.keys():
        return None
    return ("note: --data-dir without --preset trains the default preset, sized for the "
            "sample set (the guide's U-Net at an eighth of its width, at 64x96); for your "
            "data choose --preset full or seed-gpu, or --base-features and --image-size")


def kept(workdir) -> str:
    """What a stopped run keeps: every finished epoch, unless a second Ctrl-C cut the
    last one's checkpoint short (metrics.csv lists an epoch no checkpoint holds)."""
    import csv

    saved = max(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())
    try:
        with open(Path(workdir) / "metrics.csv", newline="") as f:
            finished = max((int(row["epoch"]) for row in csv.DictReader(f)), default=0)
    except (OSError, KeyError, ValueError):
        finished = 0
    if finished > saved:
        return (f"epochs up to {saved} are kept (the checkpoint of epoch {finished} was "
                "stopped while it was written; resuming trains it again)")
    return "every finished epoch is kept"


def main(argv=None):
    args = parse_args(argv)
    if args.resume and not args.workdir:
        raise common.UserError("--resume needs --workdir: the run directory to continue")
    config = build_config(args)  # checked before JAX starts: a bad flag costs nothing
    common.start_platform(args.platform, args)
    if note := sample_sized_note(args):
        print(note)

    import unet_jax
    from unet_jax import rundir
    from unet_jax.platform import python_command

    workdir = args.workdir or time.strftime("runs/unet-%Y%m%d-%H%M%S")
    try:
        unet_jax.train_and_evaluate(config, workdir, resume=args.resume)
    except (KeyboardInterrupt, common.Terminated):
        if rundir.has_checkpoint(workdir):  # a path with spaces pastes back as one
            sys.stderr.write(f"{kept(workdir)}; continue with: {python_command()} -m "
                             f"experiments.train --workdir {shlex.quote(str(workdir))} "
                             "--resume\n")
        raise
    return 0


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.train")
