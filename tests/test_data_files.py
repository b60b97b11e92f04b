"""data_pipeline.files and the decoders: layouts, pairing, every bad-data error, skip_bad."""

import logging
import re
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

import data_pipeline as dp
from data_pipeline import files
from tests.data_fixtures import (CARS, H, W, box_mask, kaggle_dir, own_dir, write_image,
                                 write_mask, write_png16_rgb)


@pytest.fixture
def kaggle(tmp_path):
    return kaggle_dir(tmp_path / "carvana")


def error_of(data_dir, **kw) -> str:
    """The DataError message of find_pairs, checked to be one line."""
    with pytest.raises(dp.DataError) as e:
        dp.find_pairs(data_dir, **kw)
    message = str(e.value)
    assert "\n" not in message
    return message


# --- layouts and pairing ----------------------------------------------------------------

def test_kaggle_layout_pairs_by_name_and_keeps_car_ids(kaggle):
    pairs = dp.find_pairs(kaggle)
    assert len(pairs) == 20
    assert all(p.mask.name == p.image.stem + "_mask.gif" for p in pairs)
    assert all(p.image.parent.name == "train" and p.image.is_absolute() for p in pairs)
    assert {p.car for p in pairs} == set(CARS)
    assert pairs[5].car == pairs[5].group == pairs[5].image.stem.rsplit("_", 1)[0]
    assert [p.image.name for p in pairs] == sorted(p.image.name for p in pairs)


def test_train_hq_with_png_masks(tmp_path):
    kaggle_dir(tmp_path, cars=("car1",), angles=2, images="train_hq", mask_suffix=".png")
    pairs = dp.find_pairs(tmp_path)
    assert [p.mask.name for p in pairs] == ["car1_01_mask.png", "car1_02_mask.png"]
    assert {p.car for p in pairs} == {"car1"}


def test_palette_gif_is_read_as_indices_not_colours(kaggle):
    pair = dp.find_pairs(kaggle)[0]
    assert Image.open(pair.mask).mode == "P"  # a real palette GIF, index 1 nearly black
    mask = dp.load_mask(pair.mask, (H, W))
    assert mask.shape == (H, W, 1) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask[..., 0], box_mask(seed=1))  # car 0, angle 1


@pytest.mark.parametrize("value", [1, 7, 255])
def test_any_non_zero_mask_value_is_foreground(tmp_path, value):
    write_mask(tmp_path / "m.png", box_mask(), value=value)
    np.testing.assert_array_equal(dp.load_mask(tmp_path / "m.png", (H, W))[..., 0], box_mask())


def test_rgb_mask_is_foreground_where_any_colour_is_set(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[box_mask()] = (200, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    np.testing.assert_array_equal(dp.load_mask(tmp_path / "m.png", (H, W))[..., 0], box_mask())


def test_jpeg_masks_are_cut_at_128_because_jpeg_is_lossy(tmp_path):
    Image.fromarray(box_mask().astype(np.uint8) * 255).save(tmp_path / "m.jpg", quality=60)
    assert np.asarray(Image.open(tmp_path / "m.jpg"))[~box_mask()].max() > 0  # the noise
    np.testing.assert_array_equal(dp.load_mask(tmp_path / "m.jpg", (H, W))[..., 0], box_mask())


def test_graded_edges_are_cut_at_half_scale(tmp_path):
    """An anti-aliased (or smoothly resized) 0/255 mask has a ring of in-between values
    at every edge: cut at half scale, not counted as foreground. 0/1 masks, class-id
    masks and palette indices never reach full scale and keep "any non-zero"."""
    mask = box_mask()
    ring = np.zeros_like(mask)
    ring[1:-1, 1:-1] = mask[:-2, 1:-1] | mask[2:, 1:-1] | mask[1:-1, :-2] | mask[1:-1, 2:]
    ring &= ~mask
    graded = np.where(mask, 255, 0).astype(np.uint8)
    graded[ring] = 127  # under half: background
    graded[mask & np.roll(~mask, 1, axis=0)] = 128  # the box's top row, half: foreground
    Image.fromarray(graded).save(tmp_path / "soft.png")
    np.testing.assert_array_equal(dp.load_mask(tmp_path / "soft.png", (H, W))[..., 0], mask)
    wide = (graded.astype(np.uint16) * 257)  # the same at 16 bits
    Image.fromarray(wide).save(tmp_path / "soft16.png")
    np.testing.assert_array_equal(dp.load_mask(tmp_path / "soft16.png", (H, W))[..., 0], mask)
    ids = np.where(mask, 2, 0).astype(np.uint8)
    ids[ring] = 1  # never at 255: every non-zero value counts
    Image.fromarray(ids).save(tmp_path / "ids.png")
    np.testing.assert_array_equal(dp.load_mask(tmp_path / "ids.png", (H, W))[..., 0], mask | ring)
    # A grey object of its own beside a white one is not a ring: both stay foreground.
    other = box_mask(seed=9) & ~mask & ~ring
    two = np.where(mask, 255, np.where(other, 100, 0)).astype(np.uint8)
    Image.fromarray(two).save(tmp_path / "two.png")
    np.testing.assert_array_equal(dp.load_mask(tmp_path / "two.png", (H, W))[..., 0], mask | other)
    palette = Image.fromarray(np.where(mask, 255, np.where(ring, 7, 0)).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0] * 256)
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(dp.load_mask(tmp_path / "p.png", (H, W))[..., 0], mask | ring)


@pytest.mark.parametrize("lossless", [False, True])
def test_webp_masks_are_cut_at_128_only_when_lossy(tmp_path, lossless):
    """A lossy WebP mask is noisy like a JPEG one; a lossless one may hold 0/1."""
    value = 1 if lossless else 255
    Image.fromarray(box_mask().astype(np.uint8) * value).save(
        tmp_path / "m.webp", lossless=lossless, quality=60)
    if not lossless:
        assert np.asarray(Image.open(tmp_path / "m.webp"))[~box_mask()].max() > 0  # the noise
    np.testing.assert_array_equal(dp.load_mask(tmp_path / "m.webp", (H, W))[..., 0], box_mask())


def test_several_classes_keep_their_ids(tmp_path):
    ids = (box_mask() + 2 * box_mask(seed=5)).astype(np.uint8)
    Image.fromarray(ids).save(tmp_path / "m.png")
    np.testing.assert_array_equal(dp.load_mask(tmp_path / "m.png", (H, W), num_classes=4)[..., 0], ids)
    with pytest.raises(dp.DataError, match=r"m.png holds class 3 but the model has 2 classes"):
        dp.load_mask(tmp_path / "m.png", (H, W), num_classes=2)


def test_own_folders_match_by_stem_in_any_format(tmp_path):
    for name, mask_name in [("a.png", "a.png"), ("b.bmp", "b_mask.png"), ("c.tif", "c.tiff"),
                            ("d.jpg", "d_mask.gif"), ("e.gif", "e.bmp"),
                            ("f.webp", "f_mask.png"), ("g_mask.tif", "g_mask.png"),
                            ("h_mask.png", "h_mask_mask.png")]:
        write_image(tmp_path / "images" / name) if not name.endswith(".gif") else \
            write_mask(tmp_path / "images" / name, box_mask())
        write_mask(tmp_path / "masks" / mask_name, box_mask())
    pairs = dp.find_pairs(tmp_path)
    assert [(p.image.name, p.mask.name) for p in pairs] == [
        ("a.png", "a.png"), ("b.bmp", "b_mask.png"), ("c.tif", "c.tiff"),
        ("d.jpg", "d_mask.gif"), ("e.gif", "e.bmp"), ("f.webp", "f_mask.png"),
        ("g_mask.tif", "g_mask.png"), ("h_mask.png", "h_mask_mask.png")]
    # each image its own group
    assert [p.car for p in pairs] == ["a", "b", "c", "d", "e", "f", "g_mask", "h_mask"]
    for pair in pairs:
        image, mask = dp.load_example(pair, (H, W))
        assert image.shape == (H, W, 3)
        np.testing.assert_array_equal(mask[..., 0], box_mask())


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_image_modes_become_the_requested_channels(tmp_path, mode):
    gray = np.random.default_rng(0).integers(0, 256, (H, W), np.uint8)
    if mode == "L":
        Image.fromarray(gray).save(tmp_path / "x.png")
    elif mode == "RGBA":
        Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 9)])).save(tmp_path / "x.png")
    else:
        Image.fromarray(gray).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "x.png")
    rgb = dp.load_image(tmp_path / "x.png", (H, W), in_channels=3)
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    if mode != "P":  # palette quantisation changes the values a little
        np.testing.assert_array_equal(rgb[..., 0], gray)
    one = dp.load_image(tmp_path / "x.png", (H, W), in_channels=1)
    assert one.shape == (H, W, 1)
    np.testing.assert_allclose(one[..., 0], rgb[..., 0], atol=1)


