"""The GPU check in one command: ``python -m experiments.benchmark --suite gpu``.

Every row is one configuration measured in its own process (``benchmark.run_child``),
the guide's setting unless a row says otherwise: 512x512, batch 32, the full-width
U-Net, 10 timed steps after 2 untimed ones. The rows, most important first:

* unet-jax's training step in bf16, compiled with an empty persistent cache, then the
  same program in a second process, served by the cache: compile time without and
  with it;
* the peers a GPU user would pick: the guide's PyTorch model under ``torch.compile``
  (channels_last, bf16 autocast), and eager in channels_last and NCHW;
* inference, tiled prediction of Carvana-sized photos (1918x1280, 512x512 tiles,
  ``--tta hflip``), float32 training;
* the levers, each an option of its own row: rematerialisation (``--remat``), batch
  64, a step without the batch metrics (``--metrics none``), cuDNN runtime fusion (an
  XLA flag, set in that row's process alone); and the input pipeline with the default
  augmentations (needs TensorFlow; skipped where it is missing).

Each row reports images/s, the FLOP/s counted from the network's shapes and their
share of the GPU's peak (MFU), the device's peak memory, compile time and what the
compile cache did. The markdown table and the JSON are rewritten after every row, so
a run stopped early still leaves every finished row. Rows run in order while the time
left (``--budget``) covers their estimate, scaled by how the finished rows compared
with theirs; a row that takes far longer than its estimate is stopped, and the rest
go on. Rows left out are listed with the reason; ``--rows`` runs chosen rows alone.

All JAX rows share one compilation cache, new and empty for each invocation: the
first row compiles cold, and later rows reuse what earlier ones stored (the parameter
initialisation, XLA's autotuning of convolutions they share), as a user's second
command would. ``--quick`` runs the same rows at 32x32, batch 2, to try every code
path on a CPU in minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform as host_platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments import benchmark, common


@dataclasses.dataclass(frozen=True)
class Row:
    """One measurement: which child runs it, what it changes (``what``, its sizes as
    fields of ``describe``), its estimated seconds on an H100/H200-class GPU
    (start-up and compiling included)."""
    id: str
    what: str
    child: str
    settings: dict
    estimate_s: float
    needs: str | None = None  # a module the row cannot run without

    def describe(self, sizes: dict) -> str:
        """``what`` with the sizes this run uses (the full check's, or --quick's)."""
        (h, w), (ph, pw) = sizes["image_size"], sizes["photo_size"]
        return self.what.format(size=f"{h}x{w}", photo=f"{pw}x{ph}",
                                batch=sizes["batch_size"], double=2 * sizes["batch_size"],
                                tile_batch=sizes["tile_batch"])


ROWS = (
    Row("jax-train-bf16", "train step, bf16; compiled with an empty cache", "jax",
        {"mode": "train", "dtype": "bfloat16"}, 100),
    Row("jax-train-bf16-warm", "the same step in a new process: compile served by the "
        "persistent cache", "jax", {"mode": "train", "dtype": "bfloat16"}, 20),
    Row("torch-compile-train-bf16", "torch.compile, channels_last, bf16 autocast",
        "torch-compile", {"mode": "train", "dtype": "bfloat16"}, 45, "torch"),
    Row("jax-infer-bf16", "inference (forward pass), bf16", "jax",
        {"mode": "infer", "dtype": "bfloat16"}, 20),
    Row("jax-tile-hflip", "tiled {photo} photos, {size} tiles, overlap 0.25, tta "
        "hflip, bf16, {tile_batch} photos per call; img/s = photos/s", "jax",
        {"mode": "tile", "dtype": "bfloat16", "tta": "hflip", "batch_size": "tile"}, 25),
    Row("jax-whole-hflip", "whole {photo} photos, one pass each (how crop-trained runs "
        "predict by default), tta hflip, bf16, {tile_batch} photos per call; img/s = "
        "photos/s", "jax",
        {"mode": "whole", "dtype": "bfloat16", "tta": "hflip", "batch_size": "tile"}, 25),
    Row("jax-train-bf16-remat-full", "--remat full: each block recomputed from its input",
        "jax", {"mode": "train", "dtype": "bfloat16", "remat": "full"}, 50),
    Row("jax-train-bf16-remat-convs", "--remat convs: convolution outputs kept, the rest "
        "recomputed", "jax", {"mode": "train", "dtype": "bfloat16", "remat": "convs"}, 50),
    Row("torch-compile-infer-bf16", "torch.compile inference, channels_last, bf16 autocast",
        "torch-compile", {"mode": "infer", "dtype": "bfloat16"}, 35, "torch"),
    Row("torch-channels_last-train-bf16", "torch eager, channels_last, bf16 autocast",
        "torch-channels_last", {"mode": "train", "dtype": "bfloat16"}, 15, "torch"),
    Row("jax-train-f32", "train step, float32 (on a GPU: TF32 convolutions, XLA's "
        "default)", "jax",
        {"mode": "train", "dtype": "float32"}, 100),
    Row("torch-channels_last-train-f32", "torch eager, channels_last, float32",
        "torch-channels_last", {"mode": "train", "dtype": "float32"}, 15, "torch"),
    Row("torch-nchw-train-bf16", "torch eager, NCHW (the guide's code), bf16 autocast",
        "torch-nchw", {"mode": "train", "dtype": "bfloat16"}, 15, "torch"),
    Row("torch-channels_last-infer-bf16", "torch eager inference, channels_last, bf16",
        "torch-channels_last", {"mode": "infer", "dtype": "bfloat16"}, 12, "torch"),
    Row("torch-nchw-infer-bf16", "torch eager inference, NCHW, bf16", "torch-nchw",
        {"mode": "infer", "dtype": "bfloat16"}, 12, "torch"),
    Row("jax-train-bf16-b64", "batch {double} instead of {batch}", "jax",
        {"mode": "train", "dtype": "bfloat16", "batch_size": "double"}, 90),
    Row("jax-train-bf16-no-metrics", "--metrics none: the step without the batch's Dice, "
        "IoU and accuracy", "jax", {"mode": "train", "dtype": "bfloat16", "metrics": "none"},
        60),
    # Off by default in XLA because it can make compiling far slower; whether the
    # fused kernels repay that is what the row measures.
    Row("jax-train-bf16-runtime-fusion", "cuDNN runtime fusion of convolution, bias and "
        "ReLU (XLA_FLAGS=--xla_gpu_use_runtime_fusion=true)", "jax",
        {"mode": "train", "dtype": "bfloat16",
         "xla_flags": "--xla_gpu_use_runtime_fusion=true"}, 120),
    Row("pipeline-augment", "tf.data input pipeline, Kaggle-sized JPEGs to the row size, "
        "--augment flip,shift,color; img/s = from the cache", "pipeline",
        {"mode": "pipeline", "augment": "flip,shift,color"}, 90, "tensorflow"),
)

FULL = {"image_size": (512, 512), "batch_size": 32, "steps": 10, "warmup": 2,
        "photo_size": [1280, 1918], "tile_batch": 10, "kaggle_size_sample": 96}
QUICK = {"image_size": (32, 32), "batch_size": 2, "steps": 2, "warmup": 1,
         "photo_size": [70, 100], "tile_batch": 4, "kaggle_size_sample": 8}


def run(args) -> int:
    """Runs the suite that ``args`` asks for; returns the exit status: 1 when no row
    could be measured."""
    if not args.quick and (args.platform == "cpu" or _backend() != "gpu"):
        # Its full sizes (512x512, batch 32) ask a CPU for tens of GB and hours.
        raise common.UserError("--suite gpu measures a GPU, and JAX finds none here; add "
                               "--quick --platform cpu to try every row at tiny sizes")
    sizes = QUICK if args.quick else FULL
    if args.budget is not None and not args.budget >= 0:  # NaN too
        raise common.UserError(f"--budget {args.budget:g}: give seconds, 0 or more (0: "
                               "the default)")
    budget = args.budget or (1800.0 if args.quick else 330.0)
    out = Path(args.out or "gpu-suite")
    from unet_jax import rundir

    rundir.check_writable(out.parent, "--out's folder")  # before minutes of rows
    rows = _chosen_rows(args.rows)
    report = {"suite": "gpu", "quick": args.quick, "platform": args.platform,
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "budget_s": budget, "settings": {k: list(v) if isinstance(v, tuple) else v
                                               for k, v in sizes.items()},
              "base_features": args.base_features, "machine": benchmark.machine_info(),
              "rows": [], "left_out": []}
    cache = tempfile.mkdtemp(prefix="unet-jax-suite-cache-")
    start, scale = time.perf_counter(), 1.0
    # Stopped from outside (a time limit): end the running row's process as well.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for row in rows:
            why_not = _missing(row, args)
            left = budget - (time.perf_counter() - start)
            estimate = row.estimate_s * scale
            if why_not is None and estimate > left:
                why_not = f"not enough time left (about {estimate:.0f} s needed, {left:.0f} s left)"
            if why_not:
                report["left_out"].append({"id": row.id, "what": row.describe(sizes),
                                           "why": why_not})
                print(f"{row.id}: left out, {why_not}", flush=True)
            else:
                result = _measure(row, args, sizes, cache, timeout=min(left, 3 * estimate + 60))
                report["rows"].append(result)
                if "wall_s" in result:  # estimates follow the machine's actual pace
                    finished = [r for r in report["rows"] if "wall_s" in r]
                    scale = sum(r["wall_s"] for r in finished) / sum(
                        r["estimate_s"] for r in finished)
                print(_progress(result), flush=True)
            _write(out, report)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    report["total_s"] = time.perf_counter() - start
    _write(out, report)
    print(f"wrote {out}.md and {out}.json ({report['total_s']:.0f} s)")
    if not any("error" not in row for row in report["rows"]):
        print("no row could be measured (each failure is above and in the files)",
              file=sys.stderr)
        return 1
    return 0


def _backend() -> str:
    """The backend JAX starts with here ('gpu', 'cpu', ...), asked of a child process:
    this one would otherwise hold GPU memory that the rows' processes need."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend())"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    lines = probe.stdout.split()
    return lines[-1] if probe.returncode == 0 and lines else "none"


