"""A trained run outside this package: ONNX, TF SavedModel, TFLite and StableHLO files.

Every format holds the same function: images ``(N, H, W, C)`` float32 in [0, 1] with
the run's channels to logits ``(N, H, W, num_classes)``, the parameters inside. The
batch size, the height and the width are all dynamic (any multiple of ``2**depth``:
the U-Net halves the map ``depth`` times). The model is the stock Flax one (the CPU
training kernels change only the backward pass) in float32 by default, also for a run
trained in bfloat16.

One route, through converters the field maintains, so that each format holds the same
program (JAX's own export, StableHLO):

* ``stablehlo``: ``jax.export`` serialises the StableHLO program with JAX's
  compatibility guarantees, lowered for CPU and CUDA; ``jax.export.deserialize(...)
  .call(images)`` runs it in any later JAX, without this package.
* ``savedmodel``: ``jax2tf`` wraps that program as one ``XlaCallModule`` op of a
  TensorFlow graph (signature ``serving_default``: ``image`` -> ``logits``), for TF
  Serving or ``tf.saved_model.load``.
* ``tflite``: the TFLite converter turns the StableHLO of that graph into TFLite's
  own operations (CONV_2D, MAX_POOL_2D, BATCH_MATMUL...), for phones and edge boards.
* ``onnx``: ``tf2onnx`` converts the TFLite model to ONNX (opset 17), for ONNX
  Runtime. ``jax2onnx`` would convert directly but requires an older orbax-checkpoint
  than this package uses, and tf2onnx cannot read a SavedModel's ``XlaCallModule``
  (jax2tf no longer writes plain TF ops), so ONNX comes from the TFLite model.

Nothing is written that was not checked: every export is run on random images by the
runtime its users will use (onnxruntime, TF's loader, the TFLite interpreter,
``jax.export.deserialize``) and compared with JAX's logits before it is moved into
place. An operation a converter lacks, or a conversion that computes something else,
is a one-line ``ExportError`` naming the format (and the operation), and no file.

Beside each export, ``<output>.json`` says what a caller needs to use it: the input
and output, how the run predicts (``prediction_settings``), the memory a whole pass
takes per pixel (where predict tiles instead), and the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

# TensorFlow through data_pipeline's door: its GPUs hidden (JAX needs them), its
# libraries' start-up notes held back.
from data_pipeline.tf_setup import native_logs_held, tensorflow
from unet_jax import rundir

FORMATS = ("onnx", "savedmodel", "tflite", "stablehlo")
ONNX_OPSET = 17
# The exported logits must equal JAX's to this, relative to the largest logit (at
# least 1): float32 sums in another order differ by about 1e-6 of it.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
EXTRA = "pip install -e '.[export]'"
FILE_SUFFIX = {"stablehlo": "jaxexport"}  # jax.export's serialised form, as the docs name it


class ExportError(RuntimeError):
    """A model that cannot be exported as asked; the message is one line naming the
    format or flag and the fix."""


# --- What a caller needs: the sidecar JSON ----------------------------------------------

def prediction_settings(config, threshold: float | None = None) -> dict:
    """How the run predicts a mask, as plain data: the run's ``PredictionMode``, what
    ``inference.Predictor`` does with it by default, for callers of an exported model.

    ``resize`` (runs trained on whole images): resize the image to ``image_size``,
    one call, resize the logits back. ``whole`` (runs trained on crops): the whole
    image at its own size times ``scale``, mirror-padded (symmetric) to a multiple of
    ``size_multiple``, in one call; where that pass would not fit in memory, tiles of
    ``tile`` with ``overlap``, blended. A binary model's mask is ``logits >
    threshold``: the logit of ``probability_threshold`` (``threshold``, as predict's
    --threshold; 0.5 by default, a logit of 0); with several classes, the argmax.
    """
    from unet_jax.prediction import PredictionMode

    c, mode = config, PredictionMode.from_config(config, memory_budget=1 << 62,
                                                 threshold=threshold)
    # Every step predict takes, in order: a caller who follows them gets its masks.
    values = "RGB values" if c.in_channels == 3 else "grayscale (luminance) values"
    wide = (f"16-bit grayscale and float images first scaled by 255 / {c.max_value:g}; "
            "16-bit colour refused" if c.max_value
            else "16-bit images, and 32-bit or float images with values over 255, first "
            "divided by 257; float images whose values stay within 1 times 255")
    first = ("the image turned upright by its EXIF orientation tag, as viewers show it "
             "(a JPEG decoded with its own downscaling by 1/2, 1/4 or 1/8 where the "
             f"result stays at least the target size), {values} / 255 ({wide}, rounded "
             "and clipped to 0..255)")
    views = {"hflip": "the image mirrored left to right",
             "flips": "the image mirrored left to right, upside down, and both"}
    call = "the model"
    if c.tta in views:  # every model call averages its views, before any resizing back
        call = (f"the model, on {views[c.tta]} too (each view's logits mirrored back, "
                "turned into probabilities, sigmoid or softmax for several classes, "
                "averaged, clipped to [1e-7, 1 - 1e-7], and turned back into logits: "
                "log(p / (1 - p)), or log p)")
    if mode.how == "resize":
        how = (f"{first}; resized to {c.image_size[0]}x{c.image_size[1]} (bilinear); "
               f"{call}; logits resized back to the image's size (bilinear)")
    else:
        how = (f"{first}; resized by scale {c.scale} (bilinear); the whole image, its "
               f"bottom and right padded to a multiple of {mode.multiple} by mirroring "
               "with the edge pixel repeated (numpy's pad mode 'symmetric'), through "
               f"{call}; or, where that does not fit in memory, tiles of "
               f"{c.tile[0]}x{c.tile[1]} overlapping by {c.overlap}, each through the "
               "same, blended with Gaussian weights; logits cut back and resized to the "
               "image's size (bilinear)")
    return {"mode": mode.how, "how": how,
            "image_size": list(c.image_size), "crop": list(c.crop) if c.crop else None,
            "tile": list(c.tile), "scale": c.scale, "overlap": c.overlap, "tta": c.tta,
            "in_channels": c.in_channels, "num_classes": c.num_classes, "depth": c.depth,
            "max_value": c.max_value,
            "size_multiple": mode.multiple,
            "threshold": mode.logit_threshold if c.num_classes == 1 else None,
            "probability_threshold": mode.threshold if c.num_classes == 1 else None,
            "decision": (f"logits > threshold (sigmoid probability over {mode.threshold:g})"
                         if c.num_classes == 1 else "argmax over the classes")}


def sidecar_path(output) -> Path:
    """``<output>.json``: beside a file, or beside a SavedModel directory."""
    return Path(f"{Path(output)}.json")


def read_sidecar(output) -> dict:
    """The sidecar of an export (``output`` the exported file or directory)."""
    path = sidecar_path(output)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} cannot be read ({e}); export the model again") from None


# --- The function to export --------------------------------------------------------------

def model_function(params, config, dtype: str):
    """images -> logits of the run's U-Net with stock Flax ops, computing in ``dtype``."""
    import jax

    from unet_jax.train import create_model

    model = create_model(dataclasses.replace(config, kernels="stock", dtype=dtype), "cpu")
    return jax.jit(lambda images: model.apply({"params": params}, images))


