"""data_pipeline.input_pipeline: batches, determinism, cache, padding, augmentation, shards."""

import os

import numpy as np
import pytest
from PIL import Image

import data_pipeline as dp
from tests.data_fixtures import H, W, box_mask, kaggle_dir, mirror_dir, write_image, write_mask

SIZE = (16, 24)  # (h, w) the tests' model sees: half of the files' 32x48


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    """20 pairs (5 cars x 4 angles), shared read-only by the tests of this module."""
    return dp.find_pairs(kaggle_dir(tmp_path_factory.mktemp("k") / "carvana"))


@pytest.fixture
def own_copy(tmp_path):
    """8 pairs a test may damage."""
    return dp.find_pairs(kaggle_dir(tmp_path / "c", cars=("p", "q"), angles=4))


def pipe(pairs, **kw):
    kw = {"image_size": SIZE, "batch_size": 4, "train": True, **kw}
    return dp.InputPipeline(pairs, **kw)


def stack(pipeline, epoch=0, key="image"):
    return np.concatenate([b[key] for b in pipeline.epoch(epoch)])


def test_train_batches_follow_the_conventions(kaggle):
    pipeline = pipe(kaggle, batch_size=6)
    batches = list(pipeline.epoch(0))
    assert len(batches) == len(pipeline) == 3  # 20 images: the partial batch is dropped
    for b in batches:
        assert set(b) == {"image", "mask"}
        assert b["image"].shape == (6, *SIZE, 3) and b["image"].dtype == np.float32
        assert b["mask"].shape == (6, *SIZE, 1) and b["mask"].dtype == np.float32
        assert 0 <= b["image"].min() and b["image"].max() <= 1 and b["image"].max() > 0.5
        assert set(np.unique(b["mask"])) == {0.0, 1.0}


def test_palette_masks_arrive_as_indices(kaggle):
    pipeline = pipe(kaggle, image_size=(H, W), batch_size=5, train=False)
    masks = stack(pipeline, key="mask")[:20, ..., 0]
    expected = [box_mask(seed=100 * c + a) for c in range(5) for a in range(1, 5)]
    np.testing.assert_array_equal(masks, np.stack(expected).astype(np.float32))


@pytest.mark.parametrize("resize", ["bilinear", "area"])
def test_masks_stay_binary_when_resized(tmp_path, resize):
    write_image(tmp_path / "images" / "x.png", size=(97, 61))
    mask = np.zeros((61, 97), bool)
    mask[5:50, 13:90] = True
    write_mask(tmp_path / "masks" / "x.png", mask)
    pairs = dp.find_pairs(tmp_path)
    image, small = dp.load_example(pairs[0], (17, 29), resize=resize)
    assert set(np.unique(small)) == {0, 1} and image.shape == (17, 29, 3)
    # nearest: every output pixel copies an input pixel, so the box keeps its place
    assert small[..., 0].mean() == pytest.approx(mask.mean(), abs=0.1)


def test_area_and_bilinear_are_different_filters(kaggle):
    a = dp.load_image(kaggle[0].image, (5, 7), resize="area")
    b = dp.load_image(kaggle[0].image, (5, 7), resize="bilinear")
    assert a.shape == b.shape == (5, 7, 3) and not np.array_equal(a, b)


def test_grayscale_files_give_three_equal_channels(tmp_path):
    for i in range(4):
        write_image(tmp_path / "images" / f"g{i}.png", mode="L", seed=i)
        write_mask(tmp_path / "masks" / f"g{i}.png", box_mask(seed=i))
    pairs = dp.find_pairs(tmp_path)
    image = stack(pipe(pairs, batch_size=2, train=False))
    assert image.shape == (4, *SIZE, 3)
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])
    one = stack(pipe(pairs, batch_size=2, train=False, in_channels=1))
    assert one.shape == (4, *SIZE, 1)
    np.testing.assert_allclose(one[..., 0], image[..., 0], atol=1 / 255 + 1e-6)


def test_tf_is_started_with_its_gpus_hidden_and_quiet(monkeypatch):
    from data_pipeline import tf_setup

    tf = tf_setup.tensorflow()
    calls = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda *a: calls.append(a))
    monkeypatch.setattr(tf_setup, "_tf", None)
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    assert tf_setup.tensorflow() is tf and calls == [([], "GPU")]
    assert tf_setup.os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
    monkeypatch.setattr(tf_setup, "_tf", None)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the user's choice stays
    tf_setup.tensorflow()
    assert tf_setup.os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