def test_16_bit_images_are_scaled_to_8_bits(tmp_path):
    Image.fromarray(np.full((H, W), 65535, np.uint16)).save(tmp_path / "x.png")
    assert dp.load_image(tmp_path / "x.png", (H, W)).min() == 255


def test_a_12_bit_image_is_named_once_with_the_fix(tmp_path, caplog, monkeypatch):
    from data_pipeline import preprocess

    monkeypatch.setattr(preprocess, "narrow_warned", False)
    Image.fromarray(np.full((H, W), 65535, np.uint16)).save(tmp_path / "wide.png")
    ramp = np.linspace(0, 4095, H * W).reshape(H, W).astype(np.uint16)
    for name in ("scan1.png", "scan2.png"):
        Image.fromarray(ramp).save(tmp_path / name)
    with caplog.at_level("WARNING"):
        dp.load_image(tmp_path / "wide.png", (H, W))
        assert not caplog.records  # the full range: nothing to say
        levels = dp.load_image(tmp_path / "scan1.png", (H, W), in_channels=1)
        dp.load_image(tmp_path / "scan2.png", (H, W))
    assert len(np.unique(levels)) == 17
    [record] = caplog.records
    message = record.getMessage()
    assert "scan1.png" in message and "below 4096" in message and "17 grey levels" in message
    assert "--max-value 4095" in message


@pytest.mark.parametrize("case", ["8-bit values in 16 bits", "dark 16 bits", "overshoot",
                                  "z-scored"])
def test_images_that_reach_the_model_nearly_black_are_named_with_the_fix_that_fits(
        tmp_path, caplog, monkeypatch, case):
    """16-bit files of 8-bit values were told to pass --max-value 511 (half
    brightness); a float image in [0, 1] with one pixel at 1.02 was read as 0..255,
    black beside its neighbours, and a z-scored one clipped at 0, without a word."""
    from data_pipeline import preprocess

    monkeypatch.setattr(preprocess, "narrow_warned", False)
    ramp = np.linspace(0, 1, H * W).reshape(H, W)
    values, fix = {"8-bit values in 16 bits": ((ramp * 249).astype(np.uint16),
                                               "--max-value 255 "),
                   # A dark first file: no suggestion under 8 bits, which would clip.
                   "dark 16 bits": ((ramp * 100).astype(np.uint16), "--max-value 255 "),
                   "overshoot": ((ramp * 0.9).astype(np.float32), "--max-value 1 "),
                   "z-scored": ((ramp * 4 - 2).astype(np.float32), "scale the images to "
                                "[0, 1] or 0..255")}[case]
    if case == "overshoot":
        values[0, 0] = 1.02
    Image.fromarray(values).save(tmp_path / "x.tif")
    with caplog.at_level("WARNING"):
        dp.load_image(tmp_path / "x.tif", None, in_channels=1)
    [record] = caplog.records
    assert "x.tif" in record.getMessage() and fix in record.getMessage()
    if case == "overshoot":  # the fix works: [0, 1] to 0..255, the overshoot white
        fixed = dp.load_image(tmp_path / "x.tif", None, in_channels=1, max_value=1)
        assert fixed.max() == 255 and abs(int(fixed[-1, -1, 0]) - 230) <= 1


def test_max_value_scales_12_bit_and_float_images_to_the_full_range(tmp_path, caplog,
                                                                     monkeypatch):
    from data_pipeline import preprocess

    monkeypatch.setattr(preprocess, "narrow_warned", False)
    ramp = np.linspace(0, 4095, H * W).reshape(H, W)
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "int.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    for name in ("int.png", "float.tif"):
        with caplog.at_level("WARNING"):
            full = dp.load_image(tmp_path / name, None, in_channels=1, max_value=4095)
        assert not caplog.records
        np.testing.assert_allclose(full[..., 0], np.rint(ramp * 255 / 4095), atol=1)
    with caplog.at_level("WARNING"):  # a float image beyond 255 and dark: named too
        dark = dp.load_image(tmp_path / "float.tif", None, in_channels=1)
    assert dark.max() == 16 and "float image" in caplog.text and "--max-value 4095" in caplog.text
    # The pipeline decodes with it, and its cache does not serve the other scaling.
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "int.png")
    (tmp_path / "images").mkdir()
    (tmp_path / "int.png").rename(tmp_path / "images" / "a.png")
    write_mask(tmp_path / "masks" / "a.png", box_mask((W, H)))
    pairs = dp.find_pairs(tmp_path)
    kw = dict(image_size=(H, W), batch_size=1, train=False, in_channels=1,
              cache=str(tmp_path / "cache"))
    dark, bright = (list(dp.InputPipeline(pairs, max_value=v, **kw).examples())[0][0]
                    for v in (0, 4095))
    assert dark.max() <= 16 and bright.max() >= 254
    assert len(list(tmp_path.glob("cache-*.images.npy"))) == 2  # one cache per scaling


def test_an_image_over_max_value_is_named_once(tmp_path, caplog, monkeypatch):
    """--max-value 4095 on 16-bit data turned most pixels white without a word."""
    from data_pipeline import preprocess

    monkeypatch.setattr(preprocess, "clipped_warned", False)
    ramp = np.linspace(0, 65535, H * W).reshape(H, W).astype(np.uint16)
    for name in ("wide1.png", "wide2.png"):
        Image.fromarray(ramp).save(tmp_path / name)
    with caplog.at_level("WARNING"):
        dp.load_image(tmp_path / "wide1.png", max_value=65535)
        assert not caplog.records  # within it: nothing to say
        dp.load_image(tmp_path / "wide1.png", max_value=4095)
        dp.load_image(tmp_path / "wide2.png", max_value=4095)
    [record] = caplog.records
    assert "wide1.png has values up to 65535, over --max-value 4095: 94% of its pixels " \
        "turn white" in record.getMessage()


def test_max_value_scales_every_float_file_alike_and_names_one_within_1(
        tmp_path, caplog, monkeypatch):
    """One scale for the dataset: a float image within [0, 1] under --max-value 4095
    is read by it (nearly black), as a dark frame of raw counts must be, and named."""
    from data_pipeline import preprocess

    monkeypatch.setattr(preprocess, "clipped_warned", False)
    ramp = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    Image.fromarray(ramp).save(tmp_path / "unit.tif")
    with caplog.at_level("WARNING"):
        for source in (tmp_path / "unit.tif", ramp):
            assert dp.load_image(source, None, in_channels=1, max_value=4095).max() == 0
    [record] = caplog.records
    assert "unit.tif is a float image within [0, 1], and --max-value 4095 scales it " \
        "nearly black" in record.getMessage()
    # A --max-value within 1 is about such images, and applies without a word.
    caplog.clear()
    with caplog.at_level("WARNING"):
        half = dp.load_image(ramp / 2, None, in_channels=1, max_value=0.5)[..., 0]
    np.testing.assert_allclose(half, np.rint(ramp * 255), atol=1)
    assert not caplog.records