def _polymorphic_shape(config) -> str:
    """Batch, height and width dynamic; height and width multiples of 2**depth."""
    k = 2 ** config.depth
    return f"b, {k}*h, {k}*w, {config.in_channels}"


def _to_stablehlo(fn, config) -> bytes:
    import jax
    import jax.numpy as jnp

    shape = jax.export.symbolic_shape(_polymorphic_shape(config))
    exported = jax.export.export(fn, platforms=("cpu", "cuda"))(
        jax.ShapeDtypeStruct(shape, jnp.float32))
    return bytes(exported.serialize())


def _tf_function(fn, config, platforms):
    """``fn`` as a TF function of one float32 ``image`` batch returning ``logits``."""
    tf = tensorflow()
    from jax.experimental import jax2tf

    converted = jax2tf.convert(fn, polymorphic_shapes=[f"({_polymorphic_shape(config)})"],
                               with_gradient=False, native_serialization_platforms=platforms)
    spec = tf.TensorSpec([None, None, None, config.in_channels], tf.float32, name="image")
    return tf.function(lambda image: {"logits": converted(image)}, autograph=False,
                       input_signature=[spec])


def _write_savedmodel(fn, config, path: Path) -> None:
    tf = tensorflow()

    module = tf.Module()
    module.serve = _tf_function(fn, config, ("cpu", "cuda"))
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def _to_tflite(fn, config) -> bytes:
    tf = tensorflow()

    module = tf.Module()  # with it, the model keeps its signature: image -> logits
    module.serve = _tf_function(fn, config, ("cpu",))
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module)
    try:
        return converter.convert()
    except Exception as e:  # noqa: BLE001 (the converter raises its own ConverterError)
        raise ExportError(f"--format tflite: the TFLite converter cannot convert this "
                          f"model ({_converter_reason(str(e))})") from None


