"""Carvana as a TensorFlow Datasets builder, from Kaggle's zips (manual download).

Kaggle requires accepting the competition's rules before downloading, so, as tfds does
for such datasets, the files are downloaded by hand: put ``train.zip`` (or
``train_hq.zip``) and ``train_masks.zip`` in tfds' manual directory
(``~/tensorflow_datasets/downloads/manual/``, or ``manual_dir=``) and prepare once::

    from pathlib import Path
    import tensorflow_datasets as tfds
    from data_pipeline.tfds_carvana import Carvana
    builder = Carvana(data_dir=Path.home() / "tensorflow_datasets")  # tfds does not expand ~
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=Path.home() / "Downloads"))
    ds = builder.as_dataset(split="train")

Each example holds the JPEG as Kaggle ships it, the mask as a one-channel PNG with
values {0, 1}, the file name and the car id (for car-disjoint splits). To train on it
with the same ``split_pairs`` and ``InputPipeline`` as on a folder, ``pairs_from_tfds``
prepares the dataset if needed and writes it out in Kaggle's layout (the JPEGs byte for
byte, masks as PNG), returning its pairs.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from data_pipeline.errors import DAMAGED_ARCHIVE, DataError
from data_pipeline.tf_setup import tensorflow

tensorflow()  # hide the GPUs from TF before tfds starts it
import tensorflow_datasets as tfds  # noqa: E402

IMAGE_ZIPS = ("train.zip", "train_hq.zip")
MASK_ZIP = "train_masks.zip"


class Carvana(tfds.core.GeneratorBasedBuilder):
    """Kaggle's Carvana Image Masking Challenge training set: 5088 photos of 318 cars,
    16 angles each, with a hand-made mask of the car."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Kaggle's train.zip (or train_hq.zip) and train_masks.zip."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Accept the rules of Kaggle's "Carvana Image Masking Challenge", download train.zip
    (or train_hq.zip) and train_masks.zip from its Data page, and place them in
    `manual_dir` (by default ~/tensorflow_datasets/downloads/manual/).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "image/filename": tfds.features.Text(),
                "car_id": tfds.features.Text(),
            }),
            supervised_keys=("image", "mask"),
            homepage="https://www.kaggle.com/c/carvana-image-masking-challenge",
        )

    def _split_generators(self, dl_manager):
        manual = Path(dl_manager.manual_dir)
        images = next((manual / z for z in IMAGE_ZIPS if (manual / z).is_file()), None)
        missing = ([] if images else [IMAGE_ZIPS[0]]) + (
            [] if (manual / MASK_ZIP).is_file() else [MASK_ZIP])
        if missing:
            raise DataError(f"{manual} lacks {' and '.join(missing)}; download them from "
                            "Kaggle (see Carvana.MANUAL_DOWNLOAD_INSTRUCTIONS)")
        return {"train": self._generate_examples(images, manual / MASK_ZIP)}

    def _generate_examples(self, images_zip: Path, masks_zip: Path):
        """(key, example) for every photo, in name order, with its mask's palette
        indices turned into {0, 1}."""
        with _open_zip(images_zip) as images, _open_zip(masks_zip) as masks:
            photos = {PurePosixPath(n).stem: n for n in images.namelist()
                      if n.lower().endswith(".jpg") and "__MACOSX" not in n}
            mask_names = {PurePosixPath(n).stem.removesuffix("_mask"): n
                          for n in masks.namelist()
                          if n.lower().endswith((".gif", ".png")) and "__MACOSX" not in n}
            extra = sorted(set(mask_names) - set(photos))
            if extra:
                raise DataError(f"{masks_zip}: {mask_names[extra[0]]} has no photo in "
                                f"{images_zip.name}; the zips do not belong together")
            for stem, name in sorted(photos.items()):
                if stem not in mask_names:
                    raise DataError(f"{images_zip}: {name} has no mask in {masks_zip.name}; "
                                    "the zips do not belong together")
                jpeg = _read(images, name)
                with Image.open(io.BytesIO(_read(masks, mask_names[stem]))) as m:
                    mask = (np.asarray(m) > 0).astype(np.uint8)  # palette index 1: the car
                with Image.open(io.BytesIO(jpeg)) as img:
                    if img.size != mask.shape[::-1]:
                        raise DataError(f"{masks_zip}: {mask_names[stem]} is "
                                        f"{mask.shape[1]}x{mask.shape[0]} but its photo is "
                                        f"{img.size[0]}x{img.size[1]}")
                yield stem, {"image": io.BytesIO(jpeg), "mask": mask[..., None],
                             "image/filename": PurePosixPath(name).name,
                             "car_id": stem.rsplit("_", 1)[0]}