def _chosen_rows(names: str | None) -> tuple[Row, ...]:
    if not names:
        return ROWS
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {row.id for row in ROWS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise common.UserError(f"--rows {unknown[0]!r}: no such row; choose from "
                               f"{', '.join(sorted(known))}")
    return tuple(row for row in ROWS if row.id in wanted)


def _missing(row: Row, args) -> str | None:
    """Why ``row`` cannot run here, or None."""
    if row.needs and importlib.util.find_spec(row.needs) is None:
        return f"{row.needs} is not installed here"
    if row.child.startswith("torch") and args.base_features != 64:
        return "the guide's PyTorch model has 64 base features; run with --base-features 64"
    return None


def _measure(row: Row, args, sizes: dict, cache: str, timeout: float) -> dict:
    """One row in its own process; a failure or a timeout becomes the row's error."""
    settings = dict(row.settings)
    batch = sizes["batch_size"]
    if settings.get("batch_size") == "tile":
        batch = sizes["tile_batch"]
    elif settings.get("batch_size") == "double":
        batch = 2 * batch
    child_args = argparse.Namespace(**{
        **vars(args), "mode": settings["mode"], "dtype": settings.get("dtype", "float32"),
        "image_size": sizes["image_size"], "batch_size": batch, "steps": sizes["steps"],
        "warmup": sizes["warmup"], "photo_size": sizes["photo_size"], "scale": 1.0,
        "overlap": 0.25, "tta": settings.get("tta", "none"),
        "remat": settings.get("remat", "none"), "metrics": settings.get("metrics", "step"),
        "compile_cache": cache})
    result = {"id": row.id, "what": row.describe(sizes), "estimate_s": row.estimate_s,
              "mode": settings["mode"], "dtype": child_args.dtype, "batch_size": batch,
              "image_size": list(sizes["image_size"])}
    start = time.perf_counter()
    try:
        if row.child == "pipeline":
            measured = _pipeline(child_args, sizes, timeout)
        else:
            measured = benchmark.run_child(child_args, row.child, timeout=timeout,
                                           xla_flags=settings.get("xla_flags", ""))
    except common.UserError as e:
        return {**result, "error": str(e), "wall_s": time.perf_counter() - start}
    return {**result, **measured}


def _pipeline(args, sizes: dict, timeout: float) -> dict:
    """The input pipeline row: its own process, as the model rows."""
    args = argparse.Namespace(**{**vars(args), "augment": "flip,shift,color",
                                 "kaggle_size_sample": sizes["kaggle_size_sample"],
                                 "batch_size": 16 if not args.quick else 2})
    return benchmark.run_child(args, "pipeline", timeout=timeout)


def _progress(row: dict) -> str:
    if "error" in row:
        return f"{row['id']}: failed: {row['error']}"
    return (f"{row['id']}: {row['img_per_s']:.1f} img/s, compile {row.get('compile_s', 0):.1f} s,"
            f" process {row['wall_s']:.0f} s")


# --- Writing the results ----------------------------------------------------------------

def _write(out: Path, report: dict) -> None:
    """PREFIX.json and PREFIX.md, each written beside and renamed: a reader (or a
    run stopped now) never sees half a file."""
    for suffix, text in ((".json", json.dumps(report, indent=1, default=str)),
                         (".md", markdown(report))):
        path = out.with_name(out.name + suffix)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _versions(report: dict) -> str:
    seen = {}
    for row in report["rows"]:
        for name in ("jax", "torch"):
            if row.get(name):
                seen[name] = row[name]
    devices = sorted({row["device"] for row in report["rows"] if row.get("device")})
    parts = [f"{name} {version}" for name, version in seen.items()]
    return (f"{', '.join(devices) or 'no device reported'}; "
            f"{', '.join(parts) or 'no versions reported'}; Python {host_platform.python_version()}")


def _tflops(row: dict) -> float | None:
    return None if row.get("gflops_per_s") is None else row["gflops_per_s"] / 1e3


def _cell(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    """The suite's table, one line per finished row, then the comparisons."""
    s = report["settings"]
    h, w = s["image_size"]
    lines = [
        f"# unet-jax GPU check{' (quick: tiny sizes, code paths only)' if report['quick'] else ''}",
        "",
        f"{report['started']}; {_versions(report)}; host {report['machine']['cpu']} "
        f"({report['machine']['cores']} cores). {h}x{w}, batch {s['batch_size']}, U-Net "
        f"width {report['base_features']}, unless a row says otherwise; median of "
        f"{s['steps']} steps after {s['warmup']} warm-up. "
        "TFLOP/s: the network's FLOPs counted from its shapes (unet_jax/flops.py); MFU: "
        "their share of the GPU's dense peak; memory: the device's peak (JAX "
        "memory_stats, torch max_memory_allocated), or the process's peak RSS (marked) "
        "where the device reports none; compile: JAX's compile of the step, torch's first "
        "step; process: the row's whole process, start-up included.",
        "",
        "| row | what it tried | img/s | step ms | TFLOP/s | MFU | memory GB | compile s "
        "| cache hits/misses | process s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['id']} | {row['what']} | failed: {row['error']} "
                         "| | | | | | | |")
            continue
        if row.get("mode") == "pipeline":
            lines.append(
                f"| {row['id']} | {row['what']} | {row['cached_img_per_s']:.0f} | | | | "
                f"{row['peak_rss_mb'] / 1e3:.1f} (RSS) | | | {row['wall_s']:.0f} |")
            continue
        memory = row.get("peak_device_mb")
        memory = (f"{memory / 1e3:.1f}" if memory is not None
                  else f"{row['peak_rss_mb'] / 1e3:.1f} (RSS)")
        cache = row.get("cache") or {}
        hits = (f"{cache.get('cache_hits', 0)}/{cache.get('cache_misses', 0)}"
                if cache else "-")
        lines.append(
            f"| {row['id']} | {row['what']} | {row['img_per_s']:.1f} | "
            f"{row['step_s'] * 1e3:.1f} | {_cell(_tflops(row), '.3g')} | "
            f"{_cell(row.get('mfu'), '.0%')} | {memory} | {row['compile_s']:.1f} | {hits} | "
            f"{row['wall_s']:.0f} |")
    lines += ["", *comparisons(report)]
    if report["left_out"]:
        lines += ["", "Left out:", ""]
        lines += [f"- {r['id']} ({r['what']}): {r['why']}" for r in report["left_out"]]
    if "total_s" in report:
        lines += ["", f"The suite took {report['total_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def comparisons(report: dict) -> list[str]:
    """The ratios a reader looks for, from the rows that finished."""
    rows = {r["id"]: r for r in report["rows"] if "error" not in r}
    out = []

    def ratio(a: str, b: str, what: str, key: str = "img_per_s", inverse: bool = False):
        if a in rows and b in rows and rows[a].get(key) and rows[b].get(key):
            value = rows[a][key] / rows[b][key]
            out.append(f"- {what}: {1 / value if inverse else value:.2f}x")

    ratio("jax-train-bf16", "torch-compile-train-bf16", "train bf16, unet-jax / torch.compile")
    ratio("jax-train-bf16", "torch-channels_last-train-bf16",
          "train bf16, unet-jax / torch eager channels_last")
    ratio("jax-train-f32", "torch-channels_last-train-f32",
          "train float32, unet-jax / torch eager channels_last")
    ratio("jax-infer-bf16", "torch-compile-infer-bf16", "inference bf16, unet-jax / torch.compile")
    ratio("jax-train-bf16", "torch-compile-train-bf16",
          "device memory, train bf16, unet-jax / torch.compile", key="peak_device_mb")
    for remat in ("full", "convs"):
        ratio(f"jax-train-bf16-remat-{remat}", "torch-compile-train-bf16",
              f"device memory, train bf16 --remat {remat}, unet-jax / torch.compile",
              key="peak_device_mb")
        ratio(f"jax-train-bf16-remat-{remat}", "jax-train-bf16",
              f"speed, --remat {remat} / none")
    ratio("jax-train-bf16", "jax-train-bf16-warm",
          "compile of the train step, empty cache / served by the cache", key="compile_s")
    if out:
        out.insert(0, "Compared (rows of this run):")
        out.insert(1, "")
    return out
