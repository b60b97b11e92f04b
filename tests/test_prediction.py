"""unet_jax.prediction: the mode object, and prediction as one program on the device,
checked against the host's numpy tiling (``tiling.predict_tiled``) and Pillow's resize."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import Config, ConfigError, tiling
from unet_jax.inference import resize_logits
from unet_jax.models import UNet
from unet_jax.prediction import PredictionMode, pass_bytes, predict_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles():
    """XLA's optimisations cost most of a tiny program's compile time and change no
    result these tests compare."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def narrow():
    """(params, apply_fn) of a narrow U-Net of depth 2."""
    model = UNet(base_features=4, depth=2)
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 16, 16, 3)))
    return params["params"], model.apply


def toy_apply(variables, x):
    """A stand-in for the U-Net that compiles in a fraction of its time: a 3x3
    convolution (so a tile's border context matters) plus ramps along both axes (so a
    misplaced or wrongly mirrored tile shows)."""
    y = jax.lax.conv_general_dilated(x, variables["params"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    height, width = x.shape[1:3]
    return (y + jnp.linspace(-1, 1, width)[None, None, :, None]
            + jnp.linspace(0, 0.5, height)[None, :, None, None])


def toy(classes=1):
    kernel = np.random.default_rng(classes).normal(size=(3, 3, 3, classes)) / 3
    return {"kernel": jnp.asarray(kernel, jnp.float32)}, toy_apply


def crop_config(crop=(32, 32), **kw):
    return Config(base_features=4, depth=2, crop=crop, **kw)


def reference_logits(model, image, mode):
    """The host's way: numpy tiling around a jitted model with test-time flips."""
    params, apply_fn = model
    jitted = jax.jit(lambda x: tiling.flip_average(
        lambda v: apply_fn({"params": params}, v), x, mode.tta))
    return tiling.predict_tiled(lambda t: np.asarray(jitted(t)), image, mode.tile,
                                mode.overlap, batch_size=4)


@pytest.mark.parametrize("size,tta,crop", [
    ((333, 517), "none", (32, 32)), ((1, 1), "none", (32, 32)), ((2000, 20), "none", (32, 32)),
    ((333, 517), "hflip", (32, 32)), ((2000, 20), "flips", (32, 32)), ((1, 1), "flips", (32, 32)),
    # Tiles taller than wide and wider than tall: each axis has its own Gaussian.
    ((333, 517), "none", (32, 48)), ((100, 61), "hflip", (48, 16))])
def test_device_tiling_equals_the_numpy_reference(size, tta, crop):
    params, apply_fn = model = toy()
    mode = PredictionMode.from_config(crop_config(crop, tta=tta), how="tile")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, *size, 3), np.uint8)
    # Three images of which two are real: the tiles of both are placed in their own
    # image, and the loop stops after them (the blank third pads the batch).
    got = np.asarray(predict_batch(params, images, 2, apply_fn, mode, 4, masks=False))
    assert got.shape == (3, *size, 1)
    for image, logits in zip(images[:2], got):
        expected = reference_logits(model, image / np.float32(255), mode)
        np.testing.assert_allclose(logits, expected, atol=1e-5)
    # The third image is not real: no model call sees its tiles, its sums stay 0, and
    # 0 divided by the weights is exactly 0. (Its pixels are random, so tiling it would
    # give logits far from 0: the toy model's ramps alone reach +-1.) An image one tile
    # in size is the exception: one call covers the whole batch, padding included.
    pads = tiling.padding(size, mode.tile, mode.overlap)
    padded = [n + sum(p) for n, p in zip(size, pads)]
    if any(len(tiling.tile_starts(n, t, mode.overlap)) > 1 for n, t in zip(padded, mode.tile)):
        np.testing.assert_array_equal(got[2], np.zeros_like(got[2]))
    else:
        assert size == (1, 1)


def test_device_tiling_of_the_unet_equals_the_numpy_reference(narrow):
    params, apply_fn = narrow
    mode = PredictionMode.from_config(crop_config(overlap=0.5), how="tile")
    image = np.random.default_rng(1).integers(0, 256, (1, 45, 70, 3), np.uint8)
    got = predict_batch(params, image, 1, apply_fn, mode, 4, masks=False)
    np.testing.assert_allclose(np.asarray(got)[0], reference_logits(
        narrow, image[0] / np.float32(255), mode), atol=1e-5)