def test_max_value_refuses_16_bit_colour_which_it_cannot_scale(tmp_path):
    """Pillow reads a 16-bit colour file by its high byte: --max-value 4095 on 12-bit
    colour images trained on values up to 15 of 255, without a word."""
    wide = np.random.default_rng(0).integers(0, 4096, (H, W, 3)).astype(np.uint16)
    write_png16_rgb(tmp_path / "colour12.png", wide)
    assert dp.load_image(tmp_path / "colour12.png").max() <= 15  # as Pillow reads it
    with Image.open(tmp_path / "colour12.png") as opened:  # a copy would lose its tile
        for source, name in ((tmp_path / "colour12.png", str(tmp_path / "colour12.png")),
                             (wide, "the in-memory image"), (opened, "the in-memory image")):
            with pytest.raises(dp.DataError, match=rf"^{re.escape(name)} is a 16-bit image "
                               r"with colour or alpha channels.*train without --max-value"):
                dp.load_image(source, max_value=4095)
    # Named by the check of every pair before training, not while the first epoch decodes.
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "colour12.png").rename(tmp_path / "data" / "images" / "a.png")
    write_mask(tmp_path / "data" / "masks" / "a.png", box_mask((W, H)))
    assert len(dp.find_pairs(tmp_path / "data")) == 1  # without --max-value: read as 8-bit
    with pytest.raises(dp.DataError, match=r"images/a\.png is a 16-bit image with colour"):
        dp.find_pairs(tmp_path / "data", max_value=4095)
    # A BMP of 16 bits per pixel (5-6-5 colour, as screenshots and embedded cameras
    # write) is 8-bit colour: scaled like any, not refused.
    write_bmp565(tmp_path / "screen.bmp", np.full((3, 4), 0x07E0, np.uint16))  # green
    assert dp.load_image(tmp_path / "screen.bmp", max_value=255).tolist() == [
        [[0, 255, 0]] * 4] * 3


def write_bmp565(path, pixels: np.ndarray) -> None:
    """A BMP of 16-bit 5-6-5 pixels (BI_BITFIELDS), written by hand: Pillow reads such
    files but writes none."""
    height, width = pixels.shape
    stride = (width * 2 + 3) // 4 * 4
    rows = b"".join(row.astype("<u2").tobytes().ljust(stride, b"\0") for row in pixels[::-1])
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 16, 3, len(rows), 2835, 2835, 0, 0)
    masks = struct.pack("<III", 0xF800, 0x07E0, 0x001F)
    offset = 14 + len(info) + len(masks)
    path.write_bytes(b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset)
                     + info + masks + rows)


# --- every bad-data error names the file -------------------------------------------------

def test_missing_mask(kaggle):
    (kaggle / "train_masks" / "bbb222_02_mask.gif").unlink()
    message = error_of(kaggle)
    assert "bbb222_02.jpg has no mask" in message and "bbb222_02_mask.gif" in message
    assert "--skip-bad" in message


def test_a_missing_mask_is_expected_under_the_name_the_other_masks_use(tmp_path):
    """Masks named p03_mask.tif were told "expected masks/p03.png": a name the user's
    masks do not have, in a format they are not in."""
    own = own_dir(tmp_path / "own", n=3)
    (own / "masks" / "img1.png").unlink()
    assert f"img1.png has no mask (expected {own / 'masks' / 'img1.png'} or " \
        f"{own / 'masks' / 'img1_mask.png'}, in any image format)" in error_of(own)
    for i in (0, 2):
        (own / "masks" / f"img{i}.png").rename(own / "masks" / f"img{i}_mask.tif")
    assert f"(expected {own / 'masks' / 'img1_mask.tif'} or {own / 'masks' / 'img1.tif'}," \
        in error_of(own)


def test_max_value_on_8_bit_images_alone_is_named_as_doing_nothing(tmp_path, caplog):
    """--max-value 4095 on 8-bit PNGs was taken without a word, and did nothing."""
    own = own_dir(tmp_path / "own", n=2)
    with caplog.at_level(logging.WARNING):
        dp.find_pairs(own, max_value=4095)
    assert f"--max-value 4095: every image of {own} is 8-bit" in caplog.text
    caplog.clear()
    Image.fromarray(np.full((H, W), 3000, np.uint16)).save(own / "images" / "img1.png")
    with caplog.at_level(logging.WARNING):
        assert len(dp.find_pairs(own, max_value=4095)) == 2
    assert "every image" not in caplog.text


def test_images_turned_by_an_exif_tag_their_masks_lack_are_named(tmp_path, caplog):
    """A photo stored upside down with the tag that turns it (3) and a mask drawn on its
    stored pixels: read as shown, the pair is misaligned, and nothing failed or said so."""
    own = own_dir(tmp_path / "own", n=3)
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.open(own / "images" / "img1.png").save(own / "images" / "img1.png", exif=exif)
    with caplog.at_level(logging.WARNING):
        assert len(dp.find_pairs(own)) == 3
    assert (f"{own / 'images' / 'img1.png'} carries an EXIF orientation tag (3) that turns "
            "or mirrors it as viewers show it, and its mask does not") in caplog.text
    caplog.clear()
    Image.open(own / "masks" / "img1.png").save(own / "masks" / "img1.png", exif=exif)
    with caplog.at_level(logging.WARNING):  # turned alike: aligned either way
        dp.find_pairs(own)
    assert "EXIF" not in caplog.text


def test_every_pair_wrong_alike_is_not_offered_skip_bad(tmp_path):
    """Binary masks under --num-classes 3: "--skip-bad skips them" offered to skip all 3."""
    own = own_dir(tmp_path / "own", n=3)
    with pytest.raises(dp.DataError) as e:
        dp.find_pairs(own, num_classes=3)
    assert "a binary mask" in str(e.value) and "pass --skip-bad" not in str(e.value)
    assert str(e.value).endswith("(3 problems in all); --skip-bad would leave no pair")
    # Images without masks, as most of Pascal VOC's photos are, beside them: the
    # masks' problem, which every pair has, is the one named (sorted first, the
    # unmatched image had hidden it).
    write_image(own / "images" / "a0.png")
    with pytest.raises(dp.DataError, match=r"masks.img0\.png holds only 0 and 255, a "
                       r"binary mask.* \(4 problems in all\); --skip-bad would leave no"):
        dp.find_pairs(own, num_classes=3)
    (own / "images" / "a0.png").unlink()
    write_image(own / "images" / "img3.png")
    write_mask(own / "masks" / "img3.png", box_mask(), value=1)  # class ids: fine
    assert "pass --skip-bad to skip such pairs" in error_of(own, num_classes=3)


