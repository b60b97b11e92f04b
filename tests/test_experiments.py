"""The command-line tools end to end, on a tiny synthetic dataset and a narrow U-Net."""

import csv
import gzip
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_pipeline
from experiments import common, evaluate, import_torch, predict, submit, train
from unet_jax import rle
from unet_jax.platform import python_command

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--base-features", "4", "--depth", "2", "--image-size", "32", "48",
        "--batch-size", "4", "--platform", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return data_pipeline.sample_dataset_dir(tmp_path_factory.mktemp("data") / "sample",
                                            num_cars=5, size=(96, 64), seed=3)


def run_cli(module, *args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def call(main, argv):
    """Runs a command's main() in this process, as its __main__ would."""
    with pytest.raises(SystemExit) as exit_info:
        from experiments import common
        common.run(main, argv, prog="test")
    return exit_info.value.code


def random_images(folder, shapes: dict):
    """A folder of random images, file name -> array shape (H, W) or (H, W, 3)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        Image.fromarray(rng.integers(0, 255, shape, np.uint8)).save(folder / name)
    return folder


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    argv = ["--data-dir", str(data_dir), "--workdir", str(run_dir), "--epochs", "2",
            "--lr", "3e-3", *TINY[:-2]]
    assert call(train.main, argv) == 0
    return run_dir


def test_train_writes_everything_a_run_promises(trained_run):
    files = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "split.json", "metrics.csv", "loss.png", "predictions.png",
            "checkpoints", "tensorboard"} <= files
    settings = json.loads((trained_run / "config.json").read_text())
    assert settings["device_count"] >= 1 and settings["image_size"] == [32, 48]
    split = json.loads((trained_run / "split.json").read_text())
    assert set(split) == {"data_dir", "train", "validation"} and split["train"] and split["validation"]
    assert not set(split["train"]) & set(split["validation"])
    rows = read_metrics(trained_run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0])[:5] == ["epoch", "train_loss", "val_loss", "val_dice", "val_iou"]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert any((trained_run / "tensorboard").iterdir())
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["1", "2"]


def test_gpu_without_gpu_is_one_line_and_exit_2(tmp_path):
    result = run_cli("experiments.train", "--platform", "gpu", "--epochs", "1",
                     "--workdir", str(tmp_path / "run"), *TINY[:-2])
    if result.returncode == 0:
        pytest.skip("this machine has a GPU")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--platform gpu" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv,expected", [
    (["--image-size", "30"], "--image-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--subset", "1.5"], "--subset"),
    (["--loss", "hinge"], "--loss"),
    (["--data-dir", "/nonexistent/carvana"], "/nonexistent/carvana"),
    (["--resume"], "--resume needs --workdir"),
])
def test_bad_flags_are_one_clear_line(argv, expected, capsys):
    assert call(train.main, argv + ["--platform", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]


def test_batch_larger_than_the_data_is_named(data_dir, tmp_path, capsys):
    code = call(train.main, ["--data-dir", str(data_dir), "--batch-size", "1000",
                             "--workdir", str(tmp_path / "r"), *TINY[:4]])
    err = capsys.readouterr().err
    assert code == 2 and "no full batch of 1000 (--batch-size)" in err


def test_a_new_run_refuses_to_overwrite_an_old_one(trained_run, capsys):
    assert call(train.main, ["--workdir", str(trained_run)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_refuses_changed_settings(trained_run, capsys):
    assert call(train.main, ["--workdir", str(trained_run), "--resume", "--lr", "1"]) == 2
    err = capsys.readouterr().err
    assert "--lr 1.0 differs from the run's 0.003" in err
    # Going on with another rate is fine-tuning: the way there is named.
    assert err.strip().endswith(f"drop the flag, or start a new --workdir (with --init-from "
                                f"{trained_run} to go on from its weights with other "
                                "settings)")


def test_resume_accepts_the_same_command_repeated(data_dir, tmp_path, capsys):
    """The command a user has in their shell history, with --resume and more epochs:
    --image-size 32 48 equals the saved [32, 48], and --data-dir D/ equals D."""
    run_dir = tmp_path / "run"
    args = ["--data-dir", str(data_dir), "--workdir", str(run_dir), *TINY[:-2]]
    assert call(train.main, args + ["--epochs", "1"]) == 0
    again = ["--data-dir", str(data_dir) + "/", "--workdir", str(run_dir), *TINY[:-2]]
    from unet_jax.train import train_step

    compiled = train_step._cache_size()
    assert call(train.main, again + ["--epochs", "2", "--resume"]) == 0
    assert [r["epoch"] for r in read_metrics(run_dir)] == ["1", "2"]
    # The restored step is placed as a new run's: resuming traced the step twice more.
    assert train_step._cache_size() == compiled
    square = tmp_path / "square"
    base = ["--data-dir", str(data_dir), "--workdir", str(square), "--base-features", "4",
            "--depth", "2", "--batch-size", "4", "--image-size", "32"]
    assert call(train.main, base + ["--epochs", "1"]) == 0
    assert call(train.main, base + ["--epochs", "2", "--resume"]) == 0
    capsys.readouterr()
    assert call(train.main, base[:-1] + ["48", "--epochs", "3", "--resume"]) == 2
    assert "--image-size 48 48 differs from the run's 32 32" in capsys.readouterr().err


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(data_dir, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    base = ["--data-dir", str(data_dir), "--workdir", str(run_dir), *TINY[:-2]]
    assert call(train.main, base + ["--epochs", "1"]) == 0
    before = read_metrics(run_dir)

    import unet_jax.trainer as lib

    real_step = lib.train_step

    def poisoned(state, batch, loss="bce"):
        state, metrics = real_step(state, batch, loss=loss)
        return state, {**metrics, "loss": metrics["loss"] * float("nan")}

    monkeypatch.setattr(lib, "train_step", poisoned)
    assert call(train.main, ["--workdir", str(run_dir), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "became nan" in err and "epoch 1" in err and "intact" in err
    assert read_metrics(run_dir) == before
    monkeypatch.setattr(lib, "train_step", real_step)
    params, _, epoch = __import__("unet_jax.checkpoints", fromlist=["x"]).restore_params(run_dir, "latest")
    assert epoch == 1


def test_killed_run_resumes_to_the_same_metrics(data_dir, tmp_path):
    """SIGKILL mid-run, --resume, and the metrics equal an uninterrupted run's."""
    args = ["--data-dir", str(data_dir), *TINY, "--epochs", "3", "--lr", "3e-3"]
    straight = tmp_path / "straight"  # in this process: its compiled steps are reused below
    assert call(train.main, [*args, "--workdir", str(straight)]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *args,
                             "--workdir", str(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "1" / "commit_success.txt").exists():
        assert proc.poll() is None and time.time() < deadline, "first epoch never finished"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "3").exists()

    assert call(train.main, ["--workdir", str(killed), "--resume", "--platform", "cpu"]) == 0
    a, b = read_metrics(straight), read_metrics(killed)
    assert [r["epoch"] for r in b] == ["1", "2", "3"]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss", "val_dice", "val_iou"):
            np.testing.assert_allclose(float(ra[key]), float(rb[key]), rtol=1e-5, err_msg=key)

    # More epochs on resume extend the run.
    assert call(train.main, ["--workdir", str(killed), "--resume", "--epochs", "4",
                             "--platform", "cpu"]) == 0
    assert [r["epoch"] for r in read_metrics(killed)] == ["1", "2", "3", "4"]


def test_sigterm_unwinds_like_ctrl_c_and_exits_143(capsys):
    """A scheduler's SIGTERM runs the command's cleanups (a checkpoint in flight is
    finished, an unused run folder removed) instead of ending Python mid-write."""
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []

    def main(argv):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the signal's exception ends this
        finally:
            cleaned.append(signal.getsignal(signal.SIGTERM))

    assert call(main, []) == 143
    assert cleaned == [signal.SIG_DFL]  # a second SIGTERM would end it at once
    assert capsys.readouterr().err == "test: terminated\n"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGTERM, 143, "terminated")])
def test_a_signal_that_lands_in_a_finalizer_still_stops_the_command(
        signum, code, said, capsys):
    """Python swallows an exception raised in ``__del__`` or a GC callback ("Exception
    ignored in ..."): a Ctrl-C that arrived while TensorFlow's finalizer ran was lost,
    and the run trained on to the end and exited 0."""
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    finished = []

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signum)  # arrives here, so its exception is swallowed
            time.sleep(0.5)

    def main(argv):
        obj = Finalized()
        del obj
        time.sleep(5)  # the signal delivered again ends this
        finished.append(True)
        return 0

    try:
        assert call(main, []) == code
    finally:
        signal.signal(signal.SIGINT, previous_int)
    assert not finished
    err = capsys.readouterr().err
    assert err.endswith(f"test: {said}\n") and "Exception ignored" not in err