def test_whole_pass_is_the_model_on_the_mirror_padded_image(narrow):
    params, apply_fn = narrow
    mode = PredictionMode.from_config(crop_config(), how="whole")
    image = np.random.default_rng(2).random((1, 37, 45, 3), np.float32)
    padded = np.pad(image, ((0, 0), (0, 3), (0, 3), (0, 0)), mode="symmetric")  # to 40x48
    expected = np.asarray(apply_fn({"params": params}, padded))[:, :37, :45]
    got = predict_batch(params, image, 1, apply_fn, mode, masks=False)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_masks_are_the_thresholded_logits_at_the_files_size():
    """Resized on the device as Pillow resizes on the host (here shrunk in height,
    antialiased, and enlarged in width), then thresholded; several classes give their
    arg-max."""
    image = np.random.default_rng(3).integers(0, 256, (1, 24, 36, 3), np.uint8)
    mode = PredictionMode.from_config(crop_config(image_size=(24, 36)), how="resize")
    for classes in (1, 3):
        params, apply_fn = toy(classes)
        logits = np.asarray(toy_apply({"params": params}, image / np.float32(255)))[0]
        resized = resize_logits(logits, (17, 75))
        got = predict_batch(params, image, 1, apply_fn, mode, out_size=(17, 75), masks=False)
        np.testing.assert_allclose(np.asarray(got)[0], resized, atol=1e-4)
        masks = np.asarray(predict_batch(params, image, 1, apply_fn, mode, out_size=(17, 75)))
        assert masks.dtype == np.uint8 and masks.shape == (1, 17, 75)
        expected = resized[..., 0] > 0 if classes == 1 else resized.argmax(-1)
        margin = np.abs(resized[..., 0]) if classes == 1 else np.diff(
            np.sort(resized, -1)[..., -2:], axis=-1)[..., 0]
        sure = margin > 1e-3  # no pixel on the fence
        np.testing.assert_array_equal(masks[0][sure], expected[sure])
        assert len(np.unique(masks)) > 1


# --- the mode object ------------------------------------------------------------------

def test_a_crop_trained_run_predicts_whole_images_while_they_fit_the_budget():
    config = crop_config(scale=0.5)
    budget = pass_bytes((1280, 1920), 4)  # a Carvana photo at scale 1, padded to 16s
    mode = PredictionMode.from_config(config, memory_budget=budget)
    assert (mode.how, mode.auto, mode.scale, mode.tile) == ("whole", True, 0.5, (32, 32))
    assert mode.how_for((1280, 1918)) == "whole"
    assert mode.how_for((1280, 1930)) == "tile"  # padded to 1932 wide: over the budget
    # The pass runs on the padded image: a budget the photo's own size just fits is
    # not enough for it.
    tight = PredictionMode.from_config(config, memory_budget=pass_bytes((1280, 1918), 4))
    assert tight.how_for((1280, 1918)) == "tile" and tight.how_for((1280, 1916)) == "whole"
    assert mode.resolved((4000, 6000)).how == "tile"
    assert "whole at scale 0.5" in mode.describe() and "tiles of 32x32" in mode.describe()
    # asked for explicitly, a way of predicting is kept whatever the size
    assert PredictionMode.from_config(config, how="whole", memory_budget=1).how_for(
        (4000, 6000)) == "whole"
    assert PredictionMode.from_config(config, how="tile").how_for((8, 8)) == "tile"
    # A budget that is no number of bytes had failed in int() or been taken as given.
    for bad in ("1GiB", -1, 0, 1.5, True):
        with pytest.raises(ValueError, match=rf"^memory_budget {bad!r}: give bytes"):
            PredictionMode.from_config(config, memory_budget=bad)


def test_a_run_trained_on_resized_images_predicts_resized():
    mode = PredictionMode.from_config(Config(base_features=4, depth=2, image_size=(32, 48)),
                                      memory_budget=1)
    assert mode.how == "resize" and mode.how_for((4000, 6000)) == "resize"
    assert mode.describe() == "resized to 32x48"


def test_whole_images_share_a_call_only_while_they_fit_the_budget():
    mode = PredictionMode.from_config(crop_config(), memory_budget=3 * pass_bytes((64, 96), 4))
    assert mode.images_per_call((64, 96), batch_size=8) == 3
    assert mode.images_per_call((64, 96), batch_size=2) == 2
    assert mode.images_per_call((640, 960), batch_size=8) == 1  # tiled, one at a time


