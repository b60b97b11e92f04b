"""deploy/web: the browser page's code (segment.mjs), run by Node.js with onnxruntime-web's
WebAssembly backend (segment-cli.mjs), gives `python -m experiments.predict`'s masks
for photos larger and smaller than the run's size, in colour and grayscale, one class
and several, runs trained on whole images and on crops, with and without test-time
flips, in one pass and in tiles (predict --tile, and where a pass would take more
than the memory budget); its resize is Pillow's bilinear filter and its grayscale
Pillow's convert("L"); a way of predicting it does not implement is refused, naming
the setting, with the sidecar's `how` text; files it cannot read are named.

Skipped only without node and npm, or where npm cannot reach its registry."""

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import sample_data
# The export tests' run (random weights, its logits centred on a car photo) and helpers.
from tests.test_export import (CONFIG, _quick_compiles, needs, random_params,  # noqa: F401
                               real_looking_image, run_dir)
from unet_jax import checkpoints, export

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "deploy" / "web"
# What npm prints when it cannot reach the registry: the one failure that skips.
OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT",
           "ENETUNREACH", "EHOSTUNREACH", "network request", "fetch failed")


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """segment-cli.mjs in a copy of deploy/web with its pinned onnxruntime-web
    installed (``npm ci``: the versions of package-lock.json), once for this file."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not on PATH: deploy/web runs under Node.js")
    web = tmp_path_factory.mktemp("web") / "web"
    shutil.copytree(WEB, web, ignore=shutil.ignore_patterns("node_modules"))
    p = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=web,
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        offline = [line for line in (p.stdout + p.stderr).splitlines()
                   if any(code in line for code in OFFLINE)]
        if offline:
            pytest.skip(f"npm cannot install onnxruntime-web (no network?): {offline[0]}")
        pytest.fail(f"npm ci in deploy/web failed:\n{p.stderr[-3000:]}")
    return web / "segment-cli.mjs"


def node(cli, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(cli), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def write_raw(path, array) -> Path:
    """segment-cli.mjs's raw format: width, height, channels (uint32 little-endian),
    then the samples row by row, channels interleaved (uint8, or float32 LE)."""
    array = np.ascontiguousarray(array if array.ndim == 3 else array[..., None])
    h, w, c = array.shape
    kind = "<f4" if array.dtype.kind == "f" else np.uint8
    Path(path).write_bytes(np.array([w, h, c], "<u4").tobytes() + array.astype(kind).tobytes())
    return Path(path)


def write_json(path, value) -> Path:
    Path(path).write_text(json.dumps(value))
    return Path(path)


def read_raw(path, float32=False) -> np.ndarray:
    data = Path(path).read_bytes()
    w, h, c = np.frombuffer(data[:12], "<u4")
    return np.frombuffer(data[12:], "<f4" if float32 else np.uint8).reshape(h, w, c)


# --- The masks: the page's code against experiments.predict -------------------------------

@pytest.fixture(scope="module")
def rgb_onnx(run_dir, tmp_path_factory):
    """The export tests' colour, one-class run, exported as ONNX: (run, file)."""
    needs("onnx")
    onnx_file = tmp_path_factory.mktemp("rgb") / "unet.onnx"
    export.export_run(run_dir[0], "onnx", onnx_file)
    return run_dir[0], onnx_file


def exported_run(tmp_path_factory, name, config, seed, gain=1.0) -> tuple:
    """A run of ``config`` with random weights, each class's logits centred on a car
    photo so that masks hold every class, and times ``gain`` (a trained model's
    confident logits, whose probabilities round to 0 and 1), exported as ONNX: (run,
    file)."""
    needs("onnx")
    params = random_params(config, seed=seed)
    image = real_looking_image()
    logits = export.model_function(params, config, "float32")(
        image.mean(-1, keepdims=True) if config.in_channels == 1 else image)
    params["head"]["bias"] = params["head"]["bias"] - np.median(logits, axis=(0, 1, 2))
    params["head"] = {k: v * gain for k, v in params["head"].items()}
    run = tmp_path_factory.mktemp(name) / "run"
    checkpoints.save_params(run, params, config, epoch=1)
    export.export_run(run, "onnx", run.parent / "unet.onnx")
    return run, run.parent / "unet.onnx"


