"""Turn the guide's saved PyTorch weights into a run directory that predict and evaluate use.

The guide saves ``torch.save(model.state_dict(), MODEL_SAVE_PATH)``. This reads that file
with ``torch.load(..., weights_only=True)``, which refuses anything but tensors and
plain containers (a .pth file is a pickle; unpickling arbitrary objects would run their
code), converts it with ``unet_jax.params_from_torch``, and writes ``OUT_DIR`` with
``config.json`` and an orbax checkpoint. Needs torch (``pip install torch``).
"""

from __future__ import annotations

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
    p.add_argument("--image-size", type=int, nargs="+", default=[512, 512], metavar=("H", "W"),
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

    path, out = Path(args.weights), Path(args.out_dir)
    if not path.is_file():
        raise common.UserError(f"{path}: no such file")
    rundir.check_start(out, resume=False, what="OUT_DIR", resumable=False)  # before reading
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad or unsafe files
        raise common.UserError(f"{path}: not a loadable weights-only state_dict "
                               f"({str(e).splitlines()[0]})") from None
    if not isinstance(state_dict, dict):
        raise common.UserError(f"{path}: holds a {type(state_dict).__name__}, not a state_dict; "
                               "save model.state_dict(), as the guide does")
    try:
        params = params_from_torch(state_dict)
        config = config_from_torch(state_dict)
    except ValueError as e:
        raise common.UserError(f"{path}: {e}") from None
    config.image_size = normalize_image_size(args.image_size, config.depth)
    checkpoints.save_params(out, params, config)
    print(f"wrote {out} ({sum(v.size for v in _leaves(params)):,} parameters, "
          f"{config.in_channels} in / {config.num_classes} out channels, input "
          f"{config.image_size[0]}x{config.image_size[1]}); use it with "
          f"python -m experiments.predict --checkpoint {out} --input IMAGE --output DIR")
    return 0


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.import_torch")
