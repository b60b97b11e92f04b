"""data_pipeline on files the tests make: layouts, errors, splits, the tf.data pipeline."""

import json

import numpy as np
import pytest
from PIL import Image

import data_pipeline as dp
from data_pipeline import sample_data

W, H = 48, 32


def write_pair(image_path, mask_path, value=1, size=(W, H), seed=0, palette=True):
    """An RGB JPEG/PNG image and a mask: a rectangle of ``value`` on 0."""
    rng = np.random.default_rng(seed)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(image_path)
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 2] = value
    if palette:  # Kaggle's GIFs: index 1 on the car; its colour here is dark on purpose
        gif = Image.fromarray(mask, mode="P")
        gif.putpalette([255, 255, 255, 3, 3, 3] + [0, 0, 0] * 254)
        gif.save(mask_path)
    else:
        Image.fromarray(mask).save(mask_path)
    return mask > 0


def kaggle_dir(root, cars=("aaa111", "bbb222", "ccc333", "ddd444", "eee555"), angles=4):
    for c, car in enumerate(cars):
        for a in range(1, angles + 1):
            write_pair(root / "train" / f"{car}_{a:02d}.jpg",
                       root / "train_masks" / f"{car}_{a:02d}_mask.gif", seed=c * 100 + a)
    return root


@pytest.fixture
def kaggle(tmp_path):
    return kaggle_dir(tmp_path / "carvana")


# --- discovery and checks -------------------------------------------------------------

def test_kaggle_layout_pairs_by_name_and_keeps_car_ids(kaggle):
    pairs = dp.find_pairs(kaggle)
    assert len(pairs) == 20
    assert all(p.mask.name == p.image.stem + "_mask.gif" for p in pairs)
    assert {p.group for p in pairs} == {"aaa111", "bbb222", "ccc333", "ddd444", "eee555"}


def test_train_hq_and_png_masks_are_accepted(tmp_path):
    write_pair(tmp_path / "train_hq" / "car1_01.jpg", tmp_path / "train_masks" / "car1_01_mask.png",
               palette=False)
    pairs = dp.find_pairs(tmp_path)
    assert len(pairs) == 1 and pairs[0].group == "car1"


def test_palette_gif_is_read_as_indices_not_colours(kaggle):
    pair = dp.find_pairs(kaggle)[0]
    _, mask = dp.load_example(pair, (H, W))
    expected = np.asarray(Image.open(pair.mask)) > 0
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    np.testing.assert_array_equal(mask[..., 0], expected)


def test_own_folders_match_by_stem_in_any_format(tmp_path):
    root = tmp_path / "own"
    write_pair(root / "images" / "a.png", root / "masks" / "a.png", value=255, palette=False)
    write_pair(root / "images" / "b.bmp", root / "masks" / "b_mask.png", value=255, palette=False)
    write_pair(root / "images" / "c.tif", root / "masks" / "c.tiff", value=255, palette=False)
    (root / "images" / "d.png").parent.mkdir(exist_ok=True)
    Image.fromarray(np.full((H, W), 90, np.uint8)).save(root / "images" / "d.png")  # grayscale
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "masks" / "d.png")
    pairs = dp.find_pairs(root)
    assert [p.image.name for p in pairs] == ["a.png", "b.bmp", "c.tif", "d.png"]
    image, mask = dp.load_example(pairs[3], (H, W), in_channels=3)
    assert image.shape == (H, W, 3) and np.all(image == 90)
    image, mask = dp.load_example(pairs[2], (H, W), in_channels=1)
    assert image.shape == (H, W, 1) and set(np.unique(mask)) == {0, 1}


def one_error(tmp_path, capsys=None, **kw):
    with pytest.raises(dp.DataError) as e:
        dp.find_pairs(tmp_path, **kw)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_mask_is_named(kaggle):
    (kaggle / "train_masks" / "bbb222_02_mask.gif").unlink()
    message = one_error(kaggle)
    assert "bbb222_02.jpg has no mask" in message and "--skip-bad" in message


