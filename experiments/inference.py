"""Masks for images of any size from a trained run: what predict, evaluate and submit share.

The model sees every image at the size it was trained at (resized bilinearly, as the
guide's ``transforms.Resize``). Its logits are resized back to the image's own size,
bilinearly, and only then thresholded at 0 (probability 0.5): thresholding first and
resizing the binary mask would give blocky edges, and Carvana is scored at full size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline.errors import DataError


def load_image(path, channels: int = 3) -> np.ndarray:
    """(H, W, channels) float32 in [0, 1]; grayscale, palette and RGBA are converted."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            array = np.asarray(img, np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({e}); remove or replace the file") from None
    return array if channels == 3 else array[..., None]


def load_mask(path) -> np.ndarray:
    """(H, W) int mask: any non-zero value is foreground (Kaggle's GIFs hold index 1)."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the mask ({e}); remove or replace the file") from None
    return array.max(axis=-1) if array.ndim == 3 else array


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W, C) float image to (height, width)."""
    height, width = size
    channels = [np.asarray(Image.fromarray(image[..., c], mode="F").resize(
        (width, height), Image.BILINEAR)) for c in range(image.shape[-1])]
    return np.stack(channels, axis=-1)


class Predictor:
    """Restores a run's parameters once and turns images into full-size masks."""

    def __init__(self, run_dir, which="best", batch_size: int = 8):
        from unet_jax import checkpoints
        from unet_jax.train import create_model

        self.params, self.config, self.epoch = checkpoints.restore_params(run_dir, which)
        self.apply_fn = create_model(self.config).apply
        self.batch_size = batch_size

    def logits(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Logits (H, W, classes) at each image's own size."""
        import jax

        from unet_jax.train import predict_step

        size = tuple(self.config.image_size)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = np.zeros((self.batch_size, *size, self.config.in_channels), np.float32)
            for i, image in enumerate(chunk):
                batch[i] = resize_image(image, size)
            # A fixed batch shape (the last batch padded) compiles the model once.
            logits = jax.device_get(predict_step(self.params, batch, self.apply_fn))
            for image, logit in zip(chunk, logits):
                out.append(resize_image(logit, image.shape[:2]))
        return out

    def masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Predicted masks at each image's own size: bool for one class, else class ids."""
        return [logit[..., 0] > 0 if logit.shape[-1] == 1 else logit.argmax(-1)
                for logit in self.logits(images)]

    def load(self, path) -> np.ndarray:
        """An image file as the model's input channels, float32 in [0, 1]."""
        return load_image(path, self.config.in_channels)

    def predict_files(self, paths):
        """Yields (path, image, mask) for each file, reading one batch of files at a time
        so that a folder of any size fits in memory."""
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start:start + self.batch_size]
            images = [self.load(p) for p in chunk]
            yield from zip(chunk, images, self.masks(images))
