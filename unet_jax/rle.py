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
    """The boolean (height, width) mask of an ``rle_encode`` string.

    Raises ValueError for what Kaggle's scorer rejects, rather than decoding it to a
    plausible mask: an odd count of numbers, a start below 1 (the 0-indexed slip), a
    length below 1, a run past the last pixel, and runs out of order or overlapping.
    """
    try:
        numbers = np.asarray(rle.split(), dtype=np.int64)
    except (ValueError, OverflowError):  # OverflowError: a number beyond int64
        raise ValueError(f"a run-length encoding holds whole numbers of pixels only: "
                         f"{rle[:40]!r}") from None
    if numbers.size % 2:
        raise ValueError("a run-length encoding needs start/length pairs")
    starts, lengths = numbers[::2], numbers[1::2]
    size = shape[0] * shape[1]
    if starts.size:
        ends = starts + lengths  # one past each run's last pixel, 1-indexed
        if starts.min() < 1:
            raise ValueError(f"run starts at {starts.min()}: pixels are numbered from 1")
        if lengths.min() < 1:
            raise ValueError(f"run of length {lengths.min()}: lengths are 1 or more")
        if ends.max() - 1 > size:
            raise ValueError(f"a run ends at pixel {ends.max() - 1}, past the last of a "
                             f"{shape[0]}x{shape[1]} mask ({size})")
        if np.any(starts[1:] < ends[:-1]):
            raise ValueError("runs out of order or overlapping: each must start after the "
                             "one before it ends")
    flat = np.zeros(size + 1, np.int8)  # +1: a run may end at the last pixel
    np.add.at(flat, starts - 1, 1)
    np.add.at(flat, starts - 1 + lengths, -1)
    return np.cumsum(flat[:-1]).astype(bool).reshape(shape)