def test_extra_mask_is_named(kaggle):
    write_pair(kaggle / "spare.jpg", kaggle / "train_masks" / "zzz999_01_mask.gif")
    assert "zzz999_01_mask.gif has no image" in one_error(kaggle)


def test_truncated_jpeg_is_named(kaggle):
    path = kaggle / "train" / "ccc333_03.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = one_error(kaggle)
    assert "ccc333_03.jpg" in message and "truncated" in message


def test_unreadable_file_is_named(kaggle):
    (kaggle / "train_masks" / "aaa111_01_mask.gif").write_bytes(b"not an image at all")
    message = one_error(kaggle)
    assert "aaa111_01_mask.gif" in message and "cannot be read" in message


def test_size_mismatch_is_named(kaggle):
    write_pair(kaggle / "train" / "eee555_04.jpg", kaggle / "train_masks" / "eee555_04_mask.gif",
               size=(W, H))
    write_pair(kaggle / "x.jpg", kaggle / "train_masks" / "eee555_04_mask.gif", size=(W + 2, H))
    message = one_error(kaggle)
    assert "eee555_04_mask.gif is 50x32" in message and "48x32" in message


def test_unknown_layout_and_missing_dir(tmp_path):
    assert "expected Kaggle's layout" in one_error(tmp_path)
    with pytest.raises(dp.DataError, match="no such directory"):
        dp.find_pairs(tmp_path / "nope")


def test_skip_bad_drops_bad_pairs_and_lists_them(kaggle, capsys):
    (kaggle / "train_masks" / "bbb222_02_mask.gif").unlink()
    (kaggle / "train" / "ccc333_01.jpg").write_bytes(b"\xff\xd8broken")
    pairs = dp.find_pairs(kaggle, skip_bad=True)
    assert len(pairs) == 18
    err = capsys.readouterr().err
    assert "skipping 2" in err and "bbb222_02.jpg" in err and "ccc333_01.jpg" in err


# --- splits ---------------------------------------------------------------------------

def synthetic_pairs(cars=20, angles=16):
    from pathlib import Path
    return [dp.Pair(Path(f"train/c{c:02d}_{a:02d}.jpg"), Path(f"m/c{c:02d}_{a:02d}_mask.gif"), f"c{c:02d}")
            for c in range(cars) for a in range(1, angles + 1)]


def test_car_split_is_disjoint_seeded_and_80_20():
    pairs = synthetic_pairs()
    train, val = dp.split_pairs(pairs, seed=42)
    assert not {p.group for p in train} & {p.group for p in val}
    assert len({p.group for p in val}) == 4 and len(train) + len(val) == len(pairs)
    assert dp.split_pairs(pairs, seed=42) == (train, val)
    assert dp.split_pairs(pairs, seed=7)[1] != val


def test_random_split_is_per_image():
    pairs = synthetic_pairs()
    train, val = dp.split_pairs(pairs, method="random", seed=42)
    assert len(val) == round(0.2 * len(pairs))
    assert {p.group for p in train} & {p.group for p in val}  # cars on both sides


def test_subset_is_taken_by_car():
    train, val = dp.split_pairs(synthetic_pairs(), subset=0.5)
    groups = {p.group for p in train + val}
    assert len(groups) == 10 and len(train + val) == 160


def test_split_needs_two_cars():
    with pytest.raises(dp.DataError, match="at least 2 cars"):
        dp.split_pairs(synthetic_pairs(cars=1))


def test_split_json_round_trip(kaggle, tmp_path):
    train, val = dp.split_pairs(dp.find_pairs(kaggle))
    dp.write_split(tmp_path / "split.json", train, val)
    record = json.loads((tmp_path / "split.json").read_text())
    assert set(record) == {"train", "validation"}
    assert record["train"] == [str(p.image) for p in train]
    assert record["validation"] == [str(p.image) for p in val]
    assert dp.read_split(tmp_path / "split.json") == (train, val)
    val[0].image.unlink()
    with pytest.raises(dp.DataError, match=val[0].image.name):
        dp.read_split(tmp_path / "split.json")


# --- the tf.data pipeline -------------------------------------------------------------

