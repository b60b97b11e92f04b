"""The synthetic Carvana stand-in: Kaggle's layout, determinism, caching, and that it
is a segmentation problem a brightness threshold does not solve."""

import json
import os
import re
import time

import numpy as np
import pytest
from PIL import Image

from data_pipeline import sample_data as sd
from data_pipeline.errors import DataError

SMALL = dict(num_cars=3, size=(96, 64), seed=7)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return sd.sample_dataset_dir(tmp_path_factory.mktemp("small") / "set", **SMALL)


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """Six cars: enough to see that they differ."""
    return sd.sample_dataset_dir(tmp_path_factory.mktemp("six") / "set", num_cars=6,
                                 size=(96, 64), seed=11)


def car_ids(root):
    return sorted({p.name.split("_")[0] for p in (root / "train").iterdir()})


def load(root, car, angle):
    """(uint8 RGB image, bool mask) of one view."""
    image = np.asarray(Image.open(root / "train" / f"{car}_{angle:02d}.jpg"))
    mask = np.asarray(Image.open(root / "train_masks" / f"{car}_{angle:02d}_mask.gif")) == 1
    return image, mask


def bbox(mask):
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def all_files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- layout and formats -------------------------------------------------------------

def test_layout_is_kaggles(small):
    ids = car_ids(small)
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{12}", i) for i in ids)
    assert sorted(p.name for p in small.iterdir()) == ["metadata.json", "train", "train_masks"]
    images = sorted(p.name for p in (small / "train").iterdir())
    masks = sorted(p.name for p in (small / "train_masks").iterdir())
    assert images == [f"{c}_{a:02d}.jpg" for c in ids for a in range(1, 17)]
    assert masks == [f"{c}_{a:02d}_mask.gif" for c in ids for a in range(1, 17)]
    meta = json.loads((small / "metadata.json").read_text())
    assert meta["synthetic"] is True and meta["images"] == 48 and sorted(meta["cars"]) == ids
    assert meta["size"] == [96, 64] and meta["num_cars"] == 3 and meta["seed"] == 7


def test_images_are_rgb_jpegs_and_masks_palette_gifs_of_0_and_1(small):
    for image_path in sorted((small / "train").iterdir()):
        mask_path = small / "train_masks" / f"{image_path.stem}_mask.gif"
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (96, 64))
            assert (mask.format, mask.mode, mask.size) == ("GIF", "P", (96, 64))
            assert mask.getpalette()[:6] == [0, 0, 0, 255, 255, 255]  # 0 black, 1 white
            values = np.asarray(mask)
            assert set(np.unique(values)) == {0, 1}
            assert set(np.unique(np.asarray(mask.convert("L")))) == {0, 255}


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="num_cars"):
        sd.sample_dataset_dir(tmp_path / "a", num_cars=0)
    with pytest.raises(ValueError, match="16x16"):
        sd.sample_dataset_dir(tmp_path / "b", num_cars=1, size=(8, 8))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- determinism and the cache ------------------------------------------------------

def test_same_arguments_give_byte_identical_files(small, tmp_path):
    again = sd.generate(tmp_path / "again", **SMALL)
    assert all_files(again) == all_files(small)
    other = sd.generate(tmp_path / "other", **dict(SMALL, seed=8))
    assert not set(car_ids(other)) & set(car_ids(small))
    first = sorted((small / "train").iterdir())[4].read_bytes()
    assert all(first != p.read_bytes() for p in (other / "train").iterdir())


def test_a_complete_set_is_reused_not_regenerated(small, monkeypatch):
    stamps = {p: p.stat().st_mtime_ns for p in small.rglob("*")}

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete set")

    monkeypatch.setattr(sd, "generate", fail)
    assert sd.sample_dataset_dir(small, **SMALL) == small
    assert {p: p.stat().st_mtime_ns for p in small.rglob("*")} == stamps


def test_default_location_is_named_by_version_and_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("UNET_JAX_DATA", str(tmp_path))
    root = sd.sample_dataset_dir(num_cars=1, size=(48, 32), seed=2)
    assert root == tmp_path / f"sample-carvana-v{sd.VERSION}-1cars-48x32-seed2"
    assert len(list((root / "train").iterdir())) == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]  # no temporaries left


