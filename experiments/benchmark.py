"""Benchmark the U-Net: training and inference images/s, memory, GFLOP/s; the input pipeline.

Each configuration runs in a fresh child process ("one process per row"), so that the
compile caches, thread pools and peak memory of one measurement never leak into
another. Images/s is the batch size over the median step time of ``--steps`` timed
steps, after compiling and ``--warmup`` untimed steps; every step waits for its
results (``block_until_ready``). Compile time (``jit(...).lower(...).compile()``) is
reported apart from the steps. GFLOP/s is XLA's own FLOP count of the compiled program
(``compiled.cost_analysis()['flops']``) over the median step time.

``--compare-torch`` runs the guide's PyTorch U-Net (``experiments/torch_unet.py``) in
the same invocation, the way the guide trains it (AdamW lr 3e-4, BCEWithLogitsLoss) or
under ``torch.inference_mode``, in NCHW and in channels_last, with one thread per core,
and prints JAX/torch ratios. Torch's GFLOP/s use the JAX program's FLOP count (the
same network), so they compare directly. ``--mode pipeline`` times the tf.data input
pipeline alone, with no model (with ``--crop``, the patch-training pipeline).
``--compare-onnx`` (``--mode infer``) adds onnxruntime on the CPU running the same
model exported to ONNX (``unet_jax.export``), an informational row: how a deployed
model compares with JAX on the same machine. ``--mode tile`` times overlap-tile prediction of whole photos (1918x1280 by default,
``--photo-size``) in tiles of ``--image-size``: photos/s and the peak memory of the
process, which the tiling keeps bounded whatever the photo's size.

The machines we share are noisy: read ratios from one invocation, never absolute
numbers from different runs. Each row records the load average and the CPU seconds
per step (``cpu_s``), which a busy machine disturbs much less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host_platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments import common

EXAMPLES = """
python -m experiments.benchmark --mode train --image-size 128 --batch-size 4 --compare-torch
python -m experiments.benchmark --mode infer --image-size 512 --batch-size 1 --compare-torch
python -m experiments.benchmark --mode infer --image-size 512 --batch-size 1 --compare-onnx
python -m experiments.benchmark --mode train --image-size 512 --batch-size 4 --steps 3 --json
python -m experiments.benchmark --mode pipeline --image-size 512 --batch-size 32 --kaggle-size-sample 64
python -m experiments.benchmark --mode pipeline --crop 256 --scale 0.5 --batch-size 16 --kaggle-size-sample 64
python -m experiments.benchmark --mode tile --image-size 256 --batch-size 8 --overlap 0.25 --steps 2
python -m experiments.benchmark --mode tile --image-size 512 --photo-size 4000 6000 --steps 1
python -m experiments.benchmark --platform gpu --dtype bfloat16 --image-size 512 --batch-size 32
"""

# "jax" is the model as training builds it (on a CPU: with both CPU kernels); the
# others measure what each CPU kernel of unet_jax/cpu_kernels.py buys (--compare-kernels).
KERNEL_VARIANTS = {"jax-stock": (False, False), "jax-conv-kernel": (True, False),
                   "jax-pool-kernel": (False, True)}
CHILDREN = ("jax", *KERNEL_VARIANTS, "torch-nchw", "torch-channels_last", "onnxruntime")


def parse_args(argv=None):
    p = common.make_parser("experiments.benchmark", __doc__.split("\n\n")[0], EXAMPLES)
    p.add_argument("--mode", choices=("train", "infer", "pipeline", "tile"), default="train",
                   help="a full AdamW training step, a forward pass, the input pipeline, "
                   "or overlap-tile prediction of whole photos (tiles of --image-size)")
    p.add_argument("--image-size", type=int, nargs="+", default=[128], metavar=("H", "W"),
                   help="model input height [width] (default: 128)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps after compiling (default: 1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; parameters stay float32 (default: float32)")
    p.add_argument("--base-features", type=int, default=64, help="U-Net width (default: 64)")
    p.add_argument("--compare-torch", action="store_true",
                   help="also run the guide's PyTorch model, NCHW and channels_last")
    p.add_argument("--compare-onnx", action="store_true",
                   help="infer mode: also run the model exported to ONNX with onnxruntime "
                   "on the CPU (needs pip install -e '.[export]')")
    p.add_argument("--compare-kernels", action="store_true",
                   help="also run the model with stock Flax ops and with each CPU kernel "
                   "alone (unet_jax/cpu_kernels.py), to see what each one buys")
    p.add_argument("--data-dir", help="pipeline mode: dataset to read (default: the sample set)")
    p.add_argument("--kaggle-size-sample", type=int, metavar="N",
                   help="pipeline mode: read N synthetic 1918x1280 JPEG/GIF pairs in "
                   "Kaggle's layout (what a real Carvana run decodes), written to a "
                   "temporary folder from the sample set")
    p.add_argument("--crop", type=int, nargs="+", metavar=("H", "W"),
                   help="pipeline mode: random crops of this size (patch training) instead "
                   "of whole images resized to --image-size")
    p.add_argument("--scale", type=float, default=1.0,
                   help="pipeline mode with --crop, and tile mode: resize each image by this "
                   "factor first (default: 1.0)")
    p.add_argument("--photo-size", type=int, nargs=2, default=[1280, 1918], metavar=("H", "W"),
                   help="tile mode: the photo's height and width (default: Carvana's 1280 1918)")
    p.add_argument("--overlap", type=float, default=0.25,
                   help="tile mode: fraction of a tile its neighbour shares (default: 0.25)")
    p.add_argument("--tta", choices=("none", "hflip", "flips"), default="none",
                   help="tile mode: test-time flips (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    common.add_platform_flag(p)
    args = p.parse_args(argv)
    for flag in ("batch_size", "steps", "base_features"):
        if getattr(args, flag) < 1:
            raise common.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise common.UserError("--warmup must be 0 or more")
    if args.kaggle_size_sample is not None and args.kaggle_size_sample < 1:
        raise common.UserError("--kaggle-size-sample must be at least 1")
    if args.compare_onnx and args.mode != "infer":
        raise common.UserError("--compare-onnx times inference: use it with --mode infer")
    if args.compare_torch and args.base_features != 64:
        raise common.UserError("--compare-torch runs the guide's model, which has 64 base "
                               "features; leave --base-features at 64")
    from unet_jax.config import normalize_image_size

    args.image_size = normalize_image_size(args.image_size, 4)  # (height, width), checked
    if args.crop is not None:
        args.crop = normalize_image_size(args.crop, 4, "--crop")
    if not 0 < args.scale <= 8:
        raise common.UserError(f"--scale {args.scale}: give a factor in (0, 8]")
    if not 0 <= args.overlap < 1:
        raise common.UserError(f"--overlap {args.overlap}: give a fraction in [0, 1)")
    if min(args.photo_size) < 1:
        raise common.UserError("--photo-size: give a positive height and width")
    return args


# ---------------------------------------------------------------------------------------
# Measuring one configuration (runs in a child process)
# ---------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux reports KiB, macOS bytes).

    Measured per child process, so it is the peak of exactly one configuration:
    parameters, optimizer state, activations, workspace and the runtime itself.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def time_steps(step, steps: int, warmup: int) -> dict:
    """Runs ``step`` (which must block until its results are ready) ``warmup`` times
    untimed, then ``steps`` times timed; returns the median wall and CPU seconds.

    The median ignores a step slowed by another process; CPU seconds (all threads of
    this process) change much less than wall time when the machine is shared.
    """
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"step_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "step_times_s": [round(t, 4) for t in wall]}


def flops_of(compiled) -> float:
    """XLA's FLOP count of a compiled program (0 where the backend does not say)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def run_jax(args, variant: str = "jax") -> dict:
    """One configuration of the Flax U-Net: the real ``train_step`` (AdamW, BCE, and
    its batch metrics) or ``predict_step``, on random data of the requested size.
    ``variant`` is "jax" (the model as training builds it) or a KERNEL_VARIANTS key."""
    backend = common.start_platform(args.platform)
    import dataclasses

    import jax
    import numpy as np

    from unet_jax import Config, create_model, create_train_state, predict_step, train_step
    from unet_jax import cpu_kernels

    h, w = args.image_size
    config = Config(base_features=args.base_features, dtype=args.dtype, image_size=(h, w))
    model = None
    if variant in KERNEL_VARIANTS:
        conv, pool = KERNEL_VARIANTS[variant]
        model = dataclasses.replace(
            create_model(dataclasses.replace(config, kernels="stock")),
            **({"conv": cpu_kernels.CpuConv} if conv else {}),
            **({"pool": cpu_kernels.max_pool_2x2} if pool else {}))
    state = create_train_state(jax.random.key(0), config, model=model)
    rng = np.random.default_rng(0)
    batch = {"image": jax.device_put(rng.uniform(size=(args.batch_size, h, w, 3)).astype(np.float32)),
             "mask": jax.device_put((rng.uniform(size=(args.batch_size, h, w, 1)) > 0.5).astype(np.float32))}

    start = time.perf_counter()
    if args.mode == "train":
        lowered = train_step.lower(state, batch)
    else:
        lowered = predict_step.lower(state.params, batch["image"], state.apply_fn,
                                     args.tta if args.mode == "tile" else "none")
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = flops_of(compiled)

    holder = {"state": state}
    images_per_step, calls = args.batch_size, 1
    if args.mode == "tile":  # one step: a whole photo, tile by tile
        from data_pipeline.preprocess import scaled_size
        from unet_jax import tiling

        photo = rng.uniform(size=(*scaled_size(args.photo_size, args.scale), 3)).astype(np.float32)

        def predict(tiles):
            holder["calls"] = holder.get("calls", 0) + 1
            return np.asarray(compiled(state.params, tiles))

        images_per_step = 1
        tiling.predict_tiled(predict, photo, (h, w), args.overlap, args.batch_size)
        calls, holder["calls"] = holder["calls"], 0

    def step():
        if args.mode == "train":
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready((holder["state"], metrics))
        elif args.mode == "tile":
            tiling.predict_tiled(predict, photo, (h, w), args.overlap, args.batch_size)
        else:
            jax.block_until_ready(compiled(state.params, batch["image"]))

    timing = time_steps(step, args.steps, args.warmup)
    flops *= calls
    return {"framework": variant, "backend": backend, "device": jax.devices()[0].device_kind,
            "img_per_s": images_per_step / timing["step_s"], **timing,
            "model_calls_per_step": calls,
            "lower_s": lower_s, "compile_s": compile_s, "flops_per_step": flops,
            "gflops_per_s": flops / timing["step_s"] / 1e9, "peak_rss_mb": peak_rss_mb(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}


def run_onnx(args) -> dict:
    """The same U-Net (same parameters as the JAX row) exported to ONNX and run by
    onnxruntime's CPU provider with one thread per core, in this process. Its
    "compile" time is the export (checked against JAX) and the session's creation,
    and its peak memory includes the export's (the conversion's, not the session's)."""
    common.start_platform("cpu")
    import jax
    import numpy as np

    from unet_jax import Config, export
    from unet_jax.train import init_params

    ort = export.require("onnxruntime", "onnx")
    h, w = args.image_size
    config = Config(base_features=args.base_features, image_size=(h, w))
    params = init_params(jax.random.key(0), config)
    images = np.random.default_rng(0).uniform(size=(args.batch_size, h, w, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = Path(tmp) / "unet.onnx"
        export.export_params(params, config, "onnx", path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_count()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        compile_s = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
    timing = time_steps(lambda: session.run(None, {"image": images}), args.steps, args.warmup)
    return {"framework": "onnxruntime", "backend": "cpu", "device": "cpu",
            "img_per_s": args.batch_size / timing["step_s"], **timing,
            "compile_s": compile_s, "gflops_per_s": 0.0, "peak_rss_mb": peak_rss_mb(),
            "onnx_mb": size_mb, "onnxruntime": ort.__version__}


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def run_torch(args, channels_last: bool) -> dict:
    """The guide's PyTorch U-Net, run as the guide runs it, in this process.

    Train: ``model(img)``, ``zero_grad``, ``BCEWithLogitsLoss``, ``backward``, AdamW
    ``step`` (lr 3e-4). Infer: the forward pass under ``torch.inference_mode`` in eval
    mode. One intra-op thread per core, as JAX's CPU backend uses. The first step
    (allocations, oneDNN kernel selection) is reported as ``compile_s``.
    """
    import numpy as np
    import torch

    from experiments.torch_unet import UNet

    h, w = args.image_size
    device = "cuda" if args.platform == "gpu" else "cpu"
    torch.set_num_threads(cpu_count())
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(3, 1).to(device=device, memory_format=fmt)
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.uniform(size=(args.batch_size, 3, h, w)).astype(np.float32))
    mask = torch.from_numpy((rng.uniform(size=(args.batch_size, 1, h, w)) > 0.5).astype(np.float32))
    img = img.to(device).contiguous(memory_format=fmt)
    mask = mask.to(device).contiguous(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    criterion = torch.nn.BCEWithLogitsLoss()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def train():
        with autocast:
            y_pred = model(img)
            loss = criterion(y_pred.float(), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sync()

    def infer():
        with torch.inference_mode(), autocast:
            model(img)
        sync()

    step = train if args.mode == "train" else infer
    model.train(args.mode == "train")
    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    timing = time_steps(step, args.steps, args.warmup)
    return {"framework": "torch-channels_last" if channels_last else "torch-nchw",
            "device": device, "img_per_s": args.batch_size / timing["step_s"], **timing,
            "compile_s": first_s, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


# ---------------------------------------------------------------------------------------
# The input pipeline
# ---------------------------------------------------------------------------------------

def kaggle_size_sample(count: int, out_dir) -> Path:
    """Writes ``count`` image/mask pairs at Carvana's 1918x1280 in Kaggle's layout
    (``train/<car>_<NN>.jpg``, ``train_masks/<car>_<NN>_mask.gif``), made from the
    sample set, and returns the folder.

    A GPU run reads full-size Kaggle JPEGs, and decoding them dominates the pipeline's
    cost; the small sample images would flatter it. The sample's drawings are enlarged
    and given a little pixel noise, so that the JPEGs hold fine detail like photographs
    and cost as much to decode.
    """
    import numpy as np
    from PIL import Image

    import data_pipeline

    sources = data_pipeline.find_pairs(data_pipeline.sample_dataset_dir())
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "train_masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        source = sources[i % len(sources)]
        name = f"{i // 16:012x}_{i % 16 + 1:02d}"  # 16 views per car, as in Carvana
        with Image.open(source.image) as image:
            big = np.asarray(image.convert("RGB").resize((1918, 1280), Image.BICUBIC), np.int16)
        noisy = np.clip(big + rng.integers(-4, 5, big.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(out / "train" / f"{name}.jpg", quality=90)
        with Image.open(source.mask) as mask:
            mask.resize((1918, 1280), Image.NEAREST).save(out / "train_masks" / f"{name}_mask.gif")
    return out


def run_pipeline(args) -> dict:
    """Images/s of the input pipeline alone (``experiments.throughput``): decoding
    every image from disk (``cold``, the first epoch or no cache) and reading the
    decoded cache (``cached``, every later epoch)."""
    import data_pipeline
    from experiments.throughput import measure_throughput

    size = args.image_size
    with tempfile.TemporaryDirectory(prefix="unet-jax-kaggle-size-") as tmp:
        if args.kaggle_size_sample:
            data_dir = kaggle_size_sample(args.kaggle_size_sample, tmp)
        else:
            data_dir = Path(args.data_dir) if args.data_dir else data_pipeline.sample_dataset_dir()
        pairs = data_pipeline.find_pairs(data_dir)
        jpeg_kb = statistics.mean(p.image.stat().st_size for p in pairs) / 1e3
        batches = len(pairs) // args.batch_size - args.warmup
        if batches < 1:
            raise common.UserError(
                f"{len(pairs)} images are too few for --batch-size {args.batch_size} and "
                f"--warmup {args.warmup}; use a smaller batch or more images")
        try:
            result = measure_throughput(pairs, size, args.batch_size, batches=batches,
                                        warmup=args.warmup, crop=args.crop, scale=args.scale)
        except ValueError as e:
            raise common.UserError(str(e)) from None
    if args.kaggle_size_sample:  # the folder is gone by now
        data_dir = f"{args.kaggle_size_sample} synthetic 1918x1280 pairs (temporary)"
    return {"framework": "tf.data", "mode": "pipeline", "data_dir": str(data_dir),
            "kaggle_size_sample": args.kaggle_size_sample, "mean_image_kb": jpeg_kb,
            **result, "peak_rss_mb": peak_rss_mb(), "machine": machine_info()}


# ---------------------------------------------------------------------------------------
# The parent: one child per row, the table, the ratios
# ---------------------------------------------------------------------------------------

def machine_info() -> dict:
    """What a reader needs to compare figures: CPU model and features, cores, versions."""
    model, flags = host_platform.processor() or host_platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model, "cores": cpu_count(),
            "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
            "python": host_platform.python_version(), "load_avg": os.getloadavg()[0]}


def child_argv(args, which: str) -> list[str]:
    """The command line of the child that measures ``which`` for this invocation."""
    return [sys.executable, "-m", "experiments.benchmark", "--mode", args.mode,
            "--image-size", *map(str, args.image_size), "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype,
            "--base-features", str(args.base_features), "--platform", args.platform,
            "--photo-size", *map(str, args.photo_size), "--scale", str(args.scale),
            "--overlap", str(args.overlap), "--tta", args.tta, "--child", which]


def run_child(args, which: str) -> dict:
    """Measures one configuration in a fresh process; returns its result row."""
    load = os.getloadavg()[0]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(child_argv(args, which), capture_output=True, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise common.UserError(f"the {which} measurement failed: "
                               f"{lines[-1] if lines else f'exit status {result.returncode}'}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["load_avg"] = round((load + os.getloadavg()[0]) / 2, 2)
    return row


def module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def torch_available() -> bool:
    return module_available("torch")


def print_table(args, rows: list[dict]) -> None:
    """One line per row: images/s, GFLOP/s, peak memory, compile, and JAX's speed-up."""
    jax_row = rows[0]
    h, w = args.image_size
    what = f"{args.mode} {h}x{w}"
    if args.mode == "tile":
        what = (f"tiled prediction of {args.photo_size[1]}x{args.photo_size[0]} photos at "
                f"scale {args.scale} in {jax_row['model_calls_per_step']} calls of {h}x{w} "
                f"tiles (overlap {args.overlap}, tta {args.tta}); img/s = photos/s")
    print(f"{what}, batch {args.batch_size}, {args.dtype}, on "
          f"{jax_row['backend']} ({jax_row['device']}); median of {args.steps} steps "
          f"after {args.warmup} warm-up:")
    print(f"  {'':20} {'img/s':>9} {'GFLOP/s':>8} {'cpu s/step':>10} {'peak MB':>8} "
          f"{'compile s':>9} {'load':>5} {'jax/this':>8}")
    for row in rows:
        ratio = jax_row["img_per_s"] / row["img_per_s"]
        print(f"  {row['framework']:20} {row['img_per_s']:9.3f} {row['gflops_per_s']:8.1f} "
              f"{row['cpu_s']:10.2f} {row['peak_rss_mb']:8.0f} {row['compile_s']:9.1f} "
              f"{row['load_avg']:5.2f} {ratio:8.2f}")
    if len(rows) > 1:
        print("  (torch and onnxruntime GFLOP/s use XLA's FLOP count of the same network; "
              "compile s for torch is its first step, for onnxruntime the export and "
              "session, whose peak memory its row includes)")


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        if args.child.startswith("jax"):
            row = run_jax(args, args.child)
        elif args.child == "onnxruntime":
            row = run_onnx(args)
        else:
            row = run_torch(args, channels_last=args.child == "torch-channels_last")
        print(json.dumps(row))
        return 0

    if args.mode == "pipeline":
        result = run_pipeline(args)
        into = (f"crops of {result['crop'][0]}x{result['crop'][1]} at scale {args.scale}"
                if args.crop else f"{result['image_size'][0]}x{result['image_size'][1]}")
        print(f"input pipeline, {result['images']} images ({result['mean_image_kb']:.0f} kB "
              f"mean file) to {into}, batch "
              f"{result['batch_size']}: {result['cold_img_per_s']:.1f} img/s decoding from "
              f"disk, {result['cached_img_per_s']:.1f} img/s from the cache (filled in "
              f"{result['cache_fill_s']:.1f} s)")
        if args.json:
            print(json.dumps(result))
        return 0

    rows, notes = [run_child(args, "jax")], []
    if args.compare_kernels:
        rows += [run_child(args, variant) for variant in KERNEL_VARIANTS]
    if args.compare_torch:
        if torch_available():
            rows += [run_child(args, "torch-nchw"), run_child(args, "torch-channels_last")]
        else:
            notes.append("--compare-torch: torch is not installed here (pip install "
                         "torch, the CPU build is enough); JAX only")
    if args.compare_onnx:
        missing = [m for m in ("tf2onnx", "onnx", "onnxruntime") if not module_available(m)]
        if missing:
            notes.append(f"--compare-onnx: {', '.join(missing)} not installed here (pip "
                         "install -e '.[export]'); JAX only")
        else:
            rows.append(run_child(args, "onnxruntime"))
    jax_row = rows[0]
    for row in (r for r in rows[1:] if r["framework"] in ("onnxruntime", "torch-nchw",
                                                          "torch-channels_last")):
        # the same network: XLA's FLOP count over this row's step time
        row["gflops_per_s"] = jax_row["flops_per_step"] / row["step_s"] / 1e9
    print_table(args, rows)
    for note in notes:
        print(note)
    if args.json:
        result = dict(jax_row, mode=args.mode, image_size=list(args.image_size),
                      batch_size=args.batch_size, dtype=args.dtype, steps=args.steps,
                      warmup=args.warmup,
                      base_features=args.base_features, machine=machine_info(), notes=notes)
        torch_rows = [r for r in rows[1:] if r["framework"].startswith("torch")]
        if torch_rows:
            result["torch"] = {r["framework"]: r for r in torch_rows}
        if rows[-1]["framework"] == "onnxruntime":
            result["onnxruntime"] = rows[-1]
        if len(rows) > 1:
            result["variants"] = {r["framework"]: r for r in rows[1:]
                                  if r["framework"] in KERNEL_VARIANTS}
            result["ratios"] = {r["framework"]: jax_row["img_per_s"] / r["img_per_s"]
                                for r in rows[1:]}
            result["memory_ratios"] = {r["framework"]: jax_row["peak_rss_mb"] / r["peak_rss_mb"]
                                       for r in rows[1:]}
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.benchmark")
