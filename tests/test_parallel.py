"""Data parallelism: 2 fake CPU devices, and 2 processes joined by jax.distributed.

Each case runs in a subprocess, because the device count is fixed when JAX starts.
"""

import csv
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import data_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--base-features", "4", "--depth", "2", "--image-size", "32", "48", "--batch-size", "4",
        "--epochs", "2", "--lr", "3e-3", "--platform", "cpu"]


def python(code_or_args, devices=1, timeout=300, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_NUM_CPU_DEVICES": str(devices)}
    args = code_or_args if isinstance(code_or_args, list) else ["-c", textwrap.dedent(code_or_args)]
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


STEP = """
import jax, jax.numpy as jnp, numpy as np
from unet_jax import Config, create_train_state, train_step, parallel
config = Config(base_features=4, depth=2, learning_rate=1e-3)
rng = np.random.default_rng(0)
batch = {"image": rng.uniform(size=(4, 16, 16, 3)).astype(np.float32),
         "mask": (rng.uniform(size=(4, 16, 16, 1)) > 0.5).astype(np.float32)}
mesh = parallel.make_mesh()
state = parallel.replicate(create_train_state(jax.random.key(0), config), mesh)
for _ in range(3):
    state, metrics = train_step(state, parallel.shard_batch(batch, mesh))
print(len(jax.devices()), state.params["head"]["kernel"].sharding.is_fully_replicated)
np.save("OUT", np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))]))
"""


def test_train_step_on_two_devices_equals_one(tmp_path, capsys):
    # One device: this process (its device count is the default 1); two: a subprocess.
    one, two = tmp_path / "params1.npy", tmp_path / "params2.npy"
    exec(textwrap.dedent(STEP.replace("OUT", str(one))), {})
    assert capsys.readouterr().out.split() == ["1", "True"]
    result = python(STEP.replace("OUT", str(two)), devices=2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "True"]
    np.testing.assert_allclose(np.load(one), np.load(two), atol=2e-5)


def test_uneven_global_batch_is_a_clear_error(tmp_path):
    result = python(["-m", "experiments.train", "--batch-size", "3", "--epochs", "1",
                     "--platform", "cpu", "--workdir", str(tmp_path / "run")], devices=2)
    assert result.returncode == 2
    assert "--batch-size 3 cannot be split evenly over 2 devices" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return data_pipeline.sample_dataset_dir(tmp_path_factory.mktemp("d") / "s", num_cars=4,
                                            size=(96, 64), seed=5)


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def assert_same_metrics(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss", "val_dice", "val_iou"):
            np.testing.assert_allclose(ra[key], rb[key], rtol=2e-3, atol=2e-4, err_msg=key)


@pytest.fixture(scope="module")
def single_device_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    result = python(["-m", "experiments.train", "--data-dir", str(data_dir), "--workdir", str(run),
                     *TINY], devices=1)
    assert result.returncode == 0, result.stderr
    return run


def test_training_on_two_devices_gives_the_same_metrics(data_dir, single_device_run, tmp_path):
    run = tmp_path / "two"
    result = python(["-m", "experiments.train", "--data-dir", str(data_dir), "--workdir", str(run),
                     *TINY], devices=2)
    assert result.returncode == 0, result.stderr
    assert "2 device(s)" in result.stdout
    import json
    assert json.loads((run / "config.json").read_text())["device_count"] == 2
    assert_same_metrics(metrics(single_device_run), metrics(run))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_in_two_processes(argv) -> list[str]:
    """experiments.train ``argv`` as two processes on localhost, one CPU device each, as
    on two machines (JAX's CPU backend runs the cross-process all-reduce with gloo);
    the stdout of each."""
    port = free_port()
    # No shared compilation cache: two processes of one run compile their programs
    # side by side, as on two hosts.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "UNET_JAX_COMPILE_CACHE": "off"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *argv, "--coordinator",
         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def test_two_processes_with_jax_distributed(data_dir, single_device_run, tmp_path):
    run = tmp_path / "multi"
    outputs = train_in_two_processes(["--data-dir", str(data_dir), "--workdir", str(run),
                                      *TINY])
    assert "2 device(s), 2 process(es)" in outputs[0]
    # only process 0 prints and writes (gloo itself may say it connected)
    assert "epoch" not in outputs[1] and "unet-jax" not in outputs[1]
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    # Each process reads its own half of every global batch; together they are the
    # batches of the single-process run, so the run is the same run.
    reference = metrics(single_device_run)
    for row, ref in zip(rows, reference):
        for key in ("train_loss", "val_loss", "val_dice"):
            assert row[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-4), key
    assert (run / "checkpoints" / "2" / "params").is_dir()
    # Fine-tuned over two processes from a run's weights (restored onto one device,
    # they could not be spread over the other process's): at a rate too small to
    # move them, the first epoch scores as the source's best did.
    tuned = tmp_path / "tuned"
    train_in_two_processes(["--data-dir", str(data_dir), "--workdir", str(tuned), *TINY,
                            "--init-from", str(single_device_run), "--lr", "1e-9",
                            "--epochs", "1"])
    best = max(reference, key=lambda r: (r["val_dice"], r["epoch"]))
    assert metrics(tuned)[0]["val_loss"] == pytest.approx(best["val_loss"], rel=1e-3)


def test_sigterm_still_unwinds_after_joining_a_multi_process_run():
    """jax.distributed.initialize installs its own SIGTERM handler; the command's own
    (unwind like Ctrl-C, exit 143) must be back in place once the run is joined."""
    script = (
        "import os, signal, sys\n"
        "from experiments import common\n"
        "def main(argv):\n"
        "    args = common.Parser().parse_args(argv)\n"
        "    common.start_platform('cpu', args)\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        import time; time.sleep(30)\n"
        "    finally:\n"
        "        print('cleanup ran', flush=True)\n"
        "common.run(main, [], prog='probe')\n")
    script = script.replace(
        "args = common.Parser().parse_args(argv)",
        "import argparse; args = argparse.Namespace(coordinator='127.0.0.1:%d', "
        "num_processes=1, process_id=0, compile_cache='off')" % free_port())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 143, p.stderr[-2000:]
    assert "cleanup ran" in p.stdout
    assert "probe: terminated" in p.stderr


@pytest.mark.parametrize("flags,error", [
    (["--coordinator", "127.0.0.1:1"], "--coordinator, --num-processes and --process-id "
     "go together"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "cannot join the multi-process run: process_id and num_processes must be"),
])
def test_a_bad_multi_process_setting_is_one_line_before_anything_is_written(
        tmp_path, flags, error):
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "experiments.train", *TINY, "--workdir",
                        str(run), *flags], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith(f"python -m experiments.train: error: {error}"), p.stderr
    assert p.stderr.count("\n") == 1 and not run.exists()
