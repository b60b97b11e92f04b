"""Masks for images of any size from a trained run: what predict, evaluate and submit share.

The model sees each image exactly as training fed it: decoded and resized by
``data_pipeline.preprocess`` (the same function, so the same pixels). How it predicts
is the run's ``PredictionMode`` (``unet_jax.prediction``): resized to the training
size, the whole image at the training scale, or tile by tile; the tools' ``--tile``,
``--overlap`` and ``--tta`` choose otherwise.

The host decodes files and writes the results; everything between, the resize of
the logits back to the image's own size and the threshold (or arg-max) included,
is one jitted program per image size (``prediction.predict_batch``), fed a batch of
same-size images at a time. The logits are resized before thresholding, bilinearly:
thresholding first and resizing the mask would give blocky edges, and Carvana is
scored at full size.
"""

from __future__ import annotations

import logging
import numbers
import os
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline import preprocess
from data_pipeline.errors import DataError
from unet_jax.prediction import PredictionMode, how_of_tile_flag, predict_batch

log = logging.getLogger(__name__)


def resize_logits(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (h, w, C) float logits to (height, width) with Pillow: the
    host's way, which the device program's resize is tested against."""
    if tuple(logits.shape[:2]) == tuple(size):
        return logits
    height, width = size
    channels = [np.asarray(Image.fromarray(logits[..., c], mode="F").resize(
        (width, height), Image.BILINEAR)) for c in range(logits.shape[-1])]
    return np.stack(channels, axis=-1)


def _padded_count(count: int, limit: int) -> int:
    """The batch a program call pads ``count`` images to: ``limit``, or for fewer the
    next power of two, so a folder compiles a few shapes and wastes little work."""
    return min(limit, 1 << (count - 1).bit_length())


class Predictor:
    """Restores a run's parameters once and turns image files into full-size masks.

    ``which``: the checkpoint, "best" (by validation Dice), "latest" or an epoch.
    ``mode`` is the run's ``PredictionMode`` unless ``tile`` (the tools' --tile and
    --no-tile), ``overlap``, ``tta`` or ``threshold`` say otherwise; it is a plain
    attribute, so one Predictor can score several ways of predicting.
    ``memory_budget``: the bytes a whole-image pass may take before a run trained on
    crops tiles instead (default ``prediction.default_memory_budget()``: half the
    GPU's memory, a quarter of the host's on a CPU). ``batch_size`` images (or tiles)
    go through the model per call.
    """

    def __init__(self, run_dir, which="best", batch_size: int = 8, *, tile=None,
                 overlap=None, tta=None, memory_budget=None, threshold=None):
        from unet_jax import checkpoints
        from unet_jax.train import create_model

        if (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                or batch_size < 1):
            raise ValueError(f"batch_size {batch_size!r}: give a whole number of images, 1 "
                             "or more")
        self.params, self.config, self.epoch = checkpoints.restore_params(run_dir, which)
        self.apply_fn = create_model(self.config).apply
        self.batch_size = batch_size
        self.mode = PredictionMode.from_config(
            self.config, how_of_tile_flag(self.config, tile), overlap, tta, memory_budget,
            threshold)
        self._warned = False  # the warning of tiles on a run of resized images, once

    def describe(self) -> str:
        """How masks are predicted, in words, for the tools' summary lines."""
        return self.mode.describe()

    def decode(self, path) -> np.ndarray:
        """uint8 (h, w, C) of an image as the model sees it: resized to the training
        size, or at its own size times the training scale. ``path`` is an image file,
        or an image in memory: a Pillow image or a numpy array (H, W), (H, W, 1), 3 or
        4 channels, uint8, 16-bit or floats in [0, 1] (``preprocess.opened``)."""
        c = self.config
        if self.mode.how == "resize":
            return preprocess.load_image(path, c.image_size, c.in_channels,
                                         max_value=c.max_value)
        image = preprocess.load_image(path, None, c.in_channels, scale=self.mode.scale,
                                      max_value=c.max_value)
        if c.crop is None and image.shape[:2] != tuple(c.image_size) and not self._warned:
            # Such a run saw its images squashed to image_size, at a scale no file
            # records: tiles at the file's own resolution match it only if the
            # training images had that size already.
            self._warned = True
            # Height x width throughout, as --image-size takes them.
            log.warning("--tile on a run trained on whole images resized to %dx%d (height "
                        "x width): %s is tiled at its own %dx%d, which matches training "
                        "only if the training images were %dx%d too; otherwise predict "
                        "without --tile, or train with --crop (and --scale) for tiles",
                        *c.image_size, preprocess.name_of(path), *image.shape[:2],
                        *c.image_size)
        return image

    def predict(self, image) -> np.ndarray:
        """The mask of one image (a file, a Pillow image or a numpy array, as
        ``decode`` takes) at its own size: bool (H, W) for one class, else uint8 class
        ids. ``predict_files`` does the same for many files, a batch at a time. (A
        large JPEG file is decoded at its own reduced scale, as training read it; an
        image already in memory is resized from its full pixels, so a few edge pixels
        of its mask may differ from the file's.)"""
        size = preprocess.image_size_of(image)
        return self.masks([self.decode(image)], [size])[0]

    def model_input(self, path) -> np.ndarray:
        """What the model sees for an image file: (h, w, C) float32 in [0, 1], the very
        array the training pipeline makes of that file."""
        return preprocess.to_float(self.decode(path))

    def _predict(self, inputs: list[np.ndarray], sizes: list[tuple[int, int]],
                 masks: bool) -> list[np.ndarray]:
        """Masks (or logits) at each image's own size, from ``decode`` (or
        ``model_input``) arrays: one program call per batch of same-size images."""
        self._check_inputs(inputs, sizes)
        out = [None] * len(inputs)
        groups = {}
        for i, (x, size) in enumerate(zip(inputs, sizes)):
            groups.setdefault((x.shape, x.dtype.str, tuple(size)), []).append(i)
        for (shape, _, size), indices in groups.items():
            limit = self.mode.images_per_call(shape[:2], self.batch_size)
            mode = self.mode.resolved(shape[:2])
            for start in range(0, len(indices), limit):
                chunk = indices[start:start + limit]
                batch = np.zeros((_padded_count(len(chunk), limit), *shape), inputs[chunk[0]].dtype)
                batch[:len(chunk)] = [inputs[i] for i in chunk]
                result = np.asarray(predict_batch(
                    self.params, batch, np.int32(len(chunk)), self.apply_fn, mode,
                    self.batch_size, tuple(size), masks, np.float32(mode.logit_threshold)))
                for row, i in enumerate(chunk):
                    out[i] = result[row]
        return out

    def _check_inputs(self, inputs, sizes) -> None:
        """Raises a one-line ValueError for arrays the model would misread: the pixels
        are scaled by dtype (uint8 / 255, floats as they are), so any other integer
        type, or floats over 1, would give wrong masks without an error."""
        if len(sizes) != len(inputs):
            raise ValueError(f"{len(inputs)} images but {len(sizes)} sizes: give each "
                             "image the (height, width) to predict its mask at")
        for i, size in enumerate(sizes):
            if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(
                    isinstance(n, numbers.Integral) and n > 0 for n in size)):
                raise ValueError(f"size {i} is {size!r}: give the (height, width) to "
                                 "predict the mask at, two whole numbers over 0")
        channels = self.config.in_channels
        for i, x in enumerate(inputs):
            x = np.asarray(x)
            if x.ndim != 3 or x.shape[-1] != channels:
                raise ValueError(f"image {i} has shape {x.shape}; the run takes (height, "
                                 f"width, {channels}) arrays, as decode() makes of a file")
            if self.mode.how == "resize" and x.shape[:2] != tuple(self.config.image_size):
                # The model would run at the wrong scale, and answer worse without a word.
                raise ValueError(
                    f"image {i} is {x.shape[0]}x{x.shape[1]}, but this run predicts images "
                    f"resized to {self.config.image_size[0]}x{self.config.image_size[1]}: "
                    "pass decode(image), which resizes, or use predict(image)")
            if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
                raise ValueError(f"image {i} is {x.dtype}: give uint8 (0..255, as decode() "
                                 "makes) or floats in [0, 1] (as model_input() makes)")
            if x.dtype != np.uint8 and x.size and not 0 <= float(x.min()) <= float(x.max()) <= 1:
                raise ValueError(f"image {i} is {x.dtype} with values in [{float(x.min()):g},"
                                 f" {float(x.max()):g}]; float images must be in [0, 1] "
                                 "(divide 0..255 values by 255)")

    def logits(self, inputs: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Float32 logits (H, W, classes) at each image's own size, from ``decode``
        (uint8) or ``model_input`` (float32) arrays."""
        return self._predict(inputs, sizes, masks=False)

    def masks(self, inputs: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Masks at each image's own size, from ``decode`` arrays: bool (H, W) for one
        class, else uint8 class ids (the arg-max of the logits)."""
        binary = self.config.num_classes == 1
        return [m.astype(bool) if binary else m for m in self._predict(inputs, sizes, True)]

    def to_mask(self, logits: np.ndarray, logit_threshold: float | None = None) -> np.ndarray:
        """Bool (H, W) for one class (over the mode's threshold, or ``logit_threshold``),
        else uint8 class ids, of host logits (H, W, classes), as the device program
        thresholds them (``masks``' types)."""
        if logits.shape[-1] == 1:
            if logit_threshold is None:
                logit_threshold = self.mode.logit_threshold
            return logits[..., 0] > np.float32(logit_threshold)
        return logits.argmax(-1).astype(np.uint8)

    def predict_files(self, paths, skip_bad: bool = False, images: bool = False,
                      logits: bool = False):
        """Yields (path, image, mask) for each readable file, in order, ``mask`` at the
        file's own size (with ``logits``, the float32 logits (H, W, classes) it is
        thresholded from, ``to_mask``); ``image`` is the file at its own size (float32
        in [0, 1], for figures) when ``images``, else None. ``batch_size`` files are
        read at a time, so a folder of any size fits in memory.

        An unreadable file raises its one-line DataError, or with ``skip_bad`` is
        skipped with a warning while the other images of its batch go on. ``paths``
        is a list of files, or one file (a str or Path), never read as its characters.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [Path(p) for p in paths]
        for start in range(0, len(paths), self.batch_size):
            chunk, inputs, sizes, pictures = [], [], [], []
            for path in paths[start:start + self.batch_size]:
                try:
                    inputs.append(self.decode(path))
                    sizes.append(preprocess.image_size_of(path))
                    if images:
                        pictures.append(preprocess.to_float(
                            preprocess.load_image(path, None, self.config.in_channels,
                                                  max_value=self.config.max_value)))
                except DataError as e:
                    if not skip_bad:
                        raise DataError(f"{e}, or pass --skip-bad to skip such "
                                        "images") from None
                    log.warning("skipping %s", e)
                    del inputs[len(chunk):], sizes[len(chunk):], pictures[len(chunk):]
                    continue
                chunk.append(path)
            results = (self.logits if logits else self.masks)(inputs, sizes)
            for i, (path, result) in enumerate(zip(chunk, results)):
                yield path, pictures[i] if images else None, result
