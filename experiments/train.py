"""Train the U-Net: the guide's training loop, with checkpoints, resume and metrics.

With no arguments it trains the full-width U-Net on the built-in synthetic sample
dataset on the CPU, at a small image size so that it finishes in minutes. Point
``--data-dir`` at Kaggle's Carvana download (``train/`` and ``train_masks/``) or at a
folder with ``images/`` and ``masks/`` for real work.

The run directory (``--workdir``) receives::

    config.json   the settings (flags and presets resolved), to reproduce or restore
    split.json    the training and validation image files
    checkpoints/  orbax checkpoints: the last epochs and the best by validation Dice
    metrics.csv   one row per epoch: train/validation loss, Dice, IoU, ...
    loss.png      training and validation loss per epoch (the guide's plot)
    predictions.png  validation images, true masks and predicted masks
    tensorboard/  the same metrics as TensorBoard event files
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path

from experiments import common

EXAMPLES = """
python -m experiments.train                                   # sample data, CPU, minutes
python -m experiments.train --platform gpu --data-dir ~/carvana --preset seed-gpu
python -m experiments.train --data-dir ~/carvana --preset seed-cpu --epochs 3
python -m experiments.train --workdir runs/my-run --resume --epochs 20   # continue a run
"""

# The guide's two configurations. Flags given with a preset override it.
PRESETS = {
    # "Hyperparameter Tuning for GPU config": 512x512, batch 32, lr 3e-4, 6 epochs.
    "seed-gpu": dict(image_size=(512, 512), batch_size=32, learning_rate=3e-4, epochs=6,
                     subset=1.0),
    # "Minimal Working Example (MWE-CPU)": 10% of the data, batch 4, 2 epochs, 512x512.
    "seed-cpu": dict(image_size=(512, 512), batch_size=4, learning_rate=3e-4, epochs=2,
                     subset=0.1),
}

# Flags that map one to one onto Config fields.
CONFIG_FLAGS = ("data_dir", "batch_size", "epochs", "learning_rate", "seed", "subset", "split",
                "loss", "dtype", "augment", "cache", "skip_bad", "base_features", "depth",
                "num_classes", "in_channels", "weight_decay", "val_fraction")


def parse_args(argv=None):
    from unet_jax.losses import LOSSES

    p = common.make_parser("experiments.train", __doc__.split("\n\n")[0], EXAMPLES)
    common.add_platform_flag(p)
    p.add_argument("--preset", choices=sorted(PRESETS), help="the guide's GPU or CPU settings")
    p.add_argument("--data-dir", help="Kaggle Carvana layout (train/, train_masks/) or "
                   "images/ + masks/ folders (default: the built-in synthetic sample set)")
    p.add_argument("--image-size", type=int, nargs="+", metavar=("H", "W"),
                   help="size the model trains at; W defaults to H (default: 64 96)")
    p.add_argument("--batch-size", type=int, help="global batch size (default: 8)")
    p.add_argument("--epochs", type=int, help="total epochs (default: 12); on --resume, more extends the run")
    p.add_argument("--lr", dest="learning_rate", type=float, help="AdamW learning rate (default: 3e-4)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0.01, torch's)")
    p.add_argument("--seed", type=int, help="seed for init, split, shuffling (default: 42)")
    p.add_argument("--subset", type=float, help="fraction of the cars to use, e.g. 0.1")
    p.add_argument("--split", choices=("car", "random"),
                   help="validation split: by car (default; no car on both sides) or per image")
    p.add_argument("--val-fraction", type=float, help="validation share (default: 0.2)")
    p.add_argument("--loss", choices=LOSSES, help="bce (the guide's, default), dice or bce_dice")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype; bfloat16 pays off on GPUs (default: float32)")
    p.add_argument("--augment", action="store_true", default=None,
                   help="random flips, shifts/scales, brightness/contrast")
    p.add_argument("--cache", help="'memory' (default), 'none', or a file prefix for data "
                   "larger than memory")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip unreadable or unmatched image/mask pairs instead of stopping")
    p.add_argument("--base-features", type=int, help="U-Net width (default: 64, the guide's)")
    p.add_argument("--depth", type=int, help="U-Net levels (default: 4, the guide's)")
    p.add_argument("--num-classes", type=int, help="output channels (default: 1, binary)")
    p.add_argument("--in-channels", type=int, help="input channels: 3 (RGB, default) or 1")
    p.add_argument("--workdir", help="run directory (default: runs/unet-<date>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --workdir from its latest checkpoint")
    common.add_distributed_flags(p)
    return p.parse_args(argv)


def build_config(args, saved=None):
    """The run's Config: defaults < preset < flags; on resume, the saved config < --epochs."""
    from unet_jax.config import Config

    given = {f: getattr(args, f) for f in CONFIG_FLAGS if getattr(args, f) is not None}
    if args.image_size is not None:
        given["image_size"] = tuple(args.image_size)
    if saved is not None:
        changed = sorted(k for k, v in given.items()
                         if k != "epochs" and v != getattr(saved, k))
        if args.preset or changed:
            what = "--preset" if args.preset else "--" + changed[0].replace("_", "-")
            raise common.UserError(f"{what} differs from the run's config.json; --resume "
                                   "continues a run with its own settings (only --epochs "
                                   "may change): drop the flag or start a new --workdir")
        return dataclasses.replace(saved, **given)
    values = {**PRESETS.get(args.preset, {}), **given}
    config = Config(**values)
    config.image_size = common.image_size(list(config.image_size), config.depth)
    for name in ("batch_size", "epochs", "base_features", "depth", "num_classes"):
        if getattr(config, name) < 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < config.subset <= 1:
        raise common.UserError(f"--subset {config.subset}: give a fraction in (0, 1]")
    if not 0 < config.val_fraction < 1:
        raise common.UserError(f"--val-fraction {config.val_fraction}: give a fraction in (0, 1)")
    if config.in_channels not in (1, 3):
        raise common.UserError("--in-channels must be 1 (grayscale) or 3 (RGB)")
    if not math.isfinite(config.learning_rate) or config.learning_rate <= 0:
        raise common.UserError(f"--lr {config.learning_rate}: give a positive learning rate")
    return config