def batches(pipeline, epoch):
    return list(pipeline.epoch(epoch))


def test_batches_follow_the_conventions(kaggle):
    pipeline = dp.InputPipeline(dp.find_pairs(kaggle), image_size=(16, 32), batch_size=6, train=True)
    out = batches(pipeline, 1)
    assert len(out) == len(pipeline) == 3  # 20 images, drop_remainder
    b = out[0]
    assert b["image"].shape == (6, 16, 32, 3) and b["image"].dtype == np.float32
    assert b["mask"].shape == (6, 16, 32, 1) and set(np.unique(b["mask"])) <= {0.0, 1.0}
    assert 0 <= b["image"].min() and b["image"].max() <= 1


def test_same_seed_same_batches_even_in_a_new_pipeline(kaggle):
    pairs = dp.find_pairs(kaggle)
    make = lambda seed: dp.InputPipeline(pairs, image_size=(16, 32), batch_size=4, train=True,
                                         seed=seed, augment=True)
    a, b = make(1), make(1)
    for x, y in zip(batches(a, 3), batches(b, 3)):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])
    assert not np.array_equal(batches(a, 3)[0]["image"], batches(a, 4)[0]["image"])
    assert not np.array_equal(batches(a, 3)[0]["image"], batches(make(2), 3)[0]["image"])


def test_every_training_image_appears_once_per_epoch(kaggle):
    pairs = dp.find_pairs(kaggle)
    pipeline = dp.InputPipeline(pairs, image_size=(16, 32), batch_size=5, train=True, seed=3)
    order = pipeline.order(1)
    assert sorted(order.tolist()) == list(range(20))
    assert pipeline.order(1).tolist() == order.tolist() != pipeline.order(2).tolist()


@pytest.mark.parametrize("cache", [None, "memory", "file"])
def test_cache_modes_give_the_same_batches(kaggle, tmp_path, cache):
    pairs = dp.find_pairs(kaggle)
    cache_arg = str(tmp_path / "cache" / "c") if cache == "file" else cache
    ref = dp.InputPipeline(pairs, image_size=(16, 32), batch_size=4, train=True, cache=None)
    pipe = dp.InputPipeline(pairs, image_size=(16, 32), batch_size=4, train=True, cache=cache_arg)
    for epoch in (1, 2):
        for x, y in zip(batches(ref, epoch), batches(pipe, epoch)):
            np.testing.assert_array_equal(x["image"], y["image"])
    if cache == "file":
        assert list((tmp_path / "cache").glob("*.complete"))
        again = dp.InputPipeline(pairs, image_size=(16, 32), batch_size=4, train=True, cache=cache_arg)
        np.testing.assert_array_equal(batches(again, 1)[0]["image"], batches(ref, 1)[0]["image"])


def test_eval_keeps_order_and_pads_the_last_batch(kaggle):
    pairs = dp.find_pairs(kaggle)
    pipeline = dp.InputPipeline(pairs, image_size=(16, 32), batch_size=8, train=False)
    out = batches(pipeline, 0)
    assert len(out) == len(pipeline) == 3
    assert [int(b["valid"].sum()) for b in out] == [8, 8, 4]
    first, _ = dp.load_example(pairs[0], (16, 32))
    np.testing.assert_allclose(out[0]["image"][0], first / 255.0, atol=1e-6)


def test_resized_masks_stay_binary(tmp_path):
    write_pair(tmp_path / "train" / "car_01.jpg", tmp_path / "train_masks" / "car_01_mask.gif",
               size=(97, 61))
    _, mask = dp.load_example(dp.find_pairs(tmp_path)[0], (16, 32))
    assert set(np.unique(mask)) == {0, 1}


