"""Turn the guide's saved PyTorch weights into a run directory that predict and evaluate use.

The guide saves ``torch.save(model.state_dict(), MODEL_SAVE_PATH)``. This reads that file
with ``torch.load(..., weights_only=True)``, which refuses anything but tensors and
plain containers (a .pth file is a pickle; unpickling arbitrary objects would run their
code), converts it with ``unet_jax.params_from_torch``, and writes ``OUT_DIR`` with
``config.json`` and an orbax checkpoint. A training script's checkpoint that holds the
state_dict under ``model_state_dict``, ``state_dict`` or ``model`` is read from there.
Needs torch (``pip install torch``).
"""

from __future__ import annotations

import pickle
import re
import shlex
from pathlib import Path

from experiments import common

EXAMPLES = """
python -m experiments.import_torch unet.pth runs/from-torch
python -m experiments.predict --checkpoint runs/from-torch --input car.jpg --output out/
"""


def parse_args(argv=None):
    p = common.make_parser("experiments.import_torch", __doc__.split("\n\n")[0], EXAMPLES)
    p.add_argument("weights", help="the .pth file the guide's notebook saved")
    p.add_argument("out_dir", help="run directory to create")
    p.add_argument("--image-size", type=int, nargs="+", metavar=("H", "W"),
                   help="size the weights were trained at (default: 512 512, the guide's)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.start_platform("cpu")
    try:
        import torch
    except ImportError:
        raise common.UserError("import_torch needs PyTorch to read .pth files: "
                               "pip install torch (the CPU build is enough)") from None
    from unet_jax import checkpoints, config_from_torch, params_from_torch, rundir
    from unet_jax.config import normalize_image_size
    from unet_jax.platform import python_command
    from unet_jax.torch_import import model_weights

    path, out = Path(args.weights), Path(args.out_dir)
    if path.is_dir():
        raise common.UserError(f"{path} is a folder; pass the .pth file of the weights")
    if not path.is_file():
        raise common.UserError(f"{path}: no such file")
    rundir.check_start(out, resume=False, what="OUT_DIR", resumable=False)  # before reading
    rundir.check_writable(out.parent, "OUT_DIR's folder")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # torch refuses classes, which could run code
            raise common.UserError(f"{path}: holds pickled Python objects (a whole model, or "
                                   "classes of its own), which are not loaded, for safety; "
                                   "save model.state_dict(), as the guide does, and import "
                                   "that") from None
        raise common.UserError(f"{path}: not a weights file that torch.save wrote "
                               f"({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 (torch raises several types for files it cannot read)
        raise common.UserError(f"{path}: not a weights file that torch.save wrote "
                               f"({_first_line(e)})") from None
    try:
        state_dict, key = model_weights(state_dict)
        if key is not None:
            print(f"reading the model's weights under {key!r} of {path}")
        params = params_from_torch(state_dict)
        config = config_from_torch(state_dict)
    except ValueError as e:
        raise common.UserError(f"{path}: {e}") from None
    if args.image_size:  # else the guide's, config_from_torch's default
        config.image_size = normalize_image_size(args.image_size, config.depth)
    checkpoints.save_params(out, params, config)
    print(f"wrote {out} ({sum(v.size for v in _leaves(params)):,} parameters, "
          f"{config.in_channels} in / {config.num_classes} out channels, input "
          f"{config.image_size[0]}x{config.image_size[1]}); use it with "
          f"{python_command()} -m experiments.predict --checkpoint {shlex.quote(str(out))} "
          "--input IMAGE --output DIR")
    return 0


def _first_line(error: Exception) -> str:
    """What went wrong, in one line: torch's own detail where its long message holds
    one ("WeightsUnpickler error: ..."), else the first line, without colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    line = detail.group(1) if detail else (text.splitlines() or [""])[0]
    return f"{type(error).__name__}: {line[:200]}"


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.import_torch")
