"""The TFDS builder on small zips in Kaggle's form that the test makes."""

import zipfile

import numpy as np
import pytest

import data_pipeline as dp
from tests.data_fixtures import H, W, box_mask, kaggle_dir

tfds = pytest.importorskip("tensorflow_datasets")
from data_pipeline.tfds_carvana import Carvana, pairs_from_tfds  # noqa: E402

CARS = ("car001", "car002")


def zip_folder(folder, zip_path, skip=()):
    """A zip like Kaggle's: every file under a top folder of the same name."""
    with zipfile.ZipFile(zip_path, "w") as z:
        for f in sorted(folder.iterdir()):
            if f.name not in skip:
                z.write(f, f"{folder.name}/{f.name}")


@pytest.fixture
def src(tmp_path):
    return kaggle_dir(tmp_path / "src", cars=CARS, angles=3)


@pytest.fixture
def manual(src, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    zip_folder(src / "train", manual / "train.zip")
    zip_folder(src / "train_masks", manual / "train_masks.zip")
    return manual


def prepare(tmp_path, manual):
    builder = Carvana(data_dir=tmp_path / "tfds")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    return builder


def test_builder_reads_kaggles_zips(tmp_path, src, manual):
    builder = prepare(tmp_path, manual)
    assert builder.name == "carvana" and "train.zip" in Carvana.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert builder.info.splits["train"].num_examples == 6
    examples = sorted(tfds.as_numpy(builder.as_dataset(split="train")),
                      key=lambda e: e["image/filename"])
    assert [e["image/filename"].decode() for e in examples] == sorted(
        p.name for p in (src / "train").iterdir())
    assert [e["car_id"].decode() for e in examples] == ["car001"] * 3 + ["car002"] * 3
    for c, a, e in [(c, a, examples[3 * c + a - 1]) for c in range(2) for a in (1, 2, 3)]:
        assert e["image"].shape == (H, W, 3) and e["mask"].shape == (H, W, 1)
        # the palette GIF's index 1 (a near-black colour) became 1, and only there
        np.testing.assert_array_equal(e["mask"][..., 0], box_mask(seed=100 * c + a))


def test_missing_zip_is_named(tmp_path):
    (tmp_path / "manual").mkdir()
    zipfile.ZipFile(tmp_path / "manual" / "train.zip", "w").close()
    with pytest.raises(dp.DataError, match="lacks train_masks.zip"):
        prepare(tmp_path, tmp_path / "manual")


def test_photo_without_mask_is_named(tmp_path, src):
    manual = tmp_path / "manual"
    manual.mkdir()
    zip_folder(src / "train", manual / "train.zip")
    zip_folder(src / "train_masks", manual / "train_masks.zip", skip={"car002_02_mask.gif"})
    with pytest.raises(dp.DataError, match="car002_02.jpg has no mask"):
        prepare(tmp_path, manual)


def test_a_truncated_download_is_named(tmp_path, manual):
    """A download cut short has no central directory: one line naming the zip."""
    data = (manual / "train.zip").read_bytes()
    (manual / "train.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(dp.DataError, match=r"train\.zip: not a complete zip file.*again"):
        prepare(tmp_path, manual)


def test_a_damaged_member_is_named(tmp_path, manual):
    """Damage inside a member (its CRC no longer matches) shows when it is read."""
    data = bytearray((manual / "train_masks.zip").read_bytes())
    first = zipfile.ZipFile(manual / "train_masks.zip").infolist()[0]
    start = first.header_offset + 30 + len(first.filename) + len(first.extra)
    data[start + first.compress_size // 2] ^= 0xFF
    (manual / "train_masks.zip").write_bytes(bytes(data))
    with pytest.raises(dp.DataError, match=r"train_masks\.zip: not a complete zip file"):
        prepare(tmp_path, manual)


def test_tfds_feeds_the_same_pipeline(tmp_path, src, manual):
    pairs = pairs_from_tfds(tmp_path / "tfds", tmp_path / "export", manual_dir=manual)
    original = dp.find_pairs(src)
    assert [p.image.name for p in pairs] == [p.image.name for p in original]
    assert [p.car for p in pairs] == [p.car for p in original]
    for a, b in zip(pairs, original):
        assert a.image.read_bytes() == b.image.read_bytes()  # the JPEG as Kaggle shipped it
        np.testing.assert_array_equal(dp.load_mask(a.mask, (H, W)), dp.load_mask(b.mask, (H, W)))
    train, val = dp.split_pairs(pairs)
    assert {p.car for p in train} != {p.car for p in val}
    batch = next(dp.InputPipeline(train, image_size=(16, 24), batch_size=2, train=True).epoch(0))
    assert batch["image"].shape == (2, 16, 24, 3) and set(np.unique(batch["mask"])) == {0, 1}
    again = pairs_from_tfds(tmp_path / "tfds", tmp_path / "export", manual_dir=manual)
    assert again == pairs  # prepared and exported once


def test_paths_with_a_tilde_are_the_home_folders(tmp_path, src, manual, monkeypatch):
    """tfds takes "~" literally; pairs_from_tfds expands it, as --data-dir does."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    pairs = pairs_from_tfds("~/tfds", "~/export", manual_dir=f"~/{manual.name}")
    assert len(pairs) == 6 and (tmp_path / "export" / "train").is_dir()
    assert not (tmp_path / "~").exists()


def test_a_folder_of_kaggles_zips_works_as_data_dir(tmp_path, src, manual, monkeypatch):
    pairs = dp.find_pairs(manual)  # what --data-dir does with the download folder
    original = dp.find_pairs(src)
    assert [p.image.name for p in pairs] == [p.image.name for p in original]
    assert [p.car for p in pairs] == [p.car for p in original]
    assert all(p.image.is_relative_to(manual / "prepared") for p in pairs)
    stamp = (manual / "prepared" / "train" / pairs[0].image.name).stat().st_mtime_ns
    # Prepared once: the second call only lists, reading none of the dataset again.
    monkeypatch.setattr(Carvana, "as_dataset", lambda *a, **k: pytest.fail("read again"))
    assert dp.find_pairs(manual) == pairs
    assert (manual / "prepared" / "train" / pairs[0].image.name).stat().st_mtime_ns == stamp


def test_zips_in_a_read_only_folder_say_to_unzip_them_elsewhere(manual, monkeypatch):
    """Kaggle's /kaggle/input is a read-only mount: EROFS, no PermissionError, had
    ended in a traceback (later: 'out of memory'-like advice to free space)."""
    import errno

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(manual / "tensorflow_datasets"))

    monkeypatch.setattr(Carvana, "download_and_prepare", read_only)
    with pytest.raises(dp.DataError, match=r"^--val-data-dir .*manual: cannot write the "
                       r"prepared dataset beside the zips \(Read-only file system\); unzip "
                       r"both into a writable folder"):
        dp.find_pairs(manual, flag="--val-data-dir")
