"""One preprocessing path: every mask format by one rule, and prediction feeding the
model exactly what training fed it."""

import dataclasses
import json
import shutil
import struct
import warnings
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

import data_pipeline
from data_pipeline import preprocess
from tests.data_fixtures import DARK_PALETTE, box_mask, own_dir
from unet_jax import checkpoints, configs, init_params

MASK = box_mask((48, 32), seed=4)


@pytest.fixture(autouse=True)
def _pillow_limit_restored(monkeypatch):
    """Decoding sets Pillow's global pixel limit from UNET_JAX_MAX_IMAGE_PIXELS; a test's
    small limit must not stay behind for other tests' direct ``Image.open``."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


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
    elif kind == "bilevel":  # mode '1': one bit per pixel
        img = Image.fromarray(m * 255).convert("1")
    elif kind == "png16_01":  # 16-bit, but holding 0 and 1
        img = Image.fromarray(m.astype(np.uint16))
    elif kind == "rgba_cutout":  # a cut-out: white car, transparent black background
        img = Image.fromarray(np.stack([m * 255] * 3 + [m * 255], -1), "RGBA")
    elif kind == "tiff":
        img = Image.fromarray(m)
    path = path.with_suffix({"jpeg": ".jpg", "gif": ".gif", "tiff": ".tif"}.get(kind, ".png"))
    img.save(path, **({"quality": 90} if kind == "jpeg" else {}))
    return path


KINDS = ["gif", "png255", "png01", "rgb", "rgba", "la", "png16", "jpeg"]


@pytest.mark.parametrize("kind", KINDS + ["bilevel", "png16_01", "rgba_cutout", "tiff"])
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
    with pytest.raises(data_pipeline.DataError, match=r"ids\.png holds class 2 .* 2 classes") as e:
        preprocess.load_mask(tmp_path / "ids.png", None, 2)
    assert str(e.value).endswith("train with --num-classes 3 if its values are class ids, "
                                 "with --num-classes 1 if they number objects (instance "
                                 "labels: all foreground), or fix the mask")
    # "More classes" is the wrong advice for binary masks spread over many values: a
    # JPEG's (Kvasir-SEG's) or graded edges'; it trained 256 classes on JPEG noise.
    rng = np.random.default_rng(0)
    binary = np.where(rng.random((32, 32)) < 0.5, 255, 0).astype(np.uint8)
    Image.fromarray(binary).save(tmp_path / "m.jpg", quality=75)
    with pytest.raises(data_pipeline.DataError, match=r"m\.jpg is a JPEG mask: lossy "
                       r"compression spreads its values \(\d+ of them, up to \d+\), so it "
                       r"cannot hold class ids, but the model has 2 classes \(--num-classes "
                       r"2\); train with --num-classes 1 for binary masks"):
        preprocess.load_mask(tmp_path / "m.jpg", None, 2)
    soft = np.zeros((32, 32), np.uint8)
    soft[8:24, 8:24] = 255
    soft[7, 8:24] = soft[24, 8:24] = 128  # an anti-aliased edge
    Image.fromarray(soft).save(tmp_path / "soft.png")
    with pytest.raises(data_pipeline.DataError, match=r"soft\.png holds values from 0 to "
                       r"255 with graded edges, .* train with --num-classes 1"):
        preprocess.load_mask(tmp_path / "soft.png", None, 2)
    levels = np.zeros((8, 8), np.uint8)
    levels[:3], levels[5:] = 127, 255  # classes as grey levels: 'try 256 classes' before
    Image.fromarray(levels).save(tmp_path / "levels.png")
    with pytest.raises(data_pipeline.DataError, match=r"levels\.png holds the values 0, 127, "
                       r"255, classes as grey levels, but the model has 3 classes "
                       r"\(--num-classes 3\), which take the class ids 0\.\.2; store each "
                       r"class as its id"):
        preprocess.load_mask(tmp_path / "levels.png", None, 3)
    void = ids.copy()
    void[4] = 255  # Pascal VOC's borders: 'classes as grey levels' before
    Image.fromarray(void).save(tmp_path / "void.png")
    with pytest.raises(data_pipeline.DataError, match=r"void\.png holds class ids below 3 "
                       r"and 255, Pascal VOC's 'void' .* pass --ignore-index 255"):
        preprocess.load_mask(tmp_path / "void.png", None, 3)
    # Binary: the ids are all foreground, whatever their value.
    np.testing.assert_array_equal(preprocess.load_mask(tmp_path / "ids.png")[..., 0], ids > 0)
    # 16-bit class ids keep their values (a 16-bit mask is not rescaled).
    Image.fromarray(ids.astype(np.uint16)).save(tmp_path / "ids16.png")
    np.testing.assert_array_equal(
        preprocess.load_mask(tmp_path / "ids16.png", (4, 4), 3)[..., 0], ids[::2, ::2])


def test_ignored_pixels_keep_their_value_beside_class_ids_and_binary_masks(tmp_path):
    """--ignore-index: VOC's 255 passes the class-id check and reaches the losses as
    255, through resizing too; in a binary run it is neither foreground (any non-zero
    pixel) nor a level that moves the graded-edge cut."""
    ids = np.zeros((8, 8), np.uint8)
    ids[:4], ids[6:] = 1, 2
    ids[4:6] = 255
    Image.fromarray(ids).save(tmp_path / "void.png")
    np.testing.assert_array_equal(
        preprocess.load_mask(tmp_path / "void.png", None, 3, ignore_index=255)[..., 0], ids)
    np.testing.assert_array_equal(
        preprocess.load_mask(tmp_path / "void.png", (4, 4), 3, ignore_index=255)[..., 0],
        ids[::2, ::2])
    # Half object, half void: the object keeps the pixel (the void ring VOC draws
    # around every object had taken its boundary pixels whenever masks shrank).
    ring = np.array([[1, 255, 0, 255], [1, 255, 0, 255]], np.uint8)
    np.testing.assert_array_equal(preprocess.resize_labels(ring, (1, 2), 255), [[1, 0]])
    with pytest.raises(data_pipeline.DataError, match=r"holds class 2 but the model has 2"):
        preprocess.load_mask(tmp_path / "void.png", None, 2, ignore_index=255)
    binary = np.zeros((8, 8), np.uint8)
    binary[:3] = 1
    binary[4] = 255
    Image.fromarray(binary).save(tmp_path / "binary.png")
    np.testing.assert_array_equal(
        preprocess.load_mask(tmp_path / "binary.png", None, 1, ignore_index=255)[..., 0], binary)
    np.testing.assert_array_equal(preprocess.load_mask(tmp_path / "binary.png")[..., 0],
                                  binary > 0)
    assert preprocess.several_values(tmp_path / "binary.png", 255) is None
    assert preprocess.several_values(tmp_path / "binary.png") is not None
    # A 0/255 mask with a void of 128: 128 would otherwise be foreground.
    drawn = np.where(binary == 1, 255, 0).astype(np.uint8)
    drawn[4] = 128
    Image.fromarray(drawn).save(tmp_path / "drawn.png")
    want = np.where(binary == 1, 1, 0)
    want[4] = 128
    np.testing.assert_array_equal(
        preprocess.load_mask(tmp_path / "drawn.png", None, 1, ignore_index=128)[..., 0], want)


def test_16_bit_images_are_scaled_by_their_range_not_their_content(tmp_path):
    # A dark 16-bit image is dark: 200/65535 of full scale, not 200/255.
    for value, expected in [(65535, 255), (51400, 200), (25700, 100), (200, 1), (1, 0)]:
        Image.fromarray(np.full((8, 8), value, np.uint16)).save(tmp_path / "x.png")
        assert Image.open(tmp_path / "x.png").mode == "I;16"
        assert (preprocess.load_image(tmp_path / "x.png") == expected).all(), value
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")  # float: [0, 1]
    assert (preprocess.load_image(tmp_path / "f.tif", None, 1) == 128).all()


def test_a_resized_image_is_pillows_resize_of_the_file(tmp_path):
    """Taller than wide in, wider than tall out: height and width swapped anywhere
    would still give the right shape after the reshape, with the pixels scrambled."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (90, 40, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    expected = np.asarray(Image.fromarray(pixels).resize((48, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(preprocess.load_image(tmp_path / "x.png", (32, 48)), expected)


