"""``train_and_evaluate``: the guide's training loop, as one function that reads top to bottom.

The guide trains with a loop per epoch: a pass over the training batches (forward,
loss, ``zero_grad``, ``backward``, ``optimizer.step``), a pass over the validation
batches without gradients, the two losses printed and plotted. This function is that
loop, and what a run needs around it: the split kept in ``split.json``, checkpoints
(the last few and the best by validation Dice), ``--resume`` from the newest intact
checkpoint, a stop on a non-finite loss with the last good checkpoint kept, Dice and
IoU per epoch in ``metrics.csv`` and TensorBoard, the guide's loss plot and a figure of
predictions, and data parallelism over every device of every process.

``python -m experiments.train`` is flags -> ``Config`` -> this call; a library user
calls it the same way::

    import unet_jax
    unet_jax.setup_platform("cpu")
    summary = unet_jax.train_and_evaluate(unet_jax.configs.tiny(), "runs/tiny")

The run directory receives::

    config.json      the settings, to reproduce or restore the run
    split.json       the training and validation image files
    checkpoints/     orbax checkpoints: the last epochs and the best by validation Dice
    metrics.csv      one row per epoch, all numbers: train/validation loss, Dice, IoU,
                     the learning rate, ... (a run with --ema scores its averaged weights)
    loss.png         training and validation loss per epoch (the guide's plot)
    predictions.png  validation images, true masks and predicted masks
    tensorboard/     the same metrics as TensorBoard event files
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import shlex
import shutil
import time
from pathlib import Path

import jax
import numpy as np

import data_pipeline
from unet_jax import checkpoints, compile_cache, finetune, optim, parallel, report, rundir
from unet_jax.config import RESUME_MAY_CHANGE, Config, ConfigError, as_flag, flag, shown
from unet_jax.platform import python_command
from unet_jax.prediction import PredictionMode, predict_batch
from unet_jax.train import (create_train_state, eval_step, loss_spec, merge_sums,
                            predict_step, score_logits, train_step)

PREVIEW = 4  # validation images in predictions.png
FIGURE_INTERVAL_S = 30  # loss.png and predictions.png are redrawn at most this often


class TrainingError(RuntimeError):
    """Training stopped on a problem the user can act on (the loss became NaN, ...)."""


def train_and_evaluate(config: Config, workdir, *, resume: bool = False, log=print) -> dict:
    """Trains the U-Net that ``config`` describes, writing the run to ``workdir``.

    With ``resume``, continues the run in ``workdir`` from its newest intact checkpoint;
    ``config`` must then equal the run's saved settings except ``epochs``, which may
    grow. Returns ``{"workdir", "history", "best"}``: the run directory, one dict per
    epoch (the rows of metrics.csv) and the best of them by validation Dice.

    Raises ``ConfigError``, ``data_pipeline.DataError``, ``checkpoints.CheckpointError``,
    ``rundir.RunDirError`` or ``TrainingError`` with one line naming what to fix.
    ``log`` takes each progress line (None: none are shown).

    For the process, as every command does: JAX's persistent compilation cache is
    turned on (``compile_cache``; ``UNET_JAX_COMPILE_CACHE=off`` keeps it off), and
    every compilation of a second or more, the caller's own included, is reported on
    stderr with its time.
    """
    if not isinstance(config, Config):
        raise TypeError(f"config is a {type(config).__name__}; give a unet_jax.Config (from "
                        "a dict: Config.from_dict(settings))")
    # Checked again, as built: a setting changed after the Config was made (a notebook's
    # config.epochs = 0) was never checked, and failed late or not at all.
    config = dataclasses.replace(config)
    workdir = Path(workdir).expanduser()
    is_main = jax.process_index() == 0
    log = log if is_main and log is not None else (lambda *a, **k: None)
    # Settings that cannot work stop here, before anything is written.
    try:
        parallel.check_batch_size(config.batch_size, parallel.make_mesh())
    except ValueError as e:
        raise ConfigError(str(e)) from None

    # A run that stops before it writes anything leaves no folder of its own behind.
    with _removed_if_unused(workdir, is_main):
        # --- Run directory: one training run at a time, and no finished run overwritten.
        # Every process writes the checkpoints; process 0 alone holds the lock. Checked
        # first without it, so that a refused directory is left as it was (no lock file,
        # no folders made); again under it, where no other run can change it meanwhile.
        check_run_dir(config, workdir, resume)
        rundir.check_writable(workdir)
        # Compile once: a later run of the same step loads it (unet_jax/compile_cache.py).
        try:
            compile_cache.enable_default()
        except compile_cache.CompileCacheError as e:
            raise ConfigError(str(e)) from None
        with rundir.lock(workdir) if is_main else contextlib.nullcontext():
            check_run_dir(config, workdir, resume)
            if is_main:
                checkpoints.remove_partial(workdir)
            mesh = parallel.make_mesh()  # one mesh over every device; batches split on axis 0
            train_data, val_data, data_dir = build_data(config, workdir, resume)
            state, manager, history, source_epoch = restore_or_init(
                config, workdir, resume, mesh, log, steps_per_epoch=len(train_data))
            try:
                start_epoch = history[-1]["epoch"] if history else 0
                if start_epoch >= config.epochs:
                    log(f"{workdir} has already trained {start_epoch} epochs; pass a larger "
                        "--epochs to extend it")
                    return {"workdir": workdir, "history": history, "best": _best(history)}
                if is_main:  # only now that the run starts (or resumes) does the directory change
                    write_run_files(config, workdir, train_data.pairs, val_data.pairs,
                                    source_epoch, data_dir)
                log(_summary(config, state, train_data, val_data, data_dir, workdir))
                train_epochs(config, workdir, state, manager, history, train_data, val_data,
                             mesh, log, is_main)
            finally:
                try:
                    manager.wait_until_finished()
                finally:
                    manager.close()
                    if is_main and jax.process_count() == 1:  # a failed write's files
                        checkpoints.remove_partial(workdir)
    best = _best(history)
    log(f"done: best validation Dice {best['val_dice']:.4f} (epoch {best['epoch']}); "
        f"outputs in {workdir}/ (metrics.csv, loss.png, predictions.png, checkpoints/); "
        f"predict with: {python_command()} -m experiments.predict --checkpoint "
        f"{shlex.quote(str(workdir))} --input IMAGE --output DIR")
    hint = _near_zero_hint(history, best, cropped=config.crop is not None)
    if hint:
        log(hint)
    return {"workdir": workdir, "history": history, "best": best}


# A training loss no segmentation loss here reaches while it learns (BCE of a constant
# guess: 0.69; cross-entropy over C classes: ln C; Dice and Tversky: at most 1).
DIVERGED = 10.0


def _near_zero_hint(history: list[dict], best: dict, cropped: bool = False) -> str | None:
    """What to do when the last validation Dice is near 0, or None. A best epoch
    before that may be an untrained model's guess (a little foreground everywhere),
    which predict would use: said too. A run that ``cropped`` already trains on
    random crops, so only more epochs are offered."""
    if not history or history[-1]["val_dice"] >= 0.05:
        return None
    if best["val_dice"] < 0.05:
        what = "the validation Dice stayed near 0"
    else:
        what = (f"the validation Dice ended near 0 (the best, {best['val_dice']:.4f} at "
                f"epoch {best['epoch']}, may be a guess made before learning, and predict "
                "uses it)")
    worst = max(history, key=lambda row: row.get("train_loss", 0.0))
    if worst.get("train_loss", 0.0) > DIVERGED:
        return (f"{what}: the training loss reached {worst['train_loss']:.3g} (epoch "
                f"{worst['epoch']}), so the updates overshoot; start again with a lower "
                "--lr (a tenth, say)")
    if data_pipeline.preprocess.clipped_warned:
        return (f"{what}: a warning above named images that --max-value does not fit "
                "(brighter than it, or floats within [0, 1] that it scales nearly black); "
                "start a new run with the value it advises, or without --max-value")
    if data_pipeline.preprocess.dark_colour_warned:
        return (f"{what}: a warning above named 16-bit colour images that reach the model "
                f"nearly black; {data_pipeline.preprocess.EIGHT_BIT_COLOUR}, and train a "
                "new run on them")
    if data_pipeline.preprocess.narrow_warned:
        return (f"{what}: a warning above named 16-bit or float images that reach the "
                "model nearly black; pass --max-value (e.g. 4095 for 12-bit data) in a "
                "new run")
    crops = ("" if cropped else ", or, with a few dozen images, on many random crops of "
             "each (README: 'A few dozen images')")
    return (f"{what}: the model predicts next to no foreground yet (it starts by "
            f"learning the background, most of every image); train for more --epochs{crops}")


# --- The phases of a run, in the order train_and_evaluate calls them ------------------

def check_run_dir(config: Config, workdir: Path, resume: bool) -> None:
    """Stops before anything is written unless the run may start (or resume) in
    ``workdir`` (``rundir.check_start``); a resumed run keeps its own settings, so
    a ``config`` that differs from its ``config.json`` in more than ``epochs`` and
    ``data_dir`` (the same images, moved: ``build_data`` finds them there) is
    refused, naming the flag."""
    rundir.check_start(workdir, resume)
    if not resume:
        if config.init_from:  # a wrong source stops the run before its data is read
            finetune.check_source(config, workdir)
        return
    config_file = workdir / "config.json"
    saved = Config.load(config_file)
    # Data that moved may be given where it is now; a validation folder may not be
    # added to a run that split its data, nor dropped from one that had it.
    movable = set(RESUME_MAY_CHANGE) - ({"val_data_dir"} if None in (
        saved.val_data_dir, config.val_data_dir) else set())
    changed = [name for name in saved.differences(config) if name not in movable]
    if not changed and saved.epochs != config.epochs and config.schedule in ("cosine", "poly"):
        raise ConfigError(
            f"--epochs {config.epochs} differs from the run's {saved.epochs} in {config_file}: "
            f"its {config.schedule} schedule decays to zero at epoch {saved.epochs}, and more "
            "epochs would raise the rate again; resume with the run's --epochs, or start a "
            "new --workdir")
    if changed:
        name = changed[0]
        new, old = getattr(config, name), getattr(saved, name)
        if isinstance(new, bool):  # --skip-bad against the run's --no-skip-bad
            what = f"{as_flag(name, new)} differs from the run's {as_flag(name, old)}"
        else:
            what = f"{flag(name)} {shown(new, name)} differs from the run's {shown(old, name)}"
        raise ConfigError(
            f"{what} in {config_file}; --resume continues a "
            "run with its own settings (only --epochs, --cache, and --data-dir or "
            "--val-data-dir for data that moved, may change): drop the flag, or start a "
            f"new --workdir (with --init-from {workdir} to go on from its weights with "
            "other settings)")


def build_data(config: Config, workdir: Path, resume: bool):
    """(train pipeline, validation pipeline, data folder). Every file is checked
    before any training (``data_pipeline.find_pairs``); the split is kept in
    split.json, so a resumed run trains and validates on the same images, found in
    ``data_dir`` when it is not the folder the run started from (by path within the
    dataset, or by a file name one image alone bears: ``read_split``)."""
    data_pipeline.preprocess.reset_warnings()  # this run's warnings, for its own hint
    data_dir = config.data_dir or str(data_pipeline.sample_dataset_dir())
    split_file = workdir / "split.json"
    if resume and split_file.is_file():
        saved = Config.load(workdir / "config.json")
        moved = config.data_dir != saved.data_dir
        val_moved = config.val_data_dir != saved.val_data_dir
        train_pairs, val_pairs = data_pipeline.read_split(
            split_file, data_dir if moved else None,
            val_data_dir=config.val_data_dir if val_moved else None)
        if config.group_by:  # for the summary: the file records images, not groups
            train_pairs, val_pairs = (data_pipeline.grouped(pairs, config.group_by)
                                      for pairs in (train_pairs, val_pairs))
    else:
        found = [data_pipeline.find_pairs(folder, skip_bad=config.skip_bad,
                                          num_classes=config.num_classes,
                                          max_value=config.max_value,
                                          ignore_index=config.ignore_index, flag=flag)
                 for folder, flag in ((data_dir, "--data-dir"),
                                      (config.val_data_dir, "--val-data-dir"))
                 if folder is not None]
        if config.val_data_dir is None:
            train_pairs, val_pairs = data_pipeline.split_pairs(
                found[0], method=config.split, val_fraction=config.val_fraction,
                seed=config.seed, subset=config.subset, group_by=config.group_by)
        else:
            train_pairs, val_pairs = data_pipeline.given_split(
                *found, seed=config.seed, subset=config.subset, group_by=config.group_by)
    if config.crop is not None:
        data_pipeline.check_crop_fits(train_pairs + val_pairs, config.crop, config.scale,
                                      2 ** config.depth)
    if not resume:
        for pairs, side in ((train_pairs, "training"), (val_pairs, "validation")):
            data_pipeline.warn_if_all_background(pairs, side, config.num_classes,
                                                 config.ignore_index)
    processes = jax.process_count()
    pipeline_kw = dict(image_size=config.image_size, batch_size=config.batch_size // processes,
                       in_channels=config.in_channels, num_classes=config.num_classes,
                       cache=config.data_cache,
                       shard=(jax.process_index(), processes), crop=config.crop,
                       scale=config.scale, max_value=config.max_value,
                       ignore_index=config.ignore_index)
    train_data = data_pipeline.InputPipeline(train_pairs, train=True, seed=config.seed,
                                             augment=config.augment,
                                             crops_per_image=config.crops_per_image,
                                             **pipeline_kw)
    val_data = data_pipeline.InputPipeline(val_pairs, train=False, **pipeline_kw)
    data_pipeline.check_caches([train_data, val_data])
    return train_data, val_data, data_dir


def restore_or_init(config: Config, workdir: Path, resume: bool, mesh, log,
                    steps_per_epoch: int):
    """(state, checkpoint manager, history, source epoch): a new state from
    ``config.seed`` (with ``config.init_from``, another run's weights, and the epoch
    of that run they are: ``finetune``; else None), or on resume the newest intact
    checkpoint's state and the metrics of its epochs. The learning-rate schedule is
    laid out over ``steps_per_epoch`` updates per epoch."""
    state = create_train_state(jax.random.key(config.seed), config,
                               steps_per_epoch=steps_per_epoch)
    source_epoch = None
    if config.init_from and not resume:
        state, source_epoch = finetune.start_from(state, config, log)
    state = parallel.replicate(state, mesh)
    manager = checkpoints.checkpoint_manager(workdir, keep=config.keep_checkpoints)
    if not resume:
        return state, manager, [], source_epoch
    try:
        state, progress, epoch, damaged = checkpoints.restore_latest_intact(manager, state, config)
    except BaseException:
        manager.close()
        raise
    skipped = f" (damaged, not used: {', '.join(map(str, damaged))})" if damaged else ""
    log(f"resuming {workdir} from epoch {epoch}{skipped}")
    return state, manager, progress["history"], None


def write_run_files(config: Config, workdir: Path, train_pairs, val_pairs,
                    source_epoch: int | None = None, data_dir=None) -> None:
    """config.json (with the devices the run uses, and the epoch of the
    ``--init-from`` run it started from: ``source_epoch``, kept from the file itself
    on a resume) and split.json, the images this run trains and validates on and the
    dataset they are in (``data_dir``). Both
    are written whenever a run starts or resumes: a new run replaces the files of one
    that stopped before its first checkpoint in the same directory (a resume must read
    this run's split, not that one's), and a resume from data that moved records
    where the images are now."""
    settings = {**config.to_dict(), "device_count": jax.device_count(),
                "process_count": jax.process_count(), "backend": jax.default_backend()}
    if config.init_from and source_epoch is None:  # a resume: as its start recorded it
        with contextlib.suppress(OSError, ValueError, AttributeError):
            source_epoch = json.loads((workdir / "config.json").read_text()).get(
                "init_from_epoch")
    if config.init_from and source_epoch is not None:
        settings["init_from_epoch"] = source_epoch
    rundir.write_text_atomic(workdir / "config.json",
                             json.dumps(settings, indent=2, sort_keys=True))
    data_pipeline.write_split(workdir / "split.json", train_pairs, val_pairs, data_dir,
                              config.val_data_dir)


def train_epochs(config: Config, workdir: Path, state, manager, history: list, train_data,
                 val_data, mesh, log, is_main: bool) -> None:
    """The guide's loop: per epoch, one jitted step per training batch, validation,
    a checkpoint, then the files a person reads. ``history`` grows by one row per
    epoch."""
    from unet_jax.progress import progress

    writer = report.SummaryWriter(workdir / "tensorboard") if is_main else None

    def finite(loss, epoch: int, step: int) -> float:
        value = float(loss)
        if not math.isfinite(value):
            last = manager.latest_step()
            kept = (f"the last good checkpoint (epoch {last}) is intact" if last
                    else "no checkpoint was written")
            raise TrainingError(f"training loss became {value} at epoch {epoch}, step "
                                f"{step}; {kept} in {workdir}; lower --lr (or a raised "
                                "--weight-decay) or check the data")
        return value

    drawn = time.perf_counter()  # when the figures were last drawn (or the loop began)
    try:
        start_epoch = history[-1]["epoch"] if history else 0
        for epoch in range(start_epoch + 1, config.epochs + 1):
            start = time.perf_counter()
            state, rate_scale = set_plateau_rate(config, state, history, log)
            losses, pending = [], None
            labels = [math.inf, -math.inf]  # lowest and highest mask value seen
            bar = progress(train_data.epoch(epoch), len(train_data), unit="batch",
                           desc=f"epoch {epoch}/{config.epochs}", show=is_main, leave=False)
            check = epoch == 1  # whether the masks hold anything to learn
            for batch in bar:
                if check and config.crop is None:
                    low, high = data_pipeline.label_range(batch["mask"], config.ignore_index)
                    labels = [min(labels[0], low), max(labels[1], high)]
                state, metrics = train_step(state, parallel.shard_batch(batch, mesh),
                                            loss=loss_spec(config))
                # Read the previous step's loss, not this one's, so the host never waits
                # for the device and the next batch is dispatched at once.
                if pending is not None:
                    losses.append(finite(pending, epoch, len(losses) + 1))
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
                pending = metrics["loss"]
            losses.append(finite(pending, epoch, len(losses) + 1))
            train_seconds = time.perf_counter() - start
            if check:
                if config.crop is not None:  # crops of a sparse object may all miss it
                    labels = train_data.mask_range()
                check_labels(config, train_data, *labels)

            # --- Validation: no gradients, every validation image once.
            val, (images, masks, logits) = validate(config, state, val_data, mesh)
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)),
                   "val_loss": float(val["loss"]), "val_dice": float(val["dice"]),
                   "val_iou": float(val["iou"]),
                   "val_pixel_accuracy": float(val["pixel_accuracy"])}
            for c, (dice, iou) in enumerate(zip(val.get("dice_per_class", []),
                                                val.get("iou_per_class", [])), start=1):
                row[f"val_dice_class{c}"], row[f"val_iou_class{c}"] = float(dice), float(iou)
            row["learning_rate"] = optim.learning_rate_at(  # of the epoch's last update
                config, int(state.step) - 1, len(train_data), rate_scale)
            row["train_img_per_s"] = len(losses) * config.batch_size / train_seconds
            row["epoch_seconds"] = time.perf_counter() - start
            history.append(row)

            # --- Checkpoint, then the files a person reads.
            checkpoints.save(manager, epoch, state,
                             {"epoch": epoch, "step": int(state.step), "history": history},
                             {"val_dice": row["val_dice"]})
            if not history[:-1]:
                # metrics.csv marks finished work that a new run may not overwrite: it
                # comes after the first checkpoint, so that a run killed while saving
                # that leaves its directory free to start again (later saves overlap).
                manager.wait_until_finished()
            averaged = " (averaged weights)" if config.ema else ""
            log(f"epoch {epoch}: train loss {row['train_loss']:.4f}, validation loss "
                f"{row['val_loss']:.4f}, Dice {row['val_dice']:.4f}, IoU {row['val_iou']:.4f}"
                f"{averaged}, lr {row['learning_rate']:.2g} ({row['epoch_seconds']:.0f} s, "
                f"{row['train_img_per_s']:.1f} img/s)")
            if is_main:
                rundir.write_text_atomic(workdir / "metrics.csv", _csv(history))
                writer.scalars(epoch, {k: v for k, v in row.items() if k != "epoch"})
                # Drawing costs about half a second: after the last epoch and at most
                # every FIGURE_INTERVAL_S, so that short epochs are not spent plotting
                # (the numbers of every epoch are in metrics.csv and TensorBoard).
                if (epoch == config.epochs
                        or time.perf_counter() - drawn >= FIGURE_INTERVAL_S):
                    report.plot_loss(history, workdir / "loss.png")
                    report.plot_predictions(images, masks, logits, workdir / "predictions.png",
                                            ignore_index=config.ignore_index)
                    drawn = time.perf_counter()
    finally:
        if writer is not None:
            writer.close()


def check_labels(config: Config, train_data, low: float, high: float) -> None:
    """Stops a run whose training masks were one value at every pixel of the first
    epoch: nothing to learn, and a run that said nothing would only show Dice 0 (or a
    perfect score) at its end. ``low`` and ``high`` are the lowest and highest mask
    values of this process's batches (for a run on crops, of its whole masks:
    ``InputPipeline.mask_range``); all processes compare the same totals.

    Masks that read as empty are most often 0/1 masks saved as JPEG (cut at 128) or
    masks of the wrong folder; masks that read as all foreground, and class-id masks
    without class 0, masks whose background is not 0, such as the 1/2/3 trimaps of
    the Oxford-IIIT Pet dataset.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        both = np.asarray(multihost_utils.process_allgather(np.array([low, -high])))
        low, high = float(both[..., 0].min()), -float(both[..., 1].min())
    folder = train_data.pairs[0].mask.parent
    if high <= 0:
        raise TrainingError(
            f"every training mask read as background at every pixel in epoch 1: nothing "
            f"to learn; check the masks in {folder} (non-zero pixels are foreground, in "
            "JPEG masks 128 and up: save 0/1 masks as PNG; alpha is not read: a mask "
            "drawn only in its alpha channel needs it copied to the colour channels)")
    if config.num_classes == 1 and low >= 1:
        raise TrainingError(
            f"every training mask read as foreground at every pixel in epoch 1: the masks "
            f"in {folder} have no 0 (background) pixels; store background as 0 (a "
            "trimap's 1/2/3 need remapping; alpha is not read: a mask white everywhere "
            "with its shape in the alpha channel needs the alpha saved as the mask), or "
            "class ids 0..C-1 with --num-classes C")
    if config.num_classes > 1 and low >= 1:
        # Class 0 is the background, left out of the mean Dice and IoU: a background
        # stored as another id would be scored as an object, and class 0 never learned.
        raise TrainingError(
            f"no training mask held class 0 (background) at any pixel in epoch 1: the "
            f"masks in {folder} hold class ids from {low:g} up, and unet-jax learns "
            "and scores classes 1..C-1 as the objects, 0 as the background; store the "
            "background as 0 (a trimap's 1 object, 2 background, 3 border need "
            "remapping)")


