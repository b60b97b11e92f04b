"""``unet_jax.train_and_evaluate``, the one trainer, called as a library user calls it."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_pipeline
import unet_jax
from unet_jax import checkpoints, configs, rundir
from unet_jax.config import ConfigError

unet_jax.setup_platform("cpu")

TINY = configs.tiny()


def shapes_dir(root, n=24, size=(48, 32), seed=0):
    """images/ + masks/ with three kinds of pixel: background (0), squares (1) and
    discs (2), each image holding one of each, at random places and sizes. The kinds
    differ in shape and tint, so that a tiny model can tell them apart in a few epochs."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image = rng.integers(60, 110, (h, w, 3)).astype(np.float32)
        mask = np.zeros((h, w), np.uint8)
        r = int(rng.integers(5, 8))
        x, y = int(rng.integers(0, w // 2 - 2 * r)), int(rng.integers(r, h - 2 * r))
        mask[y:y + 2 * r, x:x + 2 * r] = 1
        cx, cy = int(rng.integers(w // 2 + r, w - r)), int(rng.integers(r, h - r))
        mask[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 2
        image[mask == 1] = (220, 200, 60)
        image[mask == 2] = (60, 200, 220)
        image += rng.normal(0, 12, image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return data_pipeline.sample_dataset_dir(tmp_path_factory.mktemp("data") / "sample",
                                            num_cars=5, size=(96, 64), seed=3)


def drawings(mp):
    """The epochs whose figures a run draws: patches the loss plot to record them."""
    from unet_jax import report

    drawn, plot_loss = [], report.plot_loss
    mp.setattr(report, "plot_loss", lambda history, path: (
        drawn.append(history[-1]["epoch"]), plot_loss(history, path)))
    return drawn


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "run"
    config = dataclasses.replace(TINY, data_dir=str(data_dir), epochs=2)
    saved, step_losses = [], []  # the metrics each checkpoint is saved with; each step's loss
    save, train_step = checkpoints.save, unet_jax.trainer.train_step

    def recorded_step(*args, **kwargs):
        state, metrics = train_step(*args, **kwargs)
        step_losses.append(metrics["loss"])
        return state, metrics

    with pytest.MonkeyPatch.context() as mp:
        drawn = drawings(mp)
        mp.setattr(checkpoints, "save", lambda *a: (saved.append(a[4]), save(*a))[1])
        mp.setattr(unet_jax.trainer, "train_step", recorded_step)
        summary = unet_jax.train_and_evaluate(config, workdir, log=lambda *a: None)
    return config, workdir, dict(summary, drawn=drawn, saved=saved,
                                 step_losses=np.asarray(step_losses, np.float64))


def test_a_library_run_writes_what_the_cli_does(run):
    config, workdir, summary = run
    # Epochs of a second or two: the figures are drawn once, after the last epoch.
    assert summary["drawn"] == [2]
    assert summary["workdir"] == workdir and [r["epoch"] for r in summary["history"]] == [1, 2]
    # The best epoch; of a tie, the latest, whose checkpoint orbax keeps.
    assert summary["best"] == max(summary["history"], key=lambda r: (r["val_dice"], r["epoch"]))
    assert {"config.json", "split.json", "metrics.csv", "loss.png", "predictions.png",
            "checkpoints", "tensorboard"} <= {p.name for p in workdir.iterdir()}
    assert unet_jax.Config.load(workdir / "config.json") == config
    assert summary["history"][1]["train_loss"] < summary["history"][0]["train_loss"]
    # Checkpoints are ranked by validation Dice, the figure the best one is chosen by,
    # and an epoch's training loss is the mean over every one of its steps, the last too.
    assert summary["saved"] == [{"val_dice": r["val_dice"]} for r in summary["history"]]
    per_epoch = summary["step_losses"].reshape(2, -1)
    np.testing.assert_allclose([r["train_loss"] for r in summary["history"]],
                               per_epoch.mean(axis=1), rtol=1e-6)
    _, _, best_epoch = checkpoints.restore_params(workdir, "best")
    assert best_epoch == summary["best"]["epoch"]


def test_resume_extends_a_run_and_refuses_other_settings(run, tmp_path):
    config, workdir, _ = run
    with pytest.raises(ConfigError, match=r"^--lr 0\.5 differs from the run's 0\.003"):
        unet_jax.train_and_evaluate(dataclasses.replace(config, learning_rate=0.5), workdir,
                                    resume=True, log=lambda *a: None)
    with pytest.raises(ConfigError, match=r"^--skip-bad differs from the run's --no-skip-bad"):
        unet_jax.train_and_evaluate(dataclasses.replace(config, skip_bad=True), workdir,
                                    resume=True, log=lambda *a: None)
    with pytest.raises(rundir.RunDirError, match="already holds a run; pass --resume"):
        unet_jax.train_and_evaluate(config, workdir, log=lambda *a: None)
    with pytest.raises(rundir.RunDirError, match="holds no run"):
        unet_jax.train_and_evaluate(config, tmp_path / "empty", resume=True,
                                    log=lambda *a: None)
    # Resumed with the epochs it has: nothing to train, and nothing rewritten.
    logged, written = [], (workdir / "config.json").stat().st_mtime_ns
    summary = unet_jax.train_and_evaluate(config, workdir, resume=True, log=logged.append)
    assert logged[-1] == (f"{workdir} has already trained 2 epochs; pass a larger "
                          "--epochs to extend it")
    assert len(summary["history"]) == 2
    assert (workdir / "config.json").stat().st_mtime_ns == written
    with pytest.MonkeyPatch.context() as mp:
        drawn = drawings(mp)
        mp.setattr(unet_jax.trainer, "FIGURE_INTERVAL_S", 0)  # every epoch, as a long one
        summary = unet_jax.train_and_evaluate(dataclasses.replace(config, epochs=4), workdir,
                                              resume=True, log=lambda *a: None)
    assert [r["epoch"] for r in summary["history"]] == [1, 2, 3, 4] and drawn == [3, 4]
    assert json.loads((workdir / "config.json").read_text())["epochs"] == 4


def test_a_second_run_in_a_held_directory_is_refused(data_dir, tmp_path):
    workdir = tmp_path / "busy"
    config = dataclasses.replace(TINY, data_dir=str(data_dir), epochs=1)
    with rundir.lock(workdir):
        with pytest.raises(rundir.RunDirError, match="in use by another training run"):
            unet_jax.train_and_evaluate(config, workdir, log=lambda *a: None)
    assert not (workdir / "config.json").exists()


def test_a_resume_removes_the_files_of_a_write_that_never_finished(data_dir, tmp_path):
    """A checkpoint write cut short by a full disk left its folder: it kept the disk
    full, and the resume failed writing config.json with a traceback."""
    workdir = tmp_path / "run"
    config = dataclasses.replace(TINY, data_dir=str(data_dir), epochs=1)
    unet_jax.train_and_evaluate(config, workdir, log=None)
    partial = workdir / "checkpoints" / "2.orbax-checkpoint-tmp-1765000000"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "d").write_bytes(b"half a write")
    # --cache may change on a resume: it is how data is loaded, not what is learned.
    unet_jax.train_and_evaluate(dataclasses.replace(config, epochs=2, cache="none"), workdir,
                                resume=True, log=None)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]


def test_a_failed_resume_changes_nothing(data_dir, tmp_path):
    workdir = tmp_path / "run"
    config = dataclasses.replace(TINY, data_dir=str(data_dir), epochs=1)
    unet_jax.train_and_evaluate(config, workdir, log=lambda *a: None)
    for data in (workdir / "checkpoints" / "1").rglob("*"):
        if data.is_file() and data.parent.name == "d":  # orbax's array data files
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    # Everything but the lock file, which only says who holds the directory now.
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(checkpoints.CheckpointError):
        unet_jax.train_and_evaluate(dataclasses.replace(config, epochs=3), workdir,
                                    resume=True, log=lambda *a: None)
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_a_validation_folder_of_its_own_replaces_the_split(tmp_path, caplog):
    """--val-data-dir (ISIC's, CamVid's, Cityscapes' official validation images): every
    --data-dir image trains, the folder validates; split.json records both folders, so
    that a resume and evaluate find them, and where they moved."""
    from experiments import evaluate
    from tests.data_fixtures import own_dir

    train, val = own_dir(tmp_path / "train", n=8), own_dir(tmp_path / "val", n=4)
    for i, path in enumerate(sorted((val / "images").iterdir())):  # names of their own
        path.rename(path.with_name(f"v{i}.png"))
        (val / "masks" / path.name).rename(val / "masks" / f"v{i}.png")
    workdir = tmp_path / "run"
    config = dataclasses.replace(TINY, data_dir=str(train), val_data_dir=str(val), epochs=1)
    with pytest.raises(data_pipeline.DataError, match="^--val-data-dir .*nowhere: no such"):
        unet_jax.train_and_evaluate(dataclasses.replace(
            config, val_data_dir=str(tmp_path / "nowhere")), tmp_path / "not-run", log=None)
    unet_jax.train_and_evaluate(config, workdir, log=None)
    trained, validated = data_pipeline.read_split(workdir / "split.json")
    assert [p.image for p in trained] == sorted((train / "images").iterdir())
    assert [p.image for p in validated] == sorted((val / "images").iterdir())
    assert [p.mask.parent for p in validated] == [val / "masks"] * 4
    moved = tmp_path / "moved"
    val.rename(moved)
    with pytest.raises(data_pipeline.DataError, match=r"v0\.png \(or its mask\) is not "
                       r"found \(4 missing\); restore the data, give the folder it moved "
                       r"to \(--val-data-dir\)"):
        unet_jax.train_and_evaluate(dataclasses.replace(config, epochs=2), workdir,
                                    resume=True, log=None)
    summary = unet_jax.train_and_evaluate(
        dataclasses.replace(config, epochs=2, val_data_dir=str(moved)), workdir,
        resume=True, log=None)
    assert [row["epoch"] for row in summary["history"]] == [1, 2]
    # Resumed with its --preset alone: the run's own folders, not the sample set's.
    from experiments import train as train_command

    resumed = train_command.build_config(train_command.parse_args(
        ["--preset", "tiny", "--workdir", str(workdir), "--resume", "--epochs", "3"]))
    assert (resumed.data_dir, resumed.val_data_dir) == (str(train), str(moved))
    # Scoring the validation images needs no training folder.
    train.rename(tmp_path / "gone")
    saved = unet_jax.Config.load(workdir / "config.json")
    for split in ("validation", "all"):
        args = evaluate.parse_args(["--checkpoint", str(workdir), "--split", split])
        pairs, folder = evaluate.select_pairs(args, saved)
        assert [p.image for p in pairs] == sorted((moved / "images").iterdir())
        assert folder == str(moved)
    (tmp_path / "gone").rename(train)
    # The training folder given as evaluate's --data-dir: refused, not scored as
    # validation (its img0.png had stood in for the validation folder's).
    args = evaluate.parse_args(["--checkpoint", str(workdir), "--data-dir", str(train)])
    from experiments.common import UserError

    with pytest.raises(UserError, match="is this run's training folder; its validation "):
        evaluate.select_pairs(args, saved)
    # A run that split its data takes no validation folder on a resume: its split.json
    # would name a folder its validation images are not in.
    split_run = tmp_path / "split-run"
    unet_jax.train_and_evaluate(dataclasses.replace(config, val_data_dir=None), split_run,
                                log=None)
    with pytest.raises(ConfigError, match=r"^--val-data-dir .* differs from the run's none"):
        unet_jax.train_and_evaluate(dataclasses.replace(config, epochs=2), split_run,
                                    resume=True, log=None)
    # The same images on both sides are named: validation would flatter the model.
    with caplog.at_level("WARNING"):
        unet_jax.train_and_evaluate(dataclasses.replace(
            config, val_data_dir=str(own_dir(tmp_path / "copies", n=3))), tmp_path / "leak",
            log=None)
    assert "3 of the 3 validation groups (img0...) are in the training images too" in caplog.text


def test_multi_class_trains_every_class(tmp_path):
    """Three classes end to end: the masks keep their ids through the pipeline (a
    pipeline that binarised them would leave class 2 unseen and its Dice at 0), and
    every class is learnt well above what predicting background scores (0 here: each
    validation image holds every class)."""
    data = shapes_dir(tmp_path / "shapes", n=40)
    config = dataclasses.replace(TINY, data_dir=str(data), num_classes=3, base_features=8,
                                 epochs=10, learning_rate=1e-2, split="random",
                                 val_fraction=0.2, loss="bce_dice")
    summary = unet_jax.train_and_evaluate(config, tmp_path / "run", log=lambda *a: None)
    last = summary["history"][-1]
    assert last["val_dice_class1"] > 0.5 and last["val_dice_class2"] > 0.5, last
    assert last["val_dice"] == pytest.approx((last["val_dice_class1"] + last["val_dice_class2"]) / 2)
    # Against the mask files themselves (not the pipeline's view of them), so that a
    # pipeline that binarised the masks, leaving class 2 absent on both sides, fails.
    from unet_jax.inference import Predictor

    split = json.loads((tmp_path / "run" / "split.json").read_text())["validation"]
    found = []
    for path, _, predicted in Predictor(tmp_path / "run").predict_files(split):
        truth = np.asarray(Image.open(data / "masks" / Path(path).name))
        found.append([(predicted[truth == c] == c).mean() for c in (1, 2)])
    assert np.mean(found, axis=0).min() > 0.5, found
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "val_dice_class2" in header and "val_iou_class1" in header


def test_void_pixels_take_no_part_in_training_validation_or_evaluation(tmp_path):
    """Pascal VOC's layout: class ids with a 255 'void' ring around every object. The
    run refuses it without --ignore-index (the ring would be learned as a class);
    with it, validation during training and full-resolution evaluation both give the
    Dice computed here by hand with the ring left out."""
    from unet_jax import evaluation
    from unet_jax.inference import Predictor

    data = shapes_dir(tmp_path / "shapes", n=24)
    for path in (data / "masks").iterdir():
        ids = np.asarray(Image.open(path))
        grown = ids > 0
        for axis in (0, 1):
            grown = grown | np.roll(grown, 1, axis) | np.roll(grown, -1, axis)
        Image.fromarray(np.where(grown & (ids == 0), 255, ids).astype(np.uint8)).save(path)
    config = dataclasses.replace(TINY, data_dir=str(data), num_classes=3, base_features=8,
                                 epochs=3, learning_rate=1e-2, split="random")
    with pytest.raises(data_pipeline.DataError, match="Pascal VOC's 'void' .* pass "
                       "--ignore-index 255"):
        unet_jax.train_and_evaluate(config, tmp_path / "refused", log=None)
    config = dataclasses.replace(config, ignore_index=255)
    summary = unet_jax.train_and_evaluate(config, tmp_path / "run", log=None)
    predictor = Predictor(tmp_path / "run")
    assert predictor.config.ignore_index == 255
    _, pairs = data_pipeline.read_split(tmp_path / "run" / "split.json")
    dices, accuracy = {1: [], 2: []}, []
    for _, _, predicted in predictor.predict_files([p.image for p in pairs]):
        truth = np.asarray(Image.open(pairs[len(accuracy)].mask))
        accuracy.append((predicted == truth)[truth != 255].mean())
        for c in (1, 2):
            hit, true = (predicted == c) & (truth != 255), truth == c
            if hit.any() or true.any():
                dices[c].append(2 * (hit & true).sum() / (hit.sum() + true.sum()))
    by_hand = np.mean([np.mean(dices[c]) for c in (1, 2)])
    scores = evaluation.score(predictor, pairs)
    assert scores["dice"] == pytest.approx(by_hand, abs=1e-6)
    assert scores["pixel_accuracy"] == pytest.approx(np.mean(accuracy), abs=1e-6)
    assert summary["best"]["val_dice"] == pytest.approx(by_hand, abs=1e-4)
    # A mask whose every pixel is void has no score: not 0 (accuracy), not 1 (Dice).
    Image.fromarray(np.full((32, 48), 255, np.uint8)).save(pairs[0].mask)
    scores = evaluation.score(predictor, pairs)
    assert (scores["images"], scores["unlabelled"], scores["skipped"]) == (len(pairs) - 1, 1, 0)
    assert scores["pixel_accuracy"] == pytest.approx(np.mean(accuracy[1:]), abs=1e-6)


def test_group_by_reaches_the_runs_split_and_summary(tmp_path):
    from unet_jax import trainer

    data = shapes_dir(tmp_path / "flat", n=12)
    for i, image in enumerate(sorted((data / "images").iterdir())):  # 4 patients, 3 slices
        for folder in ("images", "masks"):
            (data / folder / image.name).rename(data / folder / f"pt{i % 4}_slice{i}.png")
    config = dataclasses.replace(TINY, data_dir=str(data), group_by=r"^(pt\d)_",
                                 val_fraction=0.25)
    train, val, _ = trainer.build_data(config, tmp_path / "run", resume=False)
    groups = [{p.image.name.split("_")[0] for p in d.pairs} for d in (train, val)]
    assert len(groups[1]) == 1 and not groups[0] & groups[1] and len(val.pairs) == 3
    assert trainer._groups(config, train.pairs, val.pairs) == " (3 / 1 groups)"
    plain = dataclasses.replace(config, group_by="")
    # A run's warnings are its own: an earlier run's in the same process (a notebook)
    # gave this one's near-zero-Dice hint a cause it never printed.
    from data_pipeline import preprocess
    for flag in ("narrow_warned", "clipped_warned", "dark_colour_warned", "extra_band_warned"):
        setattr(preprocess, flag, True)
    train, val, _ = trainer.build_data(plain, tmp_path / "run", resume=False)
    assert trainer._groups(plain, train.pairs, val.pairs) == ""
    assert not any((preprocess.narrow_warned, preprocess.clipped_warned,
                    preprocess.dark_colour_warned, preprocess.extra_band_warned))


def test_a_dice_near_0_at_the_end_gets_a_hint_naming_the_likely_cause(monkeypatch):
    from data_pipeline import preprocess
    from unet_jax import trainer

    def rows(*dice, loss=0.5):
        return [{"epoch": i + 1, "val_dice": d, "train_loss": loss} for i, d in enumerate(dice)]

    monkeypatch.setattr(preprocess, "narrow_warned", False)
    monkeypatch.setattr(preprocess, "clipped_warned", False)
    monkeypatch.setattr(preprocess, "dark_colour_warned", False)
    assert trainer._near_zero_hint(rows(0.3, 0.6), {"epoch": 2, "val_dice": 0.6}) is None
    stayed = trainer._near_zero_hint(rows(0.0, 0.01), {"epoch": 2, "val_dice": 0.01})
    assert stayed.startswith("the validation Dice stayed near 0") and "--epochs" in stayed
    assert "random crops" in stayed
    assert "random crops" not in trainer._near_zero_hint(  # a run on crops already
        rows(0.0, 0.01), {"epoch": 2, "val_dice": 0.01}, cropped=True)
    ended = trainer._near_zero_hint(rows(0.11, 0.0, 0.0), {"epoch": 1, "val_dice": 0.11})
    assert "ended near 0 (the best, 0.1100 at epoch 1, may be a guess" in ended
    monkeypatch.setattr(preprocess, "narrow_warned", True)
    dark = trainer._near_zero_hint(rows(0.0), {"epoch": 1, "val_dice": 0.0})
    assert "--max-value" in dark and "--epochs" not in dark
    # Float images in [0, 1] under --max-value 4095: advised more epochs, not the flag.
    monkeypatch.setattr(preprocess, "clipped_warned", True)
    unfit = trainer._near_zero_hint(rows(0.0), {"epoch": 1, "val_dice": 0.0})
    assert "--max-value does not fit" in unfit and "without --max-value" in unfit
    monkeypatch.setattr(preprocess, "clipped_warned", False)
    # Dark 16-bit colour: --max-value, which refuses colour, is not the way.
    monkeypatch.setattr(preprocess, "dark_colour_warned", True)
    colour = trainer._near_zero_hint(rows(0.0), {"epoch": 1, "val_dice": 0.0})
    assert "16-bit colour images" in colour and "8-bit colour scaled by their range" in colour
    assert "--max-value" not in colour
    monkeypatch.setattr(preprocess, "dark_colour_warned", False)
    # --lr 10: a loss of 7e21 without a NaN was advised more epochs.
    overshot = trainer._near_zero_hint(rows(0.0, 0.0, loss=7e21), {"epoch": 1, "val_dice": 0.0})
    assert "training loss reached 7e+21 (epoch 1)" in overshot and "lower --lr" in overshot


def test_a_mask_value_beyond_the_classes_is_one_line_naming_the_file(tmp_path):
    data = shapes_dir(tmp_path / "shapes", n=8)
    config = dataclasses.replace(TINY, data_dir=str(data), num_classes=2, epochs=1,
                                 split="random")
    with pytest.raises(data_pipeline.DataError, match=r"masks/s\d+\.png holds class 2"):
        unet_jax.train_and_evaluate(config, tmp_path / "run", log=lambda *a: None)


def test_the_readme_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Library use"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "best validation Dice" in out and "car" in out
    assert (tmp_path / "runs" / "tiny" / "metrics.csv").is_file()
