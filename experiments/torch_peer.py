"""The PyTorch rows of the benchmark: the guide's U-Net, run as the guide runs it.

``python -m experiments.benchmark --compare-torch`` starts this module once per row, in
a process that imports torch and numpy but not JAX, so that the row's peak memory is
PyTorch's alone. The rows (``CHILDREN``): eager in NCHW (the guide's code) and in
channels_last, and ``torch.compile`` in channels_last and in NCHW; whichever is
fastest on a machine is PyTorch at its best there. Train: ``model(img)``,
``zero_grad``, ``BCEWithLogitsLoss``, ``backward``, AdamW ``step`` (lr 3e-4, fused
where this torch has it for the device, as torch recommends for speed). Infer: the
forward pass under ``torch.inference_mode`` in eval mode. One intra-op thread per
core, as JAX's CPU backend uses; on a GPU, cuDNN picks its fastest convolutions
(``cudnn.benchmark``) in the untimed first step, as XLA autotunes while compiling.
The first step (allocations, kernel selection; for ``torch.compile``, compiling) is
reported as ``compile_s``. The parent adds the FLOP counts (the same network as the
JAX rows, so the same count).
"""

from __future__ import annotations

import argparse
import json
import time

from experiments.timing import cpu_count, peak_rss_mb, time_steps

# row name -> (channels_last, compiled)
CHILDREN = {"torch-nchw": (False, False), "torch-channels_last": (True, False),
            "torch-compile": (True, True), "torch-compile-nchw": (False, True)}


def run(which: str, mode: str, image_size, batch_size: int, steps: int, warmup: int,
        dtype: str, device: str) -> dict:
    """One row: images/s, CPU seconds, compile (first step) and peak memory."""
    import numpy as np
    import torch

    from experiments.torch_unet import UNet

    channels_last, compiled = CHILDREN[which]
    h, w = image_size
    torch.set_num_threads(cpu_count())
    torch.manual_seed(0)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(3, 1).to(device=device, memory_format=fmt)
    try:
        optimizer, optimizer_name = torch.optim.AdamW(model.parameters(), lr=3e-4,
                                                      fused=True), "AdamW (fused)"
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device here
        optimizer, optimizer_name = torch.optim.AdamW(model.parameters(), lr=3e-4), "AdamW"
    if compiled:
        model = torch.compile(model)
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.uniform(size=(batch_size, 3, h, w)).astype(np.float32))
    mask = torch.from_numpy((rng.uniform(size=(batch_size, 1, h, w)) > 0.5).astype(np.float32))
    img = img.to(device).contiguous(memory_format=fmt)
    mask = mask.to(device).contiguous(memory_format=fmt)
    criterion = torch.nn.BCEWithLogitsLoss()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

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

    step = train if mode == "train" else infer
    model.train(mode == "train")
    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    timing = time_steps(step, steps, warmup)
    cuda = device == "cuda"
    return {"framework": which, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "img_per_s": batch_size / timing["step_s"], **timing,
            "compile_s": first_s, "peak_rss_mb": peak_rss_mb(),
            "peak_device_mb": torch.cuda.max_memory_allocated() / 1e6 if cuda else None,
            "threads": torch.get_num_threads(), "optimizer": optimizer_name,
            "torch": torch.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.torch_peer",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--which", choices=CHILDREN, required=True)
    p.add_argument("--mode", choices=("train", "infer"), required=True)
    p.add_argument("--image-size", type=int, nargs=2, required=True, metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), required=True)
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    args = p.parse_args(argv)
    print(json.dumps(run(args.which, args.mode, args.image_size, args.batch_size, args.steps,
                         args.warmup, args.dtype, args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
