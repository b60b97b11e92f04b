"""The tf.data pipeline: files on disk to numpy batches for the jitted train step.

Per example: decode the image and its mask, resize the image (bilinear or area) and the
mask (nearest, so it stays binary) to the model's size. The decoded, resized examples
are cached as uint8 (in memory, or in a file for data larger than memory), so that
only the first pass pays for JPEG decoding. Per epoch: a seeded shuffle, optional
paired augmentation, scaling to [0, 1], batching, and prefetching in background
threads while the accelerator works on the previous batch.

Determinism: the order of epoch ``e`` is a permutation drawn from ``(seed, e)`` and the
augmentation of each example from ``(seed, e, position)``, so a fresh process produces
exactly the batches of the original one. That is what makes ``--resume`` continue a
run exactly as if it had never stopped.

Decoding uses Pillow: it reads Kaggle's palette GIF masks as palette indices (TF's GIF
decoder returns the palette's colours), it reads every common format (TIFF too), and
it decodes large JPEGs directly at a reduced scale when the target is much smaller.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from data_pipeline.errors import DataError
from data_pipeline.files import Pair
from data_pipeline.tf_setup import tensorflow

RESIZE = {"bilinear": Image.BILINEAR, "area": Image.BOX}


def load_example(pair: Pair, image_size, in_channels: int = 3, resize: str = "bilinear",
                 binary: bool = True):
    """(image uint8 (h, w, C), mask uint8 (h, w, 1)) of one pair, at ``image_size``.

    Pillow's bilinear filter widens its support when shrinking (antialiasing), so a
    1918x1280 photo shrunk to 512x512 keeps thin details instead of aliasing.
    """
    height, width = image_size
    try:
        with Image.open(pair.image) as img:
            img.draft("RGB" if in_channels == 3 else "L", (width, height))  # JPEG DCT scaling
            img = img.convert("RGB" if in_channels == 3 else "L")
            image = np.asarray(img.resize((width, height), RESIZE[resize]), np.uint8)
        with Image.open(pair.mask) as m:
            mask = np.asarray(m)  # palette images give indices: Kaggle's car is index 1
            if mask.ndim == 3:
                mask = mask[..., :3].max(axis=-1)
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(
                (width, height), Image.NEAREST))
    except (OSError, ValueError) as e:
        raise DataError(f"{pair.image.name}: cannot decode the pair ({e}); "
                        "pass --skip-bad or remove it") from None
    if binary:
        mask = (mask > 0).astype(np.uint8)
    return image.reshape(height, width, in_channels), mask[..., None]


class InputPipeline:
    """Batches of one split of a dataset, epoch by epoch.

    Args:
      pairs: the image/mask pairs (from ``find_pairs`` and ``split_pairs``).
      image_size: (height, width) the model sees.
      batch_size: images per batch of this process.
      train: shuffle, augment (if ``augment``) and drop the last partial batch, so the
        train step compiles once; otherwise keep the order and pad the last batch, with
        ``valid`` marking the real rows.
      cache: 'memory', None (decode every epoch) or a file path prefix: the decoded
        examples then live in a memory-mapped file, reused by later runs with the same
        files and settings.
      shard: (index, count): in a run of ``count`` processes, this process reads only
        its own fixed share of the files (decoding, caching and shuffling just those);
        every process yields the same number of batches, so they stay in step.
      num_classes: 1 for binary masks (any non-zero value is foreground); more keeps the
        masks' integer class ids.

    Batches are dicts of numpy arrays: ``image`` (B, h, w, C) float32 in [0, 1] and
    ``mask`` (B, h, w, 1) float32, and for evaluation ``valid`` (B,) bool.
    """

    def __init__(self, pairs: list[Pair], *, image_size, batch_size: int, train: bool,
                 seed: int = 0, augment: bool = False, cache="memory", in_channels: int = 3,
                 resize: str = "bilinear", shard=(0, 1), num_classes: int = 1):
        if not pairs:
            raise DataError("no images for this split")
        if resize not in RESIZE:
            raise DataError(f"resize {resize!r}: choose one of {', '.join(RESIZE)}")
        self.shard_index, self.shard_count = shard
        self.total = len(pairs)
        if self.shard_count > 1:  # a fixed, seeded deal of the files, like cards
            deal = np.random.default_rng(seed).permutation(len(pairs))
            pairs = [pairs[j] for j in deal[self.shard_index::self.shard_count]]
        self.pairs = list(pairs)
        self.image_size = tuple(image_size)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.augment = augment and train
        self.cache = cache
        self.in_channels = in_channels
        self.resize = resize
        self.binary = num_classes == 1
        self._store = None  # (images, masks) uint8 arrays once decoded

    # --- sizes ---------------------------------------------------------------------

    def _local_count(self) -> int:
        """Examples per epoch of every process (the smallest share, for training)."""
        if self.train:
            return self.total // self.shard_count // self.batch_size * self.batch_size
        return math.ceil(self.total / self.shard_count)

    def __len__(self) -> int:
        """Batches per epoch for this process."""
        if self.train:
            return self._local_count() // self.batch_size
        return math.ceil(self._local_count() / self.batch_size)

    # --- decoding and the cache ----------------------------------------------------

    def _load(self, index: int):
        return load_example(self.pairs[index], self.image_size, self.in_channels,
                            self.resize, self.binary)

    def _decoded(self, indices):
        """Decoded uint8 examples for ``indices``, decoded in parallel threads."""
        tf = tensorflow()
        h, w = self.image_size
        c = self.in_channels

        def load(i):
            image, mask = tf.numpy_function(lambda j: self._load(int(j)), [i], [tf.uint8, tf.uint8])
            return tf.ensure_shape(image, (h, w, c)), tf.ensure_shape(mask, (h, w, 1))

        ds = tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64))
        return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def _cache_path(self) -> Path:
        key = json.dumps([[str(p.image), str(p.mask)] for p in self.pairs]
                         + [list(self.image_size), self.in_channels, self.resize, self.binary])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return Path(f"{self.cache}-{digest}")

    def _fill(self):
        """Decodes every example once into the cache (memory or memory-mapped file)."""
        n, (h, w), c = len(self.pairs), self.image_size, self.in_channels
        if self.cache not in (None, "memory"):
            base = self._cache_path()
            done = Path(f"{base}.complete")
            base.parent.mkdir(parents=True, exist_ok=True)
            if done.exists():
                return (np.load(f"{base}.images.npy", mmap_mode="r"),
                        np.load(f"{base}.masks.npy", mmap_mode="r"))
            images = np.lib.format.open_memmap(f"{base}.images.npy", "w+", np.uint8, (n, h, w, c))
            masks = np.lib.format.open_memmap(f"{base}.masks.npy", "w+", np.uint8, (n, h, w, 1))
        else:
            images = np.empty((n, h, w, c), np.uint8)
            masks = np.empty((n, h, w, 1), np.uint8)
        for i, (image, mask) in enumerate(self._decoded(range(n)).as_numpy_iterator()):
            images[i], masks[i] = image, mask
        if self.cache not in (None, "memory"):
            images.flush()
            masks.flush()
            done.touch()  # written last: an interrupted fill is never reused
        return images, masks

    # --- epochs --------------------------------------------------------------------

    def order(self, epoch: int) -> np.ndarray:
        """Indices into this process's pairs for ``epoch`` (before batching)."""
        n = len(self.pairs)
        if not self.train:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)[:self._local_count()]

    def epoch(self, epoch: int = 0) -> Iterator[dict]:
        """The batches of ``epoch`` (its shuffle and augmentation depend on it alone)."""
        tf = tensorflow()
        indices = self.order(epoch)
        valid = np.ones(len(indices), bool)
        if not self.train:  # pad to whole batches: one compiled eval step serves all
            pad = len(self) * self.batch_size - len(indices)  # equal for every process
            indices = np.concatenate([indices, np.full(pad, indices[0])])
            valid = np.concatenate([valid, np.zeros(pad, bool)])

        if self.cache is None:
            examples = self._decoded(indices)
        else:
            if self._store is None:
                self._store = self._fill()
            images, masks = self._store
            h, w = self.image_size

            def lookup(i):
                image, mask = tf.numpy_function(lambda j: (images[j], masks[j]), [i],
                                                [tf.uint8, tf.uint8])
                return (tf.ensure_shape(image, (h, w, self.in_channels)),
                        tf.ensure_shape(mask, (h, w, 1)))

            examples = tf.data.Dataset.from_tensor_slices(indices).map(
                lookup, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        positions = tf.data.Dataset.range(len(indices))
        ds = tf.data.Dataset.zip((examples, positions, tf.data.Dataset.from_tensor_slices(valid)))
        seed = (self.seed, epoch)
        augment = self.augment

        def finish(example, position, is_valid):
            image, mask = example
            image = tf.cast(image, tf.float32) / 255.0
            mask = tf.cast(mask, tf.float32)
            if augment:
                image, mask = augment_pair(image, mask, tf.stack(
                    [tf.cast(seed[0], tf.int64) * 1_000_003 + seed[1], position]))
            return {"image": image, "mask": mask, "valid": is_valid}

        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.batch_size, drop_remainder=self.train).prefetch(tf.data.AUTOTUNE)
        for batch in ds.as_numpy_iterator():
            if self.train:
                batch.pop("valid")
            yield batch