def _converter_reason(message: str) -> str:
    """The operation a converter's error names, else the first line of the error."""
    ops = re.findall(r"(?:legalize|convert)[a-z ]* (?:operation|op) '([\w.]+)'", message)
    if ops:
        return "operation " + ", ".join(dict.fromkeys(ops))
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[0] if lines else "no reason given"


def _segment_prod(ctx, node, name, args):
    """tf2onnx handler for TFLite's UNSORTED_SEGMENT_PROD.

    The TFLite converter computes dynamic reshape sizes with it (the product of some
    of a shape's dimensions, the others marked by segment id -1, which the op drops).
    tf2onnx's own handler gathers id -1 as the last dimension instead, so every
    dynamic-shape model came out with wrong reshape sizes. This one does what the op
    means: ``out[s] = prod(data[i] for ids[i] == s)`` for s in range(num_segments).
    """
    import onnx
    from tf2onnx import utils

    data, ids, num = node.input
    i64 = onnx.TensorProto.INT64

    def const(value):
        return ctx.make_const(utils.make_name(f"{name}_const"), np.asarray(value)).output[0]

    def op(kind, *inputs, **attr):
        return ctx.make_node(kind, list(inputs), attr=attr).output[0]

    ids, num = op("Cast", ids, to=i64), op("Cast", num, to=i64)
    segments = op("Range", const(np.int64(0)), num, const(np.int64(1)))
    member = op("Equal", op("Unsqueeze", ids, const(np.array([0], np.int64))),
                op("Unsqueeze", segments, const(np.array([1], np.int64))))
    unit = const(np.array(1, utils.map_onnx_to_numpy_type(ctx.get_dtype(data))))
    factors = op("Where", member, op("Unsqueeze", data, const(np.array([0], np.int64))), unit)
    ctx.replace_inputs(node, [factors])
    node.type = "ReduceProd"  # over axis 1, opset 17's attribute form
    for key in list(node.attr):
        del node.attr[key]
    node.set_attr("axes", [1])
    node.set_attr("keepdims", 0)


def onnx_optimizers() -> dict:
    """tf2onnx's graph optimizers, in its order, with its reshape optimizer kept off
    the graph's outputs.

    That optimizer rewrites a Reshape whose shape is computed at run time into one of
    constant shape, and where the dimensions line up only one place further on, it
    reshapes to one more leading axis and puts a Squeeze after it. tf2onnx inserts
    that Squeeze for the Reshape's consumers alone, so on a Reshape that is the
    graph's output the Squeeze is left dangling and the model returns the extra
    axis: (1, N, H, W, 1) for (N, H, W, 1). The one-class head's NCHW -> NHWC
    transpose becomes exactly such a Reshape, and whether it is still followed by an
    Identity when the optimizer reaches it depends on the order tf2onnx's sets hand
    out nodes, which changes from process to process: about one ONNX export in ten
    failed its parity check. The output's own Reshape costs nothing to compute.
    """
    from tf2onnx import optimizer
    from tf2onnx.optimizer.reshape_optimizer import ReshapeOptimizer

    class OutputsKept(ReshapeOptimizer):
        def _optimize_reshape(self, node, graph):
            return (not set(node.output) & set(graph.outputs)
                    and super()._optimize_reshape(node, graph))

    return {name: OutputsKept if factory is ReshapeOptimizer else factory
            for name, factory in optimizer._get_optimizers().items()}


