"""experiments.benchmark end to end at a tiny size (speed itself is never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args):
    result = subprocess.run([sys.executable, "-m", "experiments.benchmark", *args, "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_benchmark_reports_sane_figures(mode):
    r = bench("--mode", mode, "--image-size", "32", "--batch-size", "2", "--steps", "2",
              "--base-features", "8", "--platform", "cpu")
    assert r["mode"] == mode and r["backend"] == "cpu"
    assert r["img_per_s"] > 0 and r["compile_s"] > 0 and r["peak_rss_mb"] > 50
    assert r["flops_per_step"] > 0 and r["gflops_per_s"] > 0
    # a training step costs more than a forward pass: about 3x its FLOPs
    if mode == "train":
        forward = bench("--mode", "infer", "--image-size", "32", "--batch-size", "2",
                        "--steps", "1", "--base-features", "8", "--platform", "cpu")
        assert 2 < r["flops_per_step"] / forward["flops_per_step"] < 4.5


def test_benchmark_compares_with_torch():
    pytest.importorskip("torch", reason="torch is not installed")
    r = bench("--mode", "infer", "--image-size", "32", "--batch-size", "1", "--steps", "1",
              "--compare-torch", "--platform", "cpu")
    assert set(r["ratios"]) == {"torch-nchw", "torch-channels_last"}
    assert all(v > 0 for v in r["ratios"].values())


def test_benchmark_measures_the_input_pipeline(tmp_path):
    import data_pipeline
    data = data_pipeline.sample_dataset_dir(tmp_path / "s", num_cars=2, size=(96, 64))
    r = bench("--mode", "pipeline", "--data-dir", str(data), "--image-size", "32", "48",
              "--batch-size", "4")
    assert r["images"] == 32 and r["cold_img_per_s"] > 0 and r["cached_img_per_s"] > 0


def test_benchmark_rejects_a_bad_size():
    result = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--image-size", "100"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "--image-size" in result.stderr