def test_extra_mask(kaggle):
    write_mask(kaggle / "train_masks" / "zzz999_01_mask.gif", box_mask())
    message = error_of(kaggle)
    assert "zzz999_01_mask.gif has no image" in message and "--skip-bad" in message


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".bmp", ".tif", ".gif", ".webp"])
def test_truncated_file(tmp_path, suffix):
    own_dir(tmp_path, n=3)
    path = tmp_path / "images" / f"img1{suffix}"
    (tmp_path / "images" / "img1.png").unlink()
    write_image(path, size=(96, 64)) if suffix != ".gif" else write_mask(path, box_mask((96, 64)))
    write_mask(tmp_path / "masks" / "img1.png", box_mask((96, 64)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    message = error_of(tmp_path)
    assert f"img1{suffix} is truncated" in message and "--skip-bad" in message


def test_unreadable_file(kaggle):
    (kaggle / "train_masks" / "aaa111_01_mask.gif").write_bytes(b"not an image at all")
    message = error_of(kaggle)
    assert "aaa111_01_mask.gif cannot be read as an image" in message


def test_empty_file(kaggle):
    (kaggle / "train" / "ccc333_04.jpg").write_bytes(b"")
    assert "ccc333_04.jpg cannot be read" in error_of(kaggle)


def test_size_mismatch(kaggle):
    write_mask(kaggle / "train_masks" / "eee555_04_mask.gif", box_mask((W + 2, H)))
    message = error_of(kaggle)
    assert f"eee555_04_mask.gif is {W + 2}x{H} but its image eee555_04.jpg is {W}x{H}" in message


def test_two_masks_for_one_image(tmp_path):
    own_dir(tmp_path, n=2)
    write_mask(tmp_path / "masks" / "img0_mask.png", box_mask())
    message = error_of(tmp_path)
    assert "img0" in message and "both claim the name" in message


def test_masks_beside_their_images_in_one_folder_or_one_per_patient(tmp_path):
    """x.tif and x_mask.tif side by side (the LGG brain MRI set's kaggle_3m/<patient>/):
    each patient's folder is its slices' group, so a split keeps a patient whole."""
    flat = tmp_path / "flat"
    for stem in ("a", "b"):
        write_image(flat / f"{stem}.png")
        write_mask(flat / f"{stem}_mask.png", box_mask())
    assert [(p.image.name, p.mask.name, p.car) for p in dp.find_pairs(flat)] == [
        ("a.png", "a_mask.png", "a"), ("b.png", "b_mask.png", "b")]
    nested = tmp_path / "kaggle_3m"
    for patient in ("TCGA_1", "TCGA_2", "TCGA_3"):
        for i in (1, 2):
            write_image(nested / patient / f"{patient}_{i}.tif", seed=i)
            write_mask(nested / patient / f"{patient}_{i}_mask.tif", box_mask(seed=i))
    (nested / "data.csv").write_text("patient,grade\n")  # what the set ships beside them
    pairs = dp.find_pairs(nested)
    assert len(pairs) == 6 and {p.car for p in pairs} == {"TCGA_1", "TCGA_2", "TCGA_3"}
    assert all(p.mask.name == p.image.stem + "_mask.tif" for p in pairs)
    train, val = dp.split_pairs(pairs, val_fraction=0.34, seed=0)
    assert len(val) == 2 and len({p.car for p in val}) == 1  # one patient, whole
    # One sub-folder alone is the dataset a level down, not one patient whom no split
    # could divide: each image is its own group, as in a flat folder.
    lone = tmp_path / "lone"
    shutil.copytree(flat, lone / "images")
    assert [p.car for p in dp.find_pairs(lone)] == ["a", "b"]
    assert len(dp.split_pairs(dp.find_pairs(lone), val_fraction=0.5)[1]) == 1
    # The run's split file reads back, from where the files are or after a move, by
    # each image's path in the dataset: by name alone, every patient's slice_1.png
    # was one and the same, and validation became training images.
    for pairs_of, data_dir in ((lambda: dp.find_pairs(nested), nested),
                               (lambda: dp.find_pairs(flat), flat)):
        pairs = pairs_of()
        dp.write_split(tmp_path / "split.json", pairs[:-1], pairs[-1:], data_dir)
        assert dp.read_split(tmp_path / "split.json") == (pairs[:-1], pairs[-1:])
    same_names = tmp_path / "same_names"
    for patient in ("P1", "P2"):
        for i in (1, 2):
            write_image(same_names / patient / f"slice_{i}.png", seed=i)
            write_mask(same_names / patient / f"slice_{i}_mask.png", box_mask(seed=i))
    pairs = dp.find_pairs(same_names)
    dp.write_split(tmp_path / "split.json", pairs[:2], pairs[2:], same_names)
    moved = tmp_path / "moved"
    shutil.move(same_names, moved)
    train, val = dp.read_split(tmp_path / "split.json", moved)
    assert [(p.image.parent.name, p.image.name, p.car) for p in train + val] == [
        ("P1", "slice_1.png", "P1"), ("P1", "slice_2.png", "P1"),
        ("P2", "slice_1.png", "P2"), ("P2", "slice_2.png", "P2")]
    # A patient whose masks are named otherwise is named, not left out.
    (moved / "P3").mkdir()
    write_image(moved / "P3" / "slice_1.png")
    write_mask(moved / "P3" / "slice_1_seg.png", box_mask())
    assert "P3/slice_1.png has no mask" in error_of(moved)
    for data_dir in (flat, nested):  # a mask or an image alone is named
        (data_dir / "lone.png").write_bytes((flat / "a.png").read_bytes())
    assert "flat/lone.png has no mask (expected " in error_of(flat)
    (nested / "TCGA_2" / "TCGA_2_1.tif").unlink()
    assert "TCGA_2_1_mask.tif has no image" in error_of(nested)


def test_neither_layout_and_no_directory(tmp_path):
    (tmp_path / "train").mkdir()  # images but no train_masks/
    message = error_of(tmp_path)
    assert str(tmp_path) in message and "train_masks/" in message and "images/ + masks/" in message
    assert "no such directory" in error_of(tmp_path / "nope")
    (tmp_path / "b00.png").write_bytes(b"")
    assert error_of(tmp_path / "b00.png").endswith("b00.png is a file: pass the folder that "
                                                   "holds images/ and masks/ (or Kaggle's "
                                                   "train/ and train_masks/)")


def test_first_of_several_problems_is_named_with_the_count(kaggle):
    (kaggle / "train_masks" / "aaa111_01_mask.gif").unlink()
    (kaggle / "train_masks" / "bbb222_01_mask.gif").unlink()
    message = error_of(kaggle)
    assert "aaa111_01.jpg" in message and "2 problems in all" in message


def test_skip_bad_drops_bad_pairs_and_lists_them(kaggle, caplog):
    (kaggle / "train_masks" / "bbb222_02_mask.gif").unlink()
    path = kaggle / "train" / "ccc333_01.jpg"
    path.write_bytes(path.read_bytes()[:300])
    write_mask(kaggle / "train_masks" / "eee555_04_mask.gif", box_mask((W, H + 1)))
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        pairs = dp.find_pairs(kaggle, skip_bad=True)
    assert len(pairs) == 17
    assert not {"bbb222_02.jpg", "ccc333_01.jpg", "eee555_04.jpg"} & {p.image.name for p in pairs}
    assert "skipping 3" in caplog.text
    for name in ("bbb222_02.jpg", "ccc333_01.jpg", "eee555_04_mask.gif"):
        assert name in caplog.text


def test_check_false_only_pairs(kaggle):
    path = kaggle / "train" / "ccc333_01.jpg"
    path.write_bytes(path.read_bytes()[:300])
    assert len(dp.find_pairs(kaggle, check=False)) == 20
    with pytest.raises(dp.DataError):
        dp.find_pairs(kaggle)


def test_nothing_usable_is_an_error(kaggle):
    for f in (kaggle / "train").iterdir():
        f.write_bytes(b"x")
    assert "no usable image/mask pairs" in error_of(kaggle, skip_bad=True)


# --- inference inputs -----------------------------------------------------------------

def test_find_images(kaggle, tmp_path):
    images = dp.find_images(kaggle / "train")
    assert len(images) == 20 and images == sorted(images)
    assert dp.find_images(images[3]) == [images[3]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(dp.DataError, match="holds no images"):
        dp.find_images(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(dp.DataError, match="notes.txt is not an image"):
        dp.find_images(tmp_path / "notes.txt")
    with pytest.raises(dp.DataError, match="no such file"):
        dp.find_images(tmp_path / "nope")


def test_find_images_leaves_out_masks_kept_beside_their_images(tmp_path, caplog):
    """A folder of x.tif and x_mask.tif (as some biomedical datasets ship) had its
    ground-truth masks segmented as images, and x_mask_mask.png written for each."""
    for stem in ("a", "b"):
        write_image(tmp_path / f"{stem}.png")
        write_mask(tmp_path / f"{stem}_mask.png", box_mask())
    write_image(tmp_path / "lone_mask.png")  # no lone.png beside it: an image
    with caplog.at_level("WARNING"):
        found = dp.find_images(tmp_path)
    assert [p.name for p in found] == ["a.png", "b.png", "lone_mask.png"]
    assert "leaving out 2 file(s) named as the masks of images beside them (a_mask.png " \
        "for a)" in caplog.text


def test_colour_coded_class_masks_are_named_not_read_as_their_brightest_channel(tmp_path):
    """Red for class 1, green for class 2: the largest channel would read both as 255,
    and the message would then suggest a binary model, merging the classes."""
    ids = (box_mask() + 2 * box_mask(seed=5)).clip(0, 2)
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)
    Image.fromarray(colours[ids]).save(tmp_path / "m.png")
    with pytest.raises(dp.DataError, match=r"m\.png codes classes as colours \(\(0, 0, 0\), "
                       r"\(0, 255, 0\), \(255, 0, 0\)\) but a model of 3 classes needs class ids"):
        dp.load_mask(tmp_path / "m.png", (H, W), num_classes=3)
    grey = np.repeat(ids[..., None].astype(np.uint8), 3, axis=-1)  # ids stored as RGB greys
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(dp.load_mask(tmp_path / "g.png", (H, W), num_classes=3)[..., 0],
                                  ids)


def test_float_masks_cut_graded_edges_at_half_and_keep_whole_class_ids(tmp_path):
    """Float TIFF masks (ImageJ's 32-bit, numpy's float saves): a disc resized smoothly
    in float had grown by its ring ("any non-zero"), and float class ids passed the
    check, then failed inside tf.data with a traceback."""
    yy, xx = np.mgrid[:H, :W]
    disc = ((yy - H / 2) ** 2 + (xx - W / 2) ** 2 < (H / 3) ** 2).astype(np.float32)
    soft = np.asarray(Image.fromarray(disc).resize((W // 2, H // 2), Image.BILINEAR)
                      .resize((W, H), Image.BILINEAR))
    assert 0 < ((soft > 0) & (soft < 1)).mean() < 0.3
    Image.fromarray(soft).save(tmp_path / "soft.tif")
    read = dp.load_mask(tmp_path / "soft.tif", (H, W))[..., 0]
    np.testing.assert_array_equal(read, soft >= 0.5)
    # Resized bicubic, a [0, 1] mask overshoots to 1.15 (and below 0): still [0, 1],
    # cut at 0.5 (a cut of 128 had read it empty); on 0..255 alike.
    over = np.asarray(Image.fromarray(disc).resize((W // 2, H // 2), Image.BILINEAR)
                      .resize((W, H), Image.BICUBIC))
    assert 1 < over.max() < 2
    for scale, name in ((1, "over.tif"), (255, "over255.tif")):
        Image.fromarray(over * scale).save(tmp_path / name)
        np.testing.assert_array_equal(dp.load_mask(tmp_path / name, (H, W))[..., 0],
                                      over * scale >= 0.5 * (1 if scale == 1 else 256))
    Image.fromarray(disc).save(tmp_path / "hard.tif")  # 0.0/1.0: any non-zero
    np.testing.assert_array_equal(dp.load_mask(tmp_path / "hard.tif", (H, W))[..., 0], disc > 0)
    ids = (box_mask() + 2 * box_mask(seed=5)).clip(0, 2).astype(np.float32)
    Image.fromarray(ids).save(tmp_path / "ids.tif")
    read = dp.load_mask(tmp_path / "ids.tif", (H // 2, W // 2), num_classes=3)
    assert read.dtype == np.uint8 and set(np.unique(read)) == {0, 1, 2}
    Image.fromarray(ids + 0.5 * (ids == 1)).save(tmp_path / "half.tif")
    with pytest.raises(dp.DataError, match=r"half\.tif holds 1\.5, which is no class id: "
                       r"class ids are whole numbers 0\.\.2"):
        dp.load_mask(tmp_path / "half.tif", (H, W), num_classes=3)


def test_kaggle_folders_extracted_one_level_down_are_found(kaggle, tmp_path):
    """``unzip train.zip -d train`` and Windows' "Extract All" make train/train/."""
    import shutil

    nested = tmp_path / "extracted"
    for folder in ("train", "train_masks"):
        shutil.copytree(kaggle / folder, nested / folder / folder)
    (nested / "train" / "__MACOSX").mkdir()  # macOS zips carry one beside the photos
    pairs = dp.find_pairs(nested)
    assert len(pairs) == len(dp.find_pairs(kaggle))
    assert pairs[0].image.parent == nested / "train" / "train"
    assert dp.find_images(nested / "train") == sorted((nested / "train" / "train").glob("*.jpg"))


def test_a_zip_where_images_are_expected_says_to_unzip_it(tmp_path):
    (tmp_path / "test.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    with pytest.raises(dp.DataError, match=r"test\.zip is not an image file .*; unzip it"):
        dp.find_images(tmp_path / "test.zip")
    with pytest.raises(dp.DataError, match=r"holds no images .*; unzip test\.zip first"):
        dp.find_images(tmp_path)
    with pytest.raises(dp.DataError, match=r"matches no known layout.*; unzip test\.zip first"):
        dp.find_pairs(tmp_path)
    # Kaggle's photos without their masks: unzipping would not help. A user's own
    # train.zip of images/ and masks/ still says to unzip it.
    import zipfile

    (tmp_path / "test.zip").unlink()
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as z:
        z.writestr("images/a.png", b"")
        z.writestr("masks/a.png", b"")
    with pytest.raises(dp.DataError, match=r"; unzip train\.zip first$"):
        dp.find_pairs(tmp_path)
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as z:
        z.writestr("train/00087a6bd4dc_01.jpg", b"")
    with pytest.raises(dp.DataError, match=r"it holds Kaggle's train\.zip but not "
                       r"train_masks\.zip: download train_masks\.zip into it too$"):
        dp.find_pairs(tmp_path)


@pytest.mark.parametrize("folders, given, hint", [
    (("image", "label"), "", "it holds image/ and label/: rename image/ to images/ and "
                             "label/ to masks/"),
    (("images", "GT"), "", "it holds images/ and GT/: rename GT/ to masks/"),
    (("images", "masks"), "images", "images/ is one of its folders: pass its parent"),
    (("train", "train_masks"), "train_masks", "train_masks/ is one of its folders: pass "
                                              "its parent"),
    (("photos", "notes"), "", "it holds notes/, photos/"),
    (("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"), "",
     "it holds ISIC2018_Task1-2_Training_Input/ and ISIC2018_Task1_Training_GroundTruth/: "
     "rename ISIC2018_Task1-2_Training_Input/ to images/ and "
     "ISIC2018_Task1_Training_GroundTruth/ to masks/"),
    # DRIVE: mask/ holds each photo's field of view, 1st_manual/ the vessels to learn;
    # the hint named mask/, whose <stem>_mask files then paired and trained at Dice 1.
    (("images", "mask", "1st_manual"), "", "it holds images/ and 2 folders that could "
     "hold its masks (1st_manual/, mask/): rename the one with the labels to learn (not, "
     "say, a field-of-view mask) to masks/"),
    # Pascal VOC as it unpacks: which of its two mask folders holds the classes.
    (("Annotations", "ImageSets", "JPEGImages", "SegmentationClass", "SegmentationObject"),
     "", "it holds Pascal VOC's JPEGImages/ and SegmentationClass/: rename JPEGImages/ to "
     "images/ and SegmentationClass/ to masks/ (SegmentationObject/ numbers objects, not "
     "classes)"),
    (("images", "image_masks"), "", "it holds images/ and image_masks/: rename "
     "image_masks/ to masks/"),  # a mask word wins
    # Massachusetts Roads, CamVid: train/ beside train_labels/ (and val/, test/ ...).
    # Its val/ pair is the validation set it comes with: for --val-data-dir.
    (("test", "test_labels", "train", "train_labels", "val", "val_labels"), "",
     "it holds train/ and train_labels/: rename train/ to images/ and train_labels/ to "
     "masks/; its val/ and val_labels/, renamed so in a folder of their own, are a "
     "validation set for --val-data-dir"),
    (("test", "test_labels", "train", "train_labels"), "", "it holds train/ and "
     "train_labels/: rename train/ to images/ and train_labels/ to masks/"),
    # CVC-ClinicDB: Original/ beside Ground Truth/.
    (("Ground Truth", "Original"), "", "it holds Original/ and Ground Truth/: rename "
     "Original/ to images/ and Ground Truth/ to masks/"),
    (("images", "mask", "mask_labels"), "", "it holds images/ and 2 folders that could "
     "hold its masks (mask/, mask_labels/): rename the one with the labels to learn (not, "
     "say, a field-of-view mask) to masks/"),  # a mask folder is no image folder
])
def test_a_folder_of_no_known_layout_says_what_it_holds_and_the_fix(tmp_path, folders,
                                                                    given, hint):
    for name in folders:
        (tmp_path / name).mkdir()
    assert error_of(tmp_path / given).endswith(hint + (f", {tmp_path}" if given else ""))


def test_several_inputs_keep_files_of_one_name_where_names_do_not_matter(tmp_path):
    """submit's rows are keyed by the whole path's name within one folder; over two
    folders a.png and a.png are two images, not one dropped."""
    for folder in ("a", "b"):
        write_image(tmp_path / folder / "x.png", (8, 8))
    both = [tmp_path / "a", tmp_path / "b"]
    assert dp.find_images(both, by_stem=False) == [tmp_path / "a" / "x.png",
                                                   tmp_path / "b" / "x.png"]
    with pytest.raises(dp.DataError, match="both claim the name 'x'"):
        dp.find_images(both)


def test_downloads_that_are_no_layout_yet_say_what_to_make_of_them(tmp_path):
    """COCO's annotations/ of JSON (renamed masks/, as the hint said: 'has no mask' for
    every image), the Data Science Bowl 2018's mask per object, VOC's JPEGImages/ and
    SegmentationClass/, and Kaggle's LGG download holding kaggle_3m/ got a list of
    folders, or a hint that led nowhere."""
    coco = tmp_path / "coco"
    write_image(coco / "images" / "000001.jpg", (8, 8))
    (coco / "annotations").mkdir()
    (coco / "annotations" / "instances_train.json").write_text("{}")
    assert error_of(coco).endswith("; annotations/ holds no mask images "
                                   "(instances_train.json): the masks must be images, one "
                                   "per photo; draw them from the annotations first "
                                   "(for COCO's JSON, pycocotools' annToMask)")
    dsb = tmp_path / "data-science-bowl-2018" / "stage1_train"
    for i in range(2):
        write_image(dsb / f"id{i}" / "images" / f"id{i}.png", (8, 8))
        for j in range(3):
            write_mask(dsb / f"id{i}" / "masks" / f"m{j}.png", box_mask((8, 8), seed=j))
    assert "each of its folders (id0/ ...) holds one image in images/ and one mask per " \
           "object in masks/ (the Data Science Bowl 2018's layout): merge" in error_of(dsb)
    # The download's own folder, beside stage1_test/: the same hint, for the folder in it.
    write_image(dsb.parent / "stage1_test" / "id9" / "images" / "id9.png", (8, 8))
    assert "; in stage1_train/, each of its folders (id0/ ...) holds one image" in error_of(
        dsb.parent)
    voc = tmp_path / "VOC2012"
    write_image(voc / "JPEGImages" / "2007_000032.jpg", (8, 8))
    for folder in ("SegmentationClass", "SegmentationObject"):
        write_mask(voc / folder / "2007_000032.png", box_mask((8, 8)))
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    (voc / "Annotations" / "2007_000032.xml").write_text("<annotation/>")
    assert error_of(voc).endswith("it holds Pascal VOC's JPEGImages/ and SegmentationClass/: "
                                  "rename JPEGImages/ to images/ and SegmentationClass/ to "
                                  "masks/ (SegmentationObject/ numbers objects, not classes)")
    lgg = tmp_path / "lgg"
    write_image(lgg / "kaggle_3m" / "P1" / "P1_1.tif", (8, 8))
    write_mask(lgg / "kaggle_3m" / "P1" / "P1_1_mask.tif", box_mask((8, 8)))
    (lgg / "lgg-mri-segmentation" / "kaggle_3m").mkdir(parents=True)
    assert error_of(lgg).endswith(f"kaggle_3m/ in it holds a dataset: pass {lgg / 'kaggle_3m'}")


def test_a_dataset_one_folder_down_is_named_and_trimaps_beside_xmls_are_found(tmp_path):
    """Kvasir-SEG unzips into Kvasir-SEG/{images,masks}/: the error named the folder
    but not as the one to pass. The Oxford-IIIT Pet set keeps its masks in
    annotations/trimaps/, beside xmls/: renamed annotations/ to masks/, as the hint
    says, it found no masks."""
    own_dir(tmp_path / "Kvasir-SEG", n=2)
    assert error_of(tmp_path).endswith(
        f"Kvasir-SEG/ in it holds a dataset: pass {tmp_path / 'Kvasir-SEG'}")
    pet = tmp_path / "Kvasir-SEG"
    (pet / "masks").rename(pet / "trimaps")
    (pet / "masks" / "xmls").mkdir(parents=True)
    (pet / "masks" / "xmls" / "img0.xml").write_text("<annotation/>")
    (pet / "trimaps").rename(pet / "masks" / "trimaps")
    pairs = dp.find_pairs(pet)
    assert [p.mask.parent.name for p in pairs] == ["trimaps", "trimaps"]


@pytest.mark.parametrize("images, masks, pairs", [
    # ISIC 2018: ISIC_0000000.jpg and ISIC_0000000_segmentation.png.
    (["ISIC_0000000", "ISIC_0000001", "ISIC_0000010"],
     ["ISIC_0000000_segmentation", "ISIC_0000001_segmentation", "ISIC_0000010_segmentation"],
     3),
    # DRIVE: 21_training.tif and 21_manual1.gif.
    (["21_training", "22_training", "23_training"],
     ["21_manual1", "22_manual1", "23_manual1"], 3),
    # Names that pair as they are: no endings dropped, the odd one named.
    (["a_x", "b_x", "c_x"], ["a_x", "b_x", "c_y"], 2),
    # Endings that would pair too few: names as they are.
    (["a_x", "b_x", "c_x", "d_x"], ["a_m", "e_m", "f_m", "g_m"], 0),
    # A number in the ending tells the files apart: slice 05 is not slice 06.
    (["pA_slice_05", "pB_slice_05", "pC_slice_05"],
     ["pA_slice_06_seg", "pB_slice_06_seg", "pC_slice_06_seg"], 0),
])
def test_masks_are_paired_by_names_less_the_ending_all_of_them_share(tmp_path, caplog,
                                                                     images, masks, pairs):
    for folder, stems in (("images", images), ("masks", masks)):
        (tmp_path / folder).mkdir()
        for i, stem in enumerate(stems):
            write_image(tmp_path / folder / f"{stem}.png", (16, 16), seed=i)
    with caplog.at_level("WARNING"):
        found, _ = files.match_pairs(tmp_path)
    assert [(p.image.stem, p.mask.stem) for p in found] == [
        (image, mask) for image, mask in zip(images, masks)][:pairs]
    assert ("paired with images by their names less" in caplog.text) == (pairs == 3)
    if pairs == 0:
        assert len(found) == 0
    if pairs == 3:
        assert [p.car for p in found] == sorted(images)  # the split's groups: the images'
        assert f"({images[0]}.png with {masks[0]}.png); check" in caplog.text


@pytest.mark.parametrize("images, masks", [("imagesTr", "labelsTr"), ("images", "masks")])
def test_nnunet_raw_data_pairs_each_case_s_channel_file_with_its_label(tmp_path, images,
                                                                        masks):
    """nnU-Net's raw layout as its 2D datasets hold it: imagesTr/<case>_0000.png (one
    file per channel; an RGB PNG is channel 0 alone) beside labelsTr/<case>.png. It had
    been 'rename imagesTr/ to images/', after which no image found its mask. A case
    of several channel files (MRI modalities) is named, with the fix."""
    root = tmp_path / "Dataset120_Roads"
    for folder in (images, masks, "imagesTs"):
        (root / folder).mkdir(parents=True)
    for i, case in enumerate(["road_000", "road_001", "road_002"]):
        write_image(root / images / f"{case}_0000.png", (16, 16), seed=i)
        write_mask(root / masks / f"{case}.png", box_mask((16, 16), seed=i), value=1)
    write_image(root / "imagesTs" / "road_900_0000.png", (16, 16))
    found = dp.find_pairs(root)
    assert [(p.image.name, p.mask.name, p.car) for p in found] == [
        (f"road_00{i}_0000.png", f"road_00{i}.png", f"road_00{i}_0000") for i in range(3)]
    write_image(root / images / "road_001_0001.png", (16, 16))
    assert error_of(root) == (
        f"{root / images}: nnU-Net's files of one channel each (road_001_0000, "
        "road_001_0001: case 'road_001'); unet-jax reads one file per image, grayscale "
        "or RGB: merge each case's channels into one RGB file (PIL.Image.merge), or keep "
        "the _0000 files alone")
    # Numbered names that pair as they are stay as they are.
    shutil.rmtree(root)
    own = tmp_path / "own"
    for folder in ("images", "masks"):
        (own / folder).mkdir(parents=True)
        for i in range(3):
            write_image(own / folder / f"scan_{i:04d}.png", (16, 16), seed=i)
    assert [p.mask.name for p in dp.find_pairs(own)] == [f"scan_{i:04d}.png" for i in range(3)]


def test_an_ignore_index_that_is_a_binary_mask_s_foreground_is_refused(tmp_path, caplog):
    """0/255 masks with --ignore-index 255 left every object pixel out, and the run
    stopped after its first epoch blaming the masks ('every mask read as background').
    0/1 masks with a 255 void are what the setting is for; JPEG masks cannot keep it."""
    own = own_dir(tmp_path / "own", n=4)  # 0/255 masks
    assert error_of(own, ignore_index=255).endswith(
        "img0.png: 255 is its objects' own value, the foreground of a binary mask, and "
        "--ignore-index 255 would leave every object pixel out; drop --ignore-index, or "
        "give the pixels to leave out a value of their own")
    for i, mask in enumerate(sorted((own / "masks").iterdir())):
        ids = box_mask(seed=i)
        ids[:2] = 255  # a void band beside 0/1 objects
        Image.fromarray(ids).save(mask)
    assert len(dp.find_pairs(own, ignore_index=255)) == 4
    Image.open(own / "masks" / "img0.png").convert("L").save(own / "masks" / "img0.jpg")
    (own / "masks" / "img0.png").unlink()
    with caplog.at_level(logging.WARNING):
        dp.find_pairs(own, ignore_index=255)
    assert ("img0.jpg is a lossy (JPEG) mask: compression spreads its values, so "
            "--ignore-index 255 cannot pick its pixels out") in caplog.text


@pytest.mark.parametrize("values, found, fix", [
    ((0, 1, 2), "values 0, 1, 2", "pass --num-classes 3"),
    ((0, 127, 255), "values 0, 127, 255", "store class ids 0..C-1 and pass --num-classes C"),
    ("colours", "2 colours", "store class ids 0..C-1 and pass --num-classes C"),
    ((0, 255), None, None),  # binary
    ("red, anti-aliased", None, None),  # one colour at several brightnesses
    ("lanczos", None, None),  # a smooth resize's graded edges and ringing
    ("float", None, None),  # float levels (a soft edge): not class ids; it crashed
])
def test_masks_that_look_like_classes_to_a_binary_run_are_named(tmp_path, caplog, values,
                                                                found, fix):
    """milesial/Pytorch-UNet maps each mask value to a class: its users' masks of
    several values trained here as one object, without a word."""
    own_dir(tmp_path, n=4)
    for i, mask in enumerate(sorted((tmp_path / "masks").iterdir())):
        box = box_mask((W, H), seed=i)
        if values in ("red, anti-aliased", "lanczos"):
            big = Image.fromarray(np.kron(box, np.ones((4, 4))).astype(np.uint8) * 255)
            grey = np.asarray(big.rotate(17).resize((W, H), Image.Resampling.LANCZOS
                                                    if values == "lanczos" else
                                                    Image.Resampling.BOX))
            pixels = grey if values == "lanczos" else np.stack(
                [grey, np.zeros_like(grey), np.zeros_like(grey)], -1)
            Image.fromarray(pixels).save(mask)
            continue
        if values == "float":
            mask.unlink()
            pixels = box.astype(np.float32)
            pixels[: H // 4] = 0.5
            Image.fromarray(pixels, mode="F").save(mask.with_suffix(".tif"))
            continue
        if values == "colours":
            pixels = np.zeros((H, W, 3), np.uint8)
            pixels[box] = (255, 0, 0)
            pixels[: H // 4] = (0, 255, 0)
        else:
            pixels = np.where(box, values[-1], values[0]).astype(np.uint8)
            pixels[: H // 4] = values[1]
        Image.fromarray(pixels).save(mask)
    with caplog.at_level("WARNING"):
        assert len(dp.find_pairs(tmp_path)) == 4
    if found is None:
        assert "read as a binary mask" not in caplog.text
    else:
        assert (f"img0.png holds {found}: read as a binary mask, every non-zero pixel "
                f"foreground; if they are classes, {fix} (instance labels") in caplog.text
        assert caplog.text.count("read as a binary mask") == 1


def test_carvana_photos_in_images_keep_their_cars(tmp_path):
    """milesial/Pytorch-UNet's data/imgs of Carvana, renamed images/: each photo was
    its own group, the 16 views of a car on both sides of the split."""
    for car in ("00087a6bd4dc", "02159e548029"):
        for view in ("01", "02"):
            write_image(tmp_path / "images" / f"{car}_{view}.jpg", (16, 16))
            write_mask(tmp_path / "masks" / f"{car}_{view}_mask.gif",
                       box_mask((16, 16)))
    assert [p.car for p in dp.find_pairs(tmp_path)] == ["00087a6bd4dc"] * 2 + [
        "02159e548029"] * 2
    (tmp_path / "images" / "00087a6bd4dc_01.jpg").rename(tmp_path / "images" / "other.jpg")
    (tmp_path / "masks" / "00087a6bd4dc_01_mask.gif").rename(tmp_path / "masks" / "other.gif")
    assert [p.car for p in dp.find_pairs(tmp_path)][:2] == ["00087a6bd4dc_02",
                                                             "02159e548029_01"]


def test_a_lone_images_folder_is_not_called_one_folder_of_a_layout(tmp_path):
    """Without masks/ beside it, images/ is not one half of a layout to pass the
    parent of; the message says what it holds instead."""
    (tmp_path / "images" / "photos").mkdir(parents=True)
    assert error_of(tmp_path / "images").endswith("it holds photos/")


def test_empty_folders_are_named_as_empty(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    assert error_of(tmp_path).endswith(
        "no usable image/mask pairs in it (images/ and masks/ hold no image files)")


def test_images_in_sub_folders_are_named_not_dropped_without_a_word(tmp_path, caplog):
    """Files one level down (per-batch or per-patient folders) are not read: where they
    are all there is, the error names the folders; beside files that are read, a
    warning says how many folders were left out."""
    for batch in ("b1", "b2"):
        own_dir(tmp_path / "nested" / batch, n=1)
        for kind in ("images", "masks"):
            shutil.move(tmp_path / "nested" / batch / kind,
                        tmp_path / "nested" / kind / batch)
    assert error_of(tmp_path / "nested").endswith(
        "(images/ and masks/ hold no image files; sub-folders are not read: images/ has "
        "b1/, b2/; masks/ has b1/, b2/)")
    mixed = own_dir(tmp_path / "mixed", n=2)
    own_dir(tmp_path / "sub", n=1)
    shutil.move(tmp_path / "sub" / "images", mixed / "images" / "later")
    with caplog.at_level(logging.WARNING, logger="data_pipeline.files"):
        assert len(dp.find_pairs(mixed)) == 2
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning == (f"{mixed / 'images'}: the images in its sub-folders (later/) are "
                       "not read; move them into images/ itself to use them")
    with pytest.raises(dp.DataError, match=r"holds no images .*; sub-folders are not "
                       r"read: images/ has b1/, b2/$"):
        dp.find_images(tmp_path / "nested" / "images")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_pipeline.files"):
        assert len(dp.find_images(mixed / "images")) == 2
    assert "its sub-folders (later/) are not read; give each folder as --input" in (
        caplog.records[0].getMessage())


def test_a_link_to_a_file_that_is_gone_is_named(tmp_path):
    root = own_dir(tmp_path / "own", n=2)
    (root / "images" / "img1.png").unlink()
    (root / "images" / "img1.png").symlink_to(tmp_path / "moved" / "img1.png")
    assert error_of(root).startswith(f"{root / 'images' / 'img1.png'} is a link to "
                                     f"{tmp_path / 'moved' / 'img1.png'}, which does not exist")
    assert [p.image.name for p in dp.find_pairs(root, skip_bad=True)] == ["img0.png"]
    every = dp.find_images(root / "images")
    assert [p.name for p in dp.check_images(every, skip_bad=True)] == ["img0.png"]


def test_hidden_files_beside_the_images_are_not_images(tmp_path):
    """macOS writes ``._<name>`` beside every file it copies to a foreign disk: they
    end in .png or .jpg but hold no image."""
    root = own_dir(tmp_path / "own", n=2)
    (root / "images" / "._img0.png").write_bytes(b"\x00\x05\x16\x07")
    (root / "masks" / "._img0.png").write_bytes(b"\x00\x05\x16\x07")
    assert [p.image.name for p in dp.find_pairs(root)] == ["img0.png", "img1.png"]


def test_a_crop_is_checked_against_each_side_of_the_smallest_image(tmp_path):
    pairs = dp.find_pairs(own_dir(tmp_path / "own", n=2))  # W x H images
    dp.check_crop_fits(pairs, (H, W), 1.0)
    for crop in ((H + 8, 16), (16, W + 8)):  # too tall alone, too wide alone
        with pytest.raises(dp.DataError, match=rf"is {H}x{W} \(height x width\) at --scale "
                                               f"1.0, smaller than --crop {crop[0]} {crop[1]}"):
            dp.check_crop_fits(pairs, crop, 1.0)
    # The crop offered is one the U-Net takes: a multiple of 2**depth.
    with pytest.raises(dp.DataError, match=f"or lower --crop to at most {H} 16$"):
        dp.check_crop_fits(pairs, (H + 8, 16), 1.0, 16)
    with pytest.raises(dp.DataError, match=f"smaller than --crop {H + 8} 16; raise "
                                           r"--scale$"):  # no multiple of 64 fits
        dp.check_crop_fits(pairs, (H + 8, 16), 1.0, 64)


def test_a_split_finds_moved_images_in_another_nesting_by_a_name_they_alone_bear(tmp_path):
    """Data unzipped into another nesting (images/images/ by Windows' Extract All, then
    images/ after a clean unzip) was reported missing: only the path inside the
    recorded dataset was tried. A name one image alone bears finds it; names that
    several patients share are still matched by path alone."""
    first = tmp_path / "first"
    for stem in ("a", "b", "c"):
        write_image(first / "images" / "images" / f"{stem}.png")
        write_mask(first / "masks" / f"{stem}.png", box_mask())
    pairs = dp.find_pairs(first)
    dp.write_split(tmp_path / "split.json", pairs[:2], pairs[2:], first)
    flat = tmp_path / "flat"
    (flat / "images").mkdir(parents=True)
    shutil.move(first / "masks", flat / "masks")
    for image in (first / "images" / "images").iterdir():
        shutil.move(image, flat / "images" / image.name)
    train, val = dp.read_split(tmp_path / "split.json", flat)
    assert [p.image for p in train + val] == [flat / "images" / f"{s}.png" for s in "abc"]
    assert [p.mask for p in train + val] == [flat / "masks" / f"{s}.png" for s in "abc"]
    # Two patients' slice_1.png, moved into a new nesting: which is which is unknown.
    same = tmp_path / "same"
    for patient in ("P1", "P2"):
        write_image(same / patient / "slice_1.png")
        write_mask(same / patient / "slice_1_mask.png", box_mask())
    pairs = dp.find_pairs(same)
    dp.write_split(tmp_path / "split.json", pairs[:1], pairs[1:], same)
    deeper = tmp_path / "deeper" / "set"
    deeper.parent.mkdir()
    shutil.move(same, deeper)
    (deeper / "P1").rename(deeper / "Q1")
    with pytest.raises(dp.DataError, match=r"P1/slice_1.png \(or its mask\) is not found"):
        dp.read_split(tmp_path / "split.json", deeper)


def test_a_side_of_empty_masks_is_named(tmp_path, caplog):
    """BUSI's normal/ folder, a group held out whole, made a validation side of empty
    masks: Dice 1 at every epoch, and the best checkpoint picked among ties, without a
    word. The check stops at the first mask with foreground."""
    from tests.data_fixtures import write_mask

    root = own_dir(tmp_path / "own", n=4)
    pairs = dp.find_pairs(root)
    assert dp.warn_if_all_background(pairs, "validation") is False and not caplog.text
    for pair in pairs[:3]:
        write_mask(pair.mask, np.zeros((H, W), bool))
    assert dp.warn_if_all_background(pairs, "validation") is False  # the 4th has one
    with caplog.at_level(logging.WARNING):
        assert dp.warn_if_all_background(pairs[:3], "validation") is True
    assert "none of the 3 validation masks holds foreground: every validation Dice is 1" \
        in caplog.text
    with caplog.at_level(logging.WARNING):
        dp.warn_if_all_background(pairs[:3], "training")
    assert "none of the 3 training masks holds foreground: the model can learn " \
        "background alone" in caplog.text
    # Ignored pixels are no foreground.
    write_mask(pairs[3].mask, box_mask(seed=3))
    assert dp.warn_if_all_background(pairs[3:], "training", ignore_index=255) is True


def test_a_second_mask_of_one_image_is_named_as_such(tmp_path, caplog):
    """BUSI ships "benign (2)_mask_1.png", a second lesion of "benign (2)", beside its
    "_mask.png": it was called an image without a mask, and --skip-bad then trained
    "benign (2)" with that lesion as background."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    for cls in ("benign", "malignant"):
        for i in range(1, 4):
            write_image(root / cls / f"{cls} ({i}).png", (W, H), seed=i)
            write_mask(root / cls / f"{cls} ({i})_mask.png", box_mask(seed=i))
    write_mask(root / "benign" / "benign (2)_mask_1.png", box_mask(seed=9))
    with pytest.raises(dp.DataError, match=r"benign \(2\)\.png has several masks \(benign "
                       r"\(2\)_mask\.png, benign \(2\)_mask_1\.png\); merge them into its "
                       r"benign \(2\)_mask file"):
        dp.find_pairs(root)
    with caplog.at_level(logging.WARNING):
        pairs = dp.find_pairs(root, skip_bad=True)
    assert sorted(p.image.name for p in pairs) == [
        "benign (1).png", "benign (3).png", "malignant (1).png", "malignant (2).png",
        "malignant (3).png"]
    # predict on the folder segments the images alone, not the second mask.
    images = dp.find_images(root / "benign")
    assert [p.name for p in images] == ["benign (1).png", "benign (2).png", "benign (3).png"]
    # A lone "_mask_1" is a misnamed mask: renamed, not merged.
    (root / "benign" / "benign (2)_mask.png").unlink()
    with pytest.raises(dp.DataError, match=r"benign \(2\)\.png's mask is named benign "
                       r"\(2\)_mask_1\.png: rename it benign \(2\)_mask\.png"):
        dp.find_pairs(root)


def test_masks_saved_as_arrays_are_named_as_not_read(tmp_path):
    root = own_dir(tmp_path / "own", n=2)
    for mask in sorted((root / "masks").iterdir()):
        np.save(mask.with_suffix(".npy"), np.zeros((H, W), np.uint8))
        mask.unlink()
    assert "img0.npy is an array file, which is not read: save each mask as a PNG" \
        in error_of(root)


def test_kaggle_photos_with_the_masks_csv_alone_say_what_to_download(tmp_path):
    """train/ and train_masks.csv without train_masks/: 'matches no known layout' named
    neither; training reads the mask images, which train_masks.zip holds."""
    (tmp_path / "train").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "00087a6bd4dc_01.jpg")
    (tmp_path / "train_masks.csv").write_text("img,rle_mask\n00087a6bd4dc_01.jpg,1 1\n")
    with pytest.raises(dp.DataError, match=r"holds Kaggle's train_masks\.csv .* download "
                       r"train_masks\.zip and unzip it here"):
        dp.find_pairs(tmp_path)