@pytest.mark.parametrize("scale,size", [(0.5, None), (0.25, None), (None, (32, 48)),
                                        (None, (250, 330))])
def test_a_resized_mask_stays_on_its_image(tmp_path, scale, size):
    """Disks drawn as an image and as its mask, both read smaller (or larger): the
    mask's centre is where the image's is. Nearest picked the pixel after the middle
    of each block at even factors, half a source pixel down and right: a model
    trained on such pairs draws its masks half a pixel up and left."""
    yy, xx = np.mgrid[:96, :128]
    offsets = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        disk = ((yy - rng.uniform(30, 66)) ** 2 + (xx - rng.uniform(30, 98)) ** 2
                < rng.uniform(8, 24) ** 2)
        Image.fromarray(disk.astype(np.uint8) * 255).save(tmp_path / "d.png")
        mask = preprocess.load_mask(tmp_path / "d.png", size, scale=scale or 1.0)[..., 0]
        image = preprocess.load_image(tmp_path / "d.png", size, 1, scale=scale or 1.0)
        seen = image[..., 0] >= 128
        assert set(np.unique(mask)) == {0, 1} and mask.shape == seen.shape
        y, x = np.mgrid[:mask.shape[0], :mask.shape[1]]
        offsets.append([y[mask == 1].mean() - y[seen].mean(),
                        x[mask == 1].mean() - x[seen].mean()])
        assert (mask != seen).mean() < 0.01
    factor = 96 / mask.shape[0]  # in the file's pixels
    assert np.abs(np.mean(offsets, axis=0) * factor).max() < 0.1, np.mean(offsets, axis=0)