@pytest.fixture(scope="module")
def gray_classes_onnx(tmp_path_factory):
    """A grayscale run with 3 classes, predicting with every flip (--tta flips), its
    logits confident (see crop_onnx)."""
    return exported_run(tmp_path_factory, "gray3", dataclasses.replace(
        CONFIG, in_channels=1, num_classes=3, tta="flips"), seed=2, gain=100.0)


@pytest.fixture(scope="module")
def crop_onnx(tmp_path_factory):
    """A colour run trained on crops at scale 0.5, predicting whole photos at that scale,
    mirror-padded, with their left-right mirror (--tta hflip); its logits confident
    (their averaged probabilities reach 1, which the averaging clips)."""
    return exported_run(tmp_path_factory, "crop", dataclasses.replace(
        CONFIG, crop=(32, 32), scale=0.5, tta="hflip"), seed=3, gain=100.0)


# (width, height): larger than the run's 48x32, much larger (6x: the filter's
# antialiasing), smaller, and taller than wide; odd sides throughout (at scale 0.5,
# each side a half that Python rounds to even: 150.5 to 150, 101.5 to 102).
PHOTO_SIZES = [(137, 91), (301, 203), (29, 21), (41, 77)]
# Tiled: several tiles each way (at scale 0.5, 61x83 is 30x42: 2x2 tiles of 32; at scale
# 1, 2 across and 4 down of 48x32), one with tile starts Python rounds half to even
# (149x197: 18.5 to 18 at scale 0.5, 86.5 to 86 at scale 1), and one smaller than a tile
# (one tile, padded, unblended).
TILED_SIZES = [(61, 83), (149, 197), (29, 21)]


def write_photos(folder: Path, sizes) -> list[Path]:
    """Car photos of ``sizes`` (width, height) as PNGs for predict in ``folder``/photos,
    and as raw files for the page's code: the (photo, mask) paths segment-cli.mjs takes."""
    (folder / "photos").mkdir()
    rng = np.random.default_rng(4)
    pairs = []
    for i, size in enumerate(sizes):
        photo, _ = sample_data.render(sample_data.random_car(rng), 1 + 3 * i, size, rng)
        photo.save(folder / "photos" / f"car{i}.png")
        # What a canvas gives the page (RGBA, opaque), and plain RGB.
        pixels = np.asarray(photo.convert("RGBA" if i % 2 == 0 else "RGB"))
        pairs += [write_raw(folder / f"car{i}.raw", pixels), folder / f"car{i}.mask"]
    return pairs