def test_ctrl_c_again_while_python_shuts_down_adds_no_traceback():
    """Users press Ctrl-C twice; the second one landing in JAX's exit callbacks
    printed their traceback under "interrupted"."""
    script = textwrap.dedent("""
        import atexit, os, signal, time
        from experiments import common
        def shut_down():  # as JAX's clean_up: registered at import, run at exit
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        atexit.register(shut_down)
        def main(argv):
            raise KeyboardInterrupt  # the first Ctrl-C
        common.run(main, [], prog="cmd")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stderr) == (130, "cmd: interrupted\n")


def test_running_out_of_memory_or_disk_and_an_ascii_console_are_one_line():
    """Out of memory (numpy, XLA), a full disk, and a console that cannot print a
    path's letters had each ended a command in a traceback, the last after its work."""
    script = textwrap.dedent("""
        import errno, sys
        from experiments import common
        def main(argv):
            print("wrote /tmp/\u00fc")
            if argv[0] == "numpy":
                raise MemoryError("Unable to allocate 279. GiB for an array")
            if argv[0] == "xla":
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 288 bytes.")
            if argv[0] == "tensorstore":
                raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space "
                                 "left on device [os_error_code='28']")
            raise OSError(errno.ENOSPC, "No space left on device", "/run/config.json")
        common.run(main, sys.argv[1:], prog="python -m experiments.train")
    """)
    for case, line in [
            ("numpy", "train: error: out of memory (Unable to allocate 279. GiB); lower "
                      "--batch-size"),
            ("xla", "train: error: out of memory (allocating 288 bytes); lower --batch-size"),
            ("disk", "train: error: cannot write /run/config.json (No space left on device); "
                     "free space on that disk"),
            # TensorStore's full disk (orbax's writes) is RESOURCE_EXHAUSTED too: no
            # "out of memory" for it.
            ("tensorstore", "train: error: cannot write (no space left on device); free "
                            "space on that disk")]:
        result = subprocess.run([sys.executable, "-c", script, case], cwd=ROOT,
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONIOENCODING": "ascii"})
        assert result.returncode == 2 and result.stdout == "wrote /tmp/\\xfc\n"
        assert result.stderr.startswith("python -m experiments." + line) and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_command_stopped_mid_compile_exits_with_its_signal_status(signum, code):
    """Stopped during its first compile, a command died of SIGSEGV (139) as Python
    shut down: JAX's exit freed the compiler's threads while they worked. Here an
    exit callback crashes as that one did; the command itself exits 130 or 143."""
    script = textwrap.dedent(f"""
        import atexit, os, signal, sys
        from experiments import common
        atexit.register(lambda: os.kill(os.getpid(), signal.SIGSEGV))
        def main(argv):
            print("training")
            os.kill(os.getpid(), {int(signum)})
        sys.argv = ["train"]
        common.run(main, prog="cmd")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    said = "interrupted" if signum == signal.SIGINT else "terminated"
    assert (result.returncode, result.stdout, result.stderr) == (
        code, "training\n", f"cmd: {said}\n"), result.stderr[-2000:]


@pytest.mark.parametrize("lands_in", ["the import", "a finalizer"])
def test_ctrl_c_while_jax_first_imports_is_one_line(lands_in):
    """A Ctrl-C in a command's first second or two, while JAX imports, printed the
    import's traceback; or, landing in JAX's GC callback that runs meanwhile, was lost,
    and the run trained to its end. Here it lands in the import of unet_jax.config, or
    in a finalizer run there, as a user's would: run as `python -m experiments.predict`,
    with nothing yet imported."""
    script = textwrap.dedent("""
        import runpy, sys, time

        LANDS_IN = sys.argv[1]

        class Finalizer:
            def __del__(self):
                raise KeyboardInterrupt  # swallowed: "Exception ignored in ..."

        class CtrlC:  # where the signal's exception would be raised: in an import
            def find_spec(self, name, path=None, target=None):
                if name == "unet_jax.config":
                    if LANDS_IN == "the import":
                        raise KeyboardInterrupt
                    Finalizer()
                    time.sleep(2)  # the rest of the import

        sys.meta_path.insert(0, CtrlC())
        sys.argv = ["predict", "--help"]
        runpy.run_module("experiments.predict", run_name="__main__", alter_sys=True)
    """)
    result = subprocess.run([sys.executable, "-c", script, lands_in], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (
        130, "python -m experiments.predict: interrupted\n"), result.stderr[-2000:]


def test_no_command_imports_jax_as_its_module_loads():
    """common.run guards a command's JAX import (the test above); an import at the top
    of a command's module runs before it, where a Ctrl-C prints the import's traceback.
    Every `python -m experiments.X` with a main must leave JAX to run()."""
    commands = sorted(p.stem for p in (ROOT / "experiments").glob("*.py")
                      if "common.run(main" in p.read_text())
    assert {"benchmark", "guide", "train", "predict"} <= set(commands)
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    importlib.import_module('experiments.' + name)\n"
              "    assert 'jax' not in sys.modules, name\n")
    result = subprocess.run([sys.executable, "-c", script, *commands], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_predict_writes_binary_masks_at_each_images_size(trained_run, tmp_path):
    inputs = random_images(tmp_path / "in", {"odd.jpg": (70, 101, 3), "gray.png": (40, 50)})
    out = tmp_path / "out"
    assert call(predict.main, ["--checkpoint", str(trained_run), "--input", str(inputs),
                               "--output", str(out), "--viz"]) == 0
    odd = np.asarray(Image.open(out / "odd_mask.png"))
    gray = np.asarray(Image.open(out / "gray_mask.png"))
    assert odd.shape == (70, 101) and gray.shape == (40, 50)
    assert set(np.unique(odd)) <= {0, 255} and set(np.unique(gray)) <= {0, 255}
    assert (out / "odd_viz.png").is_file() and (out / "gray_viz.png").is_file()


@pytest.mark.parametrize("foreground", ["everywhere", "in part"])
def test_predict_writes_the_models_mask_as_0_and_255(tmp_path, foreground):
    inputs = random_images(tmp_path / "in", {"x.png": (20, 30, 3)})
    run = (multi_class_run(tmp_path / "run", num_classes=1, winner=0)
           if foreground == "everywhere" else varied_run(tmp_path / "run", [inputs / "x.png"]))
    assert call(predict.main, ["--checkpoint", str(run), "--input", str(inputs),
                               "--output", str(tmp_path / "out")]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "x_mask.png"))
    from unet_jax.inference import Predictor
    predictor = Predictor(run)
    [expected] = predictor.masks([predictor.decode(inputs / "x.png")], [(20, 30)])
    assert np.array_equal(written, expected * np.uint8(255))
    assert ((written == 255).all() if foreground == "everywhere"
            else set(np.unique(written)) == {0, 255})


def test_predict_writes_probabilities_the_masks_are_thresholded_from(tmp_path, capsys):
    """--probabilities: a one-class run's sigmoid as 0..255, beside the very mask that
    predict writes without it (over 0.5 where it is foreground); for several classes,
    each class's softmax (it was refused)."""
    inputs = random_images(tmp_path / "in", {"x.png": (20, 30, 3), "y.jpg": (33, 17, 3)})
    run = varied_run(tmp_path / "run", [inputs / "x.png"])
    argv = ["--checkpoint", str(run), "--input", str(inputs), "--output"]
    assert call(predict.main, [*argv, str(tmp_path / "plain")]) == 0
    assert call(predict.main, [*argv, str(tmp_path / "out"), "--probabilities"]) == 0
    assert "and 2 probability map(s) (<name>_prob.png)" in capsys.readouterr().out
    from unet_jax.inference import Predictor
    predictor = Predictor(run)
    for name, size in (("x", (20, 30)), ("y", (33, 17))):
        prob = np.asarray(Image.open(tmp_path / "out" / f"{name}_prob.png"))
        mask = np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png"))
        assert np.array_equal(mask, np.asarray(Image.open(tmp_path / "plain" / f"{name}_mask.png")))
        [logits] = predictor.logits([predictor.decode(inputs / f"{name}.png" if name == "x"
                                                      else inputs / "y.jpg")], [size])
        expected = np.rint(255 / (1 + np.exp(-logits[..., 0].astype(np.float64))))
        assert prob.shape == size and np.abs(prob - expected).max() <= 1
        assert np.array_equal(mask == 255, logits[..., 0] > 0) and 0 < mask.mean() < 255
    # Another threshold: the same probabilities, the mask where they are over it; and
    # evaluate scores it, saying so.
    logits = predictor.logits([predictor.decode(inputs / "x.png")], [(20, 30)])[0][..., 0]
    threshold = round(float(1 / (1 + np.exp(-np.median(logits[logits > 0])))), 4)
    assert call(predict.main, [*argv, str(tmp_path / "high"), "--threshold",
                               str(threshold)]) == 0
    high = np.asarray(Image.open(tmp_path / "high" / "x_mask.png")) == 255
    assert np.array_equal(high, logits > np.log(threshold / (1 - threshold)))
    assert 0 < high.sum() < (logits > 0).sum()
    several = multi_class_run(tmp_path / "run3", num_classes=3, winner=1)
    # Host logits give the device's masks, of its type (to_mask had given int64).
    three = Predictor(several)
    (_, _, logits3), = three.predict_files([inputs / "x.png"], logits=True)
    (_, _, mask3), = three.predict_files([inputs / "x.png"])
    assert three.to_mask(logits3).dtype == mask3.dtype == np.uint8
    assert np.array_equal(three.to_mask(logits3), mask3)
    assert call(predict.main, ["--checkpoint", str(several), "--input", str(inputs),
                               "--output", str(tmp_path / "out3"), "--threshold", "0.7"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--threshold 0.7: a run of 3 classes takes the most probable class at each pixel, "
        "with no threshold; drop --threshold")
    for bad in ("0", "1.5", "nan"):
        assert call(predict.main, [*argv, str(tmp_path / "bad"), "--threshold", bad]) == 2
        assert f"--threshold {bad}: give a probability in (0, 1)" in capsys.readouterr().err
    # Several classes: each class's softmax but the background's, whose most probable
    # class is the mask (the background where neither reaches one minus their sum).
    assert call(predict.main, ["--checkpoint", str(several), "--input", str(inputs),
                               "--output", str(tmp_path / "out3"), "--probabilities"]) == 0
    assert ("and 4 probability map(s) (<name>_prob1.png to <name>_prob2.png)"
            in capsys.readouterr().out)
    for name in ("x", "y"):
        probs = np.stack([np.asarray(Image.open(tmp_path / "out3" / f"{name}_prob{c}.png"),
                                     np.int32) for c in (1, 2)], -1)
        probs = np.concatenate([255 - probs.sum(-1, keepdims=True), probs], -1)
        mask = np.asarray(Image.open(tmp_path / "out3" / f"{name}_mask.png"))
        chosen = np.take_along_axis(probs, mask[..., None].astype(np.int64), -1)[..., 0]
        assert np.all(chosen >= probs.max(-1) - 2)  # within the rounding of 0..255
        assert not (tmp_path / "out3" / f"{name}_prob.png").exists()
    assert predict.is_output(tmp_path / "out3" / "x_prob2.png", tmp_path / "out3")


def test_predict_names_a_missing_checkpoint(tmp_path, capsys):
    code = call(predict.main, ["--checkpoint", str(tmp_path), "--input", str(tmp_path),
                               "--output", str(tmp_path / "o")])
    assert code == 2 and "config.json" in capsys.readouterr().err


def test_a_folder_of_runs_names_the_newest_run(trained_run, tmp_path, capsys):
    """'--checkpoint runs' (train's default parent) said only 'it has no config.json'."""
    code = call(predict.main, ["--checkpoint", str(trained_run.parent), "--input",
                               str(tmp_path), "--output", str(tmp_path / "o")])
    assert code == 2 and capsys.readouterr().err.strip().endswith(
        f"it is a folder of 1 run(s); pass one of them, such as the newest, {trained_run}")


@pytest.mark.parametrize("inside", ["checkpoints", "checkpoints/2", "config.json"])
def test_a_path_inside_a_run_names_the_run(trained_run, tmp_path, capsys, inside):
    code = call(predict.main, ["--checkpoint", str(trained_run / inside), "--input",
                               str(tmp_path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    if inside == "checkpoints/2":  # one checkpoint: the run, and the epoch it is
        assert err.strip().endswith(f"it is checkpoint 2 of the run {trained_run}; pass "
                                    "that, with --epoch 2")
    else:
        assert err.strip().endswith(f"it is inside the run {trained_run}; pass that")


def test_predict_takes_several_inputs_as_a_shell_pattern_gives_them(trained_run, tmp_path,
                                                                    capsys):
    """milesial's `-i a.jpg b.jpg`, or photos/*.jpg, got 'unrecognized arguments' with
    every file name after the first."""
    from tests.data_fixtures import write_image

    for folder in ("a", "b"):
        for name in ("x.png", "y.png"):
            write_image(tmp_path / folder / f"{folder}{name}", (40, 30))
    given = [str(tmp_path / "a" / "ax.png"), str(tmp_path / "a" / "ay.png"),
             str(tmp_path / "b")]
    assert call(predict.main, ["--checkpoint", str(trained_run), "--input", *given,
                               "--output", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "ax_mask.png", "ay_mask.png", "bx_mask.png", "by_mask.png"]
    capsys.readouterr()
    write_image(tmp_path / "b" / "ax.jpg", (40, 30))  # one output name for two images
    assert call(predict.main, ["--checkpoint", str(trained_run), "--input", *given,
                               "--output", str(tmp_path / "o2")]) == 2
    # Files of two folders are each named with their folder.
    assert (f"{tmp_path / 'a' / 'ax.png'} and {tmp_path / 'b' / 'ax.jpg'} both claim the "
            "name 'ax'") in capsys.readouterr().err


def test_a_pytorch_weights_file_as_a_run_names_import_torch(tmp_path, capsys):
    """milesial/Pytorch-UNet users pass their .pth: 'it is a file' said nothing more."""
    (tmp_path / "checkpoint_epoch5.pth").write_bytes(b"PK")
    code = call(predict.main, ["--checkpoint", str(tmp_path / "checkpoint_epoch5.pth"),
                               "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    assert code == 2 and capsys.readouterr().err.strip().endswith(
        "it is a PyTorch weights file; weights the guide's notebook saved become a run "
        "directory with python -m experiments.import_torch")


def test_flags_of_milesial_pytorch_unet_are_answered_with_these(capsys):
    """A pasted milesial command line got 'required: --checkpoint, --input, --output'
    with -m, -i and -o given, or 'unrecognized arguments' with no hint."""
    assert call(predict.main, ["-m", "MODEL.pth", "-i", "a.jpg", "-o", "out.jpg", "-v",
                               "--classes", "2"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "from milesial/Pytorch-UNet: -m is --checkpoint RUN_DIR (the folder a training run "
        "wrote); -i is --input; -o is --output; -v is --viz; --classes has no counterpart: "
        "the class count is the run's (see --help)")
    assert call(train.main, ["--epochs", "5", "--learning-rate", "1e-5", "--validation",
                             "10", "--amp", "--load", "x.pth"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "from milesial/Pytorch-UNet: --learning-rate is --lr; --validation is "
        "--val-fraction, a fraction (10% is 0.1); --amp is --dtype bfloat16; --load is "
        "--resume --workdir RUN (to continue a run) or --init-from RUN (to fine-tune from "
        "its weights) (see --help)")
    assert call(train.main, ["--epoch", "3"]) == 2  # a typo of its own: did you mean
    assert "did you mean --epochs?" in capsys.readouterr().err


def test_image_size_with_crop_is_refused_as_having_no_effect(capsys):
    assert call(train.main, ["--crop", "64", "--image-size", "128"]) == 2
    assert "--image-size has no effect with --crop" in capsys.readouterr().err
    # A preset's image size is not the user's: seed-gpu with --crop trains.
    config = train.build_config(train.parse_args(["--preset", "seed-gpu", "--crop", "512"]))
    assert config.crop == (512, 512)


def test_a_mistyped_flag_gets_the_flag_it_resembles(capsys):
    assert call(train.main, ["--crops-per-imge", "4"]) == 2
    assert "unrecognized arguments: --crops-per-imge 4; did you mean --crops-per-image?" in (
        capsys.readouterr().err)
    # A flag's beginning is not the flag: --epoch (the checkpoint, in predict) was
    # train's --epochs without a word.
    assert call(train.main, ["--epoch", "2"]) == 2
    assert "unrecognized arguments: --epoch 2; did you mean --epochs?" in (
        capsys.readouterr().err)
    # A training setting given to a command that reads the run's own.
    assert call(predict.main, ["--checkpoint", "r", "--input", "i", "--output", "o",
                               "--max-value", "4095"]) == 2
    assert ("unrecognized arguments: --max-value 4095; --max-value is a setting of "
            "training, which this command does not take (the run's own are in its "
            "config.json)") in capsys.readouterr().err
    # predict's --epoch, typed as train's --epochs: the flag it resembles comes first.
    assert call(predict.main, ["--checkpoint", "r", "--input", "i", "--output", "o",
                               "--epochs", "3"]) == 2
    assert "did you mean --epoch?" in capsys.readouterr().err


def test_an_interrupted_run_says_how_to_continue(tmp_path, monkeypatch, capsys):
    import unet_jax

    def interrupted(config, workdir, resume=False):
        (Path(workdir) / "checkpoints" / "1").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(unet_jax, "train_and_evaluate", interrupted)
    run = tmp_path / "my run"  # quoted, so that the line pastes back as one path
    assert call(train.main, [*TINY, "--workdir", str(run)]) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"every finished epoch is kept; continue with: {python_command()} -m experiments.train "
        f"--workdir '{run}' --resume", "test: interrupted"]

    # A second Ctrl-C while the last epoch's checkpoint was written: that epoch is lost.
    def cut_short(config, workdir, resume=False):
        (Path(workdir) / "checkpoints" / "2.orbax-checkpoint-tmp-5").mkdir()
        (Path(workdir) / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n2,0.4\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(unet_jax, "train_and_evaluate", cut_short)
    assert call(train.main, [*TINY, "--workdir", str(run)]) == 130
    assert capsys.readouterr().err.splitlines()[0].startswith(
        "epochs up to 1 are kept (the checkpoint of epoch 2 was stopped while it was "
        "written; resuming trains it again); continue with: ")


def test_evaluate_writes_dice_iou_accuracy(trained_run, data_dir, tmp_path, capsys,
                                          monkeypatch):
    assert call(evaluate.main, ["--checkpoint", str(trained_run)]) == 0
    result = json.loads((trained_run / "evaluation-validation.json").read_text())
    split = json.loads((trained_run / "split.json").read_text())
    assert result["images"] == len(split["validation"])
    # The same Dice, computed here from predict's masks and the mask files by hand.
    from unet_jax.inference import Predictor

    pairs = [(Path(p), Path(p.replace("/train/", "/train_masks/").replace(".jpg", "_mask.gif")))
             for p in split["validation"]]
    predictor = Predictor(trained_run)
    dice = []
    for (image, mask_file), (_, _, predicted) in zip(
            pairs, predictor.predict_files([p for p, _ in pairs])):
        truth = np.asarray(Image.open(mask_file)) == 1  # Kaggle's GIFs: index 1 is the car
        total = predicted.sum() + truth.sum()
        dice.append(1.0 if total == 0 else 2 * (predicted & truth).sum() / total)
    assert result["dice"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert result["threshold"] == 0.5
    # Another threshold is scored as predict thresholds it, and recorded.
    out = tmp_path / "high.json"
    assert call(evaluate.main, ["--checkpoint", str(trained_run), "--threshold", "0.8",
                                "--output", str(out)]) == 0
    high = json.loads(out.read_text())
    assert high["threshold"] == 0.8 and "threshold 0.8" in capsys.readouterr().out
    passes = []
    monkeypatch.setattr(Predictor, "predict_files", lambda self, *a, _f=Predictor.predict_files,
                        **k: passes.append(1) or _f(self, *a, **k))
    assert call(evaluate.main, ["--checkpoint", str(trained_run), "--thresholds", "0.5",
                                "0.8", "--output", str(out)]) == 0
    assert len(passes) == 1  # every threshold from the same logits
    monkeypatch.undo()
    swept = json.loads(out.read_text())["thresholds"]
    assert [row["threshold"] for row in swept] == [0.5, 0.8]
    assert [row["dice"] for row in swept] == [result["dice"], high["dice"]]
    capsys.readouterr()
    # The best threshold is named; thresholds that tie (a model whose probabilities
    # reach none of them: this tiny run's Dice is 0 at both) name none.
    from unet_jax import evaluation

    scored = evaluation.score
    for dice, expected in [((0.1, 0.2), "best of these by Dice: --threshold 0.8"),
                           ((0.0, 0.0), "every threshold scores the same Dice")]:
        monkeypatch.setattr(evaluation, "score", lambda *a, d=dice: {
            **(r := scored(*a)), "thresholds": [{**row, "dice": x} for row, x in zip(
                r.get("thresholds", []), d)]})
        assert call(evaluate.main, ["--checkpoint", str(trained_run), "--thresholds",
                                    "0.5", "0.8", "--output", str(out)]) == 0
        printed = capsys.readouterr().out
        assert expected in printed and printed.count("by Dice") == (dice[0] != dice[1])
    monkeypatch.undo()
    assert call(evaluate.main, ["--checkpoint", str(trained_run), "--thresholds", "0.5",
                                "2", "--output", str(out)]) == 2
    assert "--thresholds 2: give a probability in (0, 1)" in capsys.readouterr().err
    assert high["dice"] == pytest.approx(np.mean([
        1.0 if m.sum() + t.sum() == 0 else 2 * (m & t).sum() / (m.sum() + t.sum())
        for m, t in ((Predictor(trained_run, threshold=0.8).predict(image),
                      np.asarray(Image.open(mask_file)) == 1) for image, mask_file in pairs)]),
        abs=1e-6)
    assert call(evaluate.main, ["--checkpoint", str(trained_run), "--data-dir", str(data_dir),
                                "--split", "all"]) == 0
    result = json.loads((trained_run / "evaluation-all.json").read_text())
    assert result["images"] == 5 * 16 and result["data_dir"] == str(data_dir.resolve())
    per_image = {Path(row["image"]).name: row["dice"] for row in result["per_image"]}
    assert len(per_image) == 80 and np.mean(list(per_image.values())) == pytest.approx(
        result["dice"], abs=1e-6)
    # Another folder gets a file of its own, not the first one's overwritten.
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    assert call(evaluate.main, ["--checkpoint", str(trained_run), "--data-dir", str(other),
                                "--split", "all"]) == 0
    result = json.loads((trained_run / "evaluation-all-other.json").read_text())
    assert result["data_dir"] == str(other.resolve())
    assert json.loads((trained_run / "evaluation-all.json").read_text())["images"] == 80
    # So does another folder of the same name elsewhere; a folder scored again keeps its.
    namesake = tmp_path / "site_b" / "other"
    shutil.copytree(data_dir, namesake)
    for folder in (namesake, other):
        assert call(evaluate.main, ["--checkpoint", str(trained_run), "--data-dir",
                                    str(folder), "--split", "all"]) == 0
    assert {f: json.loads((trained_run / f).read_text())["data_dir"] for f in (
        "evaluation-all-other.json", "evaluation-all-other-2.json")} == {
        "evaluation-all-other.json": str(other.resolve()),
        "evaluation-all-other-2.json": str(namesake.resolve())}
    assert not (trained_run / "evaluation-all-other-3.json").exists()
    # The validation split is the run's own images wherever they were moved to.
    (trained_run / "evaluation-validation.json").unlink()
    assert call(evaluate.main, ["--checkpoint", str(trained_run), "--data-dir", str(other)]) == 0
    assert json.loads((trained_run / "evaluation-validation.json").read_text())[
        "data_dir"] == str(other.resolve())
    assert not list(trained_run.glob("evaluation-validation-*.json"))
    # A folder without the run's images: the error offers --split all.
    (tmp_path / "stranger").mkdir()
    stranger = random_images(tmp_path / "stranger" / "images", {"a.png": (20, 30, 3)})
    shutil.copytree(stranger, tmp_path / "stranger" / "masks")
    capsys.readouterr()
    assert call(evaluate.main, ["--checkpoint", str(trained_run), "--data-dir",
                                str(tmp_path / "stranger")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "or score every pair of a folder instead (--data-dir DIR --split all)")


def test_predict_skips_bad_files_when_asked_and_names_them_otherwise(trained_run, tmp_path,
                                                                     capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 60, 3), 80 * i, np.uint8)).save(inputs / f"ok{i}.png")
    (inputs / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(trained_run), "--input", str(inputs), "--output", str(out)]
    assert call(predict.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.jpg" in err[0]
    assert call(predict.main, argv + ["--skip-bad"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ok0_mask.png", "ok1_mask.png",
                                                     "ok2_mask.png"]
    assert "skipped 1 unreadable" in capsys.readouterr().out


def test_submit_leaves_no_temporary_file_on_failure(trained_run, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(inputs / "a.png")
    (inputs / "b.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "submission.csv"
    argv = ["--checkpoint", str(trained_run), "--input", str(inputs), "--output", str(out)]
    assert call(submit.main, argv) == 2
    assert "b.png" in capsys.readouterr().err
    assert list(tmp_path.glob("submission*")) == []
    assert call(submit.main, argv + ["--skip-bad"]) == 0
    # Kaggle refuses a file without a row per test image: the skipped one is empty.
    assert [r for r in csv.reader(out.open())][::2] == [["img", "rle_mask"], ["b.png", ""]]
    assert "1 unreadable image(s) skipped, each written with an empty mask" in (
        capsys.readouterr().out)
    assert list(tmp_path.glob("submission*")) == [out]


def test_submit_writes_a_row_for_each_of_two_files_of_one_stem(trained_run, tmp_path):
    """Kaggle's rows are keyed by the whole file name, and submit writes no mask files:
    e0.jpg and e0.png are two rows. They were refused (or with --skip-bad, both left
    out, a file Kaggle rejects) as if they shared an output file."""
    inputs = random_images(tmp_path / "in", {"e0.jpg": (40, 60, 3), "e0.png": (40, 60, 3),
                                             "e1.png": (40, 60, 3)})
    out = tmp_path / "submission.csv"
    assert call(submit.main, ["--checkpoint", str(trained_run), "--input", str(inputs),
                              "--output", str(out)]) == 0
    assert [row[0] for row in csv.reader(out.open())] == ["img", "e0.jpg", "e0.png", "e1.png"]


def test_submit_refuses_a_folder_as_output_before_predicting(tmp_path, capsys):
    """predict's --output is a folder; submit's is a file: the mix-up is found before
    the checkpoint is even read, not when the finished CSV is moved into place."""
    (tmp_path / "subs").mkdir()
    code = call(submit.main, ["--checkpoint", str(tmp_path / "no-run"), "--input",
                              str(tmp_path), "--output", str(tmp_path / "subs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "subs is a folder" in err[0] and "subs/submission.csv" in err[0]


def test_submit_names_a_file_name_the_csv_cannot_hold(trained_run, tmp_path, capsys):
    """A name of bytes that are not UTF-8 ended in a traceback from the CSV writer."""
    from tests.data_fixtures import write_image

    images = tmp_path / "test"
    write_image(images / "a.png")
    write_image(Path(os.fsdecode(bytes(images) + b"/x\xff.png")))
    out = tmp_path / "submission.csv"
    assert call(submit.main, ["--checkpoint", str(trained_run), "--input", str(images),
                              "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x\\udcff.png': its name is not valid UTF-8" in err[0], err
    assert not out.exists()


def test_submit_replaces_an_earlier_submission_alone(trained_run, tmp_path, capsys):
    """--output RUN/config.json (or a photo's name) was replaced with the CSV."""
    from tests.data_fixtures import write_image

    images = tmp_path / "test"
    images.mkdir()
    write_image(images / "a.jpg")
    out = tmp_path / "submission.csv"
    argv = ["--checkpoint", str(trained_run), "--input", str(images)]
    assert call(submit.main, argv + ["--output", str(out)]) == 0
    assert call(submit.main, argv + ["--output", str(out)]) == 0  # its own: replaced
    refuses_to_replace(submit.main, argv, (trained_run / "config.json", images / "a.jpg"),
                       "is a file that is not a submission", capsys)


def refuses_to_replace(main, argv, victims, why: str, capsys) -> None:
    """``main`` with ``--output`` each of ``victims`` exits 2, saying ``--output <victim>
    <why>``, and leaves the file as it was."""
    for victim in victims:
        before = victim.read_bytes()
        capsys.readouterr()
        assert call(main, argv + ["--output", str(victim)]) == 2
        assert f"--output {victim} {why}" in capsys.readouterr().err
        assert victim.read_bytes() == before


def test_evaluate_replaces_an_earlier_evaluation_alone(trained_run, tmp_path, capsys):
    """--output RUN/config.json replaced the run's settings with scores (and a
    checkpoint's file, or a script, as readily): found before any scoring."""
    out = tmp_path / "scores.json"
    argv = ["--checkpoint", str(trained_run)]
    assert call(evaluate.main, argv + ["--output", str(out)]) == 0
    assert call(evaluate.main, argv + ["--output", str(out)]) == 0  # its own: replaced
    script = tmp_path / "notes.py"
    script.write_text("print('mine')\n")
    refuses_to_replace(evaluate.main, argv,
                       (trained_run / "config.json", trained_run / "metrics.csv", script),
                       "is a file that is not an evaluation's JSON", capsys)


def test_submit_takes_an_earlier_submission_saved_again_and_names_a_link(tmp_path):
    """A submission saved again by pandas (LF line ends) or a spreadsheet (a byte-order
    mark) was refused as "not a submission"; so was a link to one, for that reason."""
    from experiments.common import UserError

    for text in (b"img,rle_mask\r\na.jpg,1 2\r\n", b"img,rle_mask\na.jpg,1 2\n",
                 b"\xef\xbb\xbfimg,rle_mask\r\n"):
        (tmp_path / "sub.csv").write_bytes(text)
        assert submit.check_output(tmp_path / "sub.csv") == tmp_path / "sub.csv"
    for text in (b"img,rle_mask_v2\n", b"image,mask\n", b""):
        (tmp_path / "sub.csv").write_bytes(text)
        with pytest.raises(UserError, match="is a file that is not a submission"):
            submit.check_output(tmp_path / "sub.csv")
    (tmp_path / "link.csv").symlink_to(tmp_path / "sub.csv")
    with pytest.raises(UserError, match=rf"link.csv is a link \(to {tmp_path / 'sub.csv'}\); "
                       "give the file it points to"):
        submit.check_output(tmp_path / "link.csv")


def test_predict_into_its_input_folder_twice_predicts_the_images_alone(trained_run,
                                                                      tmp_path, capsys):
    inputs = random_images(tmp_path / "in", {"a.png": (40, 60, 3), "b.jpg": (40, 60, 3)})
    argv = ["--checkpoint", str(trained_run), "--input", str(inputs), "--output",
            str(inputs), "--viz"]
    assert call(predict.main, argv) == 0
    first = {p.name: p.read_bytes() for p in inputs.iterdir()}
    assert call(predict.main, argv) == 0
    assert "wrote 2 mask(s)" in capsys.readouterr().out.splitlines()[-1]
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == first


@pytest.mark.parametrize("theirs", ["b_mask.png", "a_viz.png", "b_mask.tif"])
def test_predict_never_replaces_a_file_it_did_not_write(trained_run, tmp_path, capsys,
                                                        theirs):
    """<name>_mask.png is how many datasets name their ground truth: predicting into
    such a folder replaced it without a word."""
    inputs = random_images(tmp_path / "in", {"a.png": (40, 60, 3), "b.jpg": (40, 60, 3)})
    Image.fromarray(np.full((40, 60), 255, np.uint8)).save(inputs / theirs)
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    argv = ["--checkpoint", str(trained_run), "--input", str(inputs), "--output",
            str(inputs), "--viz"]
    assert call(predict.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"test: error: --output {inputs}: {inputs / theirs} is there and was not "
                   "written by predict (a ground-truth mask?); give another --output "
                   "folder, or move them"]
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before
    assert call(predict.main, argv[:-1]) == (0 if theirs == "a_viz.png" else 2)


def test_evaluate_prints_its_scores_when_it_cannot_write_them(trained_run, tmp_path, capsys,
                                                             monkeypatch):
    """An --output that cannot be written is named before any scoring; a write that
    fails anyway (the run's folder, a disk filled meanwhile) still shows the scores."""
    from unet_jax import rundir

    blocked = tmp_path / "file"
    blocked.write_text("")
    code = call(evaluate.main, ["--checkpoint", str(trained_run), "--output",
                                str(blocked / "out.json")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.strip() == (f"test: error: --output's folder {blocked} is a file, "
                                    "not a directory; choose a directory for --output's "
                                    "folder")

    def full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir, "write_text_atomic", full)
    code = call(evaluate.main, ["--checkpoint", str(trained_run)])
    captured = capsys.readouterr()
    assert code == 2 and "Dice" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "evaluation-validation.json" in err[0] and (
        "the scores are above" in err[0])


@pytest.mark.parametrize("mask", [
    np.zeros((3, 4), bool), np.ones((3, 4), bool),
    np.array([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], bool),
])
def test_rle_round_trip(mask):
    assert np.array_equal(rle.rle_decode(rle.rle_encode(mask), mask.shape), mask)


@pytest.mark.parametrize("bad, why", [
    ("0 2", "numbered from 1"), ("8 5", "past the last"), ("1 2 2 1", "overlapping"),
    ("5 1 1 1", "out of order"), ("1 0", "length 0"), ("1", "pairs"), ("1 x", "whole"),
])
def test_rle_decode_refuses_what_kaggle_refuses(bad, why):
    """A 0-indexed start decoded to an empty mask, and a run past the end was cut
    short: decoded submissions looked right where Kaggle's scorer rejects them."""
    with pytest.raises(ValueError, match=why):
        rle.rle_decode(bad, (3, 3))


def test_rle_is_row_major_and_one_indexed():
    mask = np.array([[0, 1, 1, 0], [1, 1, 0, 0]], bool)
    assert rle.rle_encode(mask) == "2 2 5 2"
    assert rle.rle_encode(np.zeros((2, 2), bool)) == ""
    assert rle.rle_encode(np.ones((2, 2), bool)) == "1 4"


def test_submit_writes_kaggle_csv(tmp_path):
    # Masks that differ from image to image: each row must hold its own file's.
    test_dir = random_images(tmp_path / "test", {f"car_{i:02d}.jpg": (64, 96, 3)
                                                 for i in range(3)})
    run = varied_run(tmp_path / "run", sorted(test_dir.iterdir()))
    out = tmp_path / "submission.csv"
    assert call(submit.main, ["--checkpoint", str(run), "--input", str(test_dir),
                              "--output", str(out)]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["img", "rle_mask"]
    assert [r[0] for r in rows[1:]] == ["car_00.jpg", "car_01.jpg", "car_02.jpg"]
    from unet_jax.inference import Predictor
    predictor = Predictor(run)
    decoded = [rle.rle_decode(r[1], (64, 96)) for r in rows[1:]]
    for i, mask in enumerate(decoded):
        logits = predictor.logits([predictor.model_input(test_dir / f"car_{i:02d}.jpg")],
                                  [(64, 96)])
        assert np.array_equal(mask, predictor.to_mask(logits[0])), i
    assert len({m.tobytes() for m in decoded}) == 3  # the rows could not be swapped unseen


def test_import_torch_round_trip(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from experiments.torch_unet import UNet as TorchUNet

    torch.manual_seed(0)
    model = TorchUNet(3, 1).eval()
    torch.save(model.state_dict(), tmp_path / "unet.pth")
    run_dir = tmp_path / "imported"
    assert call(import_torch.main, [str(tmp_path / "unet.pth"), str(run_dir),
                                    "--image-size", "32"]) == 0
    from unet_jax.inference import Predictor
    predictor = Predictor(run_dir)
    image = np.random.default_rng(0).uniform(size=(32, 32, 3)).astype(np.float32)
    ours = predictor.logits([image], [(32, 32)])[0][..., 0]
    with torch.no_grad():
        theirs = model(torch.from_numpy(image.transpose(2, 0, 1)[None]))[0, 0].numpy()
    assert np.abs(ours - theirs).max() < 1e-4


def test_import_torch_refuses_pickled_objects(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import collections
    torch.save({"weights": collections.Counter("abc")}, tmp_path / "evil.pth")
    assert call(import_torch.main, [str(tmp_path / "evil.pth"), str(tmp_path / "o")]) == 2
    assert "evil.pth" in capsys.readouterr().err


# --- multi-class predict, bad masks in evaluate, interrupted writes ----------------------

def varied_run(run_dir, image_files, source=None):
    """A run of an untrained one-class model (or of the run ``source``) whose threshold
    sits at the median logit of ``image_files``: its masks are part foreground and
    differ from image to image (a tiny model trained for seconds finds nothing at
    all: every mask alike)."""
    import jax

    from unet_jax import checkpoints
    from unet_jax.inference import Predictor

    if source is None:
        source = multi_class_run(run_dir.with_name(run_dir.name + "-untrained"), 1, None)
    predictor = Predictor(source)
    logits = predictor.logits([predictor.model_input(f) for f in image_files],
                              [Image.open(f).size[::-1] for f in image_files])
    params = jax.tree.map(np.asarray, predictor.params)
    params["head"]["bias"] = params["head"]["bias"] - np.median(np.concatenate(
        [x.ravel() for x in logits]))
    return checkpoints.save_params(run_dir, params, predictor.config)


def multi_class_run(run_dir, num_classes=3, winner=2):
    """A run directory of an untrained ``num_classes`` model whose head favours class
    ``winner`` by far, so that it predicts that class on every pixel (for one class,
    winner 0: foreground everywhere); winner None leaves the model as initialised."""
    import dataclasses

    import jax

    from unet_jax import checkpoints, configs, init_params

    config = dataclasses.replace(configs.tiny(), num_classes=num_classes)
    params = init_params(jax.random.key(0), config)
    if winner is not None:
        params["head"]["bias"] = params["head"]["bias"] + 50.0 * (np.arange(num_classes) == winner)
    return checkpoints.save_params(run_dir, params, config)


def test_submit_refuses_a_multi_class_run_before_writing(tmp_path, capsys):
    """Kaggle's run-length encoding holds one binary mask per image."""
    run = multi_class_run(tmp_path / "run", num_classes=3)
    random_images(tmp_path / "test", {"a.jpg": (20, 30, 3)})
    out = tmp_path / "submission.csv"
    assert call(submit.main, ["--checkpoint", str(run), "--input", str(tmp_path / "test"),
                              "--output", str(out)]) == 2
    assert "a Carvana submission needs a binary model" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "test"]


def test_evaluate_scores_each_class_over_the_images_that_hold_it(tmp_path):
    """A 4-class run that predicts class 2 on every pixel, scored by hand: class 1 is
    in one image and missed there (0), class 2 is everywhere in the prediction (1, 2/3
    and 0 against a mask all 2, half 2 and all background), class 3 is nowhere (null)."""
    run = multi_class_run(tmp_path / "run", num_classes=4, winner=2)
    h, w = 20, 30
    half = np.zeros((h, w), np.uint8)
    half[:, :w // 2], half[:, w // 2:] = 1, 2
    masks = {"a": np.full((h, w), 2, np.uint8), "b": half, "c": np.zeros((h, w), np.uint8)}
    (tmp_path / "data").mkdir()
    random_images(tmp_path / "data" / "images", {f"{n}.png": (h, w, 3) for n in masks})
    (tmp_path / "data" / "masks").mkdir()
    for name, mask in masks.items():
        Image.fromarray(mask).save(tmp_path / "data" / "masks" / f"{name}.png")
    out = tmp_path / "eval.json"
    assert call(evaluate.main, ["--checkpoint", str(run), "--data-dir", str(tmp_path / "data"),
                                "--split", "all", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    class_2 = (1 + 2 * 0.5 / 1.5 + 0) / 3
    assert result["dice_per_class"] == pytest.approx({"1": 0.0, "2": class_2, "3": None})
    assert result["iou_per_class"] == pytest.approx({"1": 0.0, "2": (1 + 0.5 + 0) / 3,
                                                     "3": None})
    assert result["dice"] == pytest.approx(class_2 / 2)  # the classes with a figure
    assert result["images"] == 3


def test_predict_writes_class_ids_for_a_multi_class_run(tmp_path):
    run = multi_class_run(tmp_path / "run")
    inputs = random_images(tmp_path / "in", {"a.png": (50, 70, 3), "b.jpg": (30, 40)})
    out = tmp_path / "out"
    assert call(predict.main, ["--checkpoint", str(run), "--input", str(inputs),
                               "--output", str(out), "--viz"]) == 0
    for name, size in (("a", (70, 50)), ("b", (40, 30))):
        mask = Image.open(out / f"{name}_mask.png")
        assert mask.mode == "L" and mask.size == size
        assert (np.asarray(mask) == 2).all()  # the class id itself, not 0/255
    assert sorted(p.name for p in out.iterdir()) == [  # and no temporary file behind
        "a_mask.png", "a_viz.png", "b_mask.png", "b_viz.png"]


def test_predict_viz_colours_every_class(tmp_path):
    colours = predict.class_colours(12)
    assert len(colours) == 11 and len(set(colours)) == 11  # classes 1..11, each its own
    assert predict.class_colours(1) == predict.class_colours(2)  # the foreground's
    mask = np.arange(12).repeat(4)[None].repeat(8, 0)  # every class, background included
    image = np.full((8, 48, 1), 0.5, np.float32)
    predict.save_viz(image, mask, tmp_path / "viz.png", num_classes=12)
    assert Image.open(tmp_path / "viz.png").size[0] > 0


def test_predict_leaves_no_half_written_mask(tmp_path, monkeypatch):
    target = tmp_path / "a_mask.png"
    predict.save_png(np.full((4, 4), 255, np.uint8), target)
    before = target.read_bytes()

    def failing_save(self, fp, *args, **kwargs):  # a full disk, halfway through
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError):
        predict.save_png(np.zeros((4, 4), np.uint8), target)
    assert [p.name for p in tmp_path.iterdir()] == ["a_mask.png"]
    assert target.read_bytes() == before  # the previous mask, whole


def test_submit_keeps_finished_rows_and_the_same_command_continues(trained_run, tmp_path,
                                                                   capsys):
    """Carvana's 100,064 test photos take hours: a command stopped after some rows (here
    by an image found damaged only when decoded) keeps them in <output>.partial, and
    the same command continues after them instead of starting again; other settings
    are refused rather than mixing two models' rows."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(inputs / name)
    corrupt_middle(inputs / "c.png")  # found only when decoded, after a and b
    out = tmp_path / "submission.csv"
    argv = ["--checkpoint", str(trained_run), "--input", str(inputs), "--output", str(out),
            "--batch-size", "1"]  # one image per batch: a and b are written before c fails
    assert call(submit.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("test: error: ") and "c.png" in err[-1]
    assert err[-1].endswith("or pass --skip-bad to skip such images")
    assert f"2 of 4 rows kept in {out}.partial" in err[-2]
    assert not out.exists()
    assert [r[0] for r in csv.reader((tmp_path / "submission.csv.partial").open())] == [
        "img", "a.png", "b.png"]
    # A speckled mask's row can be longer than the csv module reads as a field (131,072
    # characters), which made every resume fail; only the names are read back.
    partial = tmp_path / "submission.csv.partial"
    long_row = " ".join(f"{2 * i + 1} 1" for i in range(30_000))
    partial.write_text(partial.read_text().replace("b.png,", f"b.png,{long_row}"))
    # A crash in the middle of a row leaves half a line: cut back, not kept.
    with partial.open("a") as f:
        f.write("c.png,1 2")

    assert call(submit.main, argv + ["--threshold", "0.3"]) == 2
    assert ("holds rows predicted with other settings (threshold 0.5, not 0.3); give those "
            "settings to continue it") in capsys.readouterr().err

    assert call(submit.main, argv + ["--skip-bad"]) == 0
    said = capsys.readouterr().out
    assert "wrote 4 rows to" in said and "2 of them from submission.csv.partial" in said
    csv.field_size_limit(10**7)
    rows = list(csv.reader(out.open()))
    assert [r[0] for r in rows] == ["img", "a.png", "b.png", "c.png", "d.png"]
    assert rows[2][1] == long_row  # the earlier rows as they were
    assert rows[3] == ["c.png", ""]  # the skipped image's empty row, in its place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "submission.csv"]
    fresh = tmp_path / "fresh.csv"
    assert call(submit.main, argv[:4] + ["--output", str(fresh), "--skip-bad"]) == 0
    assert fresh.read_text().replace("b.png,", f"b.png,{long_row}", 1) == out.read_text()


def test_submit_refuses_to_continue_rows_of_other_images(trained_run, tmp_path, capsys):
    """A .partial made from another test folder is not continued: its rows would not
    be --input's, in its order."""
    inputs = random_images(tmp_path / "in", {f"{n}.png": (40, 60, 3) for n in "abcd"})
    corrupt_middle(inputs / "c.png")
    out = tmp_path / "submission.csv"
    argv = ["--checkpoint", str(trained_run), "--input", str(inputs), "--output", str(out),
            "--batch-size", "1"]
    assert call(submit.main, argv) == 2  # a and b written, then c fails
    (inputs / "a.png").rename(inputs / "a0.png")
    capsys.readouterr()
    assert call(submit.main, argv + ["--skip-bad"]) == 2
    assert (f"holds rows of other images than --input's (row 1: a.png); remove "
            f"{out}.partial to start again") in capsys.readouterr().err
    assert (tmp_path / "submission.csv.partial").exists()  # refused, not removed


def test_submit_follows_the_sample_submission(trained_run, tmp_path, capsys, caplog):
    """Kaggle's sample_submission.csv (.csv.zip as Kaggle ships it) beside the test
    folder is the list of rows Kaggle expects: rows in its order, an image it names
    that the folder lacks refused before predicting (a partly unzipped test.zip),
    and one it does not name left out with a warning."""
    test = random_images(tmp_path / "test", {f"{n}.jpg": (40, 60, 3)
                                             for n in ("b", "a", "c", "x")})
    with zipfile.ZipFile(tmp_path / "sample_submission.csv.zip", "w") as z:
        z.writestr("sample_submission.csv", "img,rle_mask\nc.jpg,1 1\na.jpg,1 1\nb.jpg,1 1\n")
    out = tmp_path / "submission.csv"
    argv = ["--checkpoint", str(trained_run), "--input", str(test), "--output", str(out)]
    assert call(submit.main, argv) == 0
    assert [r[0] for r in csv.reader(out.open())] == ["img", "c.jpg", "a.jpg", "b.jpg"]
    assert ("1 image(s) of --input are not in sample_submission.csv.zip and get no row: "
            "x.jpg") in caplog.text

    (test / "a.jpg").unlink()
    assert call(submit.main, argv) == 2
    err = capsys.readouterr().err
    assert "lacks 1 of the 3 images sample_submission.csv.zip names (a.jpg)" in err
    assert call(submit.main, argv + ["--sample-submission", "none"]) == 0
    assert [r[0] for r in csv.reader(out.open())] == ["img", "b.jpg", "c.jpg", "x.jpg"]
    (tmp_path / "other.csv").write_text("id,mask\n")
    assert call(submit.main, argv + ["--sample-submission", str(tmp_path / "other.csv")]) == 2
    assert "its first column is not 'img'" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv.gz", ".csv.zip"])
def test_submit_compresses_as_the_output_name_says(trained_run, tmp_path, suffix):
    """submission.csv.gz was written as plain text under a .gz name, which Kaggle
    fails to decompress; the plain CSV of the full test set is about 1 GB."""
    test = random_images(tmp_path / "test", {"a.jpg": (40, 60, 3), "b.jpg": (40, 60, 3)})
    argv = ["--checkpoint", str(trained_run), "--input", str(test), "--output"]
    plain, packed = tmp_path / "plain.csv", tmp_path / f"sub{suffix}"
    assert call(submit.main, argv + [str(plain)]) == 0
    assert call(submit.main, argv + [str(packed)]) == 0
    if suffix == ".csv.gz":
        data = gzip.decompress(packed.read_bytes())
    else:
        with zipfile.ZipFile(packed) as z:
            assert z.namelist() == ["sub.csv"]
            data = z.read("sub.csv")
    assert data == plain.read_bytes()
    assert call(submit.main, argv + [str(packed)]) == 0  # its own, compressed: replaced
    assert call(submit.main, argv + [str(tmp_path / "sub.csv.7z")]) == 2
    damaged = tmp_path / f"damaged{suffix}"  # not a submission: refused, no traceback
    damaged.write_bytes(packed.read_bytes()[:20] + bytes(40))
    assert call(submit.main, argv + [str(damaged)]) == 2


def test_submit_stopped_while_compressing_leaves_no_temporary_file(trained_run, tmp_path,
                                                                   monkeypatch, capsys):
    """Compressing the ~1 GB of rows takes minutes; Ctrl-C then left a large .tmp."""
    test = random_images(tmp_path / "test", {"a.jpg": (40, 60, 3), "b.jpg": (40, 60, 3)})
    out = tmp_path / "sub.csv.gz"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfileobj", stopped)
    argv = ["--checkpoint", str(trained_run), "--input", str(test), "--output", str(out)]
    assert call(submit.main, argv) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sub.csv.gz.partial", "sub.csv.gz.partial.json", "sub.csv.gz.partial.lock", "test"]
    assert "2 of 2 rows kept in" in capsys.readouterr().err
    monkeypatch.undo()
    assert call(submit.main, argv) == 0  # the rows are all there: compressed at once
    assert "compressing 2 rows" in capsys.readouterr().err
    assert gzip.decompress(out.read_bytes()).startswith(b"img,rle_mask\r\na.jpg,")


def test_submit_warns_of_test_images_of_another_size(trained_run, tmp_path, caplog, capsys):
    """Kaggle decodes every row at one size: a resized copy among the test photos gives
    a row that decodes to nonsense without any error, so it is named, once, and the
    last line counts the sizes; Carvana's photos are checked against 1918x1280, so a
    folder of nothing but resized copies is named too."""
    test = random_images(tmp_path / "test", {"a.jpg": (40, 60, 3), "b.jpg": (20, 30, 3),
                                             "c.jpg": (30, 30, 3), "d.jpg": (40, 60, 3)})
    with caplog.at_level(logging.WARNING):
        assert call(submit.main, ["--checkpoint", str(trained_run), "--input", str(test),
                                  "--output", str(tmp_path / "s.csv")]) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "experiments.submit"]
    assert len(warned) == 1 and warned[0].startswith("b.jpg is 30x20, not 60x40 like the first")
    assert "masks of 60x40 (2), 30x20 (1), 30x30 (1)" in capsys.readouterr().out
    caplog.clear()
    carvana = random_images(tmp_path / "carvana", {"00087a6bd4dc_01.jpg": (40, 60, 3)})
    with caplog.at_level(logging.WARNING):
        assert call(submit.main, ["--checkpoint", str(trained_run), "--input", str(carvana),
                                  "--output", str(tmp_path / "c.csv")]) == 0
    assert "00087a6bd4dc_01.jpg is 60x40, not 1918x1280 like Carvana's photos" in caplog.text


def corrupt_middle(path):
    """Damages a PNG's image data but keeps its end, so that only decoding it (not the
    up-front check of its last bytes) finds the damage."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start:start + 20] = bytes(20)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["not an image", "damaged data", "damaged image"])
def test_evaluate_skips_a_bad_pair_when_asked_and_names_it_otherwise(trained_run, tmp_path,
                                                                     capsys, damage):
    from tests.data_fixtures import box_mask, write_image, write_mask

    data = tmp_path / "data"
    for i in range(3):
        write_image(data / "images" / f"img{i}.png", (96, 64), seed=i)
        write_mask(data / "masks" / f"img{i}.png", box_mask((96, 64), seed=i))
    bad = data / "masks" / "img1.png"
    if damage == "not an image":  # found by the check before any prediction
        bad.write_bytes(b"not an image")
    elif damage == "damaged data":  # found only when evaluate decodes it
        corrupt_middle(bad)
    else:  # found as the predictor decodes it, the other images of its batch go on
        bad = data / "images" / "img1.png"
        corrupt_middle(bad)
    out = tmp_path / "result.json"
    argv = ["--checkpoint", str(trained_run), "--data-dir", str(data), "--split", "all",
            "--output", str(out)]
    assert call(evaluate.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bar's, then the error
    assert err[-1].startswith("test: error: ") and str(bad) in err[-1]
    assert "or pass --skip-bad" in err[-1]
    assert call(evaluate.main, argv + ["--skip-bad"]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and result["skipped"] == 1


def test_tiles_on_a_run_of_resized_images_warn_once_that_the_scale_is_unknown(
        trained_run, tmp_path, caplog):
    """The run squashed its 64x96 images to 32x48: tiles cut a 64x96 file at twice the
    scale the model learned, and nothing on record says so but the sizes."""
    from unet_jax.inference import Predictor

    inputs = random_images(tmp_path / "in", {"a.png": (64, 96, 3), "b.png": (64, 96, 3),
                                             "same.png": (32, 48, 3)})
    tiled = Predictor(trained_run, tile=True)
    tiled.decode(inputs / "same.png")
    assert not caplog.records  # the training size: nothing to warn of
    for name in ("a.png", "b.png"):
        tiled.decode(inputs / name)
    assert len(caplog.records) == 1
    assert "without --tile" in caplog.text
    # In one order, height x width, as --image-size takes them.
    assert "resized to 32x48 (height x width)" in caplog.text
    assert "at its own 64x96" in caplog.text and "were 32x48 too" in caplog.text
    Predictor(trained_run).decode(inputs / "a.png")  # resized, as trained: no warning
    assert len(caplog.records) == 1


def test_a_new_run_replaces_the_split_of_a_run_that_stopped_before_its_first_checkpoint(
        data_dir, tmp_path):
    """A run stopped before its first checkpoint leaves a free directory, and its
    split.json; the next run there must record its own split, or a later --resume
    would train and validate on the stopped run's images."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = {"train": [str(tmp_path / "elsewhere" / "train" / "x_01.jpg")],
             "validation": [str(tmp_path / "elsewhere" / "train" / "y_01.jpg")]}
    (run_dir / "split.json").write_text(json.dumps(stale))
    assert call(train.main, ["--data-dir", str(data_dir), "--workdir", str(run_dir),
                             *TINY[:-2], "--epochs", "1"]) == 0
    split = json.loads((run_dir / "split.json").read_text())
    assert "elsewhere" not in json.dumps(split) and split["train"] and split["validation"]
    assert all(p.startswith(str(data_dir)) for side in ("train", "validation")
               for p in split[side])


@pytest.mark.parametrize("argv, noted", [
    (["--data-dir", "d"], True),
    (["--data-dir", "d", "--epochs", "30"], True),
    (["--data-dir", "d", "--preset", "full"], False),
    (["--data-dir", "d", "--image-size", "256"], False),
    (["--data-dir", "d", "--base-features", "64"], False),
    (["--data-dir", "d", "--crop", "256"], False),
    (["--epochs", "3"], False),  # the sample set: the preset is sized for it
])
def test_own_data_at_the_sample_sets_sizes_gets_a_note(argv, noted):
    note = train.sample_sized_note(train.parse_args(argv))
    assert (note is not None) == noted
    assert note is None or ("--preset" in note and "64x96" in note)


def test_resume_with_the_preset_alone_keeps_the_first_commands_epochs(tmp_path):
    from unet_jax import configs

    workdir = tmp_path / "w"
    (workdir / "checkpoints" / "1").mkdir(parents=True)
    (workdir / "config.json").write_text(configs.get("tiny", epochs=6).to_json())
    args = ["--preset", "tiny", "--workdir", str(workdir), "--resume"]
    assert train.build_config(train.parse_args(args)).epochs == 6
    assert train.build_config(train.parse_args(args + ["--epochs", "9"])).epochs == 9


def test_resume_finds_the_same_images_where_the_data_moved(data_dir, tmp_path, capsys):

    first = tmp_path / "first"
    shutil.copytree(data_dir, first)
    run_dir = tmp_path / "run"
    assert call(train.main, ["--data-dir", str(first), "--workdir", str(run_dir),
                             *TINY[:-2], "--epochs", "1"]) == 0
    before = json.loads((run_dir / "split.json").read_text())
    moved = first.rename(tmp_path / "moved")
    assert call(train.main, ["--workdir", str(run_dir), "--resume", "--epochs", "2"]) == 2
    assert "(--data-dir)" in capsys.readouterr().err
    assert call(train.main, ["--workdir", str(run_dir), "--resume", "--epochs", "2",
                             "--data-dir", str(moved)]) == 0
    after = json.loads((run_dir / "split.json").read_text())
    assert after == {side: [p.replace(str(first), str(moved)) for p in before[side]]
                     for side in ("train", "validation")} | {  # the same images, where
                         "data_dir": str(moved)}                # they are now
    # The next resume needs no flag: the run now records the new folder.
    assert call(train.main, ["--workdir", str(run_dir), "--resume", "--epochs", "3"]) == 0
    assert [r["epoch"] for r in read_metrics(run_dir)] == ["1", "2", "3"]


def test_import_torch_explains_whole_models_and_reads_wrapped_state_dicts(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from experiments.torch_unet import UNet as TorchUNet

    model = TorchUNet(3, 1)
    torch.save(model, tmp_path / "whole.pth")
    assert call(import_torch.main, [str(tmp_path / "whole.pth"), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "save model.state_dict()" in err[0] and "\x1b" not in err[0]
    (tmp_path / "notes.pth").write_text("101 not weights")
    assert call(import_torch.main, [str(tmp_path / "notes.pth"), str(tmp_path / "b")]) == 2
    assert "not a weights file that torch.save wrote" in capsys.readouterr().err
    torch.save(model.state_dict(), tmp_path / "cut.pth")
    data = (tmp_path / "cut.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])  # a download cut short
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    for name, error in (("cut.pth", "not a weights file that torch.save wrote ("),
                        ("tensor.pth", "holds a Tensor, not a state_dict"),
                        ("absent.pth", "absent.pth: no such file"),
                        ("", "is a folder; pass the .pth file of the weights")):
        assert call(import_torch.main, [str(tmp_path / name), str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and error in err[0], err
    assert not (tmp_path / "b").exists()
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": {}},
               tmp_path / "ckpt.pth")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert call(import_torch.main, [str(tmp_path / "ckpt.pth"), str(blocker / "run")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert call(import_torch.main, [str(tmp_path / "ckpt.pth"), str(tmp_path / "c"),
                                    "--image-size", "32"]) == 0
    assert "under 'model_state_dict'" in capsys.readouterr().out
    assert (tmp_path / "c" / "config.json").is_file()


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "typo"
    assert call(train.main, ["--data-dir", str(tmp_path / "nonexist"), "--workdir",
                             str(run_dir), *TINY]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not run_dir.exists()
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("the user's own")
    assert call(train.main, ["--data-dir", str(tmp_path / "nonexist"), "--workdir",
                             str(kept), *TINY]) == 2
    assert (kept / "notes.txt").is_file()  # a folder it did not create is never removed


def test_resume_names_the_preset_that_brings_a_different_setting(tmp_path, capsys):
    from unet_jax import configs

    workdir = tmp_path / "w"
    (workdir / "checkpoints" / "1").mkdir(parents=True)
    (workdir / "config.json").write_text(configs.get("tiny").to_json())
    assert call(train.main, ["--workdir", str(workdir), "--resume", "--preset", "default",
                             "--epochs", "9"]) == 2
    err = capsys.readouterr().err
    assert "--preset default sets --base-features 8, but the run" in err and "has 4" in err
    # A flag the first command gave with its preset: resuming with that preset alone
    # told the user to resume with the run's own preset, which it already was.
    (workdir / "config.json").write_text(configs.get("tiny", num_classes=3,
                                                     skip_connections=False).to_json())
    assert call(train.main, ["--workdir", str(workdir), "--resume", "--preset", "tiny",
                             "--no-skip-connections"]) == 2
    assert capsys.readouterr().err.endswith(
        "has 3; add --num-classes 3, or resume with no --preset at all (the run's "
        "settings come from its config.json)\n")
    assert call(train.main, ["--workdir", str(workdir), "--resume", "--preset", "tiny",
                             "--num-classes", "3"]) == 2
    assert "add --no-skip-connections, or resume" in capsys.readouterr().err


def test_predict_refuses_an_image_file_name_as_its_output_folder(trained_run, tmp_path,
                                                                capsys):
    inputs = random_images(tmp_path / "in", {"a.png": (40, 60, 3)})
    assert call(predict.main, ["--checkpoint", str(trained_run), "--input", str(inputs),
                               "--output", str(tmp_path / "pred.png")]) == 2
    assert "give a folder" in capsys.readouterr().err and not (tmp_path / "pred.png").exists()


def test_scoring_no_pairs_says_so_not_that_all_were_skipped():
    from data_pipeline.errors import DataError
    from unet_jax.evaluation import score

    with pytest.raises(DataError, match=r"^no image/mask pairs to score: give at least one"):
        score(None, [])


def test_progress_reports_in_lines_where_stderr_is_a_log(capsys):
    """tqdm's bar is off where stderr is a file (nohup, Slurm, a notebook's log), and
    an hours-long submit said nothing until it ended: a plain line instead, with the
    rate and the time left."""
    from unet_jax.progress import _duration, progress

    assert list(progress(iter(range(3)), 3, desc="submit", every=0)) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2  # after the first and second item; the end is the caller's line
    assert lines[0].startswith("submit: 1 of 3 images (33%), ") and lines[0].endswith(" left")
    assert [_duration(s) for s in (40, 720, 12300)] == ["40 s", "12 min", "3 h 25 min"]
    bar = progress(iter(range(3)), 3, unit="batch", desc="epoch 1/8", every=0)
    for _ in bar:
        bar.set_postfix(loss="0.1234")  # what the training loop reports in the bar
    assert capsys.readouterr().err.splitlines()[0].endswith(" left, loss 0.1234")
    assert list(progress(iter(range(3)), 3, every=0, show=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # a run's other processes report nothing


@pytest.mark.parametrize("value", ["abc", "10k", "-5"])
def test_a_bad_pixel_limit_variable_is_named_once_not_as_every_images_fault(
        trained_run, tmp_path, monkeypatch, capsys, value):
    """UNET_JAX_MAX_IMAGE_PIXELS=abc was reported as a fault of each image, with 'fix
    or remove the file, or pass --skip-bad', and --skip-bad then skipped them all."""
    images = random_images(tmp_path / "in", {"a.png": (40, 60, 3)})
    monkeypatch.setenv("UNET_JAX_MAX_IMAGE_PIXELS", value)
    for extra in ([], ["--skip-bad"]):
        assert call(predict.main, ["--checkpoint", str(trained_run), "--input", str(images),
                                   "--output", str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"test: error: UNET_JAX_MAX_IMAGE_PIXELS='{value}': give a whole "
                       "number of pixels (0 for no limit), or unset it"]
    with pytest.raises(data_pipeline.SettingError):  # the library: not one file's DataError
        data_pipeline.check_images([images / "a.png"], skip_bad=True)


def test_hints_call_the_python_that_runs_the_package(tmp_path, monkeypatch):
    """The README's first command runs .venv/bin/python without activating the venv, and
    the 'predict with: python -m ...' it printed ran another Python, without the
    package (ModuleNotFoundError): the hint names the venv's interpreter instead."""
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").touch(mode=0o755)
    elsewhere = tmp_path / "usr" / "bin"
    elsewhere.mkdir(parents=True)
    (elsewhere / "python").touch(mode=0o755)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(elsewhere))
    assert python_command() == ".venv/bin/python"
    monkeypatch.setenv("PATH", str(venv))  # the venv activated
    assert python_command() == "python"
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("PATH", "")
    assert python_command() == str(venv / "python")


def test_evaluate_says_how_it_scored_and_how_many_images_trained(trained_run, data_dir,
                                                                 capsys):
    """'80 images (validation, resized to 64x96): Dice 0.9563' read as a score at 64x96
    (it is at each image's size, hence not training's 0.9595), and --split all hid
    that most of its images were trained on."""
    assert call(evaluate.main, ["--checkpoint", str(trained_run)]) == 0
    n_val = len(json.loads((trained_run / "split.json").read_text())["validation"])
    assert (f"{n_val} images (validation; predicted resized to 32x48, scored at each "
            "image's own size): Dice") in capsys.readouterr().out
    assert call(evaluate.main, ["--checkpoint", str(trained_run), "--data-dir",
                                str(data_dir), "--split", "all"]) == 0
    n_train = len(json.loads((trained_run / "split.json").read_text())["train"])
    assert f"images (all, {n_train} of them trained on; predicted" in capsys.readouterr().out


def test_a_second_submit_to_the_same_output_is_refused_while_the_first_writes(tmp_path):
    """Two submits to one --output (a job resubmitted while the first still ran) both
    appended to one .partial: the first to finish wrote every image twice and exited 0."""
    out = tmp_path / "submission.csv"
    first = submit.Partial(out, {"checkpoint": "run"})
    assert first.resume(["a.jpg"]) == 0
    with pytest.raises(common.UserError, match=r"another submit is writing it \(its rows go "
                       r"to submission.csv.partial\); wait for it to finish"):
        submit.Partial(out, {"checkpoint": "run"}).resume(["a.jpg"])
    first.release()  # the first command ends: the next may continue its rows
    assert submit.Partial(out, {"checkpoint": "run"}).resume(["a.jpg"]) == 0
