"""Run-length encoding of masks, as Kaggle's Carvana evaluation defines it.

Number the pixels 1, 2, 3, ... in row-major order (left to right along the first row,
then the next row: numpy's ``mask.flatten()``) and list ``start length`` pairs,
separated by spaces, for each run of foreground pixels. An empty mask is an empty
string. ``python -m experiments.submit`` writes one such string per test image.
"""

from __future__ import annotations

import numpy as np


def rle_encode(mask) -> str:
    """Row-major, 1-indexed ``start length`` pairs of the mask's foreground runs."""
    pixels = np.concatenate([[0], np.asarray(mask, bool).ravel().astype(np.int8), [0]])
    edges = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1  # 1-indexed run starts and ends
    starts, ends = edges[::2], edges[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The boolean (height, width) mask of an ``rle_encode`` string."""
    flat = np.zeros(shape[0] * shape[1], bool)
    numbers = np.asarray(rle.split(), dtype=np.int64)
    if numbers.size % 2:
        raise ValueError("a run-length encoding needs start/length pairs")
    for start, length in zip(numbers[::2], numbers[1::2]):
        flat[start - 1:start - 1 + length] = True
    return flat.reshape(shape)