def test_class_ids_resize_to_the_class_covering_most_of_each_pixel():
    labels = np.array([[0, 0, 2, 2], [0, 1, 2, 2], [1, 1, 1, 2], [1, 1, 0, 0]], np.uint8)
    big = np.kron(labels, np.ones((4, 4), np.uint8))  # each label a 4x4 block
    np.testing.assert_array_equal(preprocess.resize_labels(big, (4, 4)), labels)
    assert preprocess.resize_labels(big, (16, 16)) is big  # its own size: as it is
    assert set(np.unique(preprocess.resize_labels(big, (3, 5)))) <= {0, 1, 2}
    half = np.array([[0, 1]] * 2, np.uint8)  # half and half: the higher label
    assert preprocess.resize_labels(half, (1, 1)).tolist() == [[1]]
    assert preprocess.resize_labels(half * 2 + 1, (1, 1)).tolist() == [[3]]
    assert preprocess.resize_labels(np.full((5, 7), 3, np.uint8), (2, 2)).tolist() == [
        [3, 3], [3, 3]]


def test_scaled_sizes_are_rounded_to_whole_pixels():
    assert preprocess.scaled_size((333, 517), 0.3) == (100, 155)  # 99.9 and 155.1
    assert preprocess.scaled_size((1280, 1918), 0.5) == (640, 959)
    assert preprocess.scaled_size((3, 3), 0.1) == (1, 1)


def test_to_float_maps_255_to_exactly_one():
    got = preprocess.to_float(np.array([0, 51, 255], np.uint8))
    assert got.dtype == np.float32 and got.tolist() == [0.0, np.float32(0.2), 1.0]


def test_image_size_of_reads_the_header(tmp_path):
    Image.fromarray(np.zeros((30, 70, 3), np.uint8)).save(tmp_path / "a.jpg")
    assert preprocess.image_size_of(tmp_path / "a.jpg") == (30, 70)
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data_pipeline.DataError, match=r"b\.jpg cannot be decoded .*fix or remove"):
        preprocess.image_size_of(tmp_path / "b.jpg")


# 40x60 = 2,400 pixels: over twice a limit of 1,000 Pillow raises; between a limit of
# 2,000 and twice it, Pillow only warns (or raises its warning, under -W error).
@pytest.mark.parametrize("limit,warnings_as_errors", [("1000", False), ("2000", False),
                                                      ("2000", True)])
def test_an_image_over_the_pixel_limit_is_one_line_with_the_fix(tmp_path, monkeypatch, limit,
                                                                warnings_as_errors):
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setenv("UNET_JAX_MAX_IMAGE_PIXELS", limit)
    with pytest.raises(data_pipeline.DataError) as e, warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("error" if warnings_as_errors else "always")
        preprocess.load_image(tmp_path / "big.png")
    assert shown == []  # no Pillow warning besides the error: one line on stderr
    message = str(e.value)
    assert "big.png has 2,400 pixels" in message and f"{int(limit):,}-pixel limit" in message
    assert "UNET_JAX_MAX_IMAGE_PIXELS=<pixels> (0 for no limit)" in message
    assert "\n" not in message
    monkeypatch.setenv("UNET_JAX_MAX_IMAGE_PIXELS", "0")  # no limit
    assert preprocess.load_image(tmp_path / "big.png").shape == (40, 60, 3)


