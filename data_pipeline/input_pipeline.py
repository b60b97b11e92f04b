"""The tf.data pipeline: files on disk to numpy batches for the jitted train step.

Per example: decode the image and its mask, resize the image (bilinear or area) and
the mask (nearest, so it stays binary) to the model's size, and keep the result as
uint8 in a cache, so that only the first epoch pays for decoding. Per epoch: a seeded
order, optional paired augmentation, scaling to [0, 1], batching, and prefetching in
background threads while the accelerator works on the previous batch.

Determinism: the order of epoch ``e`` is a permutation drawn from ``(seed, e)``, and
the augmentation of an example from ``(seed, e, its index)``, so a fresh process
produces exactly the batches of the original one. That is what lets ``--resume``
continue a run as if it had never stopped.

Decoding uses Pillow for every format, and this was measured, not assumed: Kaggle's
1918x1280 JPEGs decode at 3-5 ms each with Pillow's DCT scaling (``draft``) for small
targets, as fast as ``tf.io.decode_jpeg(ratio=...)`` and faster than a full TF decode
plus antialiased resize; and Pillow reads palette GIFs as palette indices (Kaggle's
masks store the car as index 1; ``tf.io.decode_gif`` returns the palette's colours),
TIFF (which TF cannot decode), 16-bit and palette images.

The cache is a pair of numpy arrays (in memory, or memory-mapped files) that the
pipeline object holds, filled as examples are first read. tf.data's own ``cache()``
is reused by the datasets derived from it each epoch (checked: TF 2.21 decodes once
over three epochs), but it is read in sequence: an exact seeded permutation of the
whole epoch and every-n-th sharding need random access, and tf.data discards a cache
whose first pass was interrupted.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.files import Pair
from data_pipeline.preprocess import RESIZE, load_example
from data_pipeline.tf_setup import tensorflow

class InputPipeline:
    """The batches of one side of a split, epoch by epoch.

    Args:
      pairs: the image/mask pairs (from ``find_pairs`` and ``split_pairs``).
      image_size: (height, width) the model sees.
      batch_size: images per batch of this process.
      train: shuffle each epoch, augment (if ``augment``) and drop the last partial
        batch, so the train step compiles once. Otherwise keep the order and pad the
        last batch with zeros, ``valid`` marking the real rows, so one compiled eval
        step serves every batch.
      seed: with the epoch number, fixes the order and the augmentation.
      augment: random flips, shifts, scales and brightness/contrast (training only).
      cache: 'memory', None (decode every epoch) or a file path prefix: the decoded
        examples then live in memory-mapped files, reused by later runs with the same
        files and settings (``<prefix>-<hash>.images.npy`` and so on).
      in_channels: 3 (RGB) or 1 (grayscale).
      resize: 'bilinear' or 'area' for images; masks are always resized nearest.
      shard: (index, count): in a run of ``count`` processes, this process reads every
        ``count``-th example of each global batch, from ``index`` on, after the
        epoch's shuffle; the processes' batches together are the global batch a
        single process would see, and every process yields the same number of batches.
      num_classes: 1 for binary masks (any non-zero value is foreground); more keeps
        the masks' integer class ids.

    Batches are dicts of numpy arrays: ``image`` (B, h, w, C) float32 in [0, 1] and
    ``mask`` (B, h, w, 1) float32, and for evaluation ``valid`` (B,) bool.
    """

    def __init__(self, pairs: list[Pair], *, image_size, batch_size: int, train: bool,
                 seed: int = 0, augment: bool = False, cache: str | None = "memory",
                 in_channels: int = 3, resize: str = "bilinear", shard=(0, 1),
                 num_classes: int = 1):
        if not pairs:
            raise DataError("no images for this split; add data or lower --val-fraction")
        if resize not in RESIZE:
            raise ValueError(f"resize {resize!r}: choose one of {', '.join(RESIZE)}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels {in_channels}: choose 1 (grayscale) or 3 (RGB)")
        if batch_size < 1 or seed < 0:
            raise ValueError(f"batch_size {batch_size} must be >= 1 and seed {seed} >= 0")
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard {shard}: give (index, count) with 0 <= index < count")
        self.pairs = list(pairs)
        self.image_size = tuple(int(x) for x in image_size)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.augment = augment and train
        self.cache = cache
        self.in_channels = in_channels
        self.resize = resize
        self.shard = (index, count)
        self.num_classes = num_classes
        if train and len(self) == 0:
            raise DataError(f"{len(self.pairs)} training images make no full batch of "
                            f"{batch_size * count} (--batch-size); lower the batch size")
        self._store = None  # (images, masks, ready) once the cache is opened
        self._lock = threading.Lock()
        self._error = None  # the DataError message of a file that failed to decode

    # --- sizes and order ---------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch for this process (the same for every process)."""
        n, (_, count) = len(self.pairs), self.shard
        if self.train:
            return n // (self.batch_size * count)
        return math.ceil(math.ceil(n / count) / self.batch_size)

    def order(self, epoch: int = 0) -> np.ndarray:
        """Indices into ``pairs`` that this process reads in ``epoch``, in order.

        Training: the global permutation of ``(seed, epoch)``, cut to whole global
        batches, then every ``count``-th from ``index``. Evaluation: the files in
        order, every ``count``-th (padding comes later).
        """
        if epoch < 0:
            raise ValueError(f"epoch {epoch} must be >= 0")
        n, (index, count) = len(self.pairs), self.shard
        if not self.train:
            return np.arange(index, n, count)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        return order[: len(self) * self.batch_size * count][index::count]

    # --- decoding and the cache ------------------------------------------------------

    def _decode(self, index: int):
        """Example ``index`` decoded from its files, remembering a failure's message."""
        try:
            return load_example(self.pairs[index], self.image_size, self.in_channels,
                                self.resize, self.num_classes)
        except DataError as e:
            self._error = str(e)  # TF wraps the exception; epoch() raises it again
            raise

    def _cache_key(self) -> str:
        """A digest of everything the cached bytes depend on, file dates included."""
        files = []
        for p in self.pairs:
            for f in (p.image, p.mask):
                st = f.stat()
                files.append([str(f), st.st_size, st.st_mtime_ns])
        key = json.dumps([files, self.image_size, self.in_channels, self.resize,
                          self.num_classes])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def _open_store(self):
        """The cache arrays: (images, masks, ready), ready[i] once example i is in."""
        n, (h, w), c = len(self.pairs), self.image_size, self.in_channels
        shapes = {"images": (n, h, w, c), "masks": (n, h, w, 1), "ready": (n,)}
        dtypes = {"images": np.uint8, "masks": np.uint8, "ready": np.bool_}
        if self.cache == "memory":
            # np.zeros maps zeroed pages lazily: memory is used as examples arrive.
            return tuple(np.zeros(shapes[k], dtypes[k]) for k in shapes)
        index, count = self.shard
        base = f"{self.cache}-{self._cache_key()}" + (f"-{index}of{count}" if count > 1 else "")
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        try:  # a previous run's cache, if whole: ready[i] tells which examples it holds
            arrays = tuple(np.load(f"{base}.{k}.npy", mmap_mode="r+") for k in shapes)
            if all(a.shape == shapes[k] and a.dtype == dtypes[k]
                   for a, k in zip(arrays, shapes)):
                return arrays
        except (OSError, ValueError):
            pass
        return tuple(np.lib.format.open_memmap(f"{base}.{k}.npy", "w+", dtypes[k], shapes[k])
                     for k in shapes)

    def _example(self, index) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (image, mask) of example ``index``: from the cache, or decoded (and
        cached); zeros for eval padding (index -1)."""
        index = int(index)
        (h, w), c = self.image_size, self.in_channels
        if index < 0:
            return np.zeros((h, w, c), np.uint8), np.zeros((h, w, 1), np.uint8)
        if self.cache is None:
            return self._decode(index)
        with self._lock:
            if self._store is None:
                self._store = self._open_store()
        images, masks, ready = self._store
        if not ready[index]:
            images[index], masks[index] = self._decode(index)
            ready[index] = True  # after the data: a reader never sees half an example
        return np.array(images[index]), np.array(masks[index])

    def fill(self, workers: int | None = None) -> None:
        """Decodes every example into the cache now, in parallel threads (Pillow's
        decoders release the GIL), instead of during the first epoch."""
        if self.cache is None:
            return
        with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
            list(pool.map(self._example, range(len(self.pairs))))
        self._flush()

    def _flush(self):
        """Writes a file cache's pages to disk, so the next run finds them complete."""
        if self._store is not None and isinstance(self._store[0], np.memmap):
            for a in self._store:
                a.flush()

    # --- epochs --------------------------------------------------------------------

    def dataset(self, epoch: int = 0):
        """The ``tf.data.Dataset`` of the batches of ``epoch`` (dicts of tensors)."""
        tf = tensorflow()
        indices = self.order(epoch)
        valid = np.ones(len(indices), bool)
        if not self.train:  # pad with zero images to whole batches, marked not valid
            pad = len(self) * self.batch_size - len(indices)
            indices = np.concatenate([indices, np.full(pad, -1)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
        (h, w), c = self.image_size, self.in_channels
        key = tf.constant([self.seed, epoch], tf.int64)
        augment = self.augment

        def load(index, is_valid):
            image, mask = tf.numpy_function(self._example, [index], [tf.uint8, tf.uint8])
            image = tf.cast(tf.ensure_shape(image, (h, w, c)), tf.float32) / 255.0
            mask = tf.cast(tf.ensure_shape(mask, (h, w, 1)), tf.float32)
            if augment:
                image, mask = augment_pair(
                    image, mask, tf.random.experimental.stateless_fold_in(key, index))
            return {"image": image, "mask": mask, "valid": is_valid}

        ds = tf.data.Dataset.from_tensor_slices((indices.astype(np.int64), valid))
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(self.batch_size, drop_remainder=self.train).prefetch(tf.data.AUTOTUNE)

    def epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The numpy batches of ``epoch``; its order and augmentation depend on
        ``(seed, epoch)`` alone. Evaluation ignores ``epoch``."""
        tf = tensorflow()
        self._error = None
        try:
            for batch in self.dataset(epoch).as_numpy_iterator():
                if self.train:
                    del batch["valid"]
                yield batch
        except tf.errors.OpError:
            if self._error:
                raise DataError(self._error) from None
            raise
        self._flush()


def augment_pair(image, mask, seed):
    """Random flip, shift and scale (the same on image and mask), brightness/contrast.

    The geometric changes teach the model that a car is a car wherever it stands and
    however large; one transform for both keeps every label on its pixel, and the
    mask is resampled nearest so it stays binary. Colour changes touch the image
    only. All randomness is stateless, drawn from ``seed`` (2 integers).
    """
    tf = tensorflow()
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)

    flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
    image = tf.where(flip, tf.reverse(image, [1]), image)
    mask = tf.where(flip, tf.reverse(mask, [1]), mask)

    # Output pixel (x, y) samples the input at (x / s + tx, y / s + ty): a scale s about
    # the centre and a shift of up to 10% of each side.
    scale = tf.random.stateless_uniform([], seeds[1], 0.9, 1.1)
    dx = tf.random.stateless_uniform([], seeds[2], -0.1, 0.1) * w
    dy = tf.random.stateless_uniform([], seeds[3], -0.1, 0.1) * h
    inv = 1.0 / scale
    transform = tf.stack([inv, 0.0, (w - 1) * (1 - inv) / 2 - dx,
                          0.0, inv, (h - 1) * (1 - inv) / 2 - dy, 0.0, 0.0])[None]

    def warp(x, interpolation):
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None], transforms=transform, output_shape=tf.shape(x)[:2],
            interpolation=interpolation, fill_mode="REFLECT", fill_value=0.0)[0]

    image = warp(image, "BILINEAR")
    mask = warp(mask, "NEAREST")

    image = tf.image.stateless_random_brightness(image, 0.1, seeds[4])
    image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seeds[5])
    return tf.clip_by_value(image, 0.0, 1.0), mask
