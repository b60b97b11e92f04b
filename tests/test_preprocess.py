"""One preprocessing path: every mask format by one rule, and prediction feeding the
model exactly what training fed it."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image

import data_pipeline
from data_pipeline import preprocess
from tests.data_fixtures import DARK_PALETTE, box_mask
from unet_jax import checkpoints, configs, init_params

MASK = box_mask((48, 32), seed=4)


def write_mask_as(path, kind):
    """MASK stored the way ``kind`` says; returns the file."""
    m = MASK.astype(np.uint8)
    if kind == "gif":
        img = Image.fromarray(m, "P")
        img.putpalette(DARK_PALETTE)
    elif kind == "png255":
        img = Image.fromarray(m * 255)
    elif kind == "png01":
        img = Image.fromarray(m)
    elif kind == "rgb":
        img = Image.fromarray(np.stack([m * 255, m * 0, m * 0], -1))
    elif kind == "rgba":  # opaque everywhere: the alpha must not count as mask
        img = Image.fromarray(np.stack([m * 255] * 3 + [np.full_like(m, 255)], -1), "RGBA")
    elif kind == "la":
        img = Image.fromarray(np.stack([m * 255, np.full_like(m, 255)], -1), "LA")
    elif kind == "png16":
        img = Image.fromarray(m.astype(np.uint16) * 65535)
    elif kind == "jpeg":
        img = Image.fromarray(m * 255)
    path = path.with_suffix(".jpg" if kind == "jpeg" else ".gif" if kind == "gif" else ".png")
    img.save(path, **({"quality": 90} if kind == "jpeg" else {}))
    return path


KINDS = ["gif", "png255", "png01", "rgb", "rgba", "la", "png16", "jpeg"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_mask_format_reads_as_the_same_mask(tmp_path, kind):
    path = write_mask_as(tmp_path / "m", kind)
    mask = preprocess.load_mask(path)[..., 0].astype(bool)
    if kind == "jpeg":  # lossy: a few edge pixels may flip
        assert (mask != MASK).mean() < 0.01
    else:
        np.testing.assert_array_equal(mask, MASK)
    resized = preprocess.load_mask(path, (16, 24))[..., 0]
    assert resized.shape == (16, 24) and set(np.unique(resized)) <= {0, 1}


def test_class_ids_are_kept_and_checked(tmp_path):
    ids = np.zeros((8, 8), np.uint8)
    ids[:4], ids[6:] = 1, 2
    Image.fromarray(ids).save(tmp_path / "ids.png")
    np.testing.assert_array_equal(preprocess.load_mask(tmp_path / "ids.png", None, 3)[..., 0], ids)
    with pytest.raises(data_pipeline.DataError, match=r"ids\.png holds class 2 .* 2 classes"):
        preprocess.load_mask(tmp_path / "ids.png", None, 2)


def test_an_image_over_the_pixel_limit_is_one_line_with_the_fix(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setenv("UNET_JAX_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(data_pipeline.DataError) as e:
        preprocess.load_image(tmp_path / "big.png")
    message = str(e.value)
    assert "big.png" in message and "UNET_JAX_MAX_IMAGE_PIXELS" in message
    assert "\n" not in message
    monkeypatch.setenv("UNET_JAX_MAX_IMAGE_PIXELS", "0")  # no limit
    assert preprocess.load_image(tmp_path / "big.png").shape == (40, 60, 3)


def test_an_oversized_pair_is_skipped_or_named_before_training(tmp_path, monkeypatch):
    for i in range(3):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        side = 100 if i == 0 else 20
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / "images" / f"i{i}.png")
        Image.fromarray(np.zeros((side, side), np.uint8)).save(tmp_path / "masks" / f"i{i}.png")
    monkeypatch.setenv("UNET_JAX_MAX_IMAGE_PIXELS", "5000")
    with pytest.raises(data_pipeline.DataError, match=r"i0\.png has 10,000 pixels .*--skip-bad"):
        data_pipeline.find_pairs(tmp_path)
    assert [p.image.name for p in data_pipeline.find_pairs(tmp_path, skip_bad=True)] == [
        "i1.png", "i2.png"]


@pytest.fixture
def run_dir(tmp_path):
    def make(in_channels, foreground=False):
        config = dataclasses.replace(configs.tiny(), in_channels=in_channels)
        params = init_params(jax.random.key(0), config)
        if foreground:  # predicts every pixel foreground: its Dice depends on the truth
            params["head"]["bias"] = params["head"]["bias"] + 50.0
        return checkpoints.save_params(tmp_path / f"run{in_channels}", params, config)
    return make


@pytest.mark.parametrize("name,mode,size,in_channels", [
    ("big.jpg", "RGB", (400, 300), 3),    # JPEG draft decoding (over 4x the model's size)
    ("photo.png", "RGB", (97, 61), 3),
    ("gray.png", "L", (80, 50), 3),
    ("gray1.png", "L", (80, 50), 1),
    ("alpha.png", "RGBA", (64, 40), 3),
])
def test_prediction_feeds_what_training_fed(tmp_path, run_dir, name, mode, size, in_channels):
    from unet_jax.inference import Predictor

    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), np.uint8)
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(
        tmp_path / "images" / name)
    Image.fromarray(np.zeros(size[::-1], np.uint8)).save(
        tmp_path / "images" / ("m_" + name.split(".")[0] + ".png"))
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / ("m_" + name.split(".")[0] + ".png")).rename(
        tmp_path / "masks" / (name.split(".")[0] + ".png"))
    pairs = data_pipeline.find_pairs(tmp_path)
    predictor = Predictor(run_dir(in_channels))
    pipeline = data_pipeline.InputPipeline(pairs, image_size=predictor.config.image_size,
                                           batch_size=1, train=False,
                                           in_channels=in_channels)
    fed = next(pipeline.epoch(0))["image"][0]
    seen = predictor.model_input(pairs[0].image)
    assert seen.shape == fed.shape == (*predictor.config.image_size, in_channels)
    assert np.abs(seen - fed).max() <= 1 / 255


def test_evaluate_gives_one_dice_whatever_the_mask_format(tmp_path, run_dir, capsys):
    from experiments import common, evaluate

    rng = np.random.default_rng(1)
    run = run_dir(3, foreground=True)
    results = {}
    for kind in KINDS:
        folder = tmp_path / kind
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), np.uint8)).save(folder / "images" / "a.png")
        write_mask_as(folder / "masks" / "a", kind)
        out = tmp_path / f"{kind}.json"
        with pytest.raises(SystemExit) as code:
            common.run(evaluate.main, ["--checkpoint", str(run), "--data-dir", str(folder),
                                       "--split", "all", "--output", str(out)])
        assert code.value.code == 0
        results[kind] = json.loads(out.read_text())
    reference = results["png255"]
    for kind, result in results.items():
        tolerance = 0.02 if kind == "jpeg" else 1e-9
        for key in ("dice", "iou", "pixel_accuracy"):
            assert result[key] == pytest.approx(reference[key], abs=tolerance), (kind, key)
