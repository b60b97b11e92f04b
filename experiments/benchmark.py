"""Benchmark the U-Net: training and inference images/s, memory, GFLOP/s; the input pipeline.

Each configuration runs in a fresh child process ("one process per row"), so that the
compile caches, thread pools and peak memory of one measurement never leak into
another. Images/s is the batch size over the median step time of ``--steps`` timed
steps, after compiling and ``--warmup`` untimed steps; every step waits for its
results (``block_until_ready``). Compile time (``jit(...).lower(...).compile()``) is
reported apart from the steps, with what the persistent compilation cache did
(``unet_jax/compile_cache.py``). GFLOP/s is the network's FLOPs counted from its shapes
(``unet_jax/flops.py``: XLA's own count misses cuDNN's convolutions on a GPU) over the
median step time; on a GPU the table of peak rates there turns it into a model FLOP
utilisation (``mfu``), and ``peak_device_mb`` is the device's peak memory
(``memory_stats()`` for JAX, ``max_memory_allocated()`` for torch).

``--compare-torch`` runs the guide's PyTorch U-Net (``experiments/torch_unet.py``) in
the same invocation, each row in a process without JAX (``experiments/torch_peer.py``),
on the device JAX ran on: the way the guide trains it (AdamW lr 3e-4, fused where
torch has it; BCEWithLogitsLoss) or under ``torch.inference_mode``, eager in NCHW and
in channels_last, with one thread per core, and under ``torch.compile`` in both
layouts (bf16 autocast with ``--dtype bfloat16``; ``--compare-torch eager`` leaves
the compiled rows out); the fastest of them is PyTorch at its best on that machine,
and the table ends with unet-jax's ratio to it. Torch's GFLOP/s use the same count
(the same network), so they compare directly. ``--mode pipeline`` times the tf.data input
pipeline alone, with no model (with ``--crop``, the patch-training pipeline).
``--compare-onnx`` (``--mode infer``) adds onnxruntime on the CPU running the same
model exported to ONNX (``unet_jax.export``), an informational row: how a deployed
model compares with JAX on the same machine. ``--mode tile`` times overlap-tile prediction of whole photos (1918x1280 by default,
``--photo-size``) in tiles of ``--image-size``: photos/s and the peak memory of the
process, which the tiling keeps bounded whatever the photo's size. ``--mode whole``
times the same photos in one pass each. Both run ``prediction.predict_batch``, the
program predict, evaluate and submit use: a uint8 photo at the training scale in, the
mask at the photo's own size out.
``--suite gpu`` runs the whole GPU check, row by row (``experiments/suite.py``).

The machines we share are noisy: read ratios from one invocation, never absolute
numbers from different runs. Each row records the load average and the CPU seconds
per step (``cpu_s``), which a busy machine disturbs much less than wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform as host_platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments import common
from experiments.timing import cpu_count, peak_rss_mb, time_steps
from experiments.torch_peer import CHILDREN as TORCH_PEERS

EXAMPLES = """
python -m experiments.benchmark --mode train --image-size 128 --batch-size 4 --compare-torch
python -m experiments.benchmark --mode infer --image-size 512 --batch-size 1 --compare-torch
python -m experiments.benchmark --mode infer --image-size 512 --batch-size 1 --compare-onnx
python -m experiments.benchmark --mode train --image-size 512 --batch-size 4 --steps 3 --json
python -m experiments.benchmark --mode pipeline --image-size 512 --batch-size 32 --kaggle-size-sample 64
python -m experiments.benchmark --mode pipeline --crop 256 --scale 0.5 --batch-size 16 --kaggle-size-sample 64
python -m experiments.benchmark --mode tile --image-size 256 --batch-size 8 --overlap 0.25 --steps 2
python -m experiments.benchmark --mode tile --image-size 512 --photo-size 4000 6000 --steps 1
python -m experiments.benchmark --mode whole --base-features 8 --batch-size 1 --steps 2
python -m experiments.benchmark --platform gpu --dtype bfloat16 --image-size 512 --batch-size 32
python -m experiments.benchmark --mode train --remat full --image-size 256 --batch-size 8
python -m experiments.benchmark --mode pipeline --augment --kaggle-size-sample 64 --batch-size 16
python -m experiments.benchmark --suite gpu --platform gpu --out results/gpu-suite
python -m experiments.benchmark --suite gpu --platform cpu --quick --out /tmp/dry-run
"""

# "jax" is the model as training builds it (on a CPU: with both CPU kernels); the
# others measure what each CPU kernel of unet_jax/cpu_kernels.py buys (--compare-kernels).
KERNEL_VARIANTS = {"jax-stock": (False, False), "jax-conv-kernel": (True, False),
                   "jax-pool-kernel": (False, True)}
CHILDREN = ("jax", *KERNEL_VARIANTS, "pipeline", "onnxruntime")  # the torch rows: torch_peer
TTA_VIEWS = {"none": 1, "hflip": 2, "flips": 4}


def parse_args(argv=None):
    # Imported here, not with the module: they import JAX, and common.run guards only
    # what runs inside it (a Ctrl-C then is one line, not the import's traceback).
    from unet_jax.models import REMAT
    from unet_jax.tiling import TTA

    p = common.make_parser("experiments.benchmark", __doc__.split("\n\n")[0], EXAMPLES)
    p.add_argument("--mode", choices=("train", "infer", "pipeline", "tile", "whole"),
                   default="train",
                   help="a full AdamW training step, a forward pass, the input pipeline, "
                   "overlap-tile prediction of whole photos (tiles of --image-size), or "
                   "whole photos in one pass (--batch-size photos per call)")
    p.add_argument("--image-size", type=int, nargs="+", default=[128], metavar=("H", "W"),
                   help="model input height [width] (default: 128)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (default: 4)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps after compiling (default: 1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; parameters stay float32 (default: float32)")
    p.add_argument("--base-features", type=int, default=64, help="U-Net width (default: 64)")
    p.add_argument("--compare-torch", nargs="?", const="all", choices=("all", "eager"),
                   help="also run the guide's PyTorch model: eager in NCHW and "
                   "channels_last, and (all, the default) under torch.compile in both "
                   "layouts; the table ends with unet-jax's ratio to the fastest; "
                   "'eager' leaves torch.compile out (each of its compiles takes 40 s "
                   "or more on a laptop CPU)")
    p.add_argument("--compare-onnx", action="store_true",
                   help="infer mode: also run the model exported to ONNX with onnxruntime "
                   "on the CPU (needs pip install -e '.[export]')")
    p.add_argument("--compare-kernels", action="store_true",
                   help="also run the model with stock Flax ops and with each CPU kernel "
                   "alone (unet_jax/cpu_kernels.py), to see what each one buys")
    p.add_argument("--data-dir", help="pipeline mode: dataset to read (default: the sample set)")
    p.add_argument("--skip-bad", action="store_true",
                   help="pipeline mode: leave out unreadable or unmatched pairs of --data-dir "
                   "(listed in a warning), as training does")
    p.add_argument("--kaggle-size-sample", type=int, metavar="N",
                   help="pipeline mode: read N synthetic 1918x1280 JPEG/GIF pairs in "
                   "Kaggle's layout (what a real Carvana run decodes), written to a "
                   "temporary folder from the sample set")
    p.add_argument("--crop", type=int, nargs="+", metavar=("H", "W"),
                   help="pipeline mode: random crops of this size (patch training) instead "
                   "of whole images resized to --image-size")
    p.add_argument("--scale", type=float, default=1.0,
                   help="pipeline mode with --crop, and tile and whole modes: resize each "
                   "image by this factor first (default: 1.0)")
    p.add_argument("--photo-size", type=int, nargs=2, default=[1280, 1918], metavar=("H", "W"),
                   help="tile and whole modes: the photo's height and width (default: "
                   "Carvana's 1280 1918)")
    p.add_argument("--overlap", type=float, default=0.25,
                   help="tile mode: fraction of a tile its neighbour shares (default: 0.25)")
    p.add_argument("--tta", choices=TTA, default="none",
                   help="tile and whole modes: test-time flips (default: none)")
    p.add_argument("--remat", choices=REMAT, default="none",
                   help="train mode: rematerialise each block (unet_jax.Config.remat)")
    p.add_argument("--metrics", choices=("step", "none"), default="step",
                   help="train mode: 'step' computes the batch's Dice, IoU and accuracy in "
                   "the step, as training does; 'none' measures a step with the loss alone")
    p.add_argument("--augment", nargs="?", const="flip,shift,color", default="",
                   metavar="OPS", help="pipeline mode: augmentations by name (alone: "
                   "flip,shift,color), as train's --augment")
    p.add_argument("--suite", choices=("gpu",),
                   help="run the whole GPU check (experiments/suite.py): every row in its own "
                   "process, markdown and JSON written to --out after each row")
    p.add_argument("--out", metavar="PREFIX",
                   help="--suite: write PREFIX.md and PREFIX.json (default: gpu-suite)")
    p.add_argument("--quick", action="store_true",
                   help="--suite: tiny sizes (32x32, batch 2, 2 steps), to try every code "
                   "path on a CPU in minutes")
    p.add_argument("--rows", help="--suite: only these rows, by id, comma-separated")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="--suite: stop starting rows that would not finish within this "
                   "many seconds (default: 330; with --quick, 1800)")
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
    if args.augment:
        from data_pipeline.augment import parse_augment

        try:
            args.augment = parse_augment(args.augment)
        except ValueError as e:
            raise common.UserError(str(e)) from None
    if args.compare_onnx and args.mode != "infer":
        raise common.UserError("--compare-onnx times inference: use it with --mode infer")
    if args.compare_onnx and args.dtype != "float32":
        # The export computes in float32 only: the ratio would compare two precisions.
        raise common.UserError(f"--compare-onnx runs the float32 ONNX export: drop --dtype "
                               f"{args.dtype}, so that both rows compute in float32")
    if args.compare_torch and args.mode not in ("train", "infer"):
        # The guide's model has no tiling or pipeline of its own: the peer failed after
        # the JAX row was measured, and threw it away.
        raise common.UserError("--compare-torch times the guide's model training or "
                               "inferring: use it with --mode train or --mode infer")
    # A setting of another mode would be ignored without a word.
    if args.remat != "none" and args.mode != "train" and not args.suite:
        raise common.UserError(f"--remat {args.remat} trades memory in training: use it "
                               "with --mode train")
    for flag, given in (("--kaggle-size-sample", args.kaggle_size_sample is not None),
                        ("--data-dir", args.data_dir is not None),
                        ("--skip-bad", args.skip_bad)):
        if given and args.mode != "pipeline" and not args.suite:
            raise common.UserError(f"{flag} feeds the input pipeline: use it with "
                                   "--mode pipeline")
    if args.compare_kernels and args.mode == "pipeline":
        raise common.UserError("--compare-kernels times the model: use it with --mode "
                               "train, infer, tile or whole")
    if not args.suite:
        # By identity: --budget 0 equals False, and was let through.
        given = [f"--{name}" for name in ("quick", "rows", "out", "budget")
                 if getattr(args, name) is not None and getattr(args, name) is not False]
        if given:
            raise common.UserError(f"{given[0]} belongs to the GPU check: add --suite gpu")
    if args.compare_torch and args.base_features != 64:
        raise common.UserError("--compare-torch runs the guide's model, which has 64 base "
                               "features; leave --base-features at 64")
    from unet_jax.config import Config, ConfigError, normalize_image_size

    args.image_size = normalize_image_size(args.image_size, 4)  # (height, width), checked
    if args.crop is not None:
        args.crop = normalize_image_size(args.crop, 4, "--crop")
    try:  # the run settings' own checks, so the benchmark accepts what training does
        Config(overlap=args.overlap, scale=args.scale, crop=args.crop or (16, 16))
    except ConfigError as e:
        raise common.UserError(str(e)) from None
    if min(args.photo_size) < 1:
        raise common.UserError("--photo-size: give a positive height and width")
    return args


# ---------------------------------------------------------------------------------------
# Measuring one configuration (runs in a child process)
# ---------------------------------------------------------------------------------------

def flops_of(compiled) -> float:
    """XLA's FLOP count of a compiled program (0 where the backend does not say)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def run_jax(args, variant: str = "jax") -> dict:
    """One configuration of the Flax U-Net: the real ``train_step`` (AdamW, BCE, and
    its batch metrics) or ``predict_step``, on random data of the requested size.
    ``variant`` is "jax" (the model as training builds it) or a KERNEL_VARIANTS key."""
    backend = common.start_platform(args.platform, args)
    import dataclasses

    import jax
    import numpy as np

    from unet_jax import Config, create_model, create_train_state, predict_step, train_step
    from unet_jax import cpu_kernels, flops as flop_count

    h, w = args.image_size
    config = Config(base_features=args.base_features, dtype=args.dtype, image_size=(h, w),
                    remat=args.remat)
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

    step_fn = train_step if args.metrics == "step" else loss_only_step
    if args.mode in ("tile", "whole"):
        return run_prediction(args, config, state, backend)
    start = time.perf_counter()
    if args.mode == "train":
        lowered = step_fn.lower(state, batch)
    else:
        lowered = predict_step.lower(state.params, batch["image"], state.apply_fn)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    xla_flops = flops_of(compiled)
    model_options = flop_count.model_options(config)
    flops = args.batch_size * (
        flop_count.train_flops(h, w, **model_options) if args.mode == "train"
        else flop_count.forward_flops(h, w, **model_options))

    holder = {"state": state}

    def step():
        if args.mode == "train":
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready((holder["state"], metrics))
        else:
            jax.block_until_ready(compiled(state.params, batch["image"]))

    timing = time_steps(step, args.steps, args.warmup)
    device = jax.devices()[0]
    return {"framework": variant, "backend": backend, "device": device.device_kind,
            "img_per_s": args.batch_size / timing["step_s"], **timing,
            "model_calls_per_step": 1,
            **jax_figures(args, device, timing, flops, xla_flops, lower_s, compile_s)}