def _to_onnx(tflite: bytes, path: Path) -> None:
    onnx = require("onnx", "onnx")
    require("tf2onnx", "onnx")
    from tf2onnx import optimizer, tfonnx

    tf = tensorflow()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's notice of ai_edge_litert
        source = Path(tmp) / "model.tflite"
        source.write_bytes(tflite)
        # tf2onnx.convert.from_tflite's own steps, with onnx_optimizers() in place of
        # the stock set (from_tflite takes no optimizers).
        with tf.device("/cpu:0"), tf.Graph().as_default() as unused:
            graph = tfonnx.process_tf_graph(
                unused, continue_on_error=True, opset=ONNX_OPSET, tflite_path=str(source),
                custom_op_handlers={"UnsortedSegmentProd": (_segment_prod, [])})
            graph = optimizer.optimize_graph(graph, catch_errors=True,
                                             optimizers=onnx_optimizers())
            model = graph.make_model("converted from model")
    unknown = [n.op_type for n in model.graph.node
               if n.domain not in ("", "ai.onnx") or not onnx.defs.has(n.op_type)]
    if unknown:
        raise ExportError(f"--format onnx: tf2onnx cannot convert the operation "
                          f"{', '.join(dict.fromkeys(unknown))}")
    _rename_io(model, "image", "logits")
    onnx.save(model, str(path))


def _rename_io(model, input_name: str, output_name: str) -> None:
    """Names the ONNX graph's one input and one output (tf2onnx keeps TFLite's)."""
    renames = {model.graph.input[0].name: input_name, model.graph.output[0].name: output_name}
    for value in (model.graph.input[0], model.graph.output[0]):
        value.name = renames[value.name]
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def require(module: str, fmt: str):
    """Imports ``module``, which ``--format fmt`` needs; one line naming the extra
    that installs it if it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"--format {fmt} needs {module}, which is not installed: "
                          f"{EXTRA}") from None


# --- Running an export -------------------------------------------------------------------

def load(path, fmt: str | None = None):
    """A function images (N, H, W, C) float32 in [0, 1] -> logits (numpy) of an
    exported model, run by the runtime of its format (the format from the sidecar if
    not given). Images it would misread (uint8 0..255, PyTorch's NCHW order, another
    channel count) raise a one-line ValueError."""
    path = Path(path)
    sidecar = {}
    if fmt is None:
        sidecar = read_sidecar(path)
    elif sidecar_path(path).is_file():  # for the channel check alone: not needed
        with contextlib.suppress(ExportError):
            sidecar = read_sidecar(path)
    fmt = fmt or sidecar["format"]
    run = _runner(path, fmt)
    channels = sidecar.get("prediction", {}).get("in_channels")
    return lambda images: run(_checked_images(images, channels))


def _checked_images(images, channels: int | None) -> np.ndarray:
    """``images`` as float32, refused where the model would misread them: the runtimes
    cast uint8 0..255 to floats as they are (logits in the thousands, no error), and
    name an NCHW batch only as a shape mismatch deep inside."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images of shape {images.shape}: give a batch (N, height, width, "
                         "channels); one image as image[None]")
    if channels and images.shape[-1] != channels:
        nchw = images.shape[1] == channels
        raise ValueError(f"images of shape {images.shape}: the model takes {channels} "
                         "channel(s) last, (N, height, width, channels)"
                         + (": transpose PyTorch's NCHW with x.transpose(0, 2, 3, 1)"
                            if nchw else ""))
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images are {images.dtype}: the model takes floats in [0, 1]; "
                         "divide 0..255 values by 255")
    if np.isnan(images).any():
        raise ValueError("images hold NaN values: the model takes floats in [0, 1]")
    # Most values outside: 0..255 or a normalised tensor; a cubic resize's overshoot
    # (a few values just outside) is the photo still.
    if images.size and np.mean((images < 0) | (images > 1)) > 0.05:
        raise ValueError(f"images hold values in [{float(images.min()):g}, "
                         f"{float(images.max()):g}]: the model takes floats in [0, 1]")
    return images.astype(np.float32, copy=False)


