"""User mistakes found by trying the tools as a new user would: each ends in one line
naming the right file or flag (or, for a valid command, works), decided in one place."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import data_pipeline
from data_pipeline import DataError
from experiments import evaluate, predict, train
from experiments.common import UserError
from tests.data_fixtures import box_mask, write_image, write_mask, write_png16_rgb
from tests.test_experiments import TINY, call, read_metrics
import unet_jax
from unet_jax import checkpoints, configs, rundir, trainer
from unet_jax.config import Config, ConfigError


def own_folders(root, n=6, size=(48, 32), mask_value=255):
    for i in range(n):
        write_image(root / "images" / f"img{i}.png", size, seed=i)
        write_mask(root / "masks" / f"img{i}.png", box_mask(size, seed=i), mask_value)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return own_folders(tmp_path_factory.mktemp("own"), n=8)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A tiny run of one epoch, shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    assert call(train.main, ["--data-dir", str(data), "--workdir", str(run_dir),
                             "--epochs", "1", *TINY[:-2]]) == 0
    return run_dir


def last_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "Traceback" not in "\n".join(lines)
    return lines[-1]


# --- Two files of one name --------------------------------------------------------------

def test_predict_refuses_two_images_that_would_share_a_mask_file(run, tmp_path, capsys):
    folder = tmp_path / "in"
    write_image(folder / "e0.png", seed=1)
    write_image(folder / "e0.jpg", seed=2)
    write_image(folder / "e1.png", seed=3)
    out = tmp_path / "out"
    assert call(predict.main, ["--checkpoint", str(run), "--input", str(folder),
                               "--output", str(out)]) == 2
    line = last_line(capsys)
    assert "e0.jpg" in line and "e0.png" in line and "--skip-bad" in line
    assert not out.exists() or not any(out.iterdir())
    assert call(predict.main, ["--checkpoint", str(run), "--input", str(folder),
                               "--output", str(out), "--skip-bad"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["e1_mask.png"]


def test_skip_bad_uses_neither_image_of_a_clash(tmp_path):
    root = own_folders(tmp_path, n=3)
    write_image(root / "images" / "img0.jpg", seed=9)  # img0.png's namesake
    with pytest.raises(DataError, match="img0.jpg and img0.png both claim the name 'img0'; "
                       "rename or remove all but one, or pass --skip-bad to skip such "
                       "pairs \\("):  # its own fix, not also "fix or remove the file"
        data_pipeline.find_pairs(root)
    pairs = data_pipeline.find_pairs(root, skip_bad=True)
    assert [p.image.name for p in pairs] == ["img1.png", "img2.png"]


# --- Class ids --------------------------------------------------------------------------

def test_a_class_id_beyond_num_classes_is_found_in_the_source_mask(tmp_path):
    root = tmp_path / "d"
    for i in range(3):
        write_image(root / "images" / f"img{i}.png", (64, 64), seed=i)
        ids = np.zeros((64, 64), np.uint8)
        ids[8:24, 8:24] = 1 + i % 2
        if i == 1:
            ids[63, 63] = 5  # one pixel: resizing to 32x32 (nearest) drops it
        write_mask(root / "masks" / f"img{i}.png", ids, value=1)
    with pytest.raises(DataError, match=r"img1.png holds class 5 but the model has 3 classes"):
        data_pipeline.find_pairs(root, num_classes=3)
    assert [p.image.name for p in data_pipeline.find_pairs(root, num_classes=3, skip_bad=True)] \
        == ["img0.png", "img2.png"]
    assert len(data_pipeline.find_pairs(root, num_classes=6)) == 3


def test_binary_masks_with_several_classes_advise_num_classes_1(data):
    with pytest.raises(DataError, match=r"holds only 0 and 255, a binary mask, but "
                       r"the model has 2 classes \(--num-classes 2\); train with "
                       r"--num-classes 1"):
        data_pipeline.find_pairs(data, num_classes=2)


def test_train_with_a_bad_class_id_is_one_line(data, tmp_path, capsys):
    assert call(train.main, ["--data-dir", str(data), "--workdir", str(tmp_path / "r"),
                             "--num-classes", "3", *TINY[:-2]]) == 2
    assert "holds only 0 and 255" in last_line(capsys)
    assert not (tmp_path / "r" / "config.json").exists()


def without_image_size(argv: list[str]) -> list[str]:
    """``argv`` less ``--image-size H W``: a run on crops refuses it."""
    i = argv.index("--image-size")
    return argv[:i] + argv[i + 3:]


# --- Sizes --------------------------------------------------------------------------------

def test_a_scale_that_leaves_images_smaller_than_the_crop_is_one_line(data, tmp_path, capsys):
    argv = ["--data-dir", str(data), "--workdir", str(tmp_path / "r"), "--crop", "16",
            "--scale", "0.002", "--base-features", "4", "--depth", "2", "--batch-size", "4"]
    assert call(train.main, argv) == 2
    line = last_line(capsys)
    assert "img0.png is 1x1 (height x width) at --scale 0.002, smaller than --crop 16 16" in line
    assert "raise --scale" in line


def test_an_unused_image_size_does_not_stop_a_deeper_crop_run():
    config = configs.get("default", crop=(64, 64), depth=6)
    assert config.crop == (64, 64) and config.depth == 6
    with pytest.raises(ConfigError, match="--crop"):
        configs.get("default", crop=(48, 48), depth=6)


# --- The run directory's state ------------------------------------------------------------

def test_a_run_that_failed_before_its_first_checkpoint_leaves_its_workdir_free(data, tmp_path,
                                                                              capsys, monkeypatch):
    import unet_jax.trainer as lib

    real_step = lib.train_step
    monkeypatch.setattr(lib, "train_step", lambda state, batch, loss="bce": (
        lambda out: (out[0], {**out[1], "loss": out[1]["loss"] * float("nan")}))(
            real_step(state, batch, loss=loss)))
    argv = ["--data-dir", str(data), "--workdir", str(tmp_path / "w"), "--epochs", "1",
            *TINY[:-2]]
    assert call(train.main, argv + ["--lr", "1e6"]) == 2
    assert "no checkpoint was written" in last_line(capsys)
    monkeypatch.setattr(lib, "train_step", real_step)
    assert call(train.main, argv + ["--resume"]) == 2
    assert "holds no checkpoint (its run stopped before finishing an epoch); drop --resume" \
        in last_line(capsys)
    assert call(train.main, argv + ["--lr", "1e-3"]) == 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "w")] == ["1"]


def test_metrics_csv_comes_after_the_first_checkpoint(data, tmp_path, monkeypatch):
    """metrics.csv marks finished work a new run may not overwrite. Written while the
    first checkpoint was still being saved, a run killed then left a directory that
    could neither resume (no checkpoint) nor start again (metrics.csv)."""
    real_write, committed = rundir.write_text_atomic, []

    def write(path, text):
        if Path(path).name == "metrics.csv":
            committed.append(rundir.has_checkpoint(Path(path).parent))
        real_write(path, text)

    monkeypatch.setattr(rundir, "write_text_atomic", write)
    # A tiny model's background write ends before metrics.csv is written anyway; a
    # large one's does not: each save here commits a second after it returns.
    import threading
    import time

    import jax
    import numpy as np

    from unet_jax import checkpoints

    real_save, pending = checkpoints.save, []

    def slow_save(manager, epoch, state, progress, metrics):
        if not pending:
            real_wait = manager.wait_until_finished

            def wait():  # orbax's save waits too, from the thread that saves
                for thread in pending:
                    if thread is not threading.current_thread():
                        thread.join()
                real_wait()
            manager.wait_until_finished = wait
        for thread in pending:
            thread.join()
        copied = jax.tree.map(np.asarray, state)  # the next step donates the state
        thread = threading.Thread(target=lambda: (
            time.sleep(1), real_save(manager, epoch, copied, progress, metrics)))
        thread.start()
        pending.append(thread)

    monkeypatch.setattr(checkpoints, "save", slow_save)
    argv = ["--data-dir", str(data), "--workdir", str(tmp_path / "w"), "--epochs", "2",
            *TINY[:-2]]
    assert call(train.main, argv) == 0
    assert committed[0] is True and len(committed) == 2
    assert rundir.has_checkpoint(tmp_path / "w") and len(pending) == 2


def test_resume_without_checkpoints_never_overwrites_finished_metrics(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(copy / "checkpoints")
    before = (copy / "metrics.csv").read_text()
    assert call(train.main, ["--workdir", str(copy), "--resume", "--epochs", "2"]) == 2
    assert "has metrics.csv but no checkpoint to resume from" in last_line(capsys)
    assert call(train.main, ["--workdir", str(copy), *TINY[:-2]]) == 2
    line = last_line(capsys)  # not "pass --resume", which was just refused
    assert line.endswith(f"--workdir {copy} already holds a run; choose another --workdir")
    assert (copy / "metrics.csv").read_text() == before


def test_resume_accepts_the_preset_of_the_first_command(tmp_path):
    workdir = tmp_path / "w"
    (workdir / "checkpoints" / "1").mkdir(parents=True)
    (workdir / "config.json").write_text(configs.tiny().to_json())
    args = train.parse_args(["--preset", "tiny", "--workdir", str(workdir), "--resume",
                             "--epochs", "3"])
    config = train.build_config(args)
    assert config.epochs == 3
    trainer.check_run_dir(config, workdir, resume=True)  # does not raise
    args = train.parse_args(["--preset", "default", "--workdir", str(workdir), "--resume"])
    with pytest.raises(UserError, match="--preset default sets --base-features 8"):
        train.build_config(args)
    args = train.parse_args(["--workdir", str(workdir), "--resume", "--lr", "0.5"])
    with pytest.raises(ConfigError, match="differs from the run's"):
        trainer.check_run_dir(train.build_config(args), workdir, resume=True)


def test_a_refused_run_directory_is_left_as_it_was(data, tmp_path):
    """Refused before the lock is taken: no .lock in the user's folder, and no folders
    made on the way to a run that does not exist."""
    config = configs.tiny()
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(rundir.RunDirError, match="holds files that are not a run's"):
        trainer.train_and_evaluate(config, data)
    assert sorted(p.name for p in data.iterdir()) == before
    with pytest.raises(rundir.RunDirError, match="holds no run"):
        trainer.train_and_evaluate(config, tmp_path / "a" / "b", resume=True)
    assert not (tmp_path / "a").exists()


def test_run_dir_states_on_disk(tmp_path):
    empty = tmp_path / "empty"
    rundir.check_start(empty, resume=False)
    with pytest.raises(rundir.RunDirError, match="holds no run"):
        rundir.check_start(empty, resume=True)
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints" / "1.orbax-checkpoint-tmp-5").mkdir(parents=True)
    (stopped / "config.json").write_text("{}")
    rundir.check_start(stopped, resume=False)  # an unfinished save is no checkpoint
    done = tmp_path / "done"
    (done / "checkpoints" / "2").mkdir(parents=True)
    with pytest.raises(rundir.RunDirError, match="already holds a run"):
        rundir.check_start(done, resume=False)


# --- Checkpoints that do not fit the settings ---------------------------------------------

def test_a_checkpoint_of_other_settings_is_named_as_such_not_as_damage(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
    settings = json.loads((copy / "config.json").read_text())
    settings["base_features"] = 8
    (copy / "config.json").write_text(json.dumps(settings))
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.restore_params(copy)
    text = str(e.value)
    assert "does not fit the run's settings" in text and "damaged" not in text
    assert "trained with --base-features 4; config.json says --base-features 8" in text
    assert call(train.main, ["--workdir", str(copy), "--resume", "--epochs", "2"]) == 2
    line = last_line(capsys)
    assert "does not fit the run's settings" in line and "--base-features 4" in line
    assert not (copy / "checkpoints" / checkpoints.DAMAGED).exists()


# --- evaluate ---------------------------------------------------------------------------

def test_evaluate_names_a_truncated_mask_in_a_moved_data_dir(run, data, tmp_path, capsys):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    split = json.loads((run / "split.json").read_text())
    stem = split["validation"][0].rsplit("/", 1)[1].rsplit(".", 1)[0]
    mask = moved / "masks" / f"{stem}.png"
    mask.write_bytes(mask.read_bytes()[: mask.stat().st_size // 2])
    out = tmp_path / "r.json"
    argv = ["--checkpoint", str(run), "--data-dir", str(moved), "--output", str(out)]
    assert call(evaluate.main, argv) == 2
    line = last_line(capsys)
    assert str(mask) in line and "lacks" not in line
    assert call(evaluate.main, argv + ["--skip-bad"]) == 0
    result = json.loads(out.read_text())
    assert result["skipped"] == 1 and result["images"] == len(split["validation"]) - 1


def test_evaluate_all_counts_a_wrong_size_mask_it_skips(run, tmp_path):
    root = own_folders(tmp_path / "d", n=3)
    write_mask(root / "masks" / "img2.png", box_mask((40, 32)))
    out = tmp_path / "r.json"
    assert call(evaluate.main, ["--checkpoint", str(run), "--data-dir", str(root), "--split",
                                "all", "--skip-bad", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["images"], result["skipped"]) == (2, 1)


# --- Settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(tversky_alpha=0.7), "--tversky-alpha 0.7 needs --loss tversky"),
    (dict(focal_gamma=1.0, loss="dice"), "--focal-gamma 1.0 needs --loss focal"),
    (dict(overlap=0.99), "--overlap 0.99: give a fraction in [0, 0.75]"),
    (dict(epochs="ten"), "--epochs 'ten': give a whole number"),
    (dict(batch_size=2.5), "--batch-size 2.5: give a whole number"),
    (dict(skip_bad="yes"), "--skip-bad 'yes': give true or false"),
])
def test_settings_that_would_be_ignored_or_misread_are_refused(kwargs, message):
    with pytest.raises(ConfigError) as e:
        Config(**kwargs)
    assert message in str(e.value)


def test_settings_from_text_are_coerced():
    config = Config(overlap="0.3", epochs="3", learning_rate="1e-3")
    assert (config.overlap, config.epochs, config.learning_rate) == (0.3, 3, 1e-3)
    assert Config(tversky_alpha=0.7, loss="tversky").tversky_alpha == 0.7


def test_predict_files_takes_one_path_as_one_file(run, tmp_path):
    from unet_jax.inference import Predictor

    image = tmp_path / "car.png"
    write_image(image, (48, 32), seed=4)
    predictor = Predictor(run)
    for one in (str(image), image):
        [(path, _, mask)] = list(predictor.predict_files(one))
        assert path == image and mask.shape == (32, 48)


def test_arrays_the_predictor_would_misread_are_one_line(run):
    """Pixels are scaled by dtype (uint8 / 255, floats as they are): int32, uint16 or
    0..255 floats gave masks 80% equal to the right ones, without a word."""
    from unet_jax.inference import Predictor

    predictor = Predictor(run)
    image = np.full((32, 48, 3), 200, np.uint8)
    good = predictor.masks([image], [(32, 48)])[0]
    np.testing.assert_array_equal(predictor.masks([image / np.float32(255)], [(32, 48)])[0],
                                  good)
    bad = [([image.astype(np.int32)], [(32, 48)], r"image 0 is int32: give uint8"),
           ([image.astype(np.float32)], [(32, 48)], r"values in \[200, 200\]; float images "
                                                    r"must be in \[0, 1\]"),
           ([image[..., :1]], [(32, 48)], r"shape \(32, 48, 1\); the run takes \(height, "
                                          r"width, 3\)"),
           ([image, image], [(32, 48)], r"2 images but 1 sizes")]
    for inputs, sizes, message in bad:
        with pytest.raises(ValueError, match=message) as e:
            predictor.masks(inputs, sizes)
        assert "\n" not in str(e.value)
    for batch_size in (0, -2, 1.5):
        with pytest.raises(ValueError, match=rf"batch_size {batch_size}: give a whole"):
            Predictor(run, batch_size=batch_size)


def test_library_arguments_that_would_misfire_are_named(run, tmp_path):
    """Library calls get the CLI's care: a wrong argument is named as the argument,
    not blamed on the file (load_image) or left to act wrongly (tile="no" tiles)."""
    from data_pipeline import preprocess
    from unet_jax.inference import Predictor

    image = tmp_path / "car.png"
    write_image(image, (48, 32), seed=4)
    for kwargs, message in [({"in_channels": 4}, r"in_channels 4: 1 \(grayscale\) or 3"),
                            ({"image_size": (0, 48)}, r"image_size \(0, 48\): give \(height, "
                                                      r"width\)"),
                            ({"image_size": 32}, r"image_size 32: give")]:
        with pytest.raises(ValueError, match=message):
            preprocess.load_image(image, **kwargs)
    with pytest.raises(ValueError, match=r"tile 'no': give True"):
        Predictor(run, tile="no")
    with pytest.raises(TypeError, match=r"rng 0 is a number; give a key: jax\.random\.key\(0\)"):
        unet_jax.create_train_state(0, configs.tiny())
    for config in (None, configs.tiny().to_dict()):  # not "has no attribute 'kernels'"
        for make in (unet_jax.init_params, unet_jax.create_train_state):
            with pytest.raises(TypeError, match=r"^config is a (NoneType|dict); give a "
                               r"unet_jax\.Config"):
                make(jax.random.key(0), config)
    with pytest.raises(TypeError, match=r"config is a dict; give a unet_jax.Config"):
        trainer.train_and_evaluate(configs.tiny().to_dict(), tmp_path / "w")
    assert not (tmp_path / "w").exists()
    # A setting changed after the Config was made is checked as one given to it: a
    # notebook's config.epochs = 0 returned best None; image_size = 32 failed in tf.data.
    config = configs.tiny()
    config.epochs = 0
    with pytest.raises(ConfigError, match=r"^--epochs 0: give a whole number of at least 1"):
        trainer.train_and_evaluate(config, tmp_path / "w")
    config = configs.tiny()
    config.image_size = 30
    with pytest.raises(ConfigError, match=r"^--image-size: input size 30x30 \(HxW\) is not"):
        trainer.train_and_evaluate(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_an_image_in_memory_is_predicted_as_its_file_is(run, tmp_path):
    """A notebook holds arrays and Pillow images, not files: predict() reads them by the
    file's rules. masks() was given such an array at its own size and ran the model at
    the wrong scale (Dice 0.86 -> 0.76 on a sample car) without a word."""
    from unet_jax.inference import Predictor

    predictor = Predictor(run)
    path = tmp_path / "car.png"
    write_image(path, (60, 40), seed=5)
    picture = Image.open(path)
    expected = predictor.predict(path)
    assert expected.shape == (40, 60) and expected.dtype == bool
    pixels = np.asarray(picture.convert("RGB"))
    for image in (picture, pixels, pixels / np.float32(255), pixels.astype(np.uint16) * 257):
        np.testing.assert_array_equal(predictor.predict(image), expected)
    [(_, _, mask)] = predictor.predict_files([path])
    np.testing.assert_array_equal(mask, expected)
    # A JPEG Pillow has opened but not loaded: decoding shrank the caller's own image
    # (Pillow's draft) and the mask came at that size, 40x60 for 160x240.
    write_image(tmp_path / "big.jpg", (240, 160), seed=6)
    with Image.open(tmp_path / "big.jpg") as opened:
        mask = predictor.predict(opened)
        assert mask.shape == (160, 240) and opened.size == (240, 160)
        np.testing.assert_array_equal(mask, predictor.predict(np.asarray(opened)))
    # The file itself is decoded at a JPEG's own reduced scale, which a loaded image
    # no longer allows: a few edge pixels may differ.
    assert (mask != predictor.predict(tmp_path / "big.jpg")).mean() < 0.005
    # 16-bit colour, any values: as Pillow reads the same pixels from a 16-bit PNG.
    wide = np.random.default_rng(1).integers(0, 65536, (40, 60, 3)).astype(np.uint16)
    write_png16_rgb(tmp_path / "wide.png", wide)
    np.testing.assert_array_equal(predictor.decode(wide), predictor.decode(tmp_path / "wide.png"))
    for image, message in [
            (pixels[..., :2], r"has shape \(40, 60, 2\): give \(height, width\) or"),
            (pixels > 0, r"is bool: give uint8, 16-bit or float values"),
            # 8-bit values in a wider type: read by its high byte, black (92% of a car's
            # mask called foreground); a normalised tensor: half its pixels clipped.
            (pixels.astype(np.uint16), r"is uint16 colour with values up to \d+: read by "
                                       r"its high byte, as 16-bit colour is, it would be "
                                       r"black; give \.astype\(np\.uint8\)"),
            (pixels / 127.5 - 1, r"holds values from -1 to [\d.]+, normalised: give the "
                                 r"image itself")]:
        with pytest.raises(DataError, match=f"^the in-memory image {message}"):
            predictor.predict(image)
    # What is no image: one line, not an AttributeError eleven frames into Pillow, nor
    # a message holding the file's 17,000 bytes.
    with pytest.raises(DataError, match=r"^an image given as \d+ bytes: give a file path"):
        predictor.predict((tmp_path / "big.jpg").read_bytes())
    with pytest.raises(TypeError, match=r"^an image is a file path, a Pillow image or a "
                       r"numpy array, not a list: pass the images one at a time$"):
        predictor.predict([tmp_path / "big.jpg"])
    np.testing.assert_array_equal(predictor.predict(jnp.asarray(pixels)),
                                  predictor.predict(pixels))  # a JAX array: as numpy's
    # A cubic resize's overshoot, a few values just below 0, is the photo still.
    overshoot = pixels / 255.0
    overshoot[0, :3] = -0.05
    assert predictor.predict(overshoot).shape == pixels.shape[:2]
    with pytest.raises(ValueError, match=r"^image 0 is 40x60, but this run predicts images "
                       r"resized to 32x48: pass decode\(image\), which resizes, or use "
                       r"predict\(image\)$"):
        predictor.masks([pixels], [(40, 60)])
    for size in [(-5, 10), 32, (32.0, 48)]:
        with pytest.raises(ValueError, match=r"^size 0 is .*: give the \(height, width\)"):
            predictor.masks([predictor.decode(pixels)], [size])
    with pytest.raises(DataError, match=f"^{tmp_path} is a folder, not an image: pass the "
                       "image files in it"):
        list(predictor.predict_files([tmp_path]))


def test_a_hand_made_batch_that_does_not_fit_is_one_line():
    """uint8 images went into the U-Net as 0..255 (loss 11 instead of 0.7), and masks
    without a channel axis, or of another size, failed deep inside JAX."""
    from unet_jax import per_image_loss, segmentation_metrics, segmentation_scores

    state = unet_jax.create_train_state(jax.random.key(0), configs.tiny())
    images = np.zeros((2, 32, 48, 3), np.uint8)
    with pytest.raises(TypeError, match=r"^images are uint8: the U-Net takes floats in "
                       r"\[0, 1\]; divide 0\.\.255 values by 255"):
        unet_jax.train_step(state, {"image": images, "mask": np.zeros((2, 32, 48, 1))})
    logits = np.zeros((2, 32, 48, 1), np.float32)
    for masks in (np.zeros((2, 32, 48)), np.zeros((2, 16, 48, 1))):
        for score in (lambda m: per_image_loss("bce", logits, m),
                      lambda m: segmentation_metrics(logits, m)):
            shape = re.escape(str(masks.shape))
            with pytest.raises(ValueError, match=rf"^masks have shape {shape}; logits of "
                               r"shape \(2, 32, 48, 1\) need masks of shape \(2, 32, 48, 1\)"):
                score(masks)
    mask = np.random.default_rng(0).random((2, 32, 48, 1)) > 0.5
    np.testing.assert_allclose(per_image_loss("dice", logits + 1, mask),
                               per_image_loss("dice", logits + 1, mask.astype(np.float32)))
    with pytest.raises(ValueError, match=r"class maps of shapes \(4, 4\) and \(4, 4\)"):
        segmentation_scores(np.ones((4, 4)), np.ones((4, 4)), 1)


@pytest.mark.parametrize("crop", [None, 16])
@pytest.mark.parametrize("mask_value,kind", [(1, "background"), (2, "foreground")])
def test_masks_of_one_value_everywhere_stop_the_run_after_its_first_epoch(
        tmp_path, capsys, mask_value, kind, crop):
    """0/1 masks saved as JPEG read as empty (cut at 128); a 1/2/3 trimap (2 and 3 where
    this writes 2) reads as foreground everywhere. Either way, nothing to learn."""
    for i in range(6):
        write_image(tmp_path / "images" / f"img{i}.png", (48, 32), seed=i)
        mask = box_mask((48, 32), seed=i).astype(np.uint8)
        values = mask * mask_value if kind == "background" else mask + mask_value
        path = tmp_path / "masks" / f"img{i}.{'jpg' if kind == 'background' else 'png'}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(values).save(path, quality=95)
    argv = ["--data-dir", str(tmp_path), "--workdir", str(tmp_path / "w"), "--epochs", "2",
            *(TINY if crop is None else [*without_image_size(TINY), "--crop", str(crop)])]
    assert call(train.main, argv) == 2
    line = last_line(capsys)
    assert f"every training mask read as {kind} at every pixel in epoch 1" in line
    assert str(tmp_path / "masks") in line
    # Masks drawn in their alpha channel read as empty (transparent black) or as
    # foreground everywhere (white, the shape in alpha alone).
    assert "alpha is not read" in line
    assert not (tmp_path / "w" / "metrics.csv").exists()


def test_class_id_masks_without_background_stop_the_run_after_its_first_epoch(
        tmp_path, capsys):
    """Oxford-IIIT Pet trimaps (1 pet, 2 background, 3 border) with --num-classes 4,
    after 3 was refused: trained without a word, its background scored as an object
    (Dice 0.99) in the mean."""
    for i in range(6):
        write_image(tmp_path / "images" / f"img{i}.png", (48, 32), seed=i)
        trimap = 2 - box_mask((48, 32), seed=i).astype(np.uint8)  # 1 pet, 2 background
        trimap[0] = 3
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray(trimap).save(tmp_path / "masks" / f"img{i}.png")
    argv = ["--data-dir", str(tmp_path), "--workdir", str(tmp_path / "w"), "--epochs", "2",
            "--num-classes", "4", *TINY]
    assert call(train.main, argv) == 2
    line = last_line(capsys)
    assert line.endswith("no training mask held class 0 (background) at any pixel in "
                         f"epoch 1: the masks in {tmp_path / 'masks'} hold class ids from "
                         "1 up, and unet-jax learns and scores classes 1..C-1 as the "
                         "objects, 0 as the background; store the background as 0 (a "
                         "trimap's 1 object, 2 background, 3 border need remapping)")
    assert not (tmp_path / "w" / "metrics.csv").exists()


def test_a_missing_run_and_a_hand_edited_setting_are_named_as_such(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match=r"nowhere: no such directory"):
        checkpoints.load_config(tmp_path / "nowhere")
    settings = json.loads(configs.tiny().to_json())
    settings["depth"] = "four"
    (tmp_path / "config.json").write_text(json.dumps(settings))
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"config\.json holds a setting unet-jax refuses \(--depth 'four'"):
        checkpoints.load_config(tmp_path)
