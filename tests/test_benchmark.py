"""experiments.benchmark end to end at a tiny size. Speed itself is never asserted."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import UNOPTIMISED

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32", "--batch-size", "1", "--steps", "2", "--base-features", "8",
        "--platform", "cpu"]


def bench(*args, full_width=False):
    """The benchmark's JSON row. The full-width U-Net runs with XLA's backend
    optimisations, which the suite otherwise turns off (tests/conftest.py): its
    convolutions run slower unoptimised than they take to optimise."""
    env = dict(os.environ)
    if full_width:
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(UNOPTIMISED, "")
    result = subprocess.run([sys.executable, "-m", "experiments.benchmark", *args, "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def train_row():
    return bench("--mode", "train", *TINY)


def test_train_reports_sane_figures(train_row):
    r = train_row
    assert (r["mode"], r["framework"], r["backend"]) == ("train", "jax", "cpu")
    assert (r["image_size"], r["batch_size"], r["steps"], r["base_features"]) == ([32, 32], 1, 2, 8)
    assert r["img_per_s"] > 0 and r["step_s"] > 0 and r["cpu_s"] > 0
    assert len(r["step_times_s"]) == 2
    assert r["compile_s"] > 0 and r["lower_s"] > 0
    assert r["flops_per_step"] > 0
    assert r["gflops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"] / 1e9)
    assert r["machine"]["cores"] >= 1 and "xla_flags" in r


def test_peak_memory_grows_with_the_training_state(train_row):
    """The full width holds 64 times the parameters of width 8, and a training step
    keeps at least three copies of them resident (parameters and AdamW's two moments).
    Peak RSS also holds the runtime and the compiler's own peak, which the two runs
    share only roughly, so the test asks for half of that difference."""
    wide = bench("--mode", "train", *TINY[:-4], "--base-features", "64", "--platform", "cpu",
                 full_width=True)
    params = {8: 485_817, 64: 31_031_745}
    expected_mb = 3 * 4 * (params[64] - params[8]) / 1e6
    assert wide["peak_rss_mb"] - train_row["peak_rss_mb"] > 0.5 * expected_mb


@pytest.fixture(scope="module")
def infer_row():
    # Inference compiles fastest; the kernel variants still build their own models.
    return bench("--mode", "infer", *TINY[:-2], "--steps", "1", "--compare-kernels",
                 "--platform", "cpu")


def test_compare_kernels_measures_each_cpu_kernel(infer_row):
    r = infer_row
    assert set(r["variants"]) == {"jax-stock", "jax-conv-kernel", "jax-pool-kernel"}
    for name, row in r["variants"].items():
        assert row["img_per_s"] > 0 and row["framework"] == name
        assert r["ratios"][name] == pytest.approx(r["img_per_s"] / row["img_per_s"])
        # The same network: the kernels change the backward pass only.
        assert row["flops_per_step"] == pytest.approx(r["flops_per_step"], rel=0.01)


def test_a_training_step_costs_about_three_forward_passes(train_row, infer_row):
    assert infer_row["mode"] == "infer" and infer_row["img_per_s"] > 0
    assert 2 < train_row["flops_per_step"] / infer_row["flops_per_step"] < 4.5


def test_compare_torch_adds_both_layouts_torch_compile_and_ratios():
    pytest.importorskip("torch", reason="torch is not installed")
    r = bench("--mode", "infer", "--image-size", "32", "--batch-size", "1", "--steps", "1",
              "--compare-torch", "--platform", "cpu", full_width=True)
    assert set(r["torch"]) == set(r["ratios"]) == set(r["memory_ratios"]) == {
        "torch-nchw", "torch-channels_last", "torch-compile", "torch-compile-nchw"}
    for name, row in r["torch"].items():
        assert row["img_per_s"] > 0 and row["peak_rss_mb"] > 50 and row["gflops_per_s"] > 0
        assert r["ratios"][name] == pytest.approx(r["img_per_s"] / row["img_per_s"])
        assert row["gflops_per_s"] == pytest.approx(r["flops_per_step"] / row["step_s"] / 1e9)
    fastest = max(r["torch"].values(), key=lambda row: row["img_per_s"])
    assert r["fastest_torch"] == fastest["framework"]
    assert r["ratio_to_fastest_torch"] == pytest.approx(min(r["ratios"].values()))


def test_the_torch_rows_run_without_jax_so_their_memory_is_torchs_alone():
    """JAX, Flax and optax add over 150 MB to a process: a torch row that imported them
    would report that as PyTorch's memory."""
    code = ("import sys, experiments.torch_peer; "
            "print(sorted(m for m in ('jax', 'flax', 'optax', 'unet_jax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result
    from experiments import benchmark

    argv = benchmark.child_argv(benchmark.parse_args(["--mode", "infer"]), "torch-nchw")
    assert argv[1:3] == ["-m", "experiments.torch_peer"] and argv[-2:] == ["--device", "cpu"]


@pytest.mark.parametrize("which,expected", [
    ("all", ["jax", "torch-nchw", "torch-channels_last"]),
    ("eager", ["jax", "torch-nchw", "torch-channels_last"])])
def test_a_failed_torch_compile_leaves_the_other_rows_and_says_why(monkeypatch, capsys,
                                                                    which, expected):
    """torch.compile needs a C++ compiler on a CPU; without one the measured rows stand."""
    from experiments import benchmark, common

    called = []

    def fake_child(args, name, timeout=None):
        called.append(name)
        if name == "torch-compile":
            raise common.UserError("the torch-compile measurement failed: no C++ compiler")
        return {"framework": name, "img_per_s": 1.0, "peak_rss_mb": 100.0, "step_s": 1.0,
                "gflops_per_s": 1.0, "cpu_s": 1.0, "compile_s": 0.0, "load_avg": 0.0,
                "backend": "cpu", "device": "cpu", "flops_per_step": 1.0}

    monkeypatch.setattr(benchmark, "run_child", fake_child)
    monkeypatch.setattr(benchmark, "torch_available", lambda: True)
    assert benchmark.main(["--mode", "infer", "--compare-torch", which, "--json"]) == 0
    compiled = ["torch-compile", "torch-compile-nchw"] * (which == "all")
    assert called == expected + compiled
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(result["torch"]) == expected[1:] + compiled[1:]
    assert any("no C++ compiler; its row is left out" in n for n in result["notes"]) == (
        which == "all")


def test_pipeline_mode_measures_the_input_pipeline(tmp_path):
    import data_pipeline

    data = data_pipeline.sample_dataset_dir(tmp_path / "s", num_cars=2, size=(96, 64))
    r = bench("--mode", "pipeline", "--data-dir", str(data), "--image-size", "32", "48",
              "--batch-size", "4")
    assert r["images"] == 32 and r["image_size"] == [32, 48]
    assert r["cold_img_per_s"] > 0 and r["cached_img_per_s"] > 0 and r["img_per_s"] > 0
    crops = bench("--mode", "pipeline", "--data-dir", str(data), "--crop", "16", "32",
                  "--scale", "0.5", "--batch-size", "4")
    assert crops["crop"] == [16, 32] and crops["scale"] == 0.5 and crops["img_per_s"] > 0
    # A broken file is named with a fix the benchmark has: --skip-bad (it had named
    # training's flag, which the benchmark lacked).
    bad = sorted((data / "train").iterdir())[0]
    bad.write_bytes(b"not an image")
    result = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--mode",
                             "pipeline", "--data-dir", str(data), "--image-size", "32", "48",
                             "--batch-size", "4", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and bad.name in result.stderr
    assert "--skip-bad" in result.stderr and "Traceback" not in result.stderr
    skipped = bench("--mode", "pipeline", "--data-dir", str(data), "--image-size", "32",
                    "48", "--batch-size", "4", "--skip-bad")
    assert skipped["images"] == 31


def test_kaggle_size_sample_writes_carvana_sized_pairs(tmp_path):
    import data_pipeline
    from experiments.benchmark import kaggle_size_sample

    out = kaggle_size_sample(3, tmp_path / "kaggle")
    pairs = data_pipeline.find_pairs(out)
    assert len(pairs) == 3 and pairs[0].image.parent.name == "train"
    assert pairs[0].mask.name == pairs[0].image.stem + "_mask.gif"
    with Image.open(pairs[0].image) as image, Image.open(pairs[0].mask) as mask:
        assert image.size == mask.size == (1918, 1280)


@pytest.mark.parametrize("args,message", [
    (["--image-size", "100"], "--image-size"),
    (["--compare-torch", "--base-features", "8"], "64 base features"),
    (["--steps", "0"], "--steps"),
    (["--compare-onnx", "--mode", "train"], "--compare-onnx times inference"),
    (["--compare-onnx", "--mode", "infer", "--dtype", "bfloat16"],
     "--compare-onnx runs the float32 ONNX export: drop --dtype bfloat16"),
    (["--compare-torch", "--mode", "tile"], "use it with --mode train or --mode infer"),
    (["--compare-kernels", "--mode", "pipeline"], "--compare-kernels times the model"),
    (["--mode", "infer", "--remat", "full"], "--remat full trades memory in training"),
    (["--mode", "train", "--kaggle-size-sample", "4"], "use it with --mode pipeline"),
    (["--mode", "infer", "--data-dir", "."], "--data-dir feeds the input pipeline"),
    (["--mode", "train", "--skip-bad"], "--skip-bad feeds the input pipeline"),
    (["--quick"], "--quick belongs to the GPU check: add --suite gpu"),
    (["--budget", "0"], "--budget belongs to the GPU check: add --suite gpu"),
    (["--suite", "gpu", "--quick", "--platform", "cpu", "--budget", "-5"], "--budget -5: give"),
    (["--suite", "gpu", "--quick", "--platform", "cpu", "--budget", "nan"], "--budget nan: give"),
    # Checked before the rows: a read-only or misnamed folder had failed after them.
    (["--suite", "gpu", "--quick", "--platform", "cpu", "--out", "README.md/suite"],
     "--out's folder README.md is a file"),
])
def test_bad_flags_fail_with_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "experiments.benchmark", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_tile_mode_times_whole_photos_in_tiles():
    r = bench("--mode", "tile", "--image-size", "32", "--batch-size", "4", "--steps", "1",
              "--warmup", "0", "--base-features", "4", "--photo-size", "70", "100",
              "--overlap", "0.25", "--platform", "cpu")
    assert r["mode"] == "tile" and r["img_per_s"] > 0
    # 70x100 with 4-pixel mirrored margins is 78x108: 3 x 5 tiles of 32x32 at a stride
    # of at most 24, in batches of 4
    assert r["model_calls_per_step"] == 4
    assert r["gflops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"] / 1e9)


def test_the_gpu_suite_runs_where_tensorflow_and_matplotlib_are_missing(tmp_path):
    """The GPU check's code paths, at a tiny size on the CPU, with TensorFlow and
    matplotlib made unimportable (GPU images often lack both): the model row runs,
    the pipeline row fails on its own without stopping the suite, the torch row is
    left out with its reason, and the markdown and JSON are written."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("tensorflow", "matplotlib"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('no {name} here')\n")
    out = tmp_path / "results" / "suite"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--suite", "gpu", "--quick",
         "--platform", "cpu", "--base-features", "4", "--out", str(out),
         "--rows", "jax-infer-bf16,torch-compile-infer-bf16,pipeline-augment"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)])})
    assert result.returncode == 0, result.stderr
    report = json.loads(out.with_name("suite.json").read_text())
    rows = {row["id"]: row for row in report["rows"]}
    jax_row = rows["jax-infer-bf16"]
    assert "error" not in jax_row, jax_row
    assert jax_row["img_per_s"] > 0 and jax_row["dtype"] == "bfloat16"
    assert jax_row["cache"]["cache_misses"] >= 1  # the suite's own, empty cache
    assert "tensorflow" in rows["pipeline-augment"]["error"]
    assert [r["id"] for r in report["left_out"]] == ["torch-compile-infer-bf16"]
    table = out.with_name("suite.md").read_text()
    # why the torch row is left out: the width, or (README's test command installs no
    # torch) torch itself
    import importlib.util
    reason = ("64 base features" if importlib.util.find_spec("torch")
              else "torch is not installed")
    assert "| jax-infer-bf16 |" in table and reason in table


def test_the_full_gpu_suite_needs_a_gpu_and_fails_when_no_row_ran(tmp_path, monkeypatch,
                                                                  capsys):
    """On a CPU, --suite gpu tried its 512x512 batch-32 rows (34.5 GB) or, with
    --platform gpu, wrote a table of failures, and exited 0 either way."""
    from experiments import suite
    from tests.test_experiments import call

    out = tmp_path / "suite"
    for platform in ("cpu", "auto"):  # auto: JAX, asked in a child, finds no GPU here
        assert call(benchmark_main, ["--suite", "gpu", "--platform", platform,
                                     "--out", str(out)]) == 2
        assert "--suite gpu measures a GPU, and JAX finds none here; add --quick " \
            "--platform cpu" in capsys.readouterr().err
    assert not out.with_name("suite.json").exists()
    monkeypatch.setattr(suite, "_measure", lambda row, args, sizes, *a, **k: {
        "id": row.id, "what": row.describe(sizes), "error": "x"})
    assert call(benchmark_main, ["--suite", "gpu", "--quick", "--platform", "cpu", "--rows",
                                 "jax-infer-bf16", "--out", str(out)]) == 1
    assert "no row could be measured" in capsys.readouterr().err


def benchmark_main(argv):
    from experiments import benchmark

    return benchmark.main(argv)


def test_a_lever_that_is_an_xla_flag_reaches_its_own_row_process_alone(monkeypatch):
    """XLA reads its flags once per process: the runtime-fusion row must start its
    child with the flag added to XLA_FLAGS, and the other rows without it."""
    import argparse

    from experiments import benchmark, suite

    report_env = "import json, os; print(json.dumps({'flags': os.environ.get('XLA_FLAGS', '')}))"
    monkeypatch.setattr(benchmark, "child_argv", lambda args, which: [sys.executable, "-c",
                                                                      report_env])
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    rows = {row.id: row for row in suite.ROWS}
    args = argparse.Namespace(platform="cpu")

    def flags(row_id):
        return suite._measure(rows[row_id], args, suite.QUICK, "cache", timeout=60)["flags"]

    assert flags("jax-train-bf16-runtime-fusion") == (
        "--xla_force_host_platform_device_count=1 --xla_gpu_use_runtime_fusion=true")
    assert flags("jax-train-bf16") == "--xla_force_host_platform_device_count=1"


def test_each_suite_row_names_the_sizes_it_runs():
    """--quick runs the rows at 32x32 on 70x100 photos: its report said 1918x1280
    photos, 512x512 tiles and batch 64, what the full check runs."""
    from experiments import suite

    rows = {row.id: row for row in suite.ROWS}
    assert rows["jax-tile-hflip"].describe(suite.FULL).startswith(
        "tiled 1918x1280 photos, 512x512 tiles")
    assert rows["jax-train-bf16-b64"].describe(suite.FULL) == "batch 64 instead of 32"
    assert rows["jax-tile-hflip"].describe(suite.QUICK).startswith(
        "tiled 100x70 photos, 32x32 tiles")
    assert rows["jax-train-bf16-b64"].describe(suite.QUICK) == "batch 4 instead of 2"
    for row in suite.ROWS:
        quick = row.describe(suite.QUICK)
        assert not any(size in quick for size in ("1918", "512", "64", "{")), quick


def test_pipeline_flags_reach_pipeline_children_alone():
    """The GPU check with --data-dir (or --skip-bad) gave every model row's child a flag
    its mode refuses, and every such row failed."""
    from experiments import benchmark

    args = benchmark.parse_args(["--suite", "gpu", "--platform", "cpu", "--quick",
                                 "--data-dir", "data", "--skip-bad"])
    for mode, passed in (("train", False), ("infer", False), ("pipeline", True)):
        argv = benchmark.child_argv(argparse.Namespace(**{**vars(args), "mode": mode}), "jax")
        assert ("--data-dir" in argv and "--skip-bad" in argv) is passed, (mode, argv)
        benchmark.parse_args(argv[3:])  # the child takes what it is given