def _runner(path: Path, fmt: str):
    """The runtime's own images -> logits function of an export in format ``fmt``."""
    if fmt == "onnx":
        session = onnx_session(path)
        return lambda images: session.run(None, {"image": np.asarray(images, np.float32)})[0]
    if fmt == "savedmodel":
        tf = tensorflow()

        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda images: serve(image=tf.constant(images, tf.float32))["logits"].numpy()
    if fmt == "tflite":
        return _tflite_runner(path)
    if fmt == "stablehlo":
        import jax

        exported = jax.export.deserialize(bytearray(path.read_bytes()))
        return lambda images: np.asarray(exported.call(np.asarray(images, np.float32)))
    raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def onnx_session(path, threads: int | None = None):
    """An onnxruntime CPU session of an exported model, as every part of unet-jax
    runs it (onnxruntime's default graph optimisations, its NCHWc convolution layout
    included; ``threads``: its intra-op threads, else its own choice)."""
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _tflite_runner(path: Path):
    tf = tensorflow()

    with warnings.catch_warnings():  # tf.lite.Interpreter's notice of ai_edge_litert
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    # LiteRT's own API: the signature resizes the input to each batch's shape.
    runner = interpreter.get_signature_runner("serving_default")
    return lambda images: runner(image=np.asarray(images, np.float32))["logits"]


def parity(run, fn, images) -> tuple[float, float, str]:
    """(largest difference between ``run``'s logits and JAX's (``fn``) for ``images``,
    largest absolute JAX logit, what else is wrong: '' or the runtime's shape, or its
    count of values that are not finite); logits of another shape differ by infinity."""
    expected = np.asarray(fn(images), np.float32)
    got = np.asarray(run(images))
    largest = float(np.max(np.abs(expected)))
    if got.shape != expected.shape:
        return float("inf"), largest, f"; its logits have shape {got.shape}, not {expected.shape}"
    if not np.all(np.isfinite(got)):
        return float("inf"), largest, f"; {int(np.sum(~np.isfinite(got)))} of its logits are not finite"
    return float(np.max(np.abs(got - expected))), largest, ""


def check_images(config) -> list[np.ndarray]:
    """The inputs an export is checked on: two images at the run's size, and one at
    twice its height (a batch and a size the conversion did not trace, which is what
    shape bugs in a converter or runtime get wrong)."""
    rng = np.random.default_rng(0)
    h, w = config.tile
    shapes = [(2, h, w, config.in_channels), (1, 2 * h, w, config.in_channels)]
    return [rng.uniform(size=shape).astype(np.float32) for shape in shapes]


# --- Export -------------------------------------------------------------------------------

