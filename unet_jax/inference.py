"""Masks for images of any size from a trained run: what predict, evaluate and submit share.

The model sees each image exactly as training fed it: decoded and resized by
``data_pipeline.preprocess`` (the same function, so the same pixels), scaled to [0, 1].
Two ways to predict, the run's own by default:

* ``resize`` (runs trained on whole images): the image resized to the training size,
  one model call per image. A run trained on crops resizes instead to its own size
  times the training ``scale``, rounded to a multiple of ``2**depth`` (a few pixels),
  so the model sees objects at the scale it learned them.
* ``tile`` (runs trained on crops): the image at its own size times ``scale``,
  predicted tile by tile with overlap and mirrored borders (``unet_jax.tiling``):
  nothing is squashed, and any image size works.

Either may average mirrored views (``tta``). The logits are resized back to the
image's own size, bilinearly, and only then thresholded at 0 (probability 0.5) or
arg-maxed: thresholding first and resizing the mask would give blocky edges, and
Carvana is scored at full size.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from data_pipeline import preprocess
from data_pipeline.errors import DataError
from unet_jax import tiling

log = logging.getLogger(__name__)


def check_options(overlap: float, tta: str) -> None:
    """Raises ConfigError, naming the flag, for an overlap or tta that cannot work."""
    from unet_jax.config import ConfigError

    if not (isinstance(overlap, (int, float)) and 0 <= overlap < 1):
        raise ConfigError(f"--overlap {overlap}: give a fraction in [0, 1), e.g. 0.25")
    if tta not in tiling.TTA:
        raise ConfigError(f"--tta {tta!r}: choose one of {', '.join(tiling.TTA)}")


def resize_logits(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (h, w, C) float logits to (height, width)."""
    if tuple(logits.shape[:2]) == tuple(size):
        return logits
    height, width = size
    channels = [np.asarray(Image.fromarray(logits[..., c], mode="F").resize(
        (width, height), Image.BILINEAR)) for c in range(logits.shape[-1])]
    return np.stack(channels, axis=-1)


class Predictor:
    """Restores a run's parameters once and turns image files into full-size masks.

    ``tile``, ``overlap`` and ``tta`` default to the run's own settings (``Config``:
    tiled for a run trained on crops); they are plain attributes, so one Predictor
    can score several ways of predicting.
    """

    def __init__(self, run_dir, which="best", batch_size: int = 8, *, tile=None,
                 overlap=None, tta=None):
        from unet_jax import checkpoints
        from unet_jax.train import create_model

        self.params, self.config, self.epoch = checkpoints.restore_params(run_dir, which)
        self.apply_fn = create_model(self.config).apply
        self.batch_size = batch_size
        self.tile = self.config.tiled if tile is None else bool(tile)
        self.overlap = self.config.overlap if overlap is None else overlap
        self.tta = self.config.tta if tta is None else tta
        check_options(self.overlap, self.tta)

    @property
    def mode(self) -> str:
        return "tile" if self.tile else "resize"

    def describe(self) -> str:
        """How masks are predicted, in words, for the tools' summary lines."""
        c = self.config
        if self.tile:
            how = (f"tiles of {c.tile[0]}x{c.tile[1]} at scale {c.scale}, overlap "
                   f"{self.overlap}")
        elif c.crop is None:
            how = f"resized to {c.image_size[0]}x{c.image_size[1]}"
        else:
            how = f"whole at scale {c.scale}"
        return how + (f", test-time {self.tta}" if self.tta != "none" else "")

    def model_input(self, path) -> np.ndarray:
        """What the model sees for an image file: (H, W, C) float32 in [0, 1], the very
        array the training pipeline makes of that file (resized, or for a crop-trained
        run, the whole image at the training scale that crops are cut from)."""
        c = self.config
        if self.tile:
            image = preprocess.load_image(path, None, c.in_channels, scale=c.scale)
        elif c.crop is None:
            image = preprocess.load_image(path, c.image_size, c.in_channels)
        else:
            step = 2 ** c.depth
            size = preprocess.scaled_size(preprocess.image_size_of(path), c.scale)
            image = preprocess.load_image(
                path, tuple(max(step, round(s / step) * step) for s in size), c.in_channels)
        return preprocess.to_float(image)

    def _predict(self, batch: np.ndarray) -> np.ndarray:
        import jax

        from unet_jax.train import predict_step

        return jax.device_get(predict_step(self.params, batch, self.apply_fn, self.tta))

    def logits(self, inputs: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Logits (H, W, classes) at each image's own size, from ``model_input`` arrays."""
        if self.tile:
            return [resize_logits(tiling.predict_tiled(self._predict, x, self.config.tile,
                                                       self.overlap, self.batch_size), size)
                    for x, size in zip(inputs, sizes)]
        out = [None] * len(inputs)
        same_shape = {}
        for i, x in enumerate(inputs):
            same_shape.setdefault(x.shape, []).append(i)
        for shape, indices in same_shape.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                batch = np.zeros((self.batch_size, *shape), np.float32)  # compiles once
                batch[:len(chunk)] = [inputs[i] for i in chunk]
                logits = self._predict(batch)
                for row, i in enumerate(chunk):
                    out[i] = resize_logits(logits[row], sizes[i])
        return out

    @staticmethod
    def to_mask(logits: np.ndarray) -> np.ndarray:
        """Bool (H, W) for one class, else class ids."""
        return logits[..., 0] > 0 if logits.shape[-1] == 1 else logits.argmax(-1)

    def predict_files(self, paths, skip_bad: bool = False, images: bool = False):
        """Yields (path, image, mask) for each readable file, ``mask`` at the file's own
        size; ``image`` is the file at its own size (float32 in [0, 1], for figures)
        when ``images``, else None. One batch of files is read at a time, so a folder
        of any size fits in memory.

        An unreadable file raises its one-line DataError, or with ``skip_bad`` is
        skipped with a warning while the other images of its batch go on.
        """
        # Tiling batches the tiles of one image; holding one whole image at a time
        # bounds memory for very large photos.
        files_per_call = 1 if self.tile else self.batch_size
        for start in range(0, len(paths), files_per_call):
            chunk, inputs, sizes, pictures = [], [], [], []
            for path in paths[start:start + files_per_call]:
                try:
                    inputs.append(self.model_input(path))
                    with preprocess.open_image(path) as img:
                        sizes.append(img.size[::-1])
                    if images:
                        pictures.append(preprocess.to_float(
                            preprocess.load_image(path, None, self.config.in_channels)))
                except DataError as e:
                    if not skip_bad:
                        raise
                    log.warning("skipping %s", e)
                    del inputs[len(chunk):], sizes[len(chunk):], pictures[len(chunk):]
                    continue
                chunk.append(path)
            logits = self.logits(inputs, sizes)
            for i, (path, logit) in enumerate(zip(chunk, logits)):
                yield path, pictures[i] if images else None, self.to_mask(logit)
