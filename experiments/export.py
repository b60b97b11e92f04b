"""Export a trained run to ONNX, TF SavedModel, TFLite or StableHLO, checked against JAX.

The exported model maps images (N, H, W, C) float32 in [0, 1] with the run's channels
to logits (N, H, W, classes); batch, height and width are dynamic (height and width
any multiple of 2**depth). ``<output>.json`` beside it says how the run predicts
(resize or tiles, the size, scale, threshold) and which checkpoint it came from.
Before anything is written the export is run by its own runtime and its logits are
compared with JAX's; a model a converter cannot export is one line naming the format.
"""

from __future__ import annotations

from experiments import common

EXAMPLES = """
python -m experiments.export --checkpoint RUN_DIR --format onnx --output unet.onnx
python -m experiments.export --checkpoint RUN_DIR --format savedmodel --output unet_savedmodel
python -m experiments.export --checkpoint RUN_DIR --format tflite --output unet.tflite
python -m experiments.export --checkpoint RUN_DIR --format stablehlo --output unet.jaxexport --epoch 8
"""


def parse_args(argv=None):
    from unet_jax.export import FORMATS

    p = common.make_parser("experiments.export", __doc__.split("\n\n")[0], EXAMPLES)
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="run directory written by experiments.train or experiments.import_torch")
    p.add_argument("--epoch", default="best",
                   help="'best' (by validation Dice, default), 'latest' or an epoch number")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx (ONNX Runtime), savedmodel (TensorFlow, TF Serving), tflite "
                   "(phones, edge boards) or stablehlo (jax.export, any later JAX)")
    p.add_argument("--output", required=True, help="the file to write (a directory for "
                   "savedmodel); <output>.json is written beside it")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the exported model, whatever the run trained in "
                   "(bfloat16: savedmodel and stablehlo only) (default: float32)")
    p.add_argument("--threshold", type=float, metavar="P",
                   help="one-class runs: the probability the settings file says masks are "
                   "cut at, as chosen with evaluate --thresholds (default: 0.5)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # The export is lowered for CPU and CUDA alike; converting needs no accelerator.
    common.start_platform("cpu")
    from unet_jax import export

    info = export.export_run(args.checkpoint, args.format, args.output, args.epoch, args.dtype,
                             args.threshold)
    size = export.size_of(args.output) / 1e6
    check = info["parity"]
    print(f"wrote {args.output} ({size:.1f} MB, {args.format}, {info['compute_dtype']}; "
          f"batch, height and width dynamic, sides multiples of "
          f"{info['prediction']['size_multiple']}) and {export.sidecar_path(args.output)} "
          f"from epoch {info['checkpoint']['epoch']} of {args.checkpoint}; logits match "
          f"JAX to {check['max_abs_diff']:.2g} (largest difference on random batches "
          f"of {' and '.join('x'.join(map(str, s)) for s in check['input_shapes'])})")
    return 0


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.export")