def set_plateau_rate(config: Config, state, history: list, log):
    """(state, factor): for ``--schedule plateau``, the state with the factor on its
    rate that the validation Dice of ``history`` call for (``optim.plateau_scale``);
    a resumed run gets the same factor as an uninterrupted one. 1 for other schedules."""
    if config.schedule != "plateau":
        return state, 1.0
    dices = [row["val_dice"] for row in history]
    scale = optim.plateau_scale(dices, config.plateau_patience, config.plateau_factor)
    if history and scale < optim.plateau_scale(dices[:-1], config.plateau_patience,
                                               config.plateau_factor):
        patience = config.plateau_patience
        epochs = "an epoch" if patience == 1 else f"{patience} epochs"
        log(f"validation Dice has not improved for {epochs}: "
            f"learning rate lowered to {config.learning_rate * scale:.2g}")
    return state.replace(opt_state=optim.set_plateau_scale(state.opt_state, scale)), scale


def validate(config: Config, state, val_data, mesh) -> tuple[dict, tuple]:
    """Validation loss and metrics, and (images, masks, logits) of the first
    validation images for the predictions figure. Validation predicts as predict does
    by default (``PredictionMode``), without test-time flips, with the weights the run
    is used by (the average with ``--ema``)."""
    params, val_mode = optim.scored_params(state), validation_mode(config)
    if val_mode.how == "resize":
        sums = [eval_step(params, parallel.shard_batch(batch, mesh), state.apply_fn,
                          loss=loss_spec(config))
                for batch in val_data.epoch(0)]
        batch = next(iter(val_data.epoch(0)))
        logits = predict_step(params, parallel.shard_batch(batch, mesh)["image"],
                              state.apply_fn)
        keep = np.flatnonzero(batch["valid"])[:PREVIEW]
        return merge_sums(jax.device_get(sums)), (
            batch["image"][keep], batch["mask"][keep], parallel.local_rows(logits)[keep])
    # Whole images at the training scale, in one pass or tile by tile, as predict
    # does it. Their sizes differ, so they make no global batch: every device
    # predicts every image, one at a time.
    sums, preview = [], ([], [], [])
    for image, mask in val_data.examples():
        mode = val_mode.resolved(image.shape[:2])
        logits = predict_batch(params, parallel.replicate(image[None], mesh), 1,
                               state.apply_fn, mode, config.batch_size, masks=False)
        mask = mask[None].astype(np.float32)
        sums.append(score_logits(logits, {"mask": mask}, loss_spec(config)))
        if len(preview[0]) < PREVIEW:
            for part, value in zip(preview, (data_pipeline.to_float(image), mask[0],
                                             np.asarray(logits)[0])):
                part.append(value)
    return merge_sums(jax.device_get(sums)), preview