def predict(run, folder: Path, *flags) -> None:
    """experiments.predict's masks of ``folder``/photos in ``folder``/out."""
    p = subprocess.run([sys.executable, "-m", "experiments.predict", "--checkpoint",
                        str(run), "--input", str(folder / "photos"), "--output",
                        str(folder / "out"), *flags],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def segmented(cli, onnx_file, sidecar, pairs, *flags) -> list[str]:
    """segment-cli.mjs's masks of the pairs' photos; how it took each."""
    p = node(cli, "segment", *flags, onnx_file, sidecar, *pairs)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == len(pairs) // 2
    return [json.loads(line)["how"] for line in lines]


def disagreeing(folder: Path, sizes, classes: int, theirs=None) -> tuple[int, int]:
    """(pixels where the page's masks differ from predict's, pixels), over the photos;
    ``theirs``: predict's masks, else read from ``folder``/out."""
    differ = total = 0
    values = set()
    for i, (width, height) in enumerate(sizes):
        ours = read_raw(folder / f"car{i}.mask")[..., 0]
        mask = (np.asarray(Image.open(folder / "out" / f"car{i}_mask.png")) if theirs is None
                else theirs[i])
        assert ours.shape == mask.shape == (height, width)
        values |= set(np.unique(mask).tolist())
        differ, total = differ + int(np.sum(ours != mask)), total + ours.size
    # 0/255 for one class, the class ids for several, as predict writes them.
    assert values == ({0, 255} if classes == 1 else set(range(classes)))
    return differ, total


RUNS = dict(argnames="which", argvalues=["rgb_onnx", "gray_classes_onnx", "crop_onnx"],
            ids=["rgb-one-class", "gray-3-classes-flips", "crop-scale-hflip"])


@pytest.mark.parametrize(**RUNS)
def test_the_page_gives_predicts_masks(request, cli, tmp_path, which):
    run, onnx_file = request.getfixturevalue(which)
    pairs = write_photos(tmp_path, PHOTO_SIZES)
    predict(run, tmp_path)
    assert set(segmented(cli, onnx_file, f"{onnx_file}.json", pairs)) == {
        export.read_sidecar(onnx_file)["prediction"]["mode"]}
    classes = export.read_sidecar(onnx_file)["prediction"]["num_classes"]
    differ, total = disagreeing(tmp_path, PHOTO_SIZES, classes)
    # Measured: every pixel of 77,336 agrees for each run (Pillow 13.0.0, onnxruntime-web
    # 1.31.1); predict resizes the logits with jax.image.resize, which equals Pillow's
    # filter to within 1e-4, so a logit that close to the threshold may tip.
    assert differ <= 2, f"{total - differ} of {total} pixels agree"


@pytest.mark.parametrize(**RUNS)
def test_tiles_are_predict_tiles(request, cli, tmp_path, which):
    """predict --tile's masks: the same tiles, mirrored borders, Gaussian blend and
    flipped views per tile. The page's --tile for two runs; for the third, a sidecar
    whose mode is "tile"."""
    run, onnx_file = request.getfixturevalue(which)
    pairs = write_photos(tmp_path, TILED_SIZES)
    predict(run, tmp_path, "--tile")
    sidecar = json.loads(Path(f"{onnx_file}.json").read_text())
    if which == "gray_classes_onnx":
        sidecar["prediction"]["mode"] = "tile"
        hows = segmented(cli, onnx_file, write_json(tmp_path / "tile.json", sidecar), pairs)
    else:
        hows = segmented(cli, onnx_file, f"{onnx_file}.json", pairs, "--tile")
    assert hows == ["tile"] * len(TILED_SIZES)
    differ, total = disagreeing(tmp_path, TILED_SIZES, sidecar["prediction"]["num_classes"])
    # Measured: every pixel of 35,025 agrees for each run. Tile starts rounded half up
    # (JavaScript's Math.round), sigma 1/4, no margin, the edge pixel repeated instead of
    # mirrored, or no division by the summed weights each failed this for some run.
    assert differ <= 2, f"{total - differ} of {total} pixels agree"


def test_a_pass_over_the_memory_budget_is_tiled_as_predict_decides(cli, crop_onnx, tmp_path):
    """A run trained on crops takes one pass unless it would need more than the memory
    budget (prediction.pass_bytes over the padded size: 128 bytes a pixel for this run):
    of 200,000, 61x83 at scale 0.5, 44x32 padded, needs 180,224 bytes; 149x197 (100x76)
    972,800; 29x21 (12x16) 24,576. A sidecar from before exports recorded a pass's bytes
    takes one pass."""
    from unet_jax.inference import Predictor

    run, onnx_file = crop_onnx
    pairs = write_photos(tmp_path, TILED_SIZES)
    budget = 200_000
    predictor = Predictor(run, memory_budget=budget)
    photos = [tmp_path / "photos" / f"car{i}.png" for i in range(len(TILED_SIZES))]
    hows = segmented(cli, onnx_file, f"{onnx_file}.json", pairs, "--memory-budget", budget)
    assert hows == [predictor.mode.how_for(predictor.decode(photo).shape[:2])
                    for photo in photos] == ["whole", "tile", "whole"]
    masks = [mask.astype(np.uint8) * 255 for _, _, mask in predictor.predict_files(photos)]
    differ, total = disagreeing(tmp_path, TILED_SIZES, 1, masks)
    assert differ <= 2, f"{total - differ} of {total} pixels agree"  # measured: all
    older = json.loads(Path(f"{onnx_file}.json").read_text())
    del older["pass_bytes_per_pixel"]
    assert segmented(cli, onnx_file, write_json(tmp_path / "older.json", older), pairs,
                     "--memory-budget", budget) == ["whole"] * len(TILED_SIZES)
    p = node(cli, "segment", "--memory-budget", "lots", onnx_file, f"{onnx_file}.json", *pairs)
    assert p.returncode == 2 and p.stderr.startswith("--memory-budget lots: give bytes"), p.stderr


# --- The steps alone, against Pillow ---------------------------------------------------------

def test_the_resize_is_pillows_bilinear(cli, tmp_path):
    """Down (antialiased), up, and one side each way (where Pillow 13 resizes the
    columns first), for RGB, grayscale and float32 (Pillow's mode "F", the logits)."""
    rng = np.random.default_rng(0)
    sizes = [(23, 17), (101, 88), (30, 70), (200, 3), (67, 20), (5, 45)]
    for shape in [(45, 67, 3), (45, 67)]:
        pixels = rng.integers(0, 256, shape, np.uint8)
        source = write_raw(tmp_path / "in.raw", pixels)
        for width, height in sizes:
            p = node(cli, "resize", source, width, height, tmp_path / "out.raw")
            assert p.returncode == 0, p.stderr
            ours = read_raw(tmp_path / "out.raw").astype(int)
            theirs = np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
            # Measured: 0, every sample equal; the target is 1 grey level.
            assert np.abs(ours - theirs.reshape(ours.shape)).max() <= 1, (shape, width, height)
    logits = (rng.normal(size=(19, 31)) * 10).astype(np.float32)
    source = write_raw(tmp_path / "in.raw", logits)
    for width, height in sizes:
        p = node(cli, "resize-float", source, width, height, tmp_path / "out.raw")
        assert p.returncode == 0, p.stderr
        ours = read_raw(tmp_path / "out.raw", float32=True)[..., 0]
        theirs = np.asarray(Image.fromarray(logits, mode="F").resize((width, height),
                                                                      Image.BILINEAR))
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)  # measured: 0


