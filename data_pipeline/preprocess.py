"""Decoding and resizing, the one way: what training, predict, evaluate and submit all use.

An image file becomes uint8 ``(h, w, C)``: any common format and mode (RGB, grayscale,
palette, RGBA, 16-bit, float TIFF), RGB or luminance as the model's ``in_channels``
asks, resized bilinearly (antialiased) to the model's size. A mask file becomes uint8
``(h, w, 1)`` by one rule for binary masks and one for class ids (``load_mask``),
resized nearest. ``to_float`` scales an image to the [0, 1] the model sees.

The training pipeline caches these uint8 arrays and scales them per batch; prediction
calls the same functions for the same file, so the model sees exactly what it was
trained on. Evaluation reads the true masks with ``load_mask`` at their own size.

Pillow refuses images over ``Image.MAX_IMAGE_PIXELS`` (about 89 million pixels) as
possible decompression bombs. Such a file is reported like any unreadable one; if
such images are genuine, set ``UNET_JAX_MAX_IMAGE_PIXELS`` to a larger count (or 0 for
no limit).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
from PIL import Image

from data_pipeline.errors import DataError

MAX_PIXELS_VARIABLE = "UNET_JAX_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int | None:
    """The pixel limit for one image: ``$UNET_JAX_MAX_IMAGE_PIXELS`` or Pillow's."""
    value = os.environ.get(MAX_PIXELS_VARIABLE)
    if value is None:
        return Image.MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except ValueError:
        raise DataError(f"{MAX_PIXELS_VARIABLE}={value!r}: give a whole number of pixels "
                        "(0 for no limit)") from None
    return limit or None


@contextlib.contextmanager
def open_image(path):
    """``Image.open`` of ``path``; any problem (not an image, truncated, over the pixel
    limit) becomes a one-line DataError naming the file."""
    try:
        with _open_image(path) as img:
            yield img
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's decode errors
        what = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path} cannot be decoded ({what}); fix or remove the file") from None


@contextlib.contextmanager
def _open_image(path):
    """``Image.open`` with the pixel limit reported as a one-line DataError."""
    limit = max_image_pixels()
    hint = (f"if it is genuine, allow larger images with {MAX_PIXELS_VARIABLE}=<pixels> "
            "(0 for no limit)")
    previous = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow's own check (an error above twice its limit) follows ours, so that a
        # raised limit raises both.
        Image.MAX_IMAGE_PIXELS = limit
        img = Image.open(path)
    except Image.DecompressionBombError:
        raise DataError(f"{path} is larger than the {limit:,}-pixel limit for one image; "
                        f"{hint}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    with img:
        width, height = img.size
        if limit and width * height > limit:
            raise DataError(f"{path} has {width * height:,} pixels ({width}x{height}), over "
                            f"the {limit:,}-pixel limit for one image; {hint}")
        yield img


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1], the model's input scale."""
    return np.asarray(image, np.float32) / 255.0


# Pillow's bilinear filter widens its support when shrinking (it antialiases), so a
# 1918x1280 photo shrunk to 96x64 keeps thin details instead of aliasing. BOX is the
# exact area average.
RESIZE = {"bilinear": Image.Resampling.BILINEAR, "area": Image.Resampling.BOX}
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def load_image(path, image_size=None, in_channels: int = 3,
               resize: str = "bilinear") -> np.ndarray:
    """uint8 (h, w, in_channels) of an image file of any common format and mode, at
    ``image_size`` (height, width), or at its own size if None.

    Grayscale, palette and RGBA images become RGB (alpha is dropped) for 3 channels;
    anything becomes luminance for 1. 16-bit images are scaled to 8 bits.
    """
    mode = "RGB" if in_channels == 3 else "L"
    with open_image(path) as img:
        height, width = image_size or img.size[::-1]
        if image_size:
            img.draft(mode, (width, height))  # JPEG: decode at 1/2..1/8 scale when enough
        if img.mode in _WIDE_MODES:
            values = np.asarray(img, np.float32)
            values = values * 255 if values.max() <= 1 else values
            values = values / 257 if values.max() > 255 else values
            img = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
        elif img.mode == "P":
            img = img.convert("RGBA")  # applies the palette, transparency included
        img = img.convert(mode).resize((width, height), RESIZE[resize])
        return np.asarray(img, np.uint8).reshape(height, width, in_channels)


def load_mask(path, image_size=None, num_classes: int = 1) -> np.ndarray:
    """uint8 (h, w, 1) of a mask file at ``image_size`` (or its own size if None):
    {0, 1} for binary masks, else class ids.

    Colour masks: the largest of the R, G, B values (alpha is never part of the
    mask; LA masks use L). 16-bit masks are read as their values. Binary masks: any
    non-zero value is foreground: Kaggle's GIFs hold palette index 1, users' masks
    often 0/255. Palette images are read as their indices, never their colours (the
    colour of index 1 may well be black). JPEG masks are the exception: lossy
    compression leaves their black at 1, 2, 3..., so they are cut at 128. Resized
    nearest, so no new values appear.
    """
    with open_image(path) as m:
        lossy = m.format == "JPEG"
        if image_size:
            # Nearest picks source pixels, so resizing first gives the same mask as
            # classifying first, and classifies 100x fewer pixels of a Kaggle mask.
            m = m.resize(tuple(image_size)[::-1], Image.Resampling.NEAREST)
        mode, values = m.mode, np.asarray(m)  # 'P' gives palette indices
    if values.ndim == 3:  # colour masks: foreground wherever any colour is set
        values = values[..., :1] if mode == "LA" else values[..., :3]
        values = values.max(axis=-1)
    if num_classes == 1:
        values = values >= 128 if lossy else values > 0
    elif values.max() >= num_classes:
        raise DataError(f"{path} holds class {int(values.max())} but the model has "
                        f"{num_classes} classes; fix the mask or raise --num-classes")
    return values.astype(np.uint8)[..., None]


def load_example(pair, image_size, in_channels: int = 3, resize: str = "bilinear",
                 num_classes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (h, w, C), mask uint8 (h, w, 1)) of one ``files.Pair`` at
    ``image_size``; any decoding problem is a DataError naming the file."""
    return (load_image(pair.image, image_size, in_channels, resize),
            load_mask(pair.mask, image_size, num_classes))
