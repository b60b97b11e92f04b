"""The tf.data pipeline: files on disk to numpy batches for the jitted train step.

Per example: decode the image and its mask, resize the image (bilinear or area) and
the mask (by the label covering most of each pixel, so it stays binary and on the
image) to the model's size, and keep the result as
uint8 in a cache, so that only the first epoch pays for decoding. Per epoch: a seeded
order, optional paired augmentation, scaling to [0, 1], batching, and prefetching in
background threads while the accelerator works on the previous batch.

Patch training (``crop``): the U-Net paper's way. Each example is cached once at its
own resolution times ``scale`` (never squashed to a square), and every epoch draws
``crops_per_image`` random crops of ``crop`` from each image, so that the model sees
fine detail at full resolution and a few large images give many steps. Validation
then scores whole images (``examples``) at that scale, in one pass each (tiles only
where a pass would not fit in memory: ``unet_jax.prediction``). The cache holds every
image at that size: Kaggle's 5,088 Carvana photos (1918x1280 RGB plus a one-byte
mask per pixel, 9.8 MB each) take 50 GB at scale 1.0 and 12.5 GB at scale 0.5, so
for data larger than memory give ``cache`` a file prefix (memory-mapped; the pages
the epoch reads are loaded on demand).

Determinism: the order of epoch ``e`` is a permutation drawn from ``(seed, e)``, and
the crop and augmentation of an example from ``(seed, e, its index)``, so a fresh
process produces exactly the batches of the original one. That is what lets
``--resume`` continue a run as if it had never stopped.

Decoding uses Pillow for every format, and this was measured, not assumed: Kaggle's
1918x1280 JPEGs decode at 3-5 ms each with Pillow's DCT scaling (``draft``) for small
targets, as fast as ``tf.io.decode_jpeg(ratio=...)`` and faster than a full TF decode
plus antialiased resize; and Pillow reads palette GIFs as palette indices (Kaggle's
masks store the car as index 1; ``tf.io.decode_gif`` returns the palette's colours),
TIFF (which TF cannot decode), 16-bit and palette images.

The cache is a pair of flat numpy arrays (in memory, or memory-mapped files) that the
pipeline object holds, one slot per example at its own size, filled as examples are
first read. tf.data's own ``cache()``
is reused by the datasets derived from it each epoch (checked: TF 2.21 decodes once
over three epochs), but it is read in sequence: an exact seeded permutation of the
whole epoch and every-n-th sharding need random access, and tf.data discards a cache
whose first pass was interrupted.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import math
import numbers
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline.augment import augment_pair, parse_augment
from data_pipeline.errors import DataError
from data_pipeline.files import Pair
from data_pipeline.preprocess import (DECODE_VERSION, RESIZE, image_size_of, load_example,
                                      scaled_size)
from data_pipeline.tf_setup import tensorflow

def label_range(mask: np.ndarray, ignore_index: int | None = None) -> tuple[float, float]:
    """(lowest, highest) label of ``mask``, its ``ignore_index`` pixels left out;
    (inf, -inf) where nothing is left."""
    if ignore_index is not None:
        mask = mask[mask != ignore_index]
    if not mask.size:
        return np.inf, -np.inf
    return float(mask.min()), float(mask.max())


def check_caches(pipelines) -> None:
    """Checks, before any epoch, that the decoded examples of ``pipelines`` (a run's
    training and validation sides) fit where ``--cache`` keeps them: in memory, within
    the memory this process may use (a container's limit, where it has one); in files,
    in a writable folder with the space for them. A run that would fail in its first
    epoch, or be killed as its cache filled memory (numpy maps the cache's pages
    lazily, so the allocation itself succeeds), stops at once."""
    pipelines = [p for p in pipelines if p.cache is not None]
    need = {}
    for p in pipelines:
        need[p.cache] = need.get(p.cache, 0) + p.cache_bytes()
    for cache, total in need.items():
        if cache == "memory":
            from unet_jax.platform import memory_limit

            memory = memory_limit()
            if memory and total > 0.8 * memory:
                raise DataError(f"--cache memory would keep {_gb(total)} of decoded images "
                                f"in the {_gb(memory)} of memory this process may use; "
                                "pass --cache disk (memory-mapped files, read back as "
                                "needed), or a smaller --image-size (--scale with --crop)")
            continue
        folder = Path(cache).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # A name of its own (mkstemp): processes of several hosts on one shared
            # folder may all have the same pid.
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".unet-jax-write-test-")
            os.close(fd)
            os.unlink(probe)
            free = shutil.disk_usage(folder).free
        except OSError as e:
            raise DataError(f"--cache {cache}: cannot write in {folder} "
                            f"({e.strerror or e}); give a prefix in a writable folder, or "
                            "'memory'") from None
        missing = sum(p.cache_bytes() for p in pipelines
                      if p.cache == cache and not p.cache_files_exist())
        if missing > free:
            raise DataError(f"--cache {cache} needs {_gb(missing)} for the decoded images "
                            f"and {folder} has {_gb(free)} free; free space, or give a "
                            "prefix on a larger disk, or a smaller --image-size (--scale "
                            "with --crop)")


def _size(value, name: str) -> tuple[int, int]:
    """(height, width) of a size given as one number (a square) or two, read as Config
    reads ``image_size`` (``config.normalize_image_size``); ValueError naming ``name``."""
    from unet_jax.config import normalize_image_size

    return normalize_image_size(value, None, name)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class InputPipeline:
    """The batches of one side of a split, epoch by epoch.

    Args:
      pairs: the image/mask pairs (from ``find_pairs`` and ``split_pairs``).
      image_size: (height, width) every image is resized to (without ``crop``).
      batch_size: images per batch of this process.
      train: shuffle each epoch, augment (if ``augment``) and drop the last partial
        batch, so the train step compiles once. Otherwise keep the order and pad the
        last batch with zeros, ``valid`` marking the real rows, so one compiled eval
        step serves every batch.
      seed: with the epoch number, fixes the order, the crops and the augmentation.
      augment: the augmentations by name (``augment.parse_augment``: e.g.
        "flip,shift,color,elastic,rotate"; True for flip,shift,color), training only.
      crop: (height, width) of the random crops to train on, or None to train on
        whole resized images. Images are then kept at their own size times
        ``scale``; one smaller than the crop is mirrored at its borders to fit.
        Evaluation reads whole images with ``examples`` instead of batches.
      scale: with ``crop``, the factor every image is resized by first.
      crops_per_image: with ``crop``, crops drawn from each image per epoch.
      cache: 'memory', None or 'none' (decode every epoch, as ``--cache none``) or a
        file path prefix: the decoded
        examples then live in memory-mapped files, reused by later runs with the same
        files and settings (``<prefix>-<hash>.images.npy`` and so on).
      in_channels: 3 (RGB) or 1 (grayscale).
      resize: 'bilinear' or 'area' for images (masks: ``preprocess.resize_labels``).
      shard: (index, count): in a run of ``count`` processes, this process reads every
        ``count``-th example of each global batch, from ``index`` on, after the
        epoch's shuffle; the processes' batches together are the global batch a
        single process would see, and every process yields the same number of batches.
      num_classes: 1 for binary masks (foreground by ``preprocess.load_mask``'s rule);
        more keeps the masks' integer class ids.
      max_value: the value of 16-bit and float images that becomes 255 (4095 for 12-bit
        data); 0 for the rule of the file's type (``preprocess.eight_bits``).
      ignore_index: a mask value kept as it is beside the class ids (``--ignore-index``),
        for the losses and metrics to leave out.

    Batches are dicts of numpy arrays: ``image`` (B, h, w, C) float32 in [0, 1] and
    ``mask`` (B, h, w, 1) float32, and for evaluation ``valid`` (B,) bool.
    """

    def __init__(self, pairs: list[Pair], *, image_size, batch_size: int, train: bool,
                 seed: int = 0, augment=False, cache: str | None = "memory",
                 in_channels: int = 3, resize: str = "bilinear", shard=(0, 1),
                 num_classes: int = 1, crop=None, scale: float = 1.0,
                 crops_per_image: int = 1, max_value: float = 0.0,
                 ignore_index: int | None = None):
        if not pairs:
            raise DataError("no images for this split; add data or lower --val-fraction")
        if resize not in RESIZE:
            raise ValueError(f"resize {resize!r}: choose one of {', '.join(RESIZE)}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels {in_channels}: choose 1 (grayscale) or 3 (RGB)")
        for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} {value!r}: give a whole number, {low} or more")
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard {shard}: give (index, count) with 0 <= index < count")
        if crops_per_image < 1 or (crop is None and crops_per_image != 1):
            raise ValueError(f"crops_per_image {crops_per_image}: give 1 or more, with crop")
        self.pairs = list(pairs)
        # One number is a square, as Config and --image-size take it.
        self.image_size = _size(image_size, "image_size")
        self.crop = _size(crop, "crop") if crop is not None else None
        self.scale = scale
        self.crops_per_image = crops_per_image
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.augment = parse_augment(augment) if train else ""
        # 'none' is how Config and --cache spell it; taken as a prefix, it would write
        # none-<hash>.images.npy into the working directory.
        self.cache = None if cache == "none" else cache
        self.in_channels = in_channels
        self.resize = resize
        self.shard = (index, count)
        self.num_classes = num_classes
        self.max_value = max_value
        self.ignore_index = ignore_index
        if train and len(self) == 0:
            more = " or raise --crops-per-image" if crop is not None else ""
            raise DataError(f"{len(self.pairs)} training images make no full batch of "
                            f"{batch_size * count} (--batch-size); lower the batch size{more}")
        self._store = None  # (images, masks, ready) once the cache is opened
        self._sizes = None  # (n, 2) height and width of each cached example
        self._starts = None  # (n + 1,) each example's first mask pixel in the store
        self._lock = threading.Lock()
        self._error = None  # the DataError message of a file that failed to decode

    # --- sizes and order ---------------------------------------------------------------

    def _views(self) -> int:
        """Examples per training epoch: each image ``crops_per_image`` times."""
        return len(self.pairs) * (self.crops_per_image if self.train else 1)

    def __len__(self) -> int:
        """Batches per epoch for this process (the same for every process)."""
        n, (_, count) = len(self.pairs), self.shard
        if self.train:
            return self._views() // (self.batch_size * count)
        return math.ceil(math.ceil(n / count) / self.batch_size)

    def order(self, epoch: int = 0) -> np.ndarray:
        """What this process reads in ``epoch``, in order: indices into ``pairs``, or
        in training, view numbers (view ``v`` is a crop of image ``v % len(pairs)``;
        without ``crops_per_image`` the two are the same).

        Training: the global permutation of ``(seed, epoch)``, cut to whole global
        batches, then every ``count``-th from ``index``. Evaluation: the files in
        order, every ``count``-th (padding comes later).
        """
        if epoch < 0:
            raise ValueError(f"epoch {epoch} must be >= 0")
        n, (index, count) = len(self.pairs), self.shard
        if not self.train:
            return np.arange(index, n, count)
        order = np.random.default_rng([self.seed, epoch]).permutation(self._views())
        return order[: len(self) * self.batch_size * count][index::count]

    def sizes(self) -> np.ndarray:
        """(n, 2) height and width of each example as cached: ``image_size``, or with
        ``crop`` the image's own size times ``scale`` (read from the file headers)."""
        if self._sizes is None:
            if self.crop is None:
                sizes = [self.image_size] * len(self.pairs)
            else:
                sizes = [scaled_size(image_size_of(p.image), self.scale) for p in self.pairs]
            self._sizes = np.asarray(sizes, np.int64).reshape(len(self.pairs), 2)
        return self._sizes

    # --- decoding and the cache ------------------------------------------------------

    def _decode(self, index: int):
        """Example ``index`` decoded from its files, remembering a failure's message."""
        try:
            return load_example(self.pairs[index], None if self.crop else self.image_size,
                                self.in_channels, self.resize, self.num_classes, self.scale,
                                self.max_value, self.ignore_index)
        except DataError as e:
            self._error = str(e)  # TF wraps the exception; epoch() raises it again
            raise

    def _cache_key(self) -> str:
        """A digest of everything the cached bytes depend on: the files (dates
        included), the sizes, and the decoding rules' version."""
        files = []
        for p in self.pairs:
            for f in (p.image, p.mask):
                st = f.stat()
                files.append([str(f), st.st_size, st.st_mtime_ns])
        size = ["native", self.scale] if self.crop else self.image_size
        key = json.dumps([files, size, self.in_channels, self.resize, self.num_classes,
                          DECODE_VERSION] + ([self.max_value] if self.max_value else [])
                         + ([self.ignore_index] if self.ignore_index is not None else []))
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def _offsets(self) -> np.ndarray:
        """(n + 1,) start of each example's mask pixels in the flat store (its image
        starts at ``in_channels`` times that)."""
        sizes = self.sizes()
        return np.concatenate([[0], np.cumsum(sizes[:, 0] * sizes[:, 1])])

    def cache_bytes(self) -> int:
        """Bytes the cache of every example takes: images, masks and ready flags."""
        return int(self._offsets()[-1]) * (self.in_channels + 1) + len(self.pairs)

    def _cache_base(self) -> str:
        index, count = self.shard
        return f"{self.cache}-{self._cache_key()}" + (f"-{index}of{count}" if count > 1 else "")

    def cache_files_exist(self) -> bool:
        """Whether an earlier run's cache files for these examples are there."""
        base = self._cache_base()  # one listing and hash of the files, not one per kind
        return all(Path(f"{base}.{k}.npy").is_file() for k in ("images", "masks", "ready"))

    def _open_store(self):
        """The cache arrays: (images, masks, ready), flat uint8 arrays holding every
        example at its own size, and ready[i] once example i is in."""
        n, c, pixels = len(self.pairs), self.in_channels, int(self._offsets()[-1])
        shapes = {"images": (pixels * c,), "masks": (pixels,), "ready": (n,)}
        dtypes = {"images": np.uint8, "masks": np.uint8, "ready": np.bool_}
        if self.cache == "memory":
            # np.zeros maps zeroed pages lazily: memory is used as examples arrive.
            return tuple(np.zeros(shapes[k], dtypes[k]) for k in shapes)
        base = self._cache_base()
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        # Two runs on the same data and settings (--cache disk makes that the default)
        # share these files. One at a time opens them: a run that found them half
        # made would make them again, truncating files the other has mapped (SIGBUS),
        # or pair one run's images with the other's ready flags.
        with open(f"{base}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:  # a previous run's cache, if whole: ready[i] says which examples it holds
                arrays = tuple(np.load(f"{base}.{k}.npy", mmap_mode="r+") for k in shapes)
                if all(a.shape == shapes[k] and a.dtype == dtypes[k]
                       for a, k in zip(arrays, shapes)):
                    return arrays
            except (OSError, ValueError):
                pass
            return tuple(np.lib.format.open_memmap(f"{base}.{k}.npy", "w+", dtypes[k],
                                                   shapes[k]) for k in shapes)

    def _cached(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (image, mask) of example ``index``, decoded on first use and kept in
        the cache; views into the cache, not copies."""
        if self.cache is None:
            return self._decode(index)
        with self._lock:
            if self._store is None:
                self._starts = self._offsets()
                self._store = self._open_store()
        images, masks, ready = self._store
        (h, w), c = self.sizes()[index], self.in_channels
        start, end = self._starts[index], self._starts[index + 1]
        image = images[start * c:end * c].reshape(h, w, c)
        mask = masks[start:end].reshape(h, w, 1)
        if not ready[index]:
            image[...], mask[...] = self._decode(index)
            ready[index] = True  # after the data: a reader never sees half an example
        return image, mask

    def _example(self, index) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (image, mask) of example ``index`` (a copy); zeros for eval padding
        (index -1)."""
        index = int(index)
        if index < 0:
            (h, w), c = self.image_size, self.in_channels
            return np.zeros((h, w, c), np.uint8), np.zeros((h, w, 1), np.uint8)
        image, mask = self._cached(index)
        return np.array(image), np.array(mask)

    def _crop(self, view, epoch) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (image, mask) of a random ``crop`` of view ``view``'s image, placed
        uniformly by ``(seed, epoch, view)``. An image smaller than the crop is
        mirrored at its bottom and right borders to fit, as tiled prediction does."""
        view, (ch, cw) = int(view), self.crop
        image, mask = self._cached(view % len(self.pairs))
        h, w = image.shape[:2]
        if h < ch or w < cw:
            pad = ((0, max(0, ch - h)), (0, max(0, cw - w)), (0, 0))
            image, mask = np.pad(image, pad, "symmetric"), np.pad(mask, pad, "symmetric")
            h, w = image.shape[:2]
        rng = np.random.default_rng([self.seed, int(epoch), view])
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        return (np.ascontiguousarray(image[y:y + ch, x:x + cw]),
                np.ascontiguousarray(mask[y:y + ch, x:x + cw]))

    def examples(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every example whole, in order, as uint8 (image, mask) at its cached size:
        what validation of a crop-trained run predicts, whole."""
        for index in range(len(self.pairs)):
            yield self._example(index)
        self._flush()

    def mask_range(self) -> tuple[float, float]:
        """The lowest and highest value of this process's share of the whole masks
        (from the cache, decoded where not yet there), stopping as soon as both
        background (0) and something else were seen: the check of the masks as a
        whole that batches of random crops cannot make, as crops of a sparse object
        may all miss it. Pixels of ``ignore_index`` are no value."""
        low, high = np.inf, -np.inf
        index, count = self.shard
        for i in range(index, len(self.pairs), count):
            labels = label_range(self._cached(i)[1], self.ignore_index)
            low, high = min(low, labels[0]), max(high, labels[1])
            if low == 0 < high:
                break
        self._flush()
        return low, high

    def fill(self, workers: int | None = None) -> None:
        """Decodes every example into the cache now, in parallel threads (Pillow's
        decoders release the GIL), instead of during the first epoch."""
        if self.cache is None:
            return
        with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
            list(pool.map(self._cached, range(len(self.pairs))))
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
        if self.crop is not None and not self.train:
            raise ValueError("whole images of a crop pipeline differ in size and make no "
                             "batches; read them with examples()")
        indices = self.order(epoch)
        valid = np.ones(len(indices), bool)
        if not self.train:  # pad with zero images to whole batches, marked not valid
            pad = len(self) * self.batch_size - len(indices)
            indices = np.concatenate([indices, np.full(pad, -1)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
        (h, w), c = self.crop or self.image_size, self.in_channels
        key = tf.constant([self.seed, epoch], tf.int64)
        augment = self.augment
        if self.crop is not None:
            read = lambda view: self._crop(view, epoch)  # noqa: E731
        else:
            read = self._example

        def load(index, is_valid):
            image, mask = tf.numpy_function(read, [index], [tf.uint8, tf.uint8])
            image = tf.cast(tf.ensure_shape(image, (h, w, c)), tf.float32) / 255.0
            mask = tf.ensure_shape(mask, (h, w, 1))
            if augment:  # the mask stays uint8 until then: a quarter of the bytes to move
                image, mask = augment_pair(
                    image, mask, tf.random.experimental.stateless_fold_in(key, index),
                    augment)
            return {"image": image, "mask": tf.cast(mask, tf.float32), "valid": is_valid}

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