def test_flipped_views_are_averaged_in_float32_as_jax_averages_them(cli, tmp_path):
    """A sure pixel's averaged probability is 1, clipped to float32's 1 - 1e-7: JAX's
    logit 15.94, where float64 gave 16.12 and moved the edge between sure foreground and
    sure background once the logits were resized 201 times (a model of 100 x - 50)."""
    needs("onnx")
    import jax
    import onnx
    from onnx import TensorProto, helper

    from unet_jax import tiling

    constant = lambda name, v: helper.make_tensor(name, TensorProto.FLOAT, [], [v])  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Slice", ["image", "zero", "one", "three"], ["first"]),
         helper.make_node("Mul", ["first", "hundred"], ["scaled"]),
         helper.make_node("Sub", ["scaled", "fifty"], ["logits"])], "linear",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", "h", "w", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", "h", "w", 1])],
        [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
         helper.make_tensor("one", TensorProto.INT64, [1], [1]),
         helper.make_tensor("three", TensorProto.INT64, [1], [3]),
         constant("hundred", 100.0), constant("fifty", 50.0)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8),  # what every onnxruntime reads
              tmp_path / "linear.onnx")
    settings = {**export.prediction_settings(dataclasses.replace(
        CONFIG, image_size=(16, 16), tta="hflip")), "image_size": [1, 2]}
    (tmp_path / "linear.onnx.json").write_text(json.dumps({"prediction": settings}))
    picture = np.zeros((1, 402, 3), np.uint8)
    picture[:, :201] = 255
    p = node(cli, "segment", tmp_path / "linear.onnx", tmp_path / "linear.onnx.json",
             write_raw(tmp_path / "p.raw", picture), tmp_path / "p.mask")
    assert p.returncode == 0, p.stderr
    ours = read_raw(tmp_path / "p.mask")[0, :, 0]
    logits = tiling.flip_average(lambda x: 100 * x[..., :1] - 50,
                                 np.array([[[[1.0] * 3, [0.0] * 3]]], np.float32), "hflip")
    assert np.allclose(logits[0, 0, :, 0], [15.942385, -16.118095])  # JAX's, float32
    resized = jax.image.resize(logits, (1, 1, 402, 1), "linear", antialias=True)
    theirs = np.where(np.asarray(resized)[0, 0, :, 0] > 0, 255, 0)
    assert np.array_equal(ours, theirs), np.flatnonzero(ours != theirs)