# --- determinism ------------------------------------------------------------------------

def test_same_seed_and_epoch_give_the_same_batches_in_a_fresh_pipeline(kaggle):
    a = pipe(kaggle, seed=1, augment=True)
    b = pipe(kaggle, seed=1, augment=True)  # as a resumed run in a new process builds it
    for x, y in zip(a.epoch(3), b.epoch(3), strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])


def test_epochs_and_seeds_change_the_order(kaggle):
    p = pipe(kaggle, seed=1)
    orders = [p.order(e).tolist() for e in range(3)]
    assert all(sorted(o) == list(range(20)) for o in orders)  # each image once
    assert orders[0] != orders[1] != orders[2]
    assert pipe(kaggle, seed=2).order(0).tolist() != orders[0]
    assert p.order(1).tolist() == orders[1]
    # the batches follow the order: batch images are the ordered examples
    plain = pipe(kaggle, train=False, batch_size=20)
    everything = next(plain.epoch())["image"]
    np.testing.assert_array_equal(stack(p, 1), everything[orders[1]])


def test_the_remainder_dropped_differs_per_epoch(kaggle):
    p = pipe(kaggle, batch_size=6)
    assert {len(p.order(e)) for e in range(4)} == {18}
    assert len({frozenset(p.order(e).tolist()) for e in range(4)}) > 1


# --- the cache ----------------------------------------------------------------------

