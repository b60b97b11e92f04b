"""Masks for images of any size from a trained run: what predict, evaluate and submit share.

The model sees each image exactly as training fed it: decoded and resized by
``data_pipeline.preprocess`` (the same function, so the same pixels), scaled to [0, 1].
Its logits are resized back to the image's own size, bilinearly, and only then
thresholded at 0 (probability 0.5) or arg-maxed: thresholding first and resizing the
mask would give blocky edges, and Carvana is scored at full size.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from data_pipeline import preprocess
from data_pipeline.errors import DataError

log = logging.getLogger(__name__)


def resize_logits(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (h, w, C) float logits to (height, width)."""
    height, width = size
    channels = [np.asarray(Image.fromarray(logits[..., c], mode="F").resize(
        (width, height), Image.BILINEAR)) for c in range(logits.shape[-1])]
    return np.stack(channels, axis=-1)


class Predictor:
    """Restores a run's parameters once and turns image files into full-size masks."""

    def __init__(self, run_dir, which="best", batch_size: int = 8):
        from unet_jax import checkpoints
        from unet_jax.train import create_model

        self.params, self.config, self.epoch = checkpoints.restore_params(run_dir, which)
        self.apply_fn = create_model(self.config).apply
        self.batch_size = batch_size

    def model_input(self, path) -> np.ndarray:
        """What the model sees for an image file: (H, W, C) float32 in [0, 1] at the
        training size, the very array the training pipeline feeds for that file."""
        return preprocess.to_float(preprocess.load_image(
            path, self.config.image_size, self.config.in_channels))

    def logits(self, inputs: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Logits (H, W, classes) at each image's own size, from ``model_input`` arrays."""
        import jax

        from unet_jax.train import predict_step

        out = []
        shape = (self.batch_size, *self.config.image_size, self.config.in_channels)
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            batch = np.zeros(shape, np.float32)  # a fixed shape compiles the model once
            batch[:len(chunk)] = chunk
            logits = jax.device_get(predict_step(self.params, batch, self.apply_fn))
            out += [resize_logits(logit, size)
                    for logit, size in zip(logits, sizes[start:start + self.batch_size])]
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
        for start in range(0, len(paths), self.batch_size):
            chunk, inputs, sizes, pictures = [], [], [], []
            for path in paths[start:start + self.batch_size]:
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