def test_the_model_input_of_a_run_on_crops_is_predicts(cli, tmp_path):
    """The photo at its size times the run's scale (Python's rounding: 150.5 is 150),
    mirror-padded at the bottom and right as numpy's 'symmetric' pads, values / 255."""
    from data_pipeline import preprocess

    config = dataclasses.replace(CONFIG, crop=(32, 32), scale=0.5)
    sidecar = tmp_path / "unet.onnx.json"
    sidecar.write_text(json.dumps({"prediction": export.prediction_settings(config)}))
    rng = np.random.default_rng(5)
    for width, height in [(301, 203), (29, 21), (3, 1)]:
        pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
        Image.fromarray(pixels).save(tmp_path / "photo.png")
        p = node(cli, "model-input", sidecar, write_raw(tmp_path / "photo.raw", pixels),
                 tmp_path / "x.raw")
        assert p.returncode == 0, p.stderr
        image = preprocess.to_float(preprocess.load_image(tmp_path / "photo.png", scale=0.5))
        h, w = image.shape[:2]
        expected = np.pad(image, ((0, -h % 4), (0, -w % 4), (0, 0)), mode="symmetric")
        ours = read_raw(tmp_path / "x.raw", float32=True)
        assert ours.shape == expected.shape and np.abs(ours - expected).max() <= 1 / 255


def test_the_grayscale_is_pillows(cli, tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (50, 61, 4), np.uint8)
    for colour in ("RGBA", "RGB"):
        picture = pixels if colour == "RGBA" else pixels[..., :3]
        p = node(cli, "gray", write_raw(tmp_path / "in.raw", picture), tmp_path / "out.raw")
        assert p.returncode == 0, p.stderr
        assert np.array_equal(read_raw(tmp_path / "out.raw")[..., 0],
                              np.asarray(Image.fromarray(picture).convert("L")))


@pytest.mark.parametrize("change,why", [
    (dict(mode="slices"), 'predicts with mode "slices"'),
    (dict(tta="rot90"), 'predicts with test-time flips "rot90"'),
    (dict(mode="tile", tile=[30, 30]), "predicts in tiles of 30x30 overlapping by 0.25")],
    ids=["mode", "tta", "tiles"])
def test_a_run_it_does_not_implement_is_refused_with_the_sidecars_how(cli, tmp_path,
                                                                      change, why):
    """A way of predicting this code does not know (a later version's, say) would give
    other masks than predict: it stops, saying why, with the sidecar's own words for
    what predict does."""
    settings = {**export.prediction_settings(CONFIG), **change}
    (tmp_path / "unet.onnx.json").write_text(json.dumps({"prediction": settings}))
    (tmp_path / "unet.onnx").write_bytes(b"")  # refused before the model is read
    photo = write_raw(tmp_path / "car.raw", np.zeros((21, 29, 3), np.uint8))
    p = node(cli, "segment", tmp_path / "unet.onnx", tmp_path / "unet.onnx.json", photo,
             tmp_path / "car.mask")
    assert p.returncode == 2 and p.stderr.strip().endswith(
        f"How predict segments with it: {settings['how']}"), p.stderr
    assert p.stderr.startswith('this code predicts with modes "resize", "whole", "tile"') \
        and why in p.stderr
    assert not (tmp_path / "car.mask").exists()