class NonFiniteLoss(RuntimeError):
    pass


def main(argv=None):
    args = parse_args(argv)

    # --- Platform: before any JAX computation, so --platform gpu fails before work.
    backend = common.start_platform(args.platform, args)

    import jax
    import numpy as np
    from tqdm import tqdm

    import data_pipeline
    from experiments import report
    from unet_jax import checkpoints, parallel
    from unet_jax.config import Config
    from unet_jax.train import create_train_state, eval_step, merge_sums, predict_step, train_step

    # --- Devices: one mesh over all of them; the batch is split along its first axis.
    mesh = parallel.make_mesh()
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)

    # --- Run directory and settings.
    if args.resume:
        if not args.workdir:
            raise common.UserError("--resume needs --workdir: the run directory to continue")
        workdir = Path(args.workdir)
        if not (workdir / "config.json").is_file():
            raise common.UserError(f"--resume: {workdir} holds no run (no config.json); "
                                   "check --workdir, or drop --resume to start a new run")
        config = build_config(args, saved=Config.load(workdir / "config.json"))
    else:
        config = build_config(args)
        workdir = Path(args.workdir or time.strftime("runs/unet-%Y%m%d-%H%M%S"))
        if (workdir / "checkpoints").exists():
            raise common.UserError(f"--workdir {workdir} already holds a run; pass --resume "
                                   "to continue it, or choose another --workdir")

    # --- Input: the files, the split (kept in split.json so a resumed run uses it), the
    # tf.data pipelines. Files are checked here, before any training.
    data_dir = config.data_dir or str(data_pipeline.sample_dataset_dir())
    split_file = workdir / "split.json"
    if args.resume and split_file.is_file():
        train_pairs, val_pairs = data_pipeline.read_split(split_file)
    else:
        pairs = data_pipeline.find_pairs(data_dir, skip_bad=config.skip_bad)
        train_pairs, val_pairs = data_pipeline.split_pairs(
            pairs, method=config.split, val_fraction=config.val_fraction, seed=config.seed,
            subset=config.subset)
    if len(train_pairs) < config.batch_size:
        raise common.UserError(f"--batch-size {config.batch_size} is larger than the "
                               f"{len(train_pairs)} training images; lower it")
    try:
        parallel.check_batch_size(config.batch_size, mesh)
    except ValueError as e:
        raise common.UserError(str(e)) from None
    # Each process reads only its share of every global batch.
    processes = jax.process_count()
    cache = None if config.cache == "none" else config.cache
    common_kw = dict(image_size=config.image_size, batch_size=config.batch_size // processes,
                     in_channels=config.in_channels, cache=cache,
                     shard=(jax.process_index(), processes))
    train_data = data_pipeline.InputPipeline(train_pairs, train=True, seed=config.seed,
                                             augment=config.augment, **common_kw)
    val_data = data_pipeline.InputPipeline(val_pairs, train=False, **common_kw)

    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        settings = {**json.loads(config.to_json()), "device_count": jax.device_count(),
                    "process_count": processes, "backend": backend}
        (workdir / "config.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
        if not split_file.is_file():
            data_pipeline.write_split(split_file, train_pairs, val_pairs)

    # --- Model and optimizer, restored from the latest checkpoint on --resume.
    state = parallel.replicate(create_train_state(jax.random.key(config.seed), config), mesh)
    manager = checkpoints.checkpoint_manager(workdir, keep=config.keep_checkpoints)
    history, start_epoch = [], 0
    if args.resume and manager.latest_step() is not None:
        state, progress = checkpoints.restore_state(manager, state)
        history, start_epoch = progress["history"], progress["epoch"]
    if start_epoch >= config.epochs:
        log(f"{workdir} has already trained {start_epoch} epochs; pass a larger --epochs "
              "to extend it")
        manager.close()
        return 0

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log(f"unet-jax: {n_params:,} parameters on {backend} ({jax.device_count()} device(s), "
        f"{processes} process(es)); "
          f"{len(train_pairs)} training / {len(val_pairs)} validation images from {data_dir}; "
          f"size {config.image_size[0]}x{config.image_size[1]}, batch {config.batch_size}; "
          f"run directory {workdir}")
    writer = report.SummaryWriter(workdir / "tensorboard") if is_main else None

    def evaluate(params):
        sums = [eval_step(params, parallel.shard_batch(batch, mesh), state.apply_fn,
                          loss=config.loss)
                for batch in val_data.epoch(0)]
        return merge_sums(jax.device_get(sums))

    # --- Training loop: the guide's, one jitted step per batch.
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            start = time.perf_counter()
            losses, pending = [], None
            bar = tqdm(train_data.epoch(epoch), total=len(train_data),
                       desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False,
                       disable=not is_main)
            for batch in bar:
                state, metrics = train_step(state, parallel.shard_batch(batch, mesh),
                                            loss=config.loss)
                # Read the previous step's loss, not this one's, so the host never waits
                # for the device and the next batch is dispatched at once.
                if pending is not None:
                    losses.append(_finite(pending, epoch, len(losses) + 1, workdir, manager))
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
                pending = metrics["loss"]
            losses.append(_finite(pending, epoch, len(losses) + 1, workdir, manager))
            train_seconds = time.perf_counter() - start

            val = evaluate(state.params)
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)),
                   "val_loss": val["loss"], "val_dice": val["dice"], "val_iou": val["iou"],
                   "val_pixel_accuracy": val["pixel_accuracy"],
                   "train_img_per_s": len(losses) * config.batch_size / train_seconds,
                   "epoch_seconds": time.perf_counter() - start}
            history.append(row)
            checkpoints.save(manager, epoch, state,
                             {"epoch": epoch, "step": int(state.step), "history": history},
                             {"val_dice": row["val_dice"]})
            log(f"epoch {epoch}: train loss {row['train_loss']:.4f}, validation loss "
                  f"{row['val_loss']:.4f}, Dice {row['val_dice']:.4f}, IoU {row['val_iou']:.4f} "
                  f"({row['epoch_seconds']:.0f} s, {row['train_img_per_s']:.1f} img/s)")
            batch = next(iter(val_data.epoch(0)))
            logits = predict_step(state.params, parallel.shard_batch(batch, mesh)["image"],
                                  state.apply_fn)
            if is_main:
                _write_metrics(workdir / "metrics.csv", history)
                writer.scalars(epoch, {k: v for k, v in row.items() if k != "epoch"})
                report.plot_loss(history, workdir / "loss.png")
                report.plot_predictions(batch["image"], batch["mask"], parallel.local_rows(logits),
                                        workdir / "predictions.png", valid=batch.get("valid"))
    finally:
        manager.wait_until_finished()
        manager.close()
        if writer is not None:
            writer.close()

    best = max(history, key=lambda r: r["val_dice"])
    log(f"done: best validation Dice {best['val_dice']:.4f} (epoch {best['epoch']}); "
          f"outputs in {workdir}/ (metrics.csv, loss.png, predictions.png, checkpoints/); "
          f"predict with: python -m experiments.predict --checkpoint {workdir} --input IMAGE")
    return 0


def _finite(loss, epoch, step, workdir, manager) -> float:
    value = float(loss)
    if not math.isfinite(value):
        last = manager.latest_step()
        kept = f"the last good checkpoint (epoch {last}) is intact" if last else "no checkpoint was written"
        raise common.UserError(f"training loss became {value} at epoch {epoch}, step {step}; "
                               f"{kept} in {workdir}; lower --lr or check the data")
    return value


def _write_metrics(path: Path, history: list[dict]) -> None:
    """Rewrites metrics.csv from the history (also after a resume, without duplicates)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.train")
