"""Export: each format, run by its own runtime, gives JAX's logits (to 1e-4) for any
batch and size; every model option exports; the sidecar holds the run's prediction
settings; the README's onnxruntime example gives experiments.predict's mask; bad runs
and impossible exports are one line, and leave no file."""

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from data_pipeline import sample_data
from experiments import export as export_cli
from tests.test_experiments import call
from unet_jax import checkpoints, export
from unet_jax.checkpoints import CheckpointError
from unet_jax.config import Config, ConfigError
from unet_jax.export import ExportError
from unet_jax.inference import Predictor
from unet_jax.train import init_params

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Config(base_features=4, depth=2, image_size=(32, 48))


def _missing_onnx_package():
    import importlib.util

    return next((m for m in ("tf2onnx", "onnx", "onnxruntime")
                 if importlib.util.find_spec(m) is None), None)


def needs(fmt):
    missing = _missing_onnx_package() if fmt == "onnx" else None
    if missing:
        pytest.skip(f"{missing} is not installed (pip install -e '.[export]')")


def real_looking_image(size=(96, 64), seed=3) -> np.ndarray:
    """A sample-set car photograph, (1, H, W, 3) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    photo, _ = sample_data.render(sample_data.random_car(rng), 3, size, rng)
    return (np.asarray(photo.convert("RGB"), np.float32) / 255.0)[None]


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles():
    """XLA's optimisations cost compile time and change no value that matters here."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def random_params(config, seed=0):
    """Parameters of the U-Net of ``config`` drawn with numpy at the initialisers'
    scale (1/sqrt(fan-in)): an export must reproduce any weights, and this skips
    compiling the initialisers."""
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), config))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.sqrt(
        np.prod(s.shape[:-1]) if len(s.shape) > 1 else 10)).astype(np.float32), shapes)


def sample_batches(config):
    """3 random images at the run's size, and 1 car photo at twice that size."""
    h, w = config.image_size
    photo = real_looking_image((2 * w, 2 * h))
    return [np.random.default_rng(1).uniform(size=(3, h, w, config.in_channels)).astype(
        np.float32), photo if config.in_channels == 3 else photo.mean(-1, keepdims=True)]


def assert_matches(run, batches, expected, num_classes=1):
    for images, logits in zip(batches, expected):
        out = run(images)
        assert out.shape == (*images.shape[:3], num_classes)
        diff = float(np.max(np.abs(out - logits)))
        assert diff <= export.TOLERANCE["float32"] * max(1.0, float(np.max(np.abs(logits)))), (
            images.shape, diff)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    params = random_params(CONFIG, seed=1)
    # Centre the logits on a car photo, so that masks hold both car and background.
    fn = export.model_function(params, CONFIG, "float32")
    params["head"]["bias"] = params["head"]["bias"] - np.median(
        np.asarray(fn(real_looking_image())))
    checkpoints.save_params(run, params, CONFIG, epoch=3)
    return run, params