def test_files_it_cannot_read_are_named(cli, tmp_path):
    """A PNG given for a raw picture read as a picture of 10^25 samples; the model and
    its sidecar swapped, as a JSON error naming no file."""
    Image.new("RGB", (8, 6)).save(tmp_path / "car.png")
    p = node(cli, "gray", tmp_path / "car.png", tmp_path / "out.raw")
    assert p.returncode == 2 and p.stderr.startswith(
        f"{tmp_path / 'car.png'} is not a raw picture of this format"), p.stderr
    (tmp_path / "unet.onnx").write_bytes(b"\x08\x07tf2onnx")
    (tmp_path / "unet.onnx.json").write_text("{}")
    photo = write_raw(tmp_path / "car.raw", np.zeros((6, 8, 3), np.uint8))
    p = node(cli, "segment", tmp_path / "unet.onnx.json", tmp_path / "unet.onnx", photo,
             tmp_path / "car.mask")
    assert p.returncode == 2 and p.stderr.startswith(
        f"{tmp_path / 'unet.onnx'} is not the export's JSON settings file"), p.stderr
    # Settings that fit, and a file that is no ONNX model: named, not onnxruntime's own.
    write_json(tmp_path / "unet.onnx.json", {"prediction": export.prediction_settings(CONFIG)})
    p = node(cli, "segment", tmp_path / "unet.onnx", tmp_path / "unet.onnx.json", photo,
             tmp_path / "car.mask")
    assert p.returncode == 2 and p.stderr.startswith(
        f"{tmp_path / 'unet.onnx'} is not an ONNX model onnxruntime can load ("), p.stderr


def test_a_model_and_the_settings_of_another_export_are_refused(cli, rgb_onnx, crop_onnx,
                                                                 tmp_path):
    """A crop run's model beside a resize run's settings file was segmented by the
    wrong rules without a word (or failed inside onnxruntime); a TFLite export's
    settings file was taken for an ONNX model's."""
    photo = write_raw(tmp_path / "car.raw", np.zeros((21, 29, 3), np.uint8))
    crop_model, rgb_model = crop_onnx[1], rgb_onnx[1]
    sidecar = export.read_sidecar(rgb_model)
    assert sidecar["sha256"] == hashlib.sha256(rgb_model.read_bytes()).hexdigest()
    p = node(cli, "segment", crop_model, export.sidecar_path(rgb_model), photo,
             tmp_path / "car.mask")
    assert p.returncode == 2 and p.stderr.strip() == (
        f"{export.sidecar_path(rgb_model)} describes another model than {crop_model} (its "
        "SHA-256 differs): give the model and the settings file of one export"), p.stderr
    # Where the hash cannot be computed (plain http from another machine), the size.
    assert sidecar["bytes"] == rgb_model.stat().st_size
    p = node(cli, "segment", crop_model, write_json(tmp_path / "no-hash.json", {
        k: v for k, v in sidecar.items() if k != "sha256"}), photo, tmp_path / "car.mask")
    assert p.returncode == 2 and "(its size differs)" in p.stderr, p.stderr
    tflite = write_json(tmp_path / "unet.tflite.json", {**sidecar, "format": "tflite"})
    p = node(cli, "segment", rgb_model, tflite, photo, tmp_path / "car.mask")
    assert p.returncode == 2 and "the settings file of a tflite export" in p.stderr
    p = node(cli, "segment", tmp_path / "absent.onnx", export.sidecar_path(rgb_model), photo,
             tmp_path / "car.mask")
    assert p.returncode == 2 and p.stderr.strip() == (
        f"{tmp_path / 'absent.onnx'}: no such file; give MODEL.onnx, the model "
        "experiments.export wrote")
    assert not (tmp_path / "car.mask").exists()