def validation_mode(config: Config) -> PredictionMode:
    """How validation predicts during training: as the run predicts afterwards
    (resized, or whole images at the training scale for a run on crops), without
    test-time flips, whose extra passes would slow every epoch."""
    return PredictionMode.from_config(config, tta="none")


def _summary(config, state, train_data, val_data, data_dir, workdir) -> str:
    """The run's first log line: model size, devices, data and sizes."""
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    val_mode = validation_mode(config)
    if val_mode.how == "resize":
        size = f"images resized to {config.image_size[0]}x{config.image_size[1]} (height x width)"
    else:
        size = (f"crops {shown(config.crop)} (x{config.crops_per_image} per image) of the "
                f"images at scale {config.scale}, validated {val_mode.describe()}")
    return (f"unet-jax: {n_params:,} parameters on {jax.default_backend()} "
            f"({jax.device_count()} device(s), {jax.process_count()} process(es)); "
            f"{len(train_data.pairs)} training / {len(val_data.pairs)} validation images"
            f"{_groups(config, train_data.pairs, val_data.pairs)} from {data_dir}"
            f"{f' and {config.val_data_dir}' if config.val_data_dir else ''}; {size}, "
            f"batch {config.batch_size}; {optim.describe(config)}; "
            f"run directory {workdir}")