@pytest.mark.parametrize("no_cache", [None, "none"])  # "none": as Config and --cache say it
def test_later_epochs_read_the_memory_cache_not_the_files(own_copy, no_cache, tmp_path,
                                                          monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    cached = pipe(own_copy, cache="memory")
    uncached = pipe(own_copy, cache=no_cache)
    first = stack(cached, 0)
    np.testing.assert_array_equal(first, stack(uncached, 0))
    assert not list((tmp_path / "cwd").iterdir())  # no file cache, "none-*.npy" or other
    for p in own_copy:
        p.image.write_bytes(b"gone")
    np.testing.assert_array_equal(np.sort(stack(cached, 1), 0), np.sort(first, 0))
    with pytest.raises(dp.DataError, match=r"\.jpg cannot be decoded"):
        stack(uncached, 1)


def test_file_cache_serves_a_new_pipeline_after_the_files_change(own_copy, tmp_path):
    prefix = str(tmp_path / "cache" / "train")
    first = stack(pipe(own_copy, cache=prefix), 0)
    assert len(list((tmp_path / "cache").glob("train-*.images.npy"))) == 1
    np.testing.assert_array_equal(stack(pipe(own_copy, cache=prefix), 0), first)  # reused
    write_image(own_copy[0].image, seed=99)  # an edited file makes a new cache
    again = stack(pipe(own_copy, cache=prefix), 0)
    assert len(list((tmp_path / "cache").glob("train-*.images.npy"))) == 2
    assert not np.array_equal(again, first)
    # An edit that keeps the file's size (a mask redrawn in place, say) shows in its
    # date alone.
    stat = own_copy[1].mask.stat()
    os.utime(own_copy[1].mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    stack(pipe(own_copy, cache=prefix), 0)
    assert len(list((tmp_path / "cache").glob("train-*.images.npy"))) == 3


def test_a_cache_that_cannot_fit_is_named_before_any_epoch(own_copy, tmp_path,
                                                           monkeypatch):
    """A memory cache past the machine's memory had failed inside a tf.data worker
    (or been killed as its lazily mapped pages filled); a prefix in a read-only or
    full folder, with TensorFlow's traceback an epoch later."""
    sides = [pipe(own_copy[:6]), pipe(own_copy[6:], train=False)]
    dp.check_caches(sides)  # 8 small images: fit
    need = sum(p.cache_bytes() for p in sides)
    assert need == 8 * 16 * 24 * 4 + 8  # RGB and mask bytes at SIZE, and a ready flag each
    page = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(os, "sysconf", lambda name: page if name == "SC_PAGE_SIZE"
                        else need // page)  # the two sides need all of it
    with pytest.raises(dp.DataError, match=r"^--cache memory would keep 0\.0 MB of decoded "
                       r"images in the 0\.0 MB of memory this process may use; pass --cache disk"):
        dp.check_caches(sides)
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(dp.DataError, match=r"--cache .*file/c: cannot write in .*file "):
        dp.check_caches([pipe(own_copy, cache=str(tmp_path / "file" / "c"))])
    prefix = str(tmp_path / "cache" / "c")
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(dp.DataError, match=r"needs 0\.0 MB for the decoded images and "
                       r".*cache has 0\.0 MB free"):
        dp.check_caches([pipe(own_copy, cache=prefix)])
    monkeypatch.undo()
    stack(pipe(own_copy, cache=prefix))  # written: a later run needs no space for it
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    dp.check_caches([pipe(own_copy, cache=prefix)])


def test_one_run_at_a_time_opens_a_shared_file_cache(own_copy, tmp_path):
    """Two runs on one --cache disk: the second waits while the first makes the files,
    instead of taking them for a broken cache and truncating them under it."""
    import fcntl
    import threading

    prefix = str(tmp_path / "cache" / "train")
    pipeline = pipe(own_copy, cache=prefix)
    base = pipeline._cache_base()
    (tmp_path / "cache").mkdir()
    with open(f"{base}.lock", "w") as held:  # another run, making the files
        fcntl.flock(held, fcntl.LOCK_EX)
        opened = threading.Thread(target=pipeline._open_store)
        opened.start()
        opened.join(0.5)
        assert opened.is_alive()  # it waits
    opened.join(30)
    assert not opened.is_alive()
    assert len(list((tmp_path / "cache").glob("train-*.images.npy"))) == 1


def test_fill_decodes_everything_up_front(own_copy):
    p = pipe(own_copy, batch_size=3)  # 8 images: 2 batches a epoch, 2 never read
    p.fill()
    for pair in own_copy:
        pair.image.write_bytes(b"gone")
    assert sum(len(b["image"]) for e in range(3) for b in p.epoch(e)) == 18


def test_a_file_broken_after_checking_names_itself(own_copy):
    own_copy[5].image.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(dp.DataError, match=own_copy[5].image.name):
        stack(pipe(own_copy), 0)


# --- evaluation -------------------------------------------------------------------------

def test_eval_keeps_order_and_pads_with_invalid_zeros(kaggle):
    p = pipe(kaggle, batch_size=8, train=False, augment=True)  # no augmentation in eval
    batches = list(p.epoch())
    assert len(batches) == len(p) == 3
    assert [b["valid"].tolist() for b in batches][2] == [True] * 4 + [False] * 4
    assert all(b["image"].shape == (8, *SIZE, 3) for b in batches)
    last = batches[2]
    assert not last["image"][4:].any() and not last["mask"][4:].any()
    image = np.concatenate([b["image"] for b in batches])[:20]
    expected = np.stack([dp.load_example(q, SIZE)[0] for q in kaggle]) / 255.0
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert next(p.epoch(5))["image"].tobytes() == batches[0]["image"].tobytes()


# --- augmentation -----------------------------------------------------------------------

def test_augmentation_moves_image_and_mask_together(tmp_path):
    """Each image shows its own mask in white: after augmentation the mask must still be
    where the image is bright, but for pixels on the box's edge (interpolation)."""
    pairs = dp.find_pairs(mirror_dir(tmp_path, n=8))
    plain = stack(pipe(pairs, image_size=(H, W), batch_size=8, seed=0), 1, "mask")
    aug = pipe(pairs, image_size=(H, W), batch_size=8, seed=0, augment=True)
    batch = next(aug.epoch(1))
    image, mask = batch["image"].mean(-1), batch["mask"][..., 0]
    assert set(np.unique(mask)) == {0.0, 1.0}
    changed = [not np.array_equal(a, b) for a, b in zip(mask, plain[..., 0])]
    assert sum(changed) >= 6  # nearly every example moved
    disagree = (image > 0.5) != (mask > 0.5)
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)), mode="edge")
    neighbours = [padded[:, 1 + dy: 1 + dy + H, 1 + dx: 1 + dx + W]
                  for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    edge = np.max(neighbours, 0) != np.min(neighbours, 0)
    assert not (disagree & ~edge).any()
    assert disagree.mean() < 0.02
    # Away from edges a plain image is exactly 0 or 1; brightness/contrast jitter moves
    # those values (clipping keeps some images at 0 and 1).
    jittered = [not np.isin(image[i][~edge[i]], (0.0, 1.0)).all() for i in range(8)]
    assert sum(jittered) >= 3


def test_each_example_gets_its_own_augmentation(kaggle):
    same = [kaggle[0]] * 8  # one file eight times: only the augmentation can differ
    batch = next(pipe(same, batch_size=8, augment=True).epoch(0))
    distinct = {batch["image"][i].tobytes() for i in range(8)}
    assert len(distinct) == 8
    flipped = [np.array_equal(m, batch["mask"][0]) or np.array_equal(m, batch["mask"][0, :, ::-1])
               for m in batch["mask"]]
    assert not all(flipped)  # shifts and scales differ too, not only flips


def test_augmentation_is_random_but_reproducible(kaggle):
    a, b = pipe(kaggle, seed=4, augment=True), pipe(kaggle, seed=4)
    np.testing.assert_array_equal(stack(a, 2), stack(pipe(kaggle, seed=4, augment=True), 2))
    assert not np.array_equal(stack(a, 2), stack(b, 2))


# --- shards ---------------------------------------------------------------------------

def test_shards_read_disjoint_shares_of_each_global_batch(kaggle):
    pairs = kaggle[:19]
    single = pipe(pairs, batch_size=4, seed=5, augment=True)
    shards = [pipe(pairs, batch_size=2, seed=5, augment=True, shard=(i, 2)) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single) == 4
    for epoch in (0, 1):
        orders = [s.order(epoch) for s in shards]
        assert not set(orders[0]) & set(orders[1])
        assert sorted([*orders[0], *orders[1]]) == sorted(single.order(epoch))
        # the two processes' batch k hold exactly the examples of the global batch k,
        # augmented identically (the augmentation follows the example, not the process)
        for glob, *parts in zip(single.epoch(epoch), *(s.epoch(epoch) for s in shards),
                                strict=True):
            mine = np.concatenate([p["image"] for p in parts])
            key = lambda x: x.reshape(len(x), -1).sum(1)  # noqa: E731
            np.testing.assert_allclose(np.sort(key(mine)), np.sort(key(glob["image"])), rtol=1e-5)


def test_eval_shards_cover_every_file_once_in_the_same_number_of_batches(kaggle):
    pairs = kaggle[:19]
    shards = [pipe(pairs, batch_size=4, train=False, shard=(i, 3)) for i in range(3)]
    assert {len(s) for s in shards} == {2}
    orders = [s.order() for s in shards]
    assert sorted(np.concatenate(orders).tolist()) == list(range(19))
    valid = [np.concatenate([b["valid"] for b in s.epoch()]) for s in shards]
    assert [int(v.sum()) for v in valid] == [7, 6, 6] and all(len(v) == 8 for v in valid)


def test_a_batch_larger_than_the_data_is_an_error(kaggle):
    with pytest.raises(dp.DataError, match="no full batch"):
        pipe(kaggle, batch_size=16, shard=(0, 2))


# --- throughput ---------------------------------------------------------------------

def test_measure_throughput_reports_cold_and_cached_rates(kaggle):
    from experiments.throughput import measure_throughput

    result = measure_throughput(kaggle, SIZE, 4, cache="memory", batches=3, warmup=1)
    assert result["cold_img_per_s"] > 0 and result["cached_img_per_s"] > 0
    assert result["img_per_s"] == result["cached_img_per_s"] and result["batches"] == 3
    cold = measure_throughput(kaggle, SIZE, 4, cache=None, batches=2, warmup=1)
    assert cold["cached_img_per_s"] is None and cold["img_per_s"] == cold["cold_img_per_s"]


# --- patch training: crops at native resolution ---------------------------------------

def _find_window(big: np.ndarray, small: np.ndarray):
    """(y, x) where ``small`` sits inside ``big``, or None."""
    h, w = small.shape[:2]
    for y in range(big.shape[0] - h + 1):
        for x in range(big.shape[1] - w + 1):
            if np.array_equal(big[y:y + h, x:x + w], small):
                return y, x
    return None


def test_crops_are_windows_of_the_image_at_its_own_size_times_scale(kaggle):
    crop = pipe(kaggle[:8], crop=(8, 16), scale=0.5, batch_size=4)
    whole = dp.InputPipeline(kaggle[:8], image_size=SIZE, batch_size=1, train=False,
                             crop=(8, 16), scale=0.5)
    assert (crop.sizes() == [H // 2, W // 2]).all()  # 32x48 files at scale 0.5
    examples = [(dp.to_float(i), m.astype(np.float32)) for i, m in whole.examples()]
    order = crop.order(0)
    batches = list(crop.epoch(0))
    for b, batch in enumerate(batches):
        assert batch["image"].shape == (4, 8, 16, 3) and batch["mask"].shape == (4, 8, 16, 1)
        for row in range(4):
            image, mask = examples[order[4 * b + row] % 8]
            where = _find_window(image, batch["image"][row])
            assert where is not None  # a crop, not a resized image
            y, x = where
            np.testing.assert_array_equal(batch["mask"][row], mask[y:y + 8, x:x + 16])


def test_crops_per_image_draw_several_different_crops_per_epoch(kaggle):
    pipeline = pipe(kaggle, crop=(16, 16), crops_per_image=3, batch_size=4)
    assert len(pipeline) == 20 * 3 // 4
    views = pipeline.order(0)
    assert sorted(views) == list(range(60))  # every image three times, once each view
    crops = {v: pipeline._crop(v, 0)[0] for v in (0, 20, 40)}  # three views of image 0
    assert not np.array_equal(crops[0], crops[20]) or not np.array_equal(crops[0], crops[40])


def test_crops_are_seeded_by_seed_epoch_and_view(kaggle):
    a = stack(pipe(kaggle, crop=(16, 16), seed=3), 1)
    np.testing.assert_array_equal(a, stack(pipe(kaggle, crop=(16, 16), seed=3), 1))
    assert not np.array_equal(a, stack(pipe(kaggle, crop=(16, 16), seed=3), 2))
    assert not np.array_equal(a, stack(pipe(kaggle, crop=(16, 16), seed=4), 1))


def test_each_epoch_draws_new_crops_and_augmentations_of_an_image(kaggle):
    """One image, one view: the order cannot change between epochs, so only a crop
    and an augmentation drawn anew each epoch make the batches differ."""
    one = [kaggle[0]]
    crops = pipe(one, crop=(16, 16), batch_size=1)
    assert not np.array_equal(stack(crops, 1), stack(crops, 2))
    for options in ({"augment": "shift"}, {"augment": "color", "crop": (16, 16)}):
        augmented = pipe(one, batch_size=1, **options)
        epochs = [stack(augmented, e) for e in (1, 2, 3)]
        assert not (np.array_equal(epochs[0], epochs[1])
                    and np.array_equal(epochs[0], epochs[2])), options


def test_an_image_smaller_than_the_crop_is_mirrored_to_fit(kaggle):
    pipeline = pipe(kaggle[:4], crop=(48, 64), batch_size=4)  # files are 32x48
    image, mask = pipeline._crop(0, 0)
    assert image.shape == (48, 64, 3) and mask.shape == (48, 64, 1)
    original, _ = pipeline._cached(0)
    np.testing.assert_array_equal(image[:32, :48], original)
    np.testing.assert_array_equal(image[32:48, :48], original[::-1][:16])  # mirrored rows


def test_crop_cache_holds_images_of_different_sizes_in_a_file(tmp_path):
    for i, size in enumerate([(40, 30), (56, 20), (24, 36)]):
        write_image(tmp_path / "d" / "images" / f"i{i}.png", size=size, seed=i)
        write_mask(tmp_path / "d" / "masks" / f"i{i}.png", box_mask(size, seed=i))
    pairs = dp.find_pairs(tmp_path / "d")
    kw = dict(crop=(16, 16), scale=0.75, batch_size=3, cache=str(tmp_path / "cache" / "c"))
    first = pipe(pairs, **kw)
    assert first.sizes().tolist() == [[22, 30], [15, 42], [27, 18]]
    first.fill()
    batches = stack(first, 0)
    second = pipe(pairs, **kw)
    second._decode = None  # a new pipeline that decoded anything would fail: all cached
    np.testing.assert_array_equal(stack(second, 0), batches)
    assert len(list((tmp_path / "cache").glob("c-*.images.npy"))) == 1


def test_whole_images_of_a_crop_pipeline_are_not_batched(kaggle):
    with pytest.raises(ValueError, match="examples"):
        dp.InputPipeline(kaggle, image_size=SIZE, batch_size=2, train=False, crop=(16, 16)).dataset()


def test_sizes_and_counts_are_taken_as_config_takes_them(own_copy):
    """image_size=32 (a square, as Config takes it) had failed with "'int' object is
    not iterable", and batch_size="4" comparing a str with 1."""
    assert pipe(own_copy, image_size=16, train=False).image_size == (16, 16)
    assert pipe(own_copy, image_size=[16], train=False).image_size == (16, 16)
    for bad, named in [(dict(batch_size="4"), "batch_size '4'"),
                       (dict(image_size=(16, 8, 4)), "image_size 16 8 4"),
                       (dict(image_size=True), "image_size True"),
                       (dict(crop=(0, 8)), "crop 0 8")]:
        with pytest.raises(ValueError, match=rf"^{named}: "):
            pipe(own_copy, **bad)