@pytest.mark.parametrize("override,message", [
    ({"overlap": 1.5}, "--overlap 1.5: give a fraction in [0, 0.75]"),
    ({"tta": "rot90"}, "--tta 'rot90': choose one of none, hflip, flips"),
])
def test_overrides_config_refuses_are_refused_with_its_message(override, message):
    with pytest.raises(ConfigError) as from_config:
        Config(**override)
    with pytest.raises(ConfigError) as from_mode:
        PredictionMode.from_config(crop_config(), **override)
    assert str(from_mode.value) == str(from_config.value)
    assert str(from_mode.value).startswith(message)


def test_another_threshold_compiles_nothing(narrow):
    """The threshold is a value the program takes, not part of it: evaluate
    --thresholds compiled the U-Net again for each one."""
    params, apply_fn = narrow
    image = np.random.default_rng(0).random((1, 32, 48, 3), np.float32)
    config = Config(base_features=4, depth=2, image_size=(32, 48))
    masks = []
    for threshold in (0.5, 0.3, 0.7):
        mode = PredictionMode.from_config(config, threshold=threshold)
        masks.append(np.asarray(predict_batch(params, image, 1, apply_fn, mode, 4, None,
                                              True, np.float32(mode.logit_threshold))))
        if threshold == 0.5:
            compiled = predict_batch._cache_size()
    assert predict_batch._cache_size() == compiled
    logits = np.asarray(predict_batch(params, image, 1, apply_fn, mode, 4, masks=False))
    for mask, threshold in zip(masks, (0.5, 0.3, 0.7)):
        np.testing.assert_array_equal(mask, logits[..., 0] > np.log(threshold / (1 - threshold)))


def test_a_threshold_is_any_real_number_in_0_1_and_named_otherwise():
    """np.float32(0.3) was refused as "--threshold 0.3: give a probability in (0, 1)",
    and a string crashed formatting its own message."""
    assert PredictionMode.from_config(crop_config(), threshold=np.float32(0.3)).threshold == (
        pytest.approx(0.3))
    for bad, shown in ((1.0, "1"), ("0.3", "'0.3'"), (True, "True")):
        with pytest.raises(ConfigError, match=rf"^--threshold {shown}: give a probability"):
            PredictionMode.from_config(crop_config(), threshold=bad)


def test_the_memory_estimate_covers_what_xla_reports(narrow):
    params, apply_fn = narrow
    shape = jax.ShapeDtypeStruct((1, 96, 160, 3), jnp.float32)
    jax.config.update("jax_disable_most_optimizations", False)  # the real buffer plan
    try:
        compiled = jax.jit(lambda p, x: apply_fn({"params": p}, x)).lower(params, shape).compile()
    finally:
        jax.config.update("jax_disable_most_optimizations", True)
    reported = compiled.memory_analysis().temp_size_in_bytes
    assert reported <= pass_bytes((96, 160), 4) <= 4 * reported


# --- predict, evaluate and submit without TensorFlow -------------------------------------

def test_predict_evaluate_and_submit_run_where_tensorflow_is_not_installed(tmp_path):
    from tests.data_fixtures import own_dir
    from unet_jax import checkpoints, init_params

    data = own_dir(tmp_path / "data", n=3, size=(45, 37))
    config = crop_config(data_dir=str(data), scale=0.75)
    run = checkpoints.save_params(tmp_path / "run", init_params(jax.random.key(0), config),
                                  config)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tensorflow"] = None  # 'import tensorflow' now raises ImportError
        from experiments import common, evaluate, predict, submit
        for main, argv in (
                (predict.main, ["--input", r"{data / 'images'}", "--output", r"{tmp_path / 'masks'}"]),
                (evaluate.main, ["--split", "all", "--output", r"{tmp_path / 'eval.json'}"]),
                (submit.main, ["--input", r"{data / 'images'}", "--output", r"{tmp_path / 'sub.csv'}"])):
            try:
                common.run(main, ["--checkpoint", r"{run}", "--platform", "cpu", *argv])
            except SystemExit as e:
                assert e.code == 0, e.code
        assert "tensorflow" not in {{m.split(".")[0] for m, v in sys.modules.items() if v}}
        print("done")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"})
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-2000:]
    assert len(list((tmp_path / "masks").glob("*_mask.png"))) == 3
    assert (tmp_path / "eval.json").is_file()
    assert len((tmp_path / "sub.csv").read_text().splitlines()) == 4
