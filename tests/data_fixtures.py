"""Small datasets on disk for the data_pipeline tests: Kaggle's layout with real palette
GIF masks, and users' own folders in several formats."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 48, 32
CARS = ("aaa111", "bbb222", "ccc333", "ddd444", "eee555")

# Kaggle's masks are palette GIFs holding index 1 on the car. Here index 1's colour is
# nearly black and index 0's white, so a decoder that reads colours instead of
# indices gets the mask inverted (or all foreground) and the tests fail.
DARK_PALETTE = [255, 255, 255, 3, 3, 3] + [0, 0, 0] * 254


def box_mask(size=(W, H), seed=0) -> np.ndarray:
    """A bool (h, w) mask: a rectangle placed by ``seed``."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask = np.zeros((h, w), bool)
    mask[y: y + h // 2, x: x + w // 2] = True
    return mask


def write_image(path: Path, size=(W, H), seed=0, mode="RGB") -> np.ndarray:
    """A random image of ``mode`` ('RGB', 'L', 'RGBA'); returns its pixels."""
    w, h = size
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, channels), np.uint8)
    pixels = pixels[..., 0] if channels == 1 else pixels
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return pixels


def write_mask(path: Path, mask: np.ndarray, value: int = 255) -> None:
    """A mask file: a palette GIF with index 1 on the car (``.gif``, as Kaggle's), or
    a grayscale file of 0 and ``value`` (any other suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        gif = Image.fromarray(mask.astype(np.uint8), "P")
        gif.putpalette(DARK_PALETTE)
        gif.save(path)
    else:
        Image.fromarray(mask.astype(np.uint8) * value).save(path)


def write_png16_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit colour PNG of uint16 ``pixels`` (h, w, 3), written by hand: Pillow
    reads such files (by their high byte) but cannot write them."""
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def kaggle_dir(root: Path, cars=CARS, angles: int = 4, size=(W, H), images="train",
               mask_suffix=".gif") -> Path:
    """Kaggle's layout: ``train/<car>_<NN>.jpg`` and ``train_masks/<car>_<NN>_mask.gif``."""
    for c, car in enumerate(cars):
        for a in range(1, angles + 1):
            stem = f"{car}_{a:02d}"
            write_image(root / images / f"{stem}.jpg", size, seed=100 * c + a)
            write_mask(root / "train_masks" / f"{stem}_mask{mask_suffix}",
                       box_mask(size, seed=100 * c + a))
    return root


def own_dir(root: Path, n: int = 8, size=(W, H)) -> Path:
    """A user's own ``images/`` + ``masks/`` folders: PNG images, 0/255 PNG masks."""
    for i in range(n):
        write_image(root / "images" / f"img{i}.png", size, seed=i)
        write_mask(root / "masks" / f"img{i}.png", box_mask(size, seed=i))
    return root


def mirror_dir(root: Path, n: int = 8, size=(W, H)) -> Path:
    """Images that show their own mask (white on black), so that after any geometric
    change the mask must still be where the image is bright."""
    for i in range(n):
        mask = box_mask(size, seed=i)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(mask[..., None], 3, -1).astype(np.uint8) * 255).save(
            root / "images" / f"m{i}.png")
        write_mask(root / "masks" / f"m{i}.png", mask)
    return root
