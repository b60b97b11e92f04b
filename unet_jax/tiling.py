"""Prediction at full resolution: the paper's overlap-tile strategy, and test-time flips.

The U-Net paper never resizes an image. It trains on tiles and predicts a large image
tile by tile, each tile seeing a margin of context around the part it is trusted for,
and where the image ends it invents that context by mirroring the image at its border.
``predict_tiled`` does this for an image of any size (1918 wide included: no size
error, because only the tiles must be divisible by ``2**depth``):

1. mirror-pad the image by a margin (so its border pixels lie inside some tile, not on
   a tile's edge, where a convolution sees only padding) and up to at least one tile;
2. cut it into tiles that overlap by a fraction ``overlap`` of their size, spread
   evenly so the last tile ends exactly at the border;
3. predict the tiles in batches of a fixed shape (one compiled program, the
   accelerator kept busy), and add each tile's logits into the output, weighted by a
   Gaussian centred on the tile (as nnU-Net and MONAI do): a tile's predictions are
   least reliable at its edges, where its context ends, so where tiles overlap the one
   that sees a pixel nearer its centre counts most, and no seams show;
4. divide by the summed weights and cut away the padding.

Only one batch of tiles is held at a time, so memory grows with the image alone: the
image in float32 plus one float32 plane per class and one for the weights, about
500 MB for a 6000x4000 photo.

``predict_tiled`` runs on the host in numpy and calls the model once per batch of
tiles: clear, and the reference the device version is tested against. ``tiled_logits``
is the same algorithm written for ``jax.jit``: padding, cutting, the model, blending
and normalising all become one program on the accelerator, so the host neither cuts
tiles nor waits between batches. ``whole_logits`` is the alternative a fully
convolutional network allows: one pass over the whole image, mirror-padded to a size
the U-Net accepts.

Test-time augmentation (``flip_average``) predicts mirrored copies of the input as
well, mirrors the predictions back and averages the probabilities: a car facing left
is still a car, so the model's errors on the copies are partly independent and the
average is steadier, at the cost of one more model call per view.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

TTA = ("none", "hflip", "flips")
# The views each choice averages, as the axes of an NHWC batch to mirror: W is axis 2.
_VIEWS = {"none": ((),), "hflip": ((), (2,)), "flips": ((), (2,), (1,), (1, 2))}


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``, neighbours
    sharing at least a fraction ``overlap`` of a tile, spread evenly so the first
    starts at 0 and the last ends at ``length`` (which must be at least ``tile``)."""
    if length < tile:
        raise ValueError(f"length {length} is shorter than the tile {tile}")
    if length == tile:
        return [0]
    stride = max(1, math.floor(tile * (1 - overlap)))
    count = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def gaussian_weights(tile: tuple[int, int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """(h, w) float32 weights of a tile: a Gaussian centred on it, sigma 1/8 of each
    side, 1 at the centre. At the edges it falls to about 3e-4: small enough that a
    neighbouring tile's central prediction wins, never zero, so a pixel covered by
    one tile's edge alone still gets that tile's prediction."""
    axes = []
    for size in tile:
        x = np.arange(size) - (size - 1) / 2
        axes.append(np.exp(-0.5 * (x / (size * sigma_scale)) ** 2))
    return np.outer(*axes).astype(np.float32)


def padding(size: tuple[int, int], tile: tuple[int, int], overlap: float):
    """((top, bottom), (left, right)) mirrored padding of an image of ``size`` for
    tiles of ``tile``: a margin of half the overlap on every side (none when one tile
    fits the image exactly), then more at the bottom and right if the image is
    smaller than a tile."""
    pads = []
    for length, t in zip(size, tile):
        margin = 0 if length == t else round(t * overlap / 2)
        short = max(0, t - (length + 2 * margin))
        pads.append((margin, margin + short))
    return tuple(pads)


def predict_tiled(predict: Callable[[np.ndarray], np.ndarray], image: np.ndarray,
                  tile: tuple[int, int], overlap: float = 0.25,
                  batch_size: int = 8) -> np.ndarray:
    """Logits (H, W, K) of an image (H, W, C) of any size, predicted tile by tile.

    ``predict`` maps a batch of tiles (batch_size, th, tw, C) float32 to their logits
    (batch_size, th, tw, K); it always gets ``batch_size`` tiles (the last batch padded
    with zeros), so a jitted model compiles once. ``overlap`` in [0, 1) is the
    fraction of a tile its neighbour shares. With an image exactly one tile in size
    and no overlap, the result is the model's logits for the image itself.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap {overlap}: give a fraction in [0, 1)")
    image = np.asarray(image, np.float32)
    (height, width), (th, tw) = image.shape[:2], tile
    pads = padding((height, width), tile, overlap)
    # 'symmetric' mirrors about the border, repeating the edge pixel: it works for any
    # padding width and any image size, even an image narrower than its padding.
    padded = np.pad(image, (*pads, (0, 0)), mode="symmetric")
    ys = tile_starts(padded.shape[0], th, overlap)
    xs = tile_starts(padded.shape[1], tw, overlap)
    corners = [(y, x) for y in ys for x in xs]
    weights = gaussian_weights(tile)[..., None]
    total = weight_sum = None
    for start in range(0, len(corners), batch_size):
        chunk = corners[start:start + batch_size]
        tiles = np.zeros((batch_size, th, tw, image.shape[-1]), np.float32)
        for i, (y, x) in enumerate(chunk):
            tiles[i] = padded[y:y + th, x:x + tw]
        logits = np.asarray(predict(tiles), np.float32)
        if len(corners) == 1:  # one tile is the whole (padded) image: no blending
            return logits[0, pads[0][0]:pads[0][0] + height, pads[1][0]:pads[1][0] + width]
        if total is None:
            total = np.zeros((*padded.shape[:2], logits.shape[-1]), np.float32)
            weight_sum = np.zeros((*padded.shape[:2], 1), np.float32)
        for i, (y, x) in enumerate(chunk):
            total[y:y + th, x:x + tw] += weights * logits[i]
            weight_sum[y:y + th, x:x + tw] += weights
    total /= weight_sum
    return total[pads[0][0]:pads[0][0] + height, pads[1][0]:pads[1][0] + width]


def _placed_sums(length: int, tile: int, starts: list[int], profile: np.ndarray) -> np.ndarray:
    """(length,) sum of ``profile`` (one axis of the Gaussian) placed at each start."""
    total = np.zeros(length, np.float64)
    for start in starts:
        total[start:start + tile] += profile
    return total


def tiled_logits(logits_fn: Callable, images, tile: tuple[int, int], overlap: float = 0.25,
                 tiles_per_call: int = 8, count=None):
    """``predict_tiled`` on the device, for use under ``jax.jit``: logits (N, H, W, K)
    of images (N, H, W, C) float32, every image tiled alike.

    The tiles of all N images are visited in fixed batches of ``tiles_per_call`` by a
    ``lax.fori_loop``: each step cuts its tiles from the padded images
    (``dynamic_slice``), runs ``logits_fn`` on them and adds their Gaussian-weighted
    logits into an accumulator of the padded size. No array of every tile is ever
    built, so memory grows with the images alone, as on the host. ``count`` (a traced
    integer, default N) says how many of the N images are real: the loop stops after
    their tiles, so a batch padded with blank images to a fixed shape (one compiled
    program) costs no model calls for the padding.

    The sum of the weights does not depend on the image: the Gaussian is the outer
    product of one profile per axis and the tiles form a grid, so it is the outer
    product of two 1-D sums, computed once on the host.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap {overlap}: give a fraction in [0, 1)")
    n, height, width, channels = images.shape
    (th, tw), batch = tile, tiles_per_call
    pads = padding((height, width), tile, overlap)
    top, left = pads[0][0], pads[1][0]
    padded = jnp.pad(images, ((0, 0), *pads, (0, 0)), mode="symmetric")
    ys = tile_starts(padded.shape[1], th, overlap)
    xs = tile_starts(padded.shape[2], tw, overlap)
    if len(ys) == len(xs) == 1:  # one tile is the whole (padded) image: no blending
        return logits_fn(padded)[:, top:top + height, left:left + width]

    per_image = len(ys) * len(xs)
    corners = np.array([(i, y, x) for i in range(n) for y in ys for x in xs], np.int32)
    steps_max = math.ceil(len(corners) / batch)
    corners = jnp.asarray(np.pad(corners, ((0, steps_max * batch - len(corners)), (0, 0))))
    real = per_image * (n if count is None else count)  # tiles of the real images
    steps = (real + batch - 1) // batch
    weights = jnp.asarray(gaussian_weights(tile))[..., None]
    classes = jax.eval_shape(
        logits_fn, jax.ShapeDtypeStruct((batch, th, tw, channels), images.dtype)).shape[-1]

    def step(s, total):
        rows = lax.dynamic_slice_in_dim(corners, s * batch, batch)
        tiles = jnp.concatenate([lax.dynamic_slice(
            padded, (rows[i, 0], rows[i, 1], rows[i, 2], 0), (1, th, tw, channels))
            for i in range(batch)])
        keep = (s * batch + jnp.arange(batch)) < real  # the last batch's padding adds 0
        weighted = jnp.where(keep[:, None, None, None],
                             logits_fn(tiles).astype(jnp.float32) * weights, 0.0)

        def add(i, total):  # one tile at a time: the tiles of a batch may overlap
            at = (rows[i, 0], rows[i, 1], rows[i, 2], 0)
            here = lax.dynamic_slice(total, at, (1, th, tw, classes))
            return lax.dynamic_update_slice(
                total, here + lax.dynamic_slice_in_dim(weighted, i, 1), at)

        # A loop rather than ``batch`` unrolled updates: XLA compiles it several times
        # faster (measured: 3 s against 7 s with test-time flips on a 2-core CPU).
        return lax.fori_loop(0, batch, add, total)

    total = lax.fori_loop(0, steps, step,
                          jnp.zeros((n, *padded.shape[1:3], classes), jnp.float32))
    profiles = [gaussian_weights((t, 1))[:, 0] for t in tile]  # the Gaussian per axis
    row = _placed_sums(padded.shape[1], th, ys, profiles[0])
    col = _placed_sums(padded.shape[2], tw, xs, profiles[1])
    weight_sum = jnp.outer(jnp.asarray(row, jnp.float32), jnp.asarray(col, jnp.float32))
    return (total / weight_sum[None, :, :, None])[:, top:top + height, left:left + width]


def whole_logits(logits_fn: Callable, images, multiple: int):
    """Logits (N, H, W, K) of images (N, H, W, C) in one pass: mirror-padded at the
    bottom and right up to multiples of ``multiple`` (the U-Net's ``2**depth``), so
    that any size fits the network, and the padding cut away again. Works under
    ``jax.jit``."""
    _, height, width, _ = images.shape
    pads = ((0, 0), (0, -height % multiple), (0, -width % multiple), (0, 0))
    return logits_fn(jnp.pad(images, pads, mode="symmetric"))[:, :height, :width]


def probabilities(logits):
    """Per-pixel class probabilities: sigmoid of one logit, softmax of several."""
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits)
    return jax.nn.softmax(logits, axis=-1)


def logits_of(probs, eps: float = 1e-7):
    """Logits whose ``probabilities`` are ``probs`` (clipped away from 0 and 1), so
    that averaged predictions flow through the same resizing and thresholding as
    plain ones: log(p / (1 - p)) for one channel, log p for several (softmax of log p
    is p)."""
    probs = jnp.clip(probs, eps, 1 - eps)
    if probs.shape[-1] == 1:
        return jnp.log(probs) - jnp.log1p(-probs)
    return jnp.log(probs)


def flip_average(logits_fn: Callable, images, tta: str = "none"):
    """Logits of ``images`` (N, H, W, C) averaged over mirrored views.

    ``tta``: 'none' (``logits_fn(images)`` itself), 'hflip' (the image and its
    left-right mirror) or 'flips' (also upside down, and both). Each view is
    predicted, mirrored back, turned into probabilities and averaged; the average
    is returned as logits (``logits_of``). Works under ``jax.jit``.
    """
    if tta not in _VIEWS:
        raise ValueError(f"--tta {tta!r}: choose one of {', '.join(TTA)}")
    views = _VIEWS[tta]
    if len(views) == 1:
        return logits_fn(images)
    total = 0.0
    for axes in views:
        flipped = jnp.flip(images, axes) if axes else images
        out = logits_fn(flipped)
        total = total + probabilities(jnp.flip(out, axes) if axes else out)
    return logits_of(total / len(views))