def _damaged(path, e) -> DataError:
    return DataError(f"{path}: not a complete zip file ({e}); the download was probably "
                     "cut short: download it again from Kaggle")


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except DAMAGED_ARCHIVE as e:  # found on opening, or on reading a member
        raise _damaged(path, e) from None


def _read(archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        return archive.read(name)
    except DAMAGED_ARCHIVE as e:  # found on opening, or on reading a member
        raise _damaged(archive.filename, e) from None


def export_pairs(data_dir, out_dir, split: str = "train") -> Path:
    """Writes a prepared ``carvana`` dataset in Kaggle's layout (``train/*.jpg``,
    ``train_masks/*_mask.png``) and returns ``out_dir``. Files already there are kept,
    so a second call costs only the listing."""
    out = Path(out_dir).expanduser()
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "train_masks").mkdir(parents=True, exist_ok=True)
    builder = Carvana(data_dir=Path(data_dir).expanduser())
    # A photo is written after its mask, so as many photos as examples means done: a
    # listing, instead of reading and decoding the whole dataset again (30-40 s for
    # Kaggle's 5,088) at every command.
    if len(list((out / "train").glob("*.jpg"))) == builder.info.splits[split].num_examples:
        return out
    ds = builder.as_dataset(
        split=split, decoders={"image": tfds.decode.SkipDecoding()})  # keep the JPEG bytes
    for example in tfds.as_numpy(ds):
        stem = PurePosixPath(example["image/filename"].decode()).stem
        image_path = out / "train" / f"{stem}.jpg"
        mask_path = out / "train_masks" / f"{stem}_mask.png"
        if not (image_path.exists() and mask_path.exists()):
            Image.fromarray(example["mask"][..., 0]).save(mask_path)
            image_path.write_bytes(example["image"])  # last: its presence means done
    return out


def pairs_from_tfds(data_dir, out_dir, *, manual_dir=None, skip_bad: bool = False):
    """Prepares the TFDS dataset from the zips in ``manual_dir`` (once), writes it to
    ``out_dir`` in Kaggle's layout and returns its pairs, for ``split_pairs`` and
    ``InputPipeline`` exactly as with ``--data-dir``."""
    from data_pipeline.files import find_pairs

    # tfds takes a "~" literally: a folder named ~ in the working directory.
    data_dir = Path(data_dir).expanduser()
    manual_dir = None if manual_dir is None else Path(manual_dir).expanduser()
    Carvana(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return find_pairs(export_pairs(data_dir, out_dir), skip_bad=skip_bad)


def holds_kaggle_zips(folder) -> bool:
    """Whether ``folder`` holds Kaggle's zips as downloaded (and no unzipped layout)."""
    folder = Path(folder)
    return (folder / MASK_ZIP).is_file() and any((folder / z).is_file() for z in IMAGE_ZIPS)


def prepare_zip_folder(folder, flag: str = "--data-dir") -> Path:
    """Kaggle's ``train.zip`` and ``train_masks.zip`` in ``folder`` as a folder of
    Kaggle's layout, made once through the TFDS builder.

    The builder's dataset goes to ``folder/tensorflow_datasets/`` and its files, in
    Kaggle's layout, to ``folder/prepared/``; a later call finds both and only lists the
    files. So ``--data-dir`` can be the folder the zips were downloaded to (``flag``
    names it in errors).
    """
    folder = Path(folder)
    prepared = folder / "prepared"
    try:
        Carvana(data_dir=folder / "tensorflow_datasets").download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=folder))
        export_pairs(folder / "tensorflow_datasets", prepared)
    except OSError as e:  # no permission, a read-only mount (Kaggle's input), no space
        raise DataError(f"{flag} {folder}: cannot write the prepared dataset beside the "
                        f"zips ({e.strerror or e}); unzip both into a writable folder, or "
                        "copy the zips to one") from None
    return prepared