def run_prediction(args, config, state, backend: str) -> dict:
    """Photos/s of ``prediction.predict_batch`` on random uint8 photos at the scale's
    size, masks at ``--photo-size`` out: tiled (``--mode tile``, one photo per call,
    tiles of ``--image-size`` in batches of ``--batch-size``) or whole (``--mode
    whole``, ``--batch-size`` photos per call). FLOPs are counted (``unet_jax.flops``):
    every tile's or whole pass's forward FLOPs, times the test-time views."""
    import jax
    import numpy as np

    from data_pipeline.preprocess import scaled_size
    from unet_jax import flops as flop_count, tiling
    from unet_jax.prediction import PredictionMode, predict_batch

    size = scaled_size(args.photo_size, args.scale)
    photos = 1 if args.mode == "tile" else args.batch_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (photos, *size, 3), np.uint8)
    config = dataclasses.replace(config, crop=tuple(args.image_size), scale=args.scale,
                                 overlap=args.overlap, tta=args.tta)
    mode = PredictionMode.from_config(config, how=args.mode)
    start = time.perf_counter()
    lowered = predict_batch.lower(state.params, images, np.int32(photos), state.apply_fn,
                                  mode, args.batch_size, tuple(args.photo_size))
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    model_options = flop_count.model_options(config)
    if args.mode == "tile":
        padded = [s + sum(p) for s, p in zip(size, tiling.padding(size, mode.tile, args.overlap))]
        tiles = int(np.prod([len(tiling.tile_starts(n, t, args.overlap))
                             for n, t in zip(padded, mode.tile)]))
        calls = -(-tiles // args.batch_size)
        flops = tiles * flop_count.forward_flops(*mode.tile, **model_options)
    else:
        calls = 1
        flops = photos * flop_count.forward_flops(*mode.padded(size), **model_options)
    flops *= TTA_VIEWS[args.tta]
    xla_flops = flops_of(compiled)
    device = jax.devices()[0]

    def step():
        np.asarray(compiled(state.params, images, np.int32(photos)))  # the masks, on the host

    timing = time_steps(step, args.steps, args.warmup)
    return {"framework": "jax", "backend": backend, "device": device.device_kind,
            "img_per_s": photos / timing["step_s"], **timing,
            "model_calls_per_step": calls, "photos_per_call": photos,
            **jax_figures(args, device, timing, flops, xla_flops, lower_s, compile_s)}


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
        session = export.onnx_session(path, threads=cpu_count())
        compile_s = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
    timing = time_steps(lambda: session.run(None, {"image": images}), args.steps, args.warmup)
    return {"framework": "onnxruntime", "backend": "cpu", "device": "cpu",
            "img_per_s": args.batch_size / timing["step_s"], **timing,
            "compile_s": compile_s, "peak_rss_mb": peak_rss_mb(),
            "onnx_mb": size_mb, "onnxruntime": ort.__version__}


def jax_figures(args, device, timing, flops, xla_flops, lower_s, compile_s) -> dict:
    """What every JAX row reports beside its speed: compile times, counted and XLA
    FLOPs, utilisation, memory, the compile cache and the settings that shape them."""
    import jax

    from unet_jax import compile_cache, flops as flop_count

    return {"lower_s": lower_s, "compile_s": compile_s, "flops_per_step": flops,
            "xla_flops_per_step": xla_flops,
            "gflops_per_s": flops / timing["step_s"] / 1e9,
            "mfu": flop_count.utilisation(flops / timing["step_s"], device.device_kind,
                                          args.dtype),
            "peak_device_mb": jax_peak_device_mb(device), "peak_rss_mb": peak_rss_mb(),
            "compile_cache": str(compile_cache.current_dir() or "off"),
            "cache": compile_cache.stats(), "remat": args.remat, "metrics": args.metrics,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}


def jax_peak_device_mb(device) -> float | None:
    """The device's peak memory in use (MB), where the backend reports it (GPUs; a
    CPU reports nothing, and its figure is ``peak_rss_mb``)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without the call raise rather than return None
        return None
    peak = (stats or {}).get("peak_bytes_in_use")
    return None if peak is None else peak / 1e6


def _loss_only_step(state, batch):
    """A training step with the loss alone (``--metrics none``): what the batch
    metrics of ``train_step`` cost, measured by leaving them out."""
    import jax

    from unet_jax import losses

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, batch["image"])
        return losses.per_image_loss("bce", logits, batch["mask"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), {"loss": loss}


class _LazyJit:
    """``jax.jit(fn, donate_argnums=0)``, made on first use (JAX is imported only
    after the platform is chosen)."""

    def __init__(self, fn):
        self.fn, self.jitted = fn, None

    def __getattr__(self, name):
        if self.jitted is None:
            import jax

            self.jitted = jax.jit(self.fn, donate_argnums=0)
        return getattr(self.jitted, name)


loss_only_step = _LazyJit(_loss_only_step)


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


FEED_IMG_PER_S = 400  # about what one H100/H200-class GPU trains at 512x512 in bf16


def run_pipeline(args) -> dict:
    """Images/s of the input pipeline alone (``experiments.throughput``): decoding
    every image from disk (``cold``, the first epoch or no cache) and reading the
    decoded cache (``cached``, every later epoch), with ``--augment``'s augmentations.

    tf.data spreads the work over every core of the host, so images/s per core (the
    rate over the cores this process may use) times the cores of a GPU host says
    whether it keeps up: ``cores_for_400`` is how many cores feed the 400 img/s that
    one H100/H200-class GPU trains at (512x512, bf16), assuming the work scales
    with the cores, which decoding and augmenting independent images does."""
    import data_pipeline
    from experiments.throughput import measure_throughput

    size = args.image_size
    with tempfile.TemporaryDirectory(prefix="unet-jax-kaggle-size-") as tmp:
        if args.kaggle_size_sample:
            data_dir = kaggle_size_sample(args.kaggle_size_sample, tmp)
        else:
            data_dir = Path(args.data_dir) if args.data_dir else data_pipeline.sample_dataset_dir()
        pairs = data_pipeline.find_pairs(data_dir, skip_bad=args.skip_bad)
        jpeg_kb = statistics.mean(p.image.stat().st_size for p in pairs) / 1e3
        batches = len(pairs) // args.batch_size - args.warmup
        if batches < 1:
            raise common.UserError(
                f"{len(pairs)} images are too few for --batch-size {args.batch_size} and "
                f"--warmup {args.warmup}; use a smaller batch or more images")
        try:
            result = measure_throughput(pairs, size, args.batch_size, batches=batches,
                                        warmup=args.warmup, crop=args.crop, scale=args.scale,
                                        augment=args.augment)
        except ValueError as e:
            raise common.UserError(str(e)) from None
    if args.kaggle_size_sample:  # the folder is gone by now
        data_dir = f"{args.kaggle_size_sample} synthetic 1918x1280 pairs (temporary)"
    cores = cpu_count()
    for kind in ("cold", "cached"):
        rate = result.get(f"{kind}_img_per_s")
        result[f"{kind}_img_per_s_per_core"] = rate / cores if rate else None
        result[f"{kind}_cores_for_{FEED_IMG_PER_S}"] = (
            FEED_IMG_PER_S / (rate / cores) if rate else None)
    return {"framework": "tf.data", "mode": "pipeline", "data_dir": str(data_dir),
            "augment": args.augment or "none", "cores": cores,
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
    if which in TORCH_PEERS:  # a process without JAX (experiments/torch_peer.py)
        return [sys.executable, "-m", "experiments.torch_peer", "--which", which,
                "--mode", args.mode, "--image-size", *map(str, args.image_size),
                "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--dtype", args.dtype,
                "--device", "cuda" if args.platform == "gpu" else "cpu"]
    argv = [sys.executable, "-m", "experiments.benchmark", "--mode", args.mode,
            "--image-size", *map(str, args.image_size), "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype,
            "--base-features", str(args.base_features), "--platform", args.platform,
            "--photo-size", *map(str, args.photo_size), "--scale", str(args.scale),
            "--overlap", str(args.overlap), "--tta", args.tta, "--remat", args.remat,
            "--metrics", args.metrics, "--child", which]
    if args.compile_cache:
        argv += ["--compile-cache", args.compile_cache]
    if args.augment:
        argv += ["--augment", args.augment]
    if args.mode == "pipeline":  # the other modes refuse what feeds the pipeline
        if args.kaggle_size_sample:
            argv += ["--kaggle-size-sample", str(args.kaggle_size_sample)]
        if args.data_dir:
            argv += ["--data-dir", args.data_dir]
        if args.skip_bad:
            argv += ["--skip-bad"]
    if args.crop:
        argv += ["--crop", *map(str, args.crop)]
    return argv


def run_child(args, which: str, timeout: float | None = None, xla_flags: str = "") -> dict:
    """Measures one configuration in a fresh process; returns its result row, with
    ``wall_s``, the child's whole life (start-up and compiling included).
    ``xla_flags`` are added to the child's XLA_FLAGS (XLA reads them once, at start-up,
    which is why a lever that is a compiler flag needs a process of its own).

    A child that outlives ``timeout`` seconds is stopped with everything it started
    (torch.compile's workers too) and reported as a UserError."""
    load = os.getloadavg()[0]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    start = time.perf_counter()
    child = subprocess.Popen(child_argv(args, which), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env,
                             cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise common.UserError(f"the {which} measurement took over {timeout:.0f} s and "
                               "was stopped") from None
    except BaseException:  # interrupted or terminated: the child goes too
        os.killpg(child.pid, signal.SIGKILL)
        raise
    if child.returncode != 0:
        lines = (stderr or stdout).strip().splitlines()
        raise common.UserError(f"the {which} measurement failed: "
                               f"{lines[-1] if lines else f'exit status {child.returncode}'}")
    row = json.loads(stdout.strip().splitlines()[-1])
    if which in (*TORCH_PEERS, "onnxruntime"):  # the JAX rows' network: the same count
        from unet_jax import flops

        count = flops.train_flops if args.mode == "train" else flops.forward_flops
        row["flops_per_step"] = args.batch_size * count(*args.image_size,
                                                        base_features=args.base_features)
        row["gflops_per_s"] = row["flops_per_step"] / row["step_s"] / 1e9
        row["mfu"] = flops.utilisation(row["flops_per_step"] / row["step_s"],
                                       row["device"], args.dtype)
    row["wall_s"] = time.perf_counter() - start
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
        what = (f"tiled prediction of {args.photo_size[1]}x{args.photo_size[0]} (WxH) photos at "
                f"scale {args.scale} in {jax_row['model_calls_per_step']} calls of {h}x{w} "
                f"tiles (overlap {args.overlap}, tta {args.tta}); img/s = photos/s")
    elif args.mode == "whole":
        what = (f"whole-image prediction of {args.photo_size[1]}x{args.photo_size[0]} (WxH) photos "
                f"at scale {args.scale} (tta {args.tta}); img/s = photos/s")
    machine = machine_info()  # CPUs differ 2.5x between machines: name the one measured
    print(f"{what}, batch {args.batch_size}, {args.dtype}, on "
          f"{jax_row['backend']} ({jax_row['device']}); median of {args.steps} steps "
          f"after {args.warmup} warm-up; host CPU {machine['cpu']} ({machine['cores']} "
          f"cores{''.join(', ' + isa for isa in machine['isa'])}):")
    print(f"  {'':20} {'img/s':>9} {'GFLOP/s':>8} {'MFU':>5} {'cpu s/step':>10} "
          f"{'peak MB':>8} {'device MB':>9} {'compile s':>9} {'load':>5} {'jax/this':>8}")
    for row in rows:
        ratio = jax_row["img_per_s"] / row["img_per_s"]
        mfu = f"{row['mfu']:5.0%}" if row.get("mfu") is not None else f"{'-':>5}"
        device_mb = row.get("peak_device_mb")
        device_mb = f"{device_mb:9.0f}" if device_mb is not None else f"{'-':>9}"
        print(f"  {row['framework']:20} {row['img_per_s']:9.3f} {row['gflops_per_s']:8.1f} "
              f"{mfu} {row['cpu_s']:10.2f} {row['peak_rss_mb']:8.0f} {device_mb} "
              f"{row['compile_s']:9.1f} {row['load_avg']:5.2f} {ratio:8.2f}")
    peers = [row for row in rows if row["framework"].startswith("torch")]
    if peers:
        best = max(peers, key=lambda row: row["img_per_s"])
        print(f"  fastest PyTorch row: {best['framework']}; unet-jax / it: "
              f"{jax_row['img_per_s'] / best['img_per_s']:.2f}")
    print("  (GFLOP/s: the network's FLOPs counted from its shapes, unet_jax/flops.py; MFU "
          "against the GPU's dense peak; compile s for torch is its first step, "
          "for onnxruntime the export and session, whose peak memory its row includes)")


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        if args.child.startswith("jax"):
            row = run_jax(args, args.child)
        elif args.mode == "pipeline":
            row = run_pipeline(args)
        else:
            row = run_onnx(args)
        print(json.dumps(row))
        return 0
    if args.suite:
        from experiments import suite

        return suite.run(args)

    if args.mode == "pipeline":
        result = run_pipeline(args)
        into = (f"crops of {result['crop'][0]}x{result['crop'][1]} at scale {args.scale}"
                if args.crop else f"{result['image_size'][0]}x{result['image_size'][1]}")
        print(f"input pipeline, {result['images']} images ({result['mean_image_kb']:.0f} kB "
              f"mean file) to {into}, augment {result['augment']}, batch "
              f"{result['batch_size']}: {result['cold_img_per_s']:.1f} img/s decoding from "
              f"disk, {result['cached_img_per_s']:.1f} img/s from the cache (filled in "
              f"{result['cache_fill_s']:.1f} s), on {result['cores']} core(s): "
              f"{result['cold_img_per_s_per_core']:.1f} and "
              f"{result['cached_img_per_s_per_core']:.1f} img/s per core; "
              f"{FEED_IMG_PER_S} img/s needs {result['cold_cores_for_400']:.1f} cores "
              f"decoding, {result['cached_cores_for_400']:.1f} from the cache")
        if args.json:
            print(json.dumps(result))
        return 0

    rows, notes = [run_child(args, "jax")], []
    if args.compare_kernels:
        rows += [run_child(args, variant) for variant in KERNEL_VARIANTS]
    if args.compare_torch:
        # The peers run where JAX ran: with --platform auto on a GPU machine, there.
        peer_args = argparse.Namespace(**{**vars(args), "platform": "gpu" if rows[0][
            "backend"] in ("gpu", "cuda", "rocm") else "cpu"})
        if torch_available():
            eager = [peer for peer, (_, jit) in TORCH_PEERS.items() if not jit]
            compiled = [peer for peer, (_, jit) in TORCH_PEERS.items() if jit]
            rows += [run_child(peer_args, peer) for peer in eager]
            for peer in compiled if args.compare_torch == "all" else ():
                try:  # it needs a C++ compiler on a CPU (Inductor): the other rows stand
                    rows.append(run_child(peer_args, peer))
                except common.UserError as e:
                    notes.append(f"--compare-torch: {e}; its row is left out")
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
            fastest = max(torch_rows, key=lambda r: r["img_per_s"])
            result["fastest_torch"] = fastest["framework"]
            result["ratio_to_fastest_torch"] = jax_row["img_per_s"] / fastest["img_per_s"]
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
