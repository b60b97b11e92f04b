"""From files on disk to batches for the U-Net, with tf.data on the host.

Conventions, kept everywhere in unet-jax: images are NHWC float32 in [0, 1]; masks are
NHWC with one channel, float32 in {0, 1} (any non-zero value in a mask file is
foreground; with several classes, the integer class ids). TensorFlow only prepares
numpy batches on the host, with the GPUs hidden from it (``tf_setup``); JAX owns the
accelerator.

* ``files``: find Kaggle's Carvana layout or ``images/`` + ``masks/`` folders, pair
  images with masks by name, and check every file before training (``DataError``).
* ``splits``: training/validation split by car (default) or per image; split.json.
* ``preprocess``: decode and resize images and masks, the one way that training,
  predict, evaluate and submit share.
* ``augment``: paired image/mask augmentations chosen by name (flip, shift, color,
  elastic, rotate), stateless and seeded.
* ``input_pipeline``: cache, crop, shuffle, augment, batch, prefetch.
* ``sample_data``: the built-in synthetic stand-in for Carvana.
* ``tfds_carvana``: a TFDS builder for Kaggle's zips (manual download); imported on
  its own, as it loads tensorflow_datasets.
"""

from data_pipeline.errors import DataError, SettingError
from data_pipeline.files import (Pair, check_crop_fits, check_images, check_pair,
                                 detect_layout, find_images, find_pairs,
                                 warn_if_all_background)
from data_pipeline.augment import AUGMENTATIONS, augment_pair, parse_augment
from data_pipeline.input_pipeline import InputPipeline, check_caches, label_range
from data_pipeline.preprocess import (load_example, load_image, load_mask, scaled_size,
                                      to_float)
from data_pipeline.sample_data import sample_dataset_dir
from data_pipeline.splits import (given_split, grouped, read_split, split_pairs,
                                  subset_by_car, subset_by_group, write_split)

__all__ = [
    "AUGMENTATIONS", "DataError", "InputPipeline", "SettingError", "Pair", "augment_pair", "parse_augment",
    "check_caches", "check_crop_fits", "check_images", "check_pair", "detect_layout", "find_images",
    "find_pairs", "given_split", "grouped", "label_range", "load_example", "load_image",
    "load_mask", "read_split", "scaled_size", "to_float",
    "sample_dataset_dir", "split_pairs", "subset_by_car", "subset_by_group",
    "warn_if_all_background", "write_split",
]