def export_params(params, config, fmt: str, output, dtype: str = "float32",
                  checkpoint: dict | None = None, threshold: float | None = None) -> dict:
    """Writes ``params`` of a run with ``config`` as ``fmt`` to ``output``, checked
    against JAX, and its settings file ``<output>.json`` (``checkpoint`` says where the
    weights came from; ``threshold``, the probability its masks are cut at, 0.5 by
    default); returns the settings, the check under "parity":
    {"max_abs_diff", "input_shapes", "tolerance"}."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in TOLERANCE:
        raise ExportError(f"--dtype {dtype!r}: choose float32 or bfloat16")
    if dtype != "float32" and fmt in ("onnx", "tflite"):
        raise ExportError(f"--dtype {dtype}: {fmt} exports compute in float32 only (its "
                          "CPU runtimes have no bfloat16 convolutions); drop --dtype")
    if fmt == "onnx":
        tensorflow()  # before tf2onnx imports it: quietly, without the GPUs
        for module in ("tf2onnx", "onnx", "onnxruntime"):
            require(module, fmt)
    prediction = prediction_settings(config, threshold)  # a bad threshold stops here
    output = _check_output(output, fmt)  # as given: an empty one is named as ''
    fn = model_function(params, config, dtype)
    # A name of at most 255 bytes stays one with the staging folder's 14 more.
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name[:64]}.",
                                    suffix=".tmp"))
    try:
        artifact = staging / output.name
        # The converter and interpreter log from C++ (absl notes about ignored options,
        # the XNNPACK delegate): a page of notes before export's one-line result.
        with native_logs_held(quiet_on=(ExportError,)):
            if fmt == "stablehlo":
                artifact.write_bytes(_to_stablehlo(fn, config))
            elif fmt == "savedmodel":
                _write_savedmodel(fn, config, artifact)
            elif fmt == "tflite":
                artifact.write_bytes(_to_tflite(fn, config))
            else:
                _to_onnx(_to_tflite(fn, config), artifact)
            run = load(artifact, fmt)
            checks = [(images.shape, *parity(run, fn, images))
                      for images in check_images(config)]
        shape, diff, _, wrong = max(checks, key=lambda check: check[1])
        limit = TOLERANCE[dtype] * max(1.0, max(largest for _, _, largest, _ in checks))
        if not diff <= limit:
            raise ExportError(f"--format {fmt}: the exported model computes other logits "
                              f"than JAX for a batch of shape {shape} (largest difference "
                              f"{diff:.3g}, allowed {limit:.3g}{wrong}); nothing was written")
        check = {"max_abs_diff": diff, "input_shapes": [list(s) for s, _, _, _ in checks],
                 "tolerance": limit}
        info = _settings(config, fmt, output, dtype, check, checkpoint, prediction)
        if artifact.is_file():  # what a caller checks that it has the model of these settings
            info["bytes"] = artifact.stat().st_size
            info["sha256"] = hashlib.sha256(artifact.read_bytes()).hexdigest()
        _replace(artifact, output)
        rundir.write_text_atomic(sidecar_path(output), json.dumps(info, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def export_run(run_dir, fmt: str, output, which="best", dtype: str = "float32",
               threshold: float | None = None) -> dict:
    """Exports a run's checkpoint (``which``: 'best', 'latest' or an epoch) as ``fmt``
    to ``output`` with its settings file; returns the settings. A run trained with
    ``--ema`` exports its averaged weights, as predict uses them."""
    from unet_jax import checkpoints
    from unet_jax.optim import weights_name

    params, config, epoch = checkpoints.restore_params(run_dir, which)
    return export_params(params, config, fmt, output, dtype, checkpoint={
        "run_dir": str(Path(run_dir).resolve()), "epoch": epoch, "which": str(which),
        "weights": weights_name(config)}, threshold=threshold)


def _settings(config, fmt: str, output: Path, dtype: str, check: dict,
              checkpoint: dict | None, prediction: dict) -> dict:
    """The settings file's contents: what a caller needs to use the export."""
    from unet_jax.prediction import pass_bytes

    k = 2 ** config.depth
    return {
        "format": fmt, "file": output.name,
        # Names by signature (SavedModel, TFLite), graph (ONNX), or none (StableHLO:
        # one positional argument and result).
        "signature": "serving_default" if fmt in ("savedmodel", "tflite") else None,
        "input": {"name": "image", "shape": [None, None, None, config.in_channels],
                  "dtype": "float32", "layout": "NHWC", "range": [0.0, 1.0],
                  "dynamic": f"batch; height and width any multiple of {k}"},
        "output": {"name": "logits", "shape": [None, None, None, config.num_classes],
                   "dtype": "float32"},
        "compute_dtype": dtype, "trained_dtype": config.dtype,
        "prediction": prediction,
        # What predict weighs when it chooses between one whole pass and tiles
        # (prediction.pass_bytes, linear in the pixels): bytes per pixel of the padded
        # image, so that a caller with its own memory budget can choose alike.
        "pass_bytes_per_pixel": pass_bytes((1, 1), config.base_features),
        "checkpoint": checkpoint,
        "parity": check,
    }