def test_without_unet_jax_data_the_set_goes_to_the_users_cache_folder(tmp_path,
                                                                        monkeypatch):
    """XDG_CACHE_HOME had been honoured by the compile cache but not by the sample
    set; a folder that cannot be written had ended in a traceback."""
    monkeypatch.delenv("UNET_JAX_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sd.default_root() == tmp_path / "xdg" / "unet-jax"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("UNET_JAX_DATA", str(tmp_path / "file"))
    with pytest.raises(DataError, match=r"^cannot write the sample dataset to .*file/"
                       r"sample-carvana.* \(set UNET_JAX_DATA to a writable folder"):
        sd.sample_dataset_dir(num_cars=1, size=(48, 32))


def test_a_set_made_with_other_arguments_is_replaced(tmp_path):
    root = sd.sample_dataset_dir(tmp_path / "set", num_cars=1, size=(48, 32))
    sd.sample_dataset_dir(root, num_cars=2, size=(48, 32))
    assert len(list((root / "train").iterdir())) == 32
    assert json.loads((root / "metadata.json").read_text())["num_cars"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


# --- interrupted generation ---------------------------------------------------------

def test_an_interrupted_generation_leaves_nothing_to_reuse(tmp_path, monkeypatch):
    render, calls = sd.render, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return render(*args)

    monkeypatch.setattr(sd, "render", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sd.sample_dataset_dir(tmp_path / "set", num_cars=2, size=(48, 32))
    assert list(tmp_path.iterdir()) == []  # neither the set nor its temporary
    monkeypatch.setattr(sd, "render", render)
    root = sd.sample_dataset_dir(tmp_path / "set", num_cars=2, size=(48, 32))
    assert len(list((root / "train").iterdir())) == 32
    assert len(list((root / "train_masks").iterdir())) == 32


def test_the_set_is_built_beside_its_folder_and_renamed_into_place(tmp_path, monkeypatch):
    render, building = sd.render, set()

    def watched(*args):
        assert not (tmp_path / "set").exists()  # nothing there until it is complete
        building.update((p.name, p.stat().st_ino) for p in tmp_path.glob(".set.tmp-*"))
        return render(*args)

    monkeypatch.setattr(sd, "render", watched)
    root = sd.sample_dataset_dir(tmp_path / "set", num_cars=1, size=(48, 32))
    assert len(building) == 1
    # The very folder it was built in, renamed in one step, not copied file by file.
    assert root.stat().st_ino == next(iter(building))[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_killed_runs_temporary_is_ignored_and_cleared_once_stale(tmp_path):
    leftover = tmp_path / ".set.tmp-killed"  # what a run killed mid-way leaves
    (leftover / "train").mkdir(parents=True)
    (leftover / "train" / "0123456789ab_01.jpg").write_bytes(b"half")
    root = sd.sample_dataset_dir(tmp_path / "set", num_cars=1, size=(48, 32))
    assert root == tmp_path / "set" and len(list((root / "train").iterdir())) == 16
    assert leftover.exists()  # it may belong to a run still going: left alone
    old = time.time() - 2 * 3600
    os.utime(leftover, (old, old))
    sd.generate(root, num_cars=1, size=(48, 32))
    assert not leftover.exists()


def test_a_directory_without_the_marker_is_never_reused_nor_deleted(tmp_path, small):
    half = tmp_path / "half"  # e.g. a set whose metadata.json is missing
    (half / "train").mkdir(parents=True)
    image = sorted((small / "train").iterdir())[0]
    (half / "train" / image.name).write_bytes(image.read_bytes())
    with pytest.raises(DataError, match="metadata.json"):
        sd.sample_dataset_dir(half, **SMALL)
    assert [p.name for p in (half / "train").iterdir()] == [image.name]
    empty = tmp_path / "empty"  # empty folders hold nothing to lose: filled
    (empty / "train").mkdir(parents=True)
    assert len(list((sd.sample_dataset_dir(empty, **SMALL) / "train").iterdir())) == 48


# --- what the pictures show ---------------------------------------------------------

def test_cars_differ_in_paint_shape_size_and_place(six):
    paints, areas, aspects, centres = [], [], [], []
    for car in car_ids(six):
        image, mask = load(six, car, 5)  # a side view
        top, bottom, left, right = bbox(mask)
        paints.append(np.median(image[mask], axis=0))
        areas.append(mask.mean())
        aspects.append((bottom - top) / (right - left))
        centres.append(np.argwhere(mask).mean(0))
    assert np.ptp(np.stack(paints), axis=0).max() > 60  # dark and light cars at least
    assert np.ptp(areas) > 0.04
    assert np.ptp(aspects) > 0.05  # taller and lower silhouettes
    assert np.ptp(np.stack(centres), axis=0).max() > 2  # not all in one place


def test_the_turntable_turns_the_car(six):
    for car in car_ids(six):
        views = {a: load(six, car, a)[1] for a in range(1, 17)}
        width = {a: bbox(m)[3] - bbox(m)[2] for a, m in views.items()}
        height = {a: bbox(m)[1] - bbox(m)[0] for a, m in views.items()}
        for end_on in (1, 9):  # front and back: narrower and, relatively, taller
            for side in (5, 13):
                assert width[end_on] < 0.75 * width[side]
                assert height[end_on] / width[end_on] > 1.3 * height[side] / width[side]
        for a in range(2, 9):  # NN and 18 - NN mirror each other
            assert abs(width[a] - width[18 - a]) <= 0.12 * width[a]
            assert abs(views[a].mean() - views[18 - a].mean()) <= 0.15 * views[a].mean()


def test_mask_is_the_cars_coverage_thresholded_at_one_half():
    """Drawn 3x larger, box-averaged and cut at 0.5, the mask is the same: it is
    neither grown nor shrunk by the antialiased border."""
    car = sd.random_car(np.random.default_rng([5, 0]))
    for angle in (1, 4, 5):
        _, mask = sd.render(car, angle, (96, 64), np.random.default_rng(0))
        _, large = sd.render(car, angle, (288, 192), np.random.default_rng(0))
        coverage = (np.asarray(large) == 1).reshape(64, 3, 96, 3).mean((1, 3))
        mask = np.asarray(mask) == 1
        sure = np.abs(coverage - 0.5) > 0.2  # pixels clearly in or out (but for a few
        assert np.sum(mask[sure] != (coverage[sure] > 0.5)) <= 3  # thin parts, undersampled)
        assert np.mean(mask != (coverage > 0.5)) < 0.01


def test_mask_covers_a_reasonable_share_of_each_image(six):
    shares = np.array([np.mean(np.asarray(Image.open(p)) == 1)
                       for p in sorted((six / "train_masks").iterdir())])
    assert shares.min() > 0.04 and shares.max() < 0.6
    assert 0.1 < shares.mean() < 0.45


def test_mask_is_aligned_with_the_cars_edges(six):
    """Image edges are strongest on the mask's outline, not one or two pixels off."""
    def edge_strength(shift):
        total = 0.0
        for car in car_ids(six):
            for angle in (1, 3, 5, 7, 9, 11, 13, 15):
                image, mask = load(six, car, angle)
                grey = image.astype(float).mean(-1)
                gradient = np.hypot(*np.gradient(grey))
                moved = np.roll(mask, shift, axis=(0, 1))
                outline = moved ^ np.roll(moved, 1, 0) | moved ^ np.roll(moved, 1, 1)
                total += gradient[outline].mean()
        return total

    aligned = edge_strength((0, 0))
    for shift in ((2, 0), (-2, 0), (0, 2), (0, -2)):
        assert aligned > 1.3 * edge_strength(shift)


def test_the_shadow_darkens_the_floor_but_is_not_in_the_mask(six):
    """In side views the floor seen under the body, between the wheels, is in shadow:
    darker than the floor beside the car at the same height, and outside the mask."""
    darker = []
    for car in car_ids(six):
        for angle in (5, 13):
            image, mask = load(six, car, angle)
            grey = image.astype(float).mean(-1)
            top, bottom, left, right = bbox(mask)
            rows = slice(bottom - 2, bottom)
            middle = slice(left + (right - left) // 3, right - (right - left) // 3)
            gap = ~mask[rows, middle]
            assert gap.mean() > 0.5  # the floor shows under the body
            aside = np.concatenate([grey[rows, : max(left - 3, 1)], grey[rows, right + 3:]], 1)
            darker.append(aside.mean() - grey[rows, middle][gap].mean())
    assert min(darker) > 15


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    """The set the tools use by default (24 cars, 240x160), in a temporary folder."""
    return sd.sample_dataset_dir(tmp_path_factory.mktemp("default") / "set")


def best_threshold_dice(values, truth):
    """The best Dice of ``values > t`` or ``values < t`` over all thresholds t, pooled
    over the whole set (one global threshold), from two histograms."""
    car = np.bincount(values[truth], minlength=256).astype(float)
    background = np.bincount(values[~truth], minlength=256).astype(float)
    above_car = car[::-1].cumsum()[::-1]  # pixels >= t
    above_bg = background[::-1].cumsum()[::-1]
    dice_above = 2 * above_car / (above_car + above_bg + car.sum())
    below_car, below_bg = car.sum() - above_car, background.sum() - above_bg  # pixels < t
    dice_below = 2 * below_car / (below_car + below_bg + car.sum())
    return max(dice_above.max(), dice_below.max())


def test_no_global_threshold_segments_the_default_set(default_set):
    images = sorted((default_set / "train").iterdir())
    assert len(images) == 24 * 16
    rgb = np.stack([np.asarray(Image.open(p)) for p in images])
    truth = np.stack([np.asarray(Image.open(default_set / "train_masks" / f"{p.stem}_mask.gif"))
                      for p in images]) == 1
    grey = np.stack([np.asarray(Image.open(p).convert("L")) for p in images])
    assert best_threshold_dice(grey, truth) < 0.87
    for channel in range(3):  # nor a threshold on one colour channel
        assert best_threshold_dice(rgb[..., channel], truth) < 0.87
    # The check itself works: a threshold does segment a set where it should.
    assert best_threshold_dice(np.where(truth, 40, 200).astype(np.uint8), truth) == 1.0
