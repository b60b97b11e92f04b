"""The TFDS builder on small zips in Kaggle's form that the test makes."""

import zipfile

import numpy as np
import pytest

from tests.test_data import kaggle_dir


@pytest.fixture
def manual_dir(tmp_path):
    src = kaggle_dir(tmp_path / "src", cars=("car001", "car002"), angles=3)
    manual = tmp_path / "manual"
    manual.mkdir()
    for folder, zip_name in (("train", "train.zip"), ("train_masks", "train_masks.zip")):
        with zipfile.ZipFile(manual / zip_name, "w") as z:
            for f in sorted((src / folder).iterdir()):
                z.write(f, f"{folder}/{f.name}")  # Kaggle's zips hold a top folder
    return manual


def test_builder_reads_kaggles_zips(manual_dir, tmp_path):
    import tensorflow_datasets as tfds

    from data_pipeline.tfds_carvana import Carvana

    builder = Carvana(data_dir=tmp_path / "tfds")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(examples) == 6
    example = examples[0]
    assert example["image"].shape == (32, 48, 3) and example["mask"].shape == (32, 48, 1)
    assert set(np.unique(example["mask"])) == {0, 1}
    assert {e["car_id"].decode() for e in examples} == {"car001", "car002"}


def test_missing_zip_is_named(tmp_path):
    import tensorflow_datasets as tfds

    from data_pipeline import DataError
    from data_pipeline.tfds_carvana import Carvana

    (tmp_path / "manual").mkdir()
    zipfile.ZipFile(tmp_path / "manual" / "train.zip", "w").close()
    with pytest.raises(DataError, match="missing train_masks.zip"):
        Carvana(data_dir=tmp_path / "tfds").download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=tmp_path / "manual"))


def test_tfds_feeds_the_same_pipeline(manual_dir, tmp_path):
    import data_pipeline as dp
    from data_pipeline.tfds_carvana import pairs_from_tfds

    pairs = pairs_from_tfds(tmp_path / "tfds", tmp_path / "export", manual_dir=manual_dir)
    assert len(pairs) == 6 and {p.group for p in pairs} == {"car001", "car002"}
    original = dp.find_pairs(manual_dir.parent / "src")
    for a, b in zip(pairs, original):
        assert a.image.read_bytes() == b.image.read_bytes()  # the JPEG as shipped
        np.testing.assert_array_equal(dp.load_example(a, (32, 48))[1], dp.load_example(b, (32, 48))[1])
    train, val = dp.split_pairs(pairs)
    batch = next(dp.InputPipeline(train, image_size=(16, 32), batch_size=2, train=True).epoch(1))
    assert batch["image"].shape == (2, 16, 32, 3)
