"""Carvana as a TensorFlow Datasets builder, from Kaggle's zips (manual download).

Kaggle requires accepting the competition's rules before downloading, so, as tfds does
for such datasets, the files are downloaded by hand: put ``train.zip`` and
``train_masks.zip`` in tfds' manual directory (``~/tensorflow_datasets/downloads/manual``
or ``manual_dir=``) and prepare the dataset once::

    import tensorflow_datasets as tfds
    from data_pipeline.tfds_carvana import Carvana
    Carvana(data_dir="~/tensorflow_datasets").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="~/Downloads"))

Each example holds the JPEG as Kaggle ships it, the mask as a one-channel PNG with
values {0, 1}, the file name and the car id (for car-disjoint splits).
``export_pairs`` writes a prepared dataset back out in Kaggle's layout so that the same
``InputPipeline`` (and ``--data-dir``) read it; ``pairs_from_tfds`` does both in one.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.errors import DataError
from data_pipeline.tf_setup import tensorflow

tensorflow()  # hide GPUs from TF before tfds starts it
import tensorflow_datasets as tfds  # noqa: E402

MANUAL_ZIPS = ("train.zip", "train_masks.zip")


class Carvana(tfds.core.GeneratorBasedBuilder):
    """Kaggle's Carvana Image Masking Challenge training set: 5088 photos of 318 cars."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Kaggle's train.zip and train_masks.zip."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Accept the rules of Kaggle's "Carvana Image Masking Challenge", download train.zip
    and train_masks.zip from its Data page, and place both files in `manual_dir`
    (by default ~/tensorflow_datasets/downloads/manual/).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "file_name": tfds.features.Text(),
                "car_id": tfds.features.Text(),
            }),
            supervised_keys=("image", "mask"),
            homepage="https://www.kaggle.com/c/carvana-image-masking-challenge",
        )

    def _split_generators(self, dl_manager):
        manual = Path(dl_manager.manual_dir)
        missing = [z for z in MANUAL_ZIPS if not (manual / z).is_file()]
        if missing:
            raise DataError(f"{manual}: missing {', '.join(missing)}; download them from Kaggle "
                            "(see Carvana.MANUAL_DOWNLOAD_INSTRUCTIONS)")
        return {"train": self._generate_examples(manual / "train.zip", manual / "train_masks.zip")}

    def _generate_examples(self, images_zip, masks_zip):
        with zipfile.ZipFile(images_zip) as images, zipfile.ZipFile(masks_zip) as masks:
            mask_names = {Path(n).name[: -len("_mask.gif")]: n for n in masks.namelist()
                          if n.endswith("_mask.gif")}
            for name in sorted(images.namelist()):
                stem = Path(name).stem
                if not name.endswith(".jpg"):
                    continue
                if stem not in mask_names:
                    raise DataError(f"{images_zip}: {name} has no mask in {masks_zip.name}")
                with masks.open(mask_names[stem]) as f:
                    mask = (np.asarray(Image.open(io.BytesIO(f.read()))) > 0).astype(np.uint8)
                with images.open(name) as f:
                    jpeg = f.read()
                yield stem, {"image": io.BytesIO(jpeg), "mask": mask[..., None],
                             "file_name": Path(name).name, "car_id": stem.rsplit("_", 1)[0]}


def export_pairs(data_dir, out_dir, split: str = "train") -> Path:
    """Writes a prepared ``carvana`` dataset in Kaggle's layout (masks as PNG) and
    returns ``out_dir``; files already there are kept."""
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "train_masks").mkdir(parents=True, exist_ok=True)
    builder = Carvana(data_dir=data_dir)
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    for example in tfds.as_numpy(ds):
        stem = Path(example["file_name"].decode()).stem
        image_path = out / "train" / f"{stem}.jpg"
        if not image_path.exists():
            image_path.write_bytes(example["image"])  # the original JPEG bytes
            Image.fromarray(example["mask"][..., 0]).save(out / "train_masks" / f"{stem}_mask.png")
    return out


def pairs_from_tfds(data_dir, out_dir, *, manual_dir=None, skip_bad: bool = False):
    """Prepares the TFDS dataset (from the zips in ``manual_dir``) if needed, exports it
    to ``out_dir`` and returns its pairs for ``split_pairs`` and ``InputPipeline``."""
    from data_pipeline.files import find_pairs

    builder = Carvana(data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return find_pairs(export_pairs(data_dir, out_dir), skip_bad=skip_bad)