def size_of(path) -> int:
    """Bytes of an exported file, or of every file of a SavedModel directory."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _check_output(output: Path, fmt: str) -> Path:
    """``output`` made absolute, its parent created; refuses a path whose file or
    directory, or settings file, is anything but an earlier export (``_is_export``):
    an export replaces what it wrote before, never a user's file (a run's config.json,
    notes in a SavedModel directory, the folder the command runs in)."""
    given, output = output, Path(os.path.abspath(output))
    if output.is_symlink():
        raise ExportError(f"--output {given} is a symbolic link (to {os.readlink(output)}); "
                          "give the path itself, or a new name")
    if output == Path.cwd() or output in Path.cwd().parents:
        example = "unet_savedmodel" if fmt == "savedmodel" else f"unet{_suffix(fmt)}"
        raise ExportError(f"--output {str(given) or repr('')} is the folder this command "
                          "runs in (or holds it); give the export a name of its own, e.g. "
                          f"{example}")
    kind = {_suffix(f): f for f in FORMATS if f != "savedmodel"}.get(output.suffix)
    if kind is not None and kind != fmt:
        raise ExportError(f"--output {given} ends in {output.suffix}, the {kind} format's "
                          f"name, for an export to {fmt}: pass --format {kind}, or name it "
                          f"{output.with_suffix(_suffix(fmt)).name}")
    ours = _is_export(output)
    _check_target(output, given, fmt, ours)
    _check_sidecar(output, given, ours)
    _check_parent(output, given)
    return output


def _check_target(output: Path, given, fmt: str, ours: bool) -> None:
    """Refuses a file or folder at ``output`` that the export may not replace: one it
    did not write (not ``ours``), the wrong kind for ``fmt``, or a SavedModel folder
    holding files of the user's."""
    if fmt == "savedmodel":
        if output.is_file():
            raise ExportError(f"--output {given} is a file; a SavedModel is a directory, "
                              "give a new directory name")
        if output.is_dir() and any(output.iterdir()):
            _check_replaceable(output, given, ours)
            others = sorted(p.name for p in output.iterdir() if p.name not in SAVEDMODEL_FILES)
            if others:
                raise ExportError(f"--output {given} holds {', '.join(others)}, which an "
                                  "export does not write and replacing it would delete; "
                                  "move them, or give another --output")
    elif output.is_dir():
        raise ExportError(f"--output {given} is a directory; give a file name, e.g. "
                          f"{output / ('unet' + _suffix(fmt))}")
    elif output.exists():
        _check_replaceable(output, given, ours)


def _check_sidecar(output: Path, given, ours: bool) -> None:
    """Refuses a settings file that cannot be written, or is not an export's."""
    sidecar = sidecar_path(output)
    if len(os.fsencode(sidecar.name)) > NAME_MAX:
        raise ExportError(f"--output {given}: its settings file's name, {sidecar.name[:24]}"
                          f"... ({len(os.fsencode(sidecar.name))} bytes), is longer than a "
                          f"file name may be ({NAME_MAX}); give a shorter name")
    if sidecar.is_dir():  # found now, not after the export is in place
        raise ExportError(f"--output {given}: its settings file {sidecar} would replace a "
                          "directory of that name; move it, or give another --output")
    if sidecar.exists() and not ours:
        raise ExportError(f"--output {given}: {sidecar} exists and is not the settings file "
                          "of an export of that name; move it, or give another --output")


def _check_parent(output: Path, given) -> None:
    """Creates ``output``'s folder; refuses one that is a file or cannot be written."""
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"--output {given}: {parent} is a file, not a folder; "
                                  "choose another path")
            break
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output.parent, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        # /proc/x.onnx: /proc exists, yet no file can be made in it (ENOENT).
        raise ExportError(f"--output {given}: cannot write in {output.parent} "
                          f"({e.strerror or e}); choose another path") from None


NAME_MAX = 255  # bytes in a file name: Linux, macOS and Windows alike
# What tf.saved_model.save writes into a SavedModel directory.
SAVEDMODEL_FILES = frozenset({"saved_model.pb", "variables", "assets", "fingerprint.pb"})


def _suffix(fmt: str) -> str:
    return "." + FILE_SUFFIX.get(fmt, fmt) if fmt != "savedmodel" else ""


def _is_export(output: Path) -> bool:
    """Whether ``output`` is an earlier export: its settings file says it wrote it."""
    try:
        info = json.loads(sidecar_path(output).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return (isinstance(info, dict) and info.get("file") == output.name
            and info.get("format") in FORMATS)


def _check_replaceable(output: Path, given, ours: bool) -> None:
    if not ours:
        raise ExportError(f"--output {given} exists and is not an earlier export (no "
                          f"{sidecar_path(output).name} beside it says so); export "
                          "replaces only what it wrote: give a new name, or move it")


def _replace(artifact: Path, output: Path) -> None:
    """Moves a checked export into place, replacing an older export there."""
    if output.is_dir():
        shutil.rmtree(output)
    os.replace(artifact, output)