def _groups(config, train_pairs, val_pairs) -> str:
    """How many groups (cars) each side of the split holds, when they are not single
    images: the summary shows that a split by group took place."""
    counts = [len({p.car for p in pairs}) for pairs in (train_pairs, val_pairs)]
    if config.split != "car" or counts == [len(train_pairs), len(val_pairs)]:
        return ""
    kaggle = all(p.image.parent.name in ("train", "train_hq") for p in train_pairs)
    what = "cars" if kaggle and not config.group_by else "groups"
    return f" ({counts[0]} / {counts[1]} {what})"


@contextlib.contextmanager
def _removed_if_unused(workdir: Path, is_main: bool):
    """Removes ``workdir`` if this run created it and stops with an error before
    writing anything in it but its lock (a data folder with a typo, a bad mask), so
    that failed starts do not pile up as empty run folders."""
    created = not workdir.exists()
    try:
        yield
    except BaseException:
        unused = created and is_main and workdir.is_dir() and all(
            path.name == ".lock" or (path.is_dir() and not any(path.iterdir()))
            for path in workdir.rglob("*"))
        if unused:
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def _best(history: list[dict]) -> dict | None:
    """The epoch of the best validation Dice; the latest of a tie, the one whose
    checkpoint orbax's BestN keeps and ``checkpoints.restore_params`` restores."""
    return max(history, key=lambda r: (r["val_dice"], r["epoch"])) if history else None


def _csv(history: list[dict]) -> str:
    """metrics.csv from the whole history (rewritten each epoch: no duplicate rows
    after a resume)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()
