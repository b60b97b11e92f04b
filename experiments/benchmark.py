"""Benchmark the U-Net: training and inference images/s, memory, GFLOP/s; the input pipeline.

Each configuration runs in a fresh child process, so that compile caches and peak
memory of one measurement never leak into another ("one process per row"). Images/s is
the median over ``--steps`` timed steps after ``--warmup`` untimed ones; compile time
is measured separately; GFLOP/s is XLA's own FLOP count of the compiled program
divided by the median step time. ``--compare-torch`` runs the guide's PyTorch model the
same way (AdamW + BCEWithLogitsLoss, NCHW and channels_last) in the same invocation
and prints the ratios; its GFLOP/s use the JAX program's FLOP count, the same network.

These machines are shared and noisy: compare ratios from one invocation, never
absolute numbers from different days.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from experiments import common

EXAMPLES = """
python -m experiments.benchmark --mode train --image-size 128 --batch-size 4 --compare-torch
python -m experiments.benchmark --mode infer --image-size 512 --batch-size 1 --compare-torch
python -m experiments.benchmark --mode pipeline --image-size 512 --batch-size 32 --kaggle-size-sample 64
python -m experiments.benchmark --platform gpu --dtype bfloat16 --image-size 512 --batch-size 32
"""


def parse_args(argv=None):
    p = common.make_parser("experiments.benchmark", __doc__.split("\n\n")[0], EXAMPLES)
    p.add_argument("--mode", choices=("train", "infer", "pipeline"), default="train")
    p.add_argument("--image-size", type=int, nargs="+", default=[128], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--base-features", type=int, default=64, help="U-Net width (default: 64)")
    p.add_argument("--compare-torch", action="store_true",
                   help="also run the guide's PyTorch model (NCHW and channels_last)")
    p.add_argument("--data-dir", help="pipeline mode: dataset to read (default: the sample set)")
    p.add_argument("--kaggle-size-sample", type=int, metavar="N",
                   help="pipeline mode: read N synthetic 1918x1280 JPEG/GIF pairs, Carvana's size")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--child", choices=("jax", "torch-nchw", "torch-cl"), help=argparse_hidden())
    common.add_platform_flag(p)
    return p.parse_args(argv)


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _time_steps(step, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def run_jax(args) -> dict:
    """One configuration of the Flax U-Net in this process."""
    backend = common.start_platform(args.platform)
    import jax
    import numpy as np

    from unet_jax import Config, create_train_state, train_step
    from unet_jax.train import predict_step

    h, w = common.image_size(args.image_size)
    config = Config(base_features=args.base_features, dtype=args.dtype, image_size=(h, w))
    state = create_train_state(jax.random.key(0), config)
    rng = np.random.default_rng(0)
    batch = {"image": jax.device_put(rng.uniform(size=(args.batch_size, h, w, 3)).astype(np.float32)),
             "mask": jax.device_put((rng.uniform(size=(args.batch_size, h, w, 1)) > 0.5).astype(np.float32))}

    if args.mode == "train":
        lowered = train_step.lower(state, batch)
    else:
        lowered = predict_step.lower(state.params, batch["image"], state.apply_fn)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float((cost or {}).get("flops", 0.0))

    holder = {"state": state}

    def step():
        if args.mode == "train":
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics)
        else:
            jax.block_until_ready(compiled(state.params, batch["image"]))

    times = _time_steps(step, args.steps, args.warmup)
    median = statistics.median(times)
    return {"framework": "jax", "backend": backend, "device": str(jax.devices()[0].device_kind),
            "img_per_s": args.batch_size / median, "step_s": median, "compile_s": compile_s,
            "flops_per_step": flops, "gflops_per_s": flops / median / 1e9,
            "peak_rss_mb": peak_rss_mb()}


def run_torch(args, channels_last: bool) -> dict:
    """The guide's PyTorch model, trained or run the way the guide does, in this process."""
    import numpy as np
    import torch

    from experiments.torch_unet import UNet

    torch.set_num_threads(os.cpu_count() or 1)
    h, w = common.image_size(args.image_size)
    model = UNet(3, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.uniform(size=(args.batch_size, 3, h, w)).astype(np.float32))
    mask = torch.from_numpy((rng.uniform(size=(args.batch_size, 1, h, w)) > 0.5).astype(np.float32))
    img, mask = img.contiguous(memory_format=fmt), mask.contiguous(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    criterion = torch.nn.BCEWithLogitsLoss()

    def train():
        y_pred = model(img)
        optimizer.zero_grad()
        loss = criterion(y_pred, mask)
        loss.backward()
        optimizer.step()

    def infer():
        with torch.inference_mode():
            model(img)

    step = train if args.mode == "train" else infer
    model.train(args.mode == "train")
    start = time.perf_counter()
    step()  # the first call allocates; reported like JAX's compile time
    first_s = time.perf_counter() - start
    times = _time_steps(step, args.steps, args.warmup)
    median = statistics.median(times)
    return {"framework": "torch-channels_last" if channels_last else "torch-nchw",
            "img_per_s": args.batch_size / median, "step_s": median, "compile_s": first_s,
            "peak_rss_mb": peak_rss_mb(), "torch": torch.__version__}


def run_pipeline(args) -> dict:
    """Images/s of the tf.data pipeline alone, from disk and from its cache."""
    import tempfile

    import data_pipeline
    from data_pipeline.throughput import measure_throughput

    size = common.image_size(args.image_size)
    data_dir = args.data_dir or data_pipeline.sample_dataset_dir()
    pairs = data_pipeline.find_pairs(data_dir)
    if args.kaggle_size_sample:
        data_dir = tempfile.mkdtemp(prefix="unet-jax-kaggle-size-")
        pairs = kaggle_size_copies(pairs[:args.kaggle_size_sample], data_dir)
    result = measure_throughput(pairs, size, args.batch_size,
                                batches=max(1, len(pairs) // args.batch_size - 1), warmup=1)
    return {"framework": "tf.data", "data_dir": str(data_dir), **result,
            "peak_rss_mb": peak_rss_mb()}


def kaggle_size_copies(pairs, out_dir):
    """Copies of ``pairs`` at Carvana's 1918x1280, in Kaggle's layout, for timing the
    decoding that a real run pays. Noise keeps the JPEGs as costly to decode as photos."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    import data_pipeline

    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "train_masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for pair in pairs:
        image = Image.open(pair.image).convert("RGB").resize((1918, 1280), Image.BICUBIC)
        noisy = np.asarray(image, np.int16) + rng.integers(-6, 7, (1280, 1918, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
            out / "train" / pair.image.name, quality=90)
        Image.open(pair.mask).resize((1918, 1280), Image.NEAREST).save(
            out / "train_masks" / pair.mask.name)
    return data_pipeline.find_pairs(out)


def _child(args, which: str) -> dict:
    """Runs one configuration in a fresh process and returns its JSON result."""
    argv = [a for a in sys.argv[1:] if a not in ("--compare-torch", "--json")]
    cmd = [sys.executable, "-m", "experiments.benchmark", *argv, "--child", which]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise common.UserError(f"benchmark ({which}) failed: {lines[-1] if lines else result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        if args.child == "jax":
            result = run_jax(args)
        else:
            result = run_torch(args, channels_last=args.child == "torch-cl")
        print(json.dumps(result))
        return 0
    if args.mode == "pipeline":
        result = run_pipeline(args)
        print(f"tf.data pipeline, {result['images']} images at {result['image_size']}, "
              f"batch {result['batch_size']}: {result['cold_img_per_s']:.1f} img/s from disk, "
              f"{result['cached_img_per_s']:.1f} img/s cached (cache filled in "
              f"{result['cache_fill_s']:.1f} s)")
        if args.json:
            print(json.dumps(result))
        return 0

    common.image_size(args.image_size)  # a bad size fails here, before any child starts
    rows = [_child(args, "jax")]
    if args.compare_torch:
        try:
            import torch  # noqa: F401
            rows += [_child(args, "torch-nchw"), _child(args, "torch-cl")]
        except ImportError:
            print("--compare-torch: torch is not installed (pip install torch); JAX only")
    jax_row = rows[0]
    size = "x".join(map(str, args.image_size * (2 if len(args.image_size) == 1 else 1)))
    print(f"{args.mode} {size}, batch {args.batch_size}, {args.dtype} on {jax_row['backend']} "
          f"({jax_row['device']}), median of {args.steps} steps:")
    print(f"  {'':22} {'img/s':>9} {'GFLOP/s':>8} {'peak MB':>8} {'compile s':>9} {'jax/this':>8}")
    for row in rows:
        row["gflops_per_s"] = jax_row["flops_per_step"] * row["img_per_s"] / args.batch_size / 1e9
        ratio = jax_row["img_per_s"] / row["img_per_s"]
        print(f"  {row['framework']:22} {row['img_per_s']:9.3f} {row['gflops_per_s']:8.1f} "
              f"{row['peak_rss_mb']:8.0f} {row['compile_s']:9.1f} {ratio:8.2f}")
    if args.json:
        result = dict(jax_row, mode=args.mode, image_size=args.image_size,
                      batch_size=args.batch_size, dtype=args.dtype, steps=args.steps)
        if len(rows) > 1:
            result["torch"] = {r["framework"]: r for r in rows[1:]}
            result["ratios"] = {r["framework"]: jax_row["img_per_s"] / r["img_per_s"] for r in rows[1:]}
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.benchmark")