def test_augmentation_moves_image_and_mask_together(tmp_path):
    """The image is its own mask (white where the mask is 1): after augmentation the
    mask must still be where the bright pixels are."""
    root = tmp_path / "own"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        mask = np.zeros((32, 48), np.uint8)
        y, x = rng.integers(4, 16), rng.integers(4, 28)
        mask[y:y + 12, x:x + 16] = 1
        Image.fromarray(np.repeat(mask[..., None] * 255, 3, -1)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"{i}.png")
    pairs = dp.find_pairs(root)
    plain = dp.InputPipeline(pairs, image_size=(32, 48), batch_size=8, train=True, seed=0)
    aug = dp.InputPipeline(pairs, image_size=(32, 48), batch_size=8, train=True, seed=0, augment=True)
    a, p = batches(aug, 1)[0], batches(plain, 1)[0]
    assert not np.array_equal(a["mask"], p["mask"])  # something moved
    assert set(np.unique(a["mask"])) <= {0.0, 1.0}
    # brightness/contrast change the values but not which side of mid-grey a pixel is on
    agree = ((a["image"].mean(-1, keepdims=True) > 0.5) == (a["mask"] > 0.5)).mean()
    assert agree > 0.98


def test_shards_split_the_files_and_stay_in_step(kaggle):
    pairs = dp.find_pairs(kaggle)[:19]
    for train in (True, False):
        shards = [dp.InputPipeline(pairs, image_size=(16, 32), batch_size=2, train=train,
                                   seed=5, shard=(i, 2)) for i in range(2)]
        files = [{p.image for p in s.pairs} for s in shards]
        assert not files[0] & files[1] and len(files[0] | files[1]) == 19
        assert len(shards[0]) == len(shards[1]) == (4 if train else 5)
        assert [len(batches(s, 1)) for s in shards] == [len(shards[0])] * 2


# --- the sample dataset ---------------------------------------------------------------

@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return dp.sample_dataset_dir(tmp_path_factory.mktemp("s") / "sample", num_cars=3,
                                 size=(96, 64), seed=1)


def test_sample_dataset_is_in_kaggles_layout(sample):
    images = sorted((sample / "train").iterdir())
    masks = sorted((sample / "train_masks").iterdir())
    assert len(images) == len(masks) == 3 * 16
    assert {p.name.split("_")[1] for p in images} == {f"{a:02d}.jpg" for a in range(1, 17)}
    gif = Image.open(masks[0])
    assert gif.format == "GIF" and gif.mode == "P"
    values = np.asarray(gif)
    assert set(np.unique(values)) == {0, 1}
    assert 0.05 < values.mean() < 0.6
    assert len(dp.find_pairs(sample)) == 48


def test_sample_dataset_is_deterministic_and_reused(sample, tmp_path):
    other = dp.sample_dataset_dir(tmp_path / "again", num_cars=3, size=(96, 64), seed=1)
    for a, b in zip(sorted((sample / "train").iterdir()), sorted((other / "train").iterdir())):
        assert a.read_bytes() == b.read_bytes()
    stamp = (sample / "metadata.json").stat().st_mtime_ns
    assert dp.sample_dataset_dir(sample, num_cars=3, size=(96, 64), seed=1) == sample
    assert (sample / "metadata.json").stat().st_mtime_ns == stamp


def test_interrupted_generation_is_not_reused(tmp_path):
    half = tmp_path / "half"
    (half / "train").mkdir(parents=True)  # no metadata.json: an interrupted attempt
    root = dp.sample_dataset_dir(half, num_cars=2, size=(48, 32))
    assert len(list((root / "train").iterdir())) == 32


def test_cars_differ_and_no_threshold_segments_them(sample):
    pairs = dp.find_pairs(sample)
    images, masks = zip(*(dp.load_example(p, (64, 96)) for p in pairs))
    gray = np.stack(images).mean(-1)
    truth = np.stack(masks)[..., 0] > 0
    areas = truth.reshape(len(truth), -1).mean(1)
    assert areas.std() > 0.02  # different sizes and angles
    colours = [img[m[..., 0] > 0].mean(0) for img, m in zip(images[::16], masks[::16])]
    assert np.ptp(np.stack(colours), axis=0).max() > 20

    def dice(pred):
        return 2 * (pred & truth).sum() / (pred.sum() + truth.sum())

    best = max(max(dice(gray < t), dice(gray > t)) for t in range(5, 255, 5))
    assert best < 0.9