@pytest.fixture(scope="module")
def reference(run_dir):
    """JAX's logits for the run's test batches, computed once for every format."""
    batches = sample_batches(CONFIG)
    fn = export.model_function(run_dir[1], CONFIG, "float32")
    return batches, [np.asarray(fn(images)) for images in batches]


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The run exported in every format whose packages are installed: stablehlo through
    the command line, the others through the library."""
    out = tmp_path_factory.mktemp("exported")
    paths = {}
    for fmt in export.FORMATS:
        if fmt == "onnx" and _missing_onnx_package():
            continue
        paths[fmt] = out / f"unet.{fmt}"
        if fmt != "stablehlo":
            export.export_run(run_dir[0], fmt, paths[fmt])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert call(export_cli.main, ["--checkpoint", str(run_dir[0]), "--format",
                                      "stablehlo", "--output", str(paths["stablehlo"])]) == 0
    paths["printed"] = printed.getvalue()
    return paths


def test_a_loaded_export_names_images_it_would_misread(exported, reference, tmp_path):
    """uint8 photos were cast to floats as they are (logits in the thousands, no
    error), and an NCHW batch failed as a shape mismatch inside the runtime."""
    run = export.load(exported["stablehlo"])
    images = reference[0][0]
    for given, message in [
            ((images * 255).astype(np.uint8), r"^images are uint8: the model takes floats "
                                              r"in \[0, 1\]; divide 0\.\.255 values by 255$"),
            (images.transpose(0, 3, 1, 2), r"^images of shape \(\d+, 3, \d+, \d+\): the "
                                           r"model takes 3 channel\(s\) last, .*NCHW"),
            (images[0], r"^images of shape \(\d+, \d+, 3\): give a batch"),
            (images * 2 - 1, r"^images hold values in \[-[\d.]+, [\d.]+\]: the model "
                             r"takes floats in \[0, 1\]$")]:
        with pytest.raises(ValueError, match=message):
            run(given)
    np.testing.assert_array_equal(run(images.astype(np.float64)), run(images))
    with pytest.raises(ValueError, match=r"^images hold NaN values"):
        run(np.full_like(images, np.nan))
    overshoot = images.copy()
    overshoot[0, 0, :2] = -0.01  # a cubic resize's: a few values just outside
    assert run(overshoot).shape == run(images).shape
    # A damaged sidecar beside a file whose format is given: the model still loads.
    copy = tmp_path / "unet.stablehlo"
    copy.write_bytes(exported["stablehlo"].read_bytes())
    export.sidecar_path(copy).write_text("{")
    assert export.load(copy, "stablehlo")(images).shape == run(images).shape


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_every_format_gives_jax_logits_for_any_batch_and_size(exported, reference, fmt):
    needs(fmt)
    assert_matches(export.load(exported[fmt], fmt), *reference)
    info = export.read_sidecar(exported[fmt])
    assert info["format"] == fmt and info["checkpoint"]["epoch"] == 3
    assert info["parity"]["max_abs_diff"] <= 1e-4


def test_the_command_says_what_it_wrote(exported):
    line = exported["printed"].strip()
    assert line.startswith(f"wrote {exported['stablehlo']} (") and line.endswith(
        "random batches of 2x32x48x3 and 1x64x48x3)")
    assert f"{exported['stablehlo']}.json from epoch 3" in line
    assert "height and width dynamic, sides multiples of 4" in line


def test_the_onnx_conversion_keeps_the_output_shape_of_a_computed_reshape():
    """The one-class head's NCHW -> NHWC transpose reaches tf2onnx's reshape optimizer
    as a Reshape to a shape computed from the input's, and in some processes (the
    order depends on set iteration) as the graph's output: the stock optimizers then
    return (1, N, H, W, 1). Here the same Reshape, its shape read through an Identity
    so that it becomes the output before the optimizer can rewrite it."""
    needs("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from tf2onnx import optimizer
    from tf2onnx.graph import GraphUtil

    def converted(optimizers):
        nodes = [helper.make_node("Shape", ["x"], ["shape"]),
                 helper.make_node("Identity", ["shape"], ["same"]),
                 helper.make_node("Gather", ["same", "nhw"], ["dims"], axis=0),
                 helper.make_node("Concat", ["dims", "one"], ["nhwc"], axis=0),
                 helper.make_node("Reshape", ["x", "nhwc"], ["y"])]
        consts = [helper.make_tensor("nhw", TensorProto.INT64, [3], [0, 2, 3]),
                  helper.make_tensor("one", TensorProto.INT64, [1], [1])]
        graph = helper.make_graph(
            nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                          ["n", 1, "h", "w"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], consts)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        graph = optimizer.optimize_graph(GraphUtil.create_graph_from_onnx_model(model),
                                         catch_errors=False, optimizers=optimizers)
        session = ort.InferenceSession(graph.make_model("head").SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return session.run(None, {"x": np.zeros((2, 1, 3, 5), np.float32)})[0].shape

    assert converted(export.onnx_optimizers()) == (2, 3, 5, 1)
    # tf2onnx's own set still has the fault (pinned 1.17.0): when this fails, the
    # fault is mended upstream and onnx_optimizers() can go.
    assert converted(optimizer._get_optimizers()) == (1, 2, 3, 5, 1)


@pytest.mark.parametrize("options, fmt", [
    # onnx is converted from the tflite model: it runs both converters (tf2onnx is
    # slow on the attention gates' resize, so they go to tflite alone).
    (dict(attention=True), "tflite"),
    (dict(separable=True), "onnx"),
    (dict(depth=3, in_channels=1, num_classes=3), "tflite"),
], ids=["attention-tflite", "separable-onnx", "depth3-gray-3classes-tflite"])
def test_every_model_option_exports(options, fmt, tmp_path):
    needs(fmt)
    config = dataclasses.replace(CONFIG, **options)
    params = random_params(config)
    # export_params compares batches of 2 and 1 with JAX; here a batch of 1 of a sample
    # photograph at another size.
    export.export_params(params, config, fmt, tmp_path / f"unet.{fmt}")
    images = sample_batches(config)[1]
    expected = export.model_function(params, config, "float32")(images)
    assert_matches(export.load(tmp_path / f"unet.{fmt}", fmt), [images], [expected],
                   config.num_classes)


def test_a_bfloat16_run_exports_in_float32_or_on_request_in_bfloat16(run_dir, tmp_path):
    params = run_dir[1]
    trained_in_bf16 = dataclasses.replace(CONFIG, dtype="bfloat16")
    export.export_params(params, trained_in_bf16, "stablehlo", tmp_path / "f32")
    images = real_looking_image((48, 32))
    f32 = np.asarray(export.model_function(params, CONFIG, "float32")(images))
    assert_matches(export.load(tmp_path / "f32", "stablehlo"), [images], [f32])
    # export_params compares the bfloat16 export with JAX's bfloat16 model itself
    # (bfloat16 convolutions compile slowly on a CPU: no more of them here).
    check = export.export_params(params, trained_in_bf16, "stablehlo", tmp_path / "bf16",
                                 dtype="bfloat16")["parity"]
    assert check["max_abs_diff"] <= check["tolerance"]
    bf16 = export.load(tmp_path / "bf16", "stablehlo")(images)
    assert bf16.dtype == np.float32  # logits in float32, computed in bfloat16:
    assert 1e-5 < np.abs(bf16 - f32).max() < 0.05 * max(1, np.abs(f32).max())
    with pytest.raises(ExportError, match=r"^--dtype bfloat16: tflite exports compute in "
                       r"float32 only .*drop --dtype$"):
        export.export_params(params, CONFIG, "tflite", tmp_path / "x.tflite", dtype="bfloat16")


def test_the_sidecar_holds_the_runs_prediction_settings(exported, run_dir):
    settings = export.read_sidecar(exported["stablehlo"])["prediction"]
    assert settings == export.prediction_settings(CONFIG)
    # Enough to rebuild them, and they are what predict does with the run by default.
    rebuilt = Config(image_size=tuple(settings["image_size"]), crop=settings["crop"],
                     scale=settings["scale"], overlap=settings["overlap"],
                     tta=settings["tta"], in_channels=settings["in_channels"],
                     num_classes=settings["num_classes"], depth=settings["depth"])
    assert export.prediction_settings(rebuilt) == settings
    predictor = Predictor(run_dir[0])
    assert (predictor.mode.how, predictor.mode.overlap, predictor.mode.tta) == (
        settings["mode"], settings["overlap"], settings["tta"])
    crop_run = dataclasses.replace(CONFIG, crop=(32, 32), scale=0.5, tta="hflip")
    tiles = json.loads(json.dumps(export.prediction_settings(crop_run)))
    assert (tiles["mode"], tiles["tile"], tiles["scale"], tiles["tta"]) == (
        "whole", [32, 32], 0.5, "hflip")
    for step in ("EXIF orientation", "resized by scale 0.5", "tiles of 32x32",
                 "mode 'symmetric'", "on the image mirrored left to right too",
                 "turned into probabilities"):
        assert step in tiles["how"], step
    # The clip predict applies before the logarithm (a trained run's logit of 47 is a
    # probability of exactly 1 in float32, whose logit is inf).
    import inspect

    from unet_jax import tiling
    eps = inspect.signature(tiling.logits_of).parameters["eps"].default
    assert eps == 1e-7 and "clipped to [1e-7, 1 - 1e-7]" in tiles["how"]
    # The views are averaged at the model's size, before the logits are resized back.
    assert tiles["how"].index("averaged") < tiles["how"].index("resized to the image's")
    assert "EXIF" in settings["how"] and "mirrored" not in settings["how"]  # no tta
    # A threshold chosen with evaluate reaches the settings file, as a logit and as
    # the probability evaluate and predict speak of.
    chosen = export.prediction_settings(CONFIG, threshold=0.8)
    assert chosen["threshold"] == pytest.approx(np.log(0.8 / 0.2))
    assert chosen["probability_threshold"] == 0.8 and settings["threshold"] == 0.0
    with pytest.raises(ConfigError, match=r"^--threshold 2: give a probability"):
        export.export_params(run_dir[1], CONFIG, "stablehlo", "unused.jaxexport", threshold=2)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- onnx-example -->\n```python\n(.*?)```", text, re.S)
    assert block, "the README's onnxruntime example is marked <!-- onnx-example -->"
    return block.group(1)


@pytest.fixture(scope="module")
def gray_onnx(tmp_path_factory):
    """A grayscale run (1 input channel) exported as ONNX: (run directory, file)."""
    needs("onnx")
    config = dataclasses.replace(CONFIG, in_channels=1)
    params = random_params(config, seed=2)
    fn = export.model_function(params, config, "float32")
    params["head"]["bias"] = params["head"]["bias"] - np.median(
        np.asarray(fn(real_looking_image().mean(-1, keepdims=True))))
    run = tmp_path_factory.mktemp("gray") / "run"
    checkpoints.save_params(run, params, config, epoch=1)
    export.export_run(run, "onnx", run.parent / "unet.onnx")
    return run, run.parent / "unet.onnx"


@pytest.mark.parametrize("colour", ["RGB", "L"])
def test_the_readme_onnx_example_gives_predicts_mask(request, run_dir, tmp_path, colour):
    needs("onnx")
    if colour == "RGB":
        run, onnx_file = run_dir[0], request.getfixturevalue("exported")["onnx"]
    else:
        run, onnx_file = request.getfixturevalue("gray_onnx")
    code = readme_example()
    assert len(code.strip().splitlines()) <= 20
    assert "jax" not in code and "tensorflow" not in code and "unet_jax" not in code
    # A JPEG larger than twice the run's size: decoded with JPEG's own downscaling, as
    # training and predict decode it; then the same photo stored sideways, with the
    # EXIF tag that turns it upright, as phones save it.
    rng = np.random.default_rng(5)
    photo, _ = sample_data.render(sample_data.random_car(rng), 5, (150, 100), rng)
    sideways = Image.Exif()
    sideways[0x0112] = 6  # shown turned 90 degrees clockwise
    for name in ("unet.onnx", "unet.onnx.json"):
        (tmp_path / name).write_bytes((onnx_file.parent / name).read_bytes())
    for stored, exif, shown in [(photo, None, (100, 150)),
                                (photo.transpose(Image.Transpose.ROTATE_90), sideways, (100, 150))]:
        stored.convert(colour).save(tmp_path / "car.jpg", quality=90,
                                    **({"exif": exif} if exif else {}))
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        mask = np.asarray(Image.open(tmp_path / "car_mask.png")) > 0
        predictor = Predictor(run)
        (_, _, logits), = predictor.predict_files([tmp_path / "car.jpg"], logits=True)
        expected = predictor.to_mask(logits) > 0
        assert mask.shape == shown and 0 < expected.mean() < 1
        # onnxruntime and XLA sum in other orders (and, under load, other thread
        # splits): a pixel whose logit is within float32 rounding of the threshold may
        # tip; any other difference is a wrong example.
        differ = mask != expected
        assert differ.sum() <= 2 and (np.abs(logits[..., 0][differ]) < 1e-4).all(), (
            differ.sum(), np.abs(logits[..., 0][differ]).max(initial=0))


@pytest.mark.parametrize("change", [{"mode": "whole"}, {"tta": "hflip"},
                                    {"num_classes": 3}])
def test_the_readme_onnx_example_refuses_what_it_does_not_do(exported, tmp_path, change):
    """The example resizes, runs one view and thresholds one class: a crop run's
    export (whole images), a run with test-time flips, or one of several classes
    (where it failed comparing with the null threshold) is refused, not given other
    masks than predict."""
    needs("onnx")
    for name in ("unet.onnx", "unet.onnx.json"):
        (tmp_path / name).write_bytes((exported["onnx"].parent / name).read_bytes())
    sidecar = json.loads((tmp_path / "unet.onnx.json").read_text())
    sidecar["prediction"].update(change)
    (tmp_path / "unet.onnx.json").write_text(json.dumps(sidecar))
    result = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "AssertionError" in result.stderr


# --- One-line errors, no files --------------------------------------------------------

def test_a_directory_that_is_not_a_run_is_one_line(tmp_path, capsys):
    code = call(export_cli.main, ["--checkpoint", str(tmp_path), "--format", "stablehlo",
                                  "--output", str(tmp_path / "out" / "unet.stablehlo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not a run directory" in err[0]
    assert not (tmp_path / "out" / "unet.stablehlo").exists()


def test_a_damaged_checkpoint_is_one_line(run_dir, tmp_path, capsys):
    import shutil

    run = Path(shutil.copytree(run_dir[0], tmp_path / "run"))
    data = max((f for f in (run / "checkpoints" / "3" / "params").rglob("*")
                if f.is_file() and f.parent.name == "d"), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code = call(export_cli.main, ["--checkpoint", str(run), "--format", "stablehlo",
                                  "--output", str(tmp_path / "unet.stablehlo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is damaged" in err[0], err
    assert not list(tmp_path.glob("unet.stablehlo*"))


def _shifted(logits):
    return logits + 1e-3


def _extra_axis_for_one_image(logits):
    # What a runtime's shape bug looked like: right for a batch of 2, an extra axis for 1.
    return logits[None] if logits.shape[0] == 1 else logits


@pytest.mark.parametrize("damage, batch", [(_shifted, r"\(2, 32, 48, 3\)"),
                                           (_extra_axis_for_one_image, r"\(1, 64, 48, 3\)")],
                         ids=["other-values", "other-shape"])
def test_an_export_that_computes_something_else_is_refused(run_dir, tmp_path, monkeypatch,
                                                           damage, batch):
    real_load = export.load
    monkeypatch.setattr(export, "load", lambda path, fmt=None: (
        lambda images: damage(np.asarray(real_load(path, fmt)(images)))))
    with pytest.raises(ExportError, match=r"^--format stablehlo: the exported model computes "
                       rf"other logits than JAX for a batch of shape {batch} .*; nothing "
                       r"was written$"):
        export.export_params(run_dir[1], CONFIG, "stablehlo", tmp_path / "unet.stablehlo")
    assert list(tmp_path.iterdir()) == []


def test_an_operation_the_onnx_converter_lacks_is_named(run_dir, tmp_path, monkeypatch):
    needs("onnx")
    import onnx
    import tf2onnx
    from onnx import helper

    import tf2onnx.tfonnx

    def unconverted(*args, **kwargs):
        node = helper.make_node("TFL_SOME_NEW_OP", ["image"], ["logits"])
        model = helper.make_model(helper.make_graph([node], "g", [], []))
        return types.SimpleNamespace(make_model=lambda name: model)

    monkeypatch.setattr(tf2onnx.tfonnx, "process_tf_graph", lambda *a, **k: None)
    monkeypatch.setattr(tf2onnx.optimizer, "optimize_graph", unconverted)
    assert onnx  # the check reads onnx's operator schemas
    with pytest.raises(ExportError, match=r"^--format onnx: tf2onnx cannot convert the "
                       r"operation TFL_SOME_NEW_OP$"):
        export.export_params(run_dir[1], CONFIG, "onnx", tmp_path / "unet.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_export_extra_names_the_install_command(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=re.escape(
            "--format onnx needs tf2onnx, which is not installed: pip install -e '.[export]'")):
        export.export_params(run_dir[1], CONFIG, "onnx", tmp_path / "unet.onnx")


def test_an_output_that_is_a_directory_is_one_line(run_dir, tmp_path):
    with pytest.raises(ExportError, match=r"is a directory; give a file name, e\.g\. .*unet\.tflite$"):
        export.export_params(run_dir[1], CONFIG, "tflite", tmp_path)
    with pytest.raises(ExportError, match=r"e\.g\. .*unet\.jaxexport$"):  # as the README names it
        export.export_params(run_dir[1], CONFIG, "stablehlo", tmp_path)
    with pytest.raises(CheckpointError):
        export.export_run(tmp_path, "tflite", tmp_path / "unet.tflite")
    (tmp_path / "unet.tflite.json").mkdir()  # where the settings file would go
    with pytest.raises(ExportError, match=r"unet\.tflite\.json would replace a directory"):
        export.export_params(run_dir[1], CONFIG, "tflite", tmp_path / "unet.tflite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.tflite.json"]
    # A folder that exists but takes no file: "not writable (No such file or directory)"
    # had contradicted itself.
    with pytest.raises(ExportError, match=r"^--output /proc/x\.jaxexport: cannot write in "
                       r"/proc \("):
        export.export_params(run_dir[1], CONFIG, "stablehlo", "/proc/x.jaxexport")


def test_a_savedmodel_replaces_an_older_one_and_nothing_else(exported, reference, run_dir,
                                                             tmp_path):
    """A SavedModel is a directory: exporting again over an earlier export replaces it
    whole, but a directory of other files, an export with files of the user's added,
    or a file, is never removed to make room."""
    import shutil

    old = tmp_path / "unet_savedmodel"
    export.export_params(run_dir[1], CONFIG, "savedmodel", old)
    export.export_params(run_dir[1], CONFIG, "savedmodel", old)  # its own: replaced
    assert_matches(export.load(old, "savedmodel"), *reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet_savedmodel",
                                                          "unet_savedmodel.json"]
    (old / "NOTES.txt").write_text("keep")
    with pytest.raises(ExportError, match=r"unet_savedmodel holds NOTES\.txt, which an "
                       r"export does not write and replacing it would delete; move them"):
        export.export_params(run_dir[1], CONFIG, "savedmodel", old)
    copied = tmp_path / "copied"  # an export without its settings file: not known as one
    shutil.copytree(exported["savedmodel"], copied)
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    for path in (copied, other):
        with pytest.raises(ExportError, match=rf"{path.name} exists and is not an earlier "
                           rf"export \(no {path.name}\.json beside it says so\)"):
            export.export_params(run_dir[1], CONFIG, "savedmodel", path)
    a_file = tmp_path / "unet.pb"
    a_file.write_text("keep")
    with pytest.raises(ExportError, match=r"unet\.pb is a file; a SavedModel is a directory"):
        export.export_params(run_dir[1], CONFIG, "savedmodel", a_file)
    assert (other / "notes.txt").read_text() == a_file.read_text() == "keep"
    assert (old / "NOTES.txt").read_text() == "keep" and (copied / "saved_model.pb").is_file()


def test_an_export_never_replaces_a_file_it_did_not_write(run_dir, tmp_path, monkeypatch):
    """--output RUN/config.json wrote the model over the run's settings (and
    --output RUN/config the settings file over it); --output . emptied the folder the
    command ran in; a link to a SavedModel failed after the whole conversion."""
    run = tmp_path / "run"
    import shutil

    shutil.copytree(run_dir[0], run)
    settings = (run / "config.json").read_text()
    with pytest.raises(ExportError, match=r"config\.json exists and is not an earlier export"):
        export.export_params(run_dir[1], CONFIG, "stablehlo", run / "config.json")
    with pytest.raises(ExportError, match=r"config\.json exists and is not the settings "
                       r"file of an export of that name"):
        export.export_params(run_dir[1], CONFIG, "savedmodel", run / "config")
    assert (run / "config.json").read_text() == settings and not (run / "config").exists()
    monkeypatch.chdir(run)
    with pytest.raises(ExportError, match=r"^--output \. is the folder this command runs in"):
        export.export_params(run_dir[1], CONFIG, "savedmodel", ".")
    # An empty --output is named as given, with an example of the format's own name.
    with pytest.raises(ExportError, match=r"^--output '' is the folder .* e\.g\. "
                       r"unet\.jaxexport$"):
        export.export_params(run_dir[1], CONFIG, "stablehlo", "")
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(ExportError, match=r"link is a symbolic link \(to .*run\); give the "
                       r"path itself"):
        export.export_params(run_dir[1], CONFIG, "savedmodel", tmp_path / "link")
    with pytest.raises(ExportError, match=r"x\.onnx ends in \.onnx, the onnx format's name, "
                       r"for an export to tflite: pass --format onnx, or name it x\.tflite$"):
        export.export_params(run_dir[1], CONFIG, "tflite", tmp_path / "x.onnx")
    with pytest.raises(ExportError, match=r"run/config\.json is a file, not a folder"):
        export.export_params(run_dir[1], CONFIG, "tflite", run / "config.json" / "x.tflite")
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in run_dir[0].iterdir())
    # A name as long as its settings file's allows leaves room for the staging files.
    long = tmp_path / ("u" * 240 + ".jaxexport")
    export.export_params(run_dir[1], CONFIG, "stablehlo", long)
    assert long.is_file() and export.read_sidecar(long)["file"] == long.name
    with pytest.raises(ExportError, match=r"its settings file's name, u+\.\.\. \(256 "
                       r"bytes\), is longer than a file name may be \(255\)"):
        export.export_params(run_dir[1], CONFIG, "stablehlo", tmp_path / ("u" * 241 + ".jaxexport"))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_the_command_prints_no_tensorflow_start_up_notes(run_dir, tmp_path):
    """TensorFlow's libraries log "oneDNN custom operations are on" from C++ as they
    load; tf2onnx imported TensorFlow before unet-jax could quiet it (and hide the GPUs
    from it)."""
    needs("onnx")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    p = subprocess.run([sys.executable, "-m", "experiments.export", "--checkpoint",
                        str(run_dir[0]), "--format", "onnx", "--output",
                        str(tmp_path / "unet.onnx")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    # (A compilation of a second or more is logged; on a busy machine there may be one.)
    assert "oneDNN" not in p.stderr and "absl::InitializeLog" not in p.stderr, p.stderr
    assert p.stdout.startswith("wrote ")


def test_a_runtime_result_of_another_shape_or_not_finite_is_named():
    """"largest difference inf" said nothing of why: a shape or values that are not finite."""
    images = np.zeros((2, 4, 4, 3), np.float32)
    fn = lambda x: np.ones((len(x), 4, 4, 1), np.float32)  # noqa: E731
    assert export.parity(fn, fn, images) == (0.0, 1.0, "")
    diff, _, wrong = export.parity(lambda x: fn(x)[None], fn, images)
    assert diff == np.inf and wrong == "; its logits have shape (1, 2, 4, 4, 1), not (2, 4, 4, 1)"
    diff, _, wrong = export.parity(lambda x: fn(x) * np.inf, fn, images)
    assert diff == np.inf and wrong == "; 32 of its logits are not finite"