def augment_pair(image, mask, seed):
    """Random flip, shift/scale (the same on image and mask), brightness/contrast.

    The geometric changes teach the model that a car is a car wherever it stands and
    however large; applying one transform to both image and mask keeps every label on
    its pixel (the mask is resampled nearest, so it stays binary). Colour changes touch
    the image only. All randomness is stateless, drawn from ``seed`` (2 ints).
    """
    tf = tensorflow()
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)

    flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
    image = tf.where(flip, tf.reverse(image, [1]), image)
    mask = tf.where(flip, tf.reverse(mask, [1]), mask)

    # Output pixel (x, y) samples input (a0 x + a2, b1 y + b2): scale about the centre,
    # then shift by up to 10% of the size.
    scale = tf.random.stateless_uniform([], seeds[1], 0.9, 1.1)
    dx = tf.random.stateless_uniform([], seeds[2], -0.1, 0.1) * w
    dy = tf.random.stateless_uniform([], seeds[3], -0.1, 0.1) * h
    inv = 1.0 / scale
    transform = tf.stack([inv, 0.0, (w - w * inv) / 2 - dx,
                          0.0, inv, (h - h * inv) / 2 - dy, 0.0, 0.0])[None]

    def warp(x, interpolation):
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None], transforms=transform, output_shape=tf.shape(x)[:2],
            interpolation=interpolation, fill_mode="NEAREST", fill_value=0.0)[0]

    image = warp(image, "BILINEAR")
    mask = warp(mask, "NEAREST")

    image = tf.image.stateless_random_brightness(image, 0.1, seeds[4])
    image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seeds[5])
    return tf.clip_by_value(image, 0.0, 1.0), mask