def test_a_raised_limit_holds_while_the_file_loads(tmp_path, monkeypatch):
    # Pillow checks its limit again while loading a compressed TIFF; the limit must
    # still be the variable's then, not Pillow's (here a small stand-in for its 89
    # million), or a genuine large TIFF fails with Pillow's traceback.
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(tmp_path / "big.tif",
                                                       compression="tiff_deflate")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setenv("UNET_JAX_MAX_IMAGE_PIXELS", "0")
    assert preprocess.load_image(tmp_path / "big.tif", (20, 30)).shape == (20, 30, 3)
    assert preprocess.load_mask(tmp_path / "big.tif").shape == (40, 60, 1)


def test_a_bad_pixel_limit_variable_is_named(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setenv("UNET_JAX_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(data_pipeline.SettingError, match="UNET_JAX_MAX_IMAGE_PIXELS='lots'"):
        preprocess.load_image(tmp_path / "a.png")


def write_big_png(path, width=16000, height=12000):
    """A genuine 8-bit grayscale PNG of zeros, written by hand: Pillow itself takes
    several seconds for 192 million pixels, zlib on its own about one."""
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    compressor, rows = zlib.compressobj(9), b"\0" * (width + 1) * 250  # filter byte + row
    data = b"".join(compressor.compress(rows) for _ in range(height // 250))
    data += compressor.compress(b"\0" * (width + 1) * (height % 250)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def big_png(tmp_path_factory):
    return write_big_png(tmp_path_factory.mktemp("big") / "huge.png")


def test_a_16000x12000_image_is_refused_with_the_fix(big_png, tmp_path, monkeypatch):
    monkeypatch.delenv("UNET_JAX_MAX_IMAGE_PIXELS", raising=False)  # Pillow's own limit
    for load in (preprocess.load_image, preprocess.load_mask):
        with pytest.raises(data_pipeline.DataError) as e:
            load(big_png, (32, 48))
        message = str(e.value)
        assert message.startswith(f"{big_png} has 192,000,000 pixels") and "\n" not in message
        assert "UNET_JAX_MAX_IMAGE_PIXELS" in message
    # Before training: the pair is named (and skipped with skip_bad), the rest kept.
    own_dir(tmp_path, n=2)
    shutil.copy(big_png, tmp_path / "images" / "huge.png")
    shutil.copy(big_png, tmp_path / "masks" / "huge.png")
    with pytest.raises(data_pipeline.DataError) as e:
        data_pipeline.find_pairs(tmp_path)
    message = str(e.value)
    assert "huge.png has 192,000,000 pixels" in message and "--skip-bad" in message
    assert "UNET_JAX_MAX_IMAGE_PIXELS" in message and "\n" not in message
    assert [p.image.name for p in data_pipeline.find_pairs(tmp_path, skip_bad=True)] == [
        "img0.png", "img1.png"]


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
    def make(in_channels, foreground=False, max_value=0.0):
        config = dataclasses.replace(configs.tiny(), in_channels=in_channels,
                                     max_value=max_value)
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
    ("big_gray.jpg", "L", (400, 300), 1),  # draft decoding of the luminance alone
    ("big_gray3.jpg", "L", (400, 300), 3),
    ("scan12.png", "I;16", (80, 50), 1),   # 12-bit data with --max-value 4095
])
def test_prediction_feeds_what_training_fed(tmp_path, run_dir, name, mode, size, in_channels):
    from unet_jax.inference import Predictor

    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": 1, "RGBA": 4, "I;16": 1}[mode]
    top, dtype = (4096, np.uint16) if mode == "I;16" else (256, np.uint8)
    pixels = rng.integers(0, top, (size[1], size[0], channels), dtype)
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels,
                    None if mode == "I;16" else mode).save(tmp_path / "images" / name)
    Image.fromarray(np.zeros(size[::-1], np.uint8)).save(
        tmp_path / "images" / ("m_" + name.split(".")[0] + ".png"))
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / ("m_" + name.split(".")[0] + ".png")).rename(
        tmp_path / "masks" / (name.split(".")[0] + ".png"))
    pairs = data_pipeline.find_pairs(tmp_path)
    predictor = Predictor(run_dir(in_channels, max_value=4095 if mode == "I;16" else 0))
    pipeline = data_pipeline.InputPipeline(pairs, image_size=predictor.config.image_size,
                                           batch_size=1, train=False,
                                           in_channels=in_channels,
                                           max_value=predictor.config.max_value)
    fed = next(pipeline.epoch(0))["image"][0]
    seen = predictor.model_input(pairs[0].image)
    assert seen.shape == fed.shape == (*predictor.config.image_size, in_channels)
    assert np.abs(seen - fed).max() <= 1 / 255
    if mode == "I;16":  # scaled by 255/4095 (random pixels resized: mean about 0.5), not
        assert seen.mean() > 0.3  # by 255/65535 (at most 16/255)


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


# --- EXIF orientation: files are read as viewers show them ------------------------------

# What each EXIF orientation asks a viewer to do to the stored pixels, in the words of
# the EXIF standard (exiftool's names), written out in numpy rather than taken from Pillow.
SHOWN = {1: lambda s: s,
         2: lambda s: s[:, ::-1],                    # mirror horizontal
         3: lambda s: s[::-1, ::-1],                 # rotate 180
         4: lambda s: s[::-1, :],                    # mirror vertical
         5: lambda s: np.rot90(s[:, ::-1], 1),       # mirror horizontal, rotate 270 CW
         6: lambda s: np.rot90(s, -1),               # rotate 90 CW
         7: lambda s: np.rot90(s[:, ::-1], -1),      # mirror horizontal, rotate 90 CW
         8: lambda s: np.rot90(s, 1)}                # rotate 270 CW


def save_with_orientation(path, pixels, value, **kw):
    """``pixels`` stored as they are, with EXIF orientation ``value`` in the header."""
    exif = Image.Exif()
    exif[0x0112] = value
    Image.fromarray(pixels).save(path, exif=exif, **kw)
    return path


@pytest.mark.parametrize("suffix", [".png", ".tif", ".webp"])
@pytest.mark.parametrize("value", range(1, 9))
def test_exif_orientation_is_applied_to_images_masks_and_sizes(tmp_path, value, suffix):
    rng = np.random.default_rng(value)
    stored = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # no symmetry to hide a turn
    stored_mask = (rng.random((6, 10)) > 0.5).astype(np.uint8) * 255
    kw = {"lossless": True} if suffix == ".webp" else {}
    image = save_with_orientation(tmp_path / f"x{suffix}", stored, value, **kw)
    mask = save_with_orientation(tmp_path / f"m{suffix}", stored_mask, value, **kw)
    shown, shown_mask = SHOWN[value](stored), SHOWN[value](stored_mask) > 0
    if suffix == ".tif" and value >= 5 and preprocess._pillow_turns_tiffs():
        # This Pillow turns TIFFs itself, and gets a quarter turn's size wrong: refused.
        for read in (preprocess.image_size_of, preprocess.load_image, preprocess.load_mask):
            with pytest.raises(data_pipeline.DataError, match=r"x\.tif is a TIFF whose "
                               r"orientation tag .* save it upright|m\.tif is a TIFF"):
                read(mask if read is preprocess.load_mask else image)
        return

    assert preprocess.image_size_of(image) == shown.shape[:2]
    np.testing.assert_array_equal(preprocess.load_image(image), shown)
    np.testing.assert_array_equal(preprocess.load_mask(mask)[..., 0], shown_mask)
    # Resized to a size given as shown (height, width): the turn comes before the resize.
    h, w = shown.shape[:2]
    assert preprocess.load_image(image, (h * 2, w)).shape == (h * 2, w, 3)
    np.testing.assert_array_equal(preprocess.load_mask(mask, (h * 2, w))[::2, :, 0], shown_mask)


def test_a_turned_jpeg_is_decoded_small_and_upright(tmp_path):
    """A sideways-stored phone photo (orientation 6) shrunk at decode time comes out at
    the asked size, upright: the bright top-left of the stored pixels ends top-right."""
    stored = np.zeros((64, 128, 3), np.uint8)
    stored[:32, :64] = 255
    path = save_with_orientation(tmp_path / "p.jpg", stored, 6, quality=95)
    assert preprocess.image_size_of(path) == (128, 64)
    small = preprocess.load_image(path, (32, 16)).astype(float)
    assert small.shape == (32, 16, 3)
    quarters = [small[rows, cols].mean() for rows in (slice(0, 16), slice(16, 32))
                for cols in (slice(0, 8), slice(8, 16))]
    assert quarters[1] > 200 and max(quarters[0], quarters[2], quarters[3]) < 55


def test_a_mask_drawn_on_the_stored_pixels_of_a_turned_photo_is_named(tmp_path):
    own_dir(tmp_path, n=2, size=(10, 6))
    stored = np.zeros((6, 10, 3), np.uint8)
    save_with_orientation(tmp_path / "images" / "img0.png", stored, 6)
    with pytest.raises(data_pipeline.DataError) as e:
        data_pipeline.find_pairs(tmp_path)
    assert "img0.png is 10x6 but its image img0.png is 6x10 as shown" in str(e.value)
    assert "EXIF orientation" in str(e.value)
    # The mask drawn over the photo as shown pairs with it.
    Image.fromarray(np.zeros((10, 6), np.uint8)).save(tmp_path / "masks" / "img0.png")
    assert len(data_pipeline.find_pairs(tmp_path)) == 2


def test_a_predicted_mask_has_the_turned_photo_s_shown_size(tmp_path, run_dir):
    from unet_jax.inference import Predictor

    stored = np.random.default_rng(2).integers(0, 256, (30, 50, 3), np.uint8)
    path = save_with_orientation(tmp_path / "phone.jpg", stored, 8)
    [(_, picture, mask)] = Predictor(run_dir(3)).predict_files(path, images=True)
    assert mask.shape == picture.shape[:2] == (50, 30)


# --- multi-page TIFF: a stack is refused, a preview page is not -------------------------

def save_pages(path, sizes):
    pages = [Image.fromarray(np.full(size, 40 * i, np.uint8)) for i, size in enumerate(sizes)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


def test_a_tiff_stack_is_refused_naming_the_file_and_the_fix(tmp_path):
    own_dir(tmp_path, n=2, size=(10, 6))
    save_pages(tmp_path / "masks" / "img1.tif", [(6, 10)] * 3)
    (tmp_path / "masks" / "img1.png").unlink()
    with pytest.raises(data_pipeline.DataError) as e:
        data_pipeline.find_pairs(tmp_path)
    assert "img1.tif is a stack of 3 images" in str(e.value) and "ImageSequence" in str(e.value)
    assert len(data_pipeline.find_pairs(tmp_path, skip_bad=True)) == 1
    with pytest.raises(data_pipeline.DataError, match=r"stack\.tif is a stack of 2 images"):
        preprocess.load_image(save_pages(tmp_path / "stack.tif", [(6, 10)] * 2))


def test_a_tiff_with_a_smaller_preview_page_is_its_first_page(tmp_path):
    path = save_pages(tmp_path / "scan.tif", [(6, 10), (3, 5)])
    assert preprocess.image_size_of(path) == (6, 10)
    assert (preprocess.load_image(path, None, 1) == 0).all()


def test_tiff_pages_marked_as_reduced_copies_are_not_a_stack(tmp_path):
    pages = [Image.fromarray(np.full((6, 10), 40 * i, np.uint8)) for i in range(2)]
    pages[0].save(tmp_path / "pyramid.tif", save_all=True, append_images=pages[1:],
                  tiffinfo={254: 1})  # NewSubfileType: reduced-resolution copy
    assert preprocess.image_size_of(tmp_path / "pyramid.tif") == (6, 10)


@pytest.mark.parametrize("suffix", [".gif", ".webp", ".png"])
def test_an_animation_is_refused_naming_the_file_and_the_fix(tmp_path, suffix):
    """An animated mask or image would be read as its first frame alone."""
    frames = [Image.fromarray(np.full((6, 10), 40 * i, np.uint8)) for i in range(3)]
    path = tmp_path / f"clip{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True)
    with pytest.raises(data_pipeline.DataError,
                       match=rf"clip\{suffix} is an animation of 3 frames .*ImageSequence"):
        preprocess.load_image(path)
    frames[0].save(path, save_all=True, append_images=[], lossless=True)
    assert preprocess.image_size_of(path) == (6, 10)  # one frame is one image


def test_a_lossy_webp_of_one_animated_frame_is_cut_at_128(tmp_path):
    """Its image chunk sits inside an ANMF frame chunk, not at the top of the file."""
    mask = np.zeros((32, 48), bool)
    mask[8:24, 10:40] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "still.webp", quality=30)
    vp8 = (tmp_path / "still.webp").read_bytes()[12:]  # the VP8 chunk, header included

    def chunk(kind, payload):
        return kind + len(payload).to_bytes(4, "little") + payload + b"\0" * (len(payload) % 2)

    def u24(n):
        return n.to_bytes(3, "little")

    body = (b"WEBP" + chunk(b"VP8X", bytes([0x02, 0, 0, 0]) + u24(47) + u24(31))
            + chunk(b"ANIM", bytes(4) + bytes(2))
            + chunk(b"ANMF", u24(0) + u24(0) + u24(47) + u24(31) + u24(100) + b"\0" + vp8))
    path = tmp_path / "m.webp"
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
    with Image.open(path) as img:
        assert img.n_frames == 1 and img.size == (48, 32)
    assert preprocess._lossy_webp(path)
    np.testing.assert_array_equal(preprocess.load_mask(path)[..., 0], mask)


def test_satellite_tiffs_are_named_where_they_would_reach_the_model_wrongly(tmp_path, caplog,
                                                                           monkeypatch):
    """11-bit colour (SpaceNet) reached the model at values 0..7 without a word, and the
    --max-value it would take was refused with advice back to the black images; an
    RGB TIFF's 4th, near-infrared band was dropped silently; a GDAL 4-band 16-bit TIFF
    was 'not an image'."""
    import struct

    from tests.data_fixtures import write_png16_rgb

    monkeypatch.setattr(preprocess, "dark_colour_warned", False)
    monkeypatch.setattr(preprocess, "extra_band_warned", False)
    eleven_bit = np.random.default_rng(0).integers(0, 2048, (16, 16, 3)).astype(np.uint16)
    write_png16_rgb(tmp_path / "pan.png", eleven_bit)
    with caplog.at_level("WARNING"):
        assert preprocess.load_image(tmp_path / "pan.png").max() <= 7
    assert "pan.png is 16-bit colour, read by its high byte" in caplog.text
    assert "save the images as 8-bit colour scaled by their range first" in caplog.text
    with pytest.raises(data_pipeline.DataError, match=r"save the images as 8-bit colour "
                       r"scaled by their range first .* and train without --max-value"):
        preprocess.load_image(tmp_path / "pan.png", max_value=2047)
    # A TIFF of 4 8-bit bands whose 4th is data, not alpha (ExtraSamples unspecified).
    h = w = 8
    pixels = np.random.default_rng(1).integers(0, 256, (h, w, 4)).astype(np.uint8)
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 4, None), (259, 3, 1, 1),
            (262, 3, 1, 2), (273, 4, 1, None), (277, 3, 1, 4), (278, 3, 1, h),
            (279, 4, 1, pixels.size), (338, 3, 1, 0)]
    entries = 2 + 12 * len(tags) + 4
    bits_at, data_at = 8 + entries, 8 + entries + 8
    ifd = struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        value = {258: bits_at, 273: data_at}.get(tag, value)
        ifd += struct.pack("<HHI", tag, kind, count) + (
            struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value))
    data = (b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)
            + struct.pack("<4H", 8, 8, 8, 8) + pixels.tobytes())
    (tmp_path / "rgbn.tif").write_bytes(data)
    caplog.clear()
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(preprocess.load_image(tmp_path / "rgbn.tif"),
                                      pixels[..., :3])
    assert "rgbn.tif has a 4th band beside RGB" in caplog.text
    # A YCbCr TIFF, which Pillow decodes through an RGBX raw mode, has no 4th band; an
    # all-black 16-bit tile (no data) is not dark data.
    caplog.clear()
    rgb = np.random.default_rng(2).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    Image.fromarray(rgb).convert("YCbCr").save(tmp_path / "ycc.tif", compression="tiff_lzw")
    monkeypatch.setattr(preprocess, "extra_band_warned", False)
    monkeypatch.setattr(preprocess, "dark_colour_warned", False)
    write_png16_rgb(tmp_path / "nodata.png", np.zeros((16, 16, 3), np.uint16))
    with caplog.at_level("WARNING"):
        preprocess.load_image(tmp_path / "ycc.tif")
        preprocess.load_image(tmp_path / "nodata.png")
    assert caplog.text == ""
    (tmp_path / "gdal.tif").write_bytes(b"II*\x00" + bytes(12))
    with pytest.raises(data_pipeline.DataError, match=r"gdal\.tif cannot be decoded .* such "
                       r"as a TIFF of more than 4 bands"):
        preprocess.load_image(tmp_path / "gdal.tif")
