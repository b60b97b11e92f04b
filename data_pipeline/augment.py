"""Paired image/mask augmentation, chosen by name, for the tf.data pipeline.

A segmentation network learns from few labelled images only if it sees them in many
forms. Each op below changes an image and its mask together: the geometric ops move
both by one and the same transform, so every label stays on its pixel, and resample
the mask nearest, so it keeps exactly its values ({0, 1}, or the class ids); colour
ops touch the image alone. Images are float32 (h, w, C) in [0, 1], masks float32
(h, w, 1).

* ``flip``: a random horizontal flip (a car facing left is still a car).
* ``shift``: a random shift of up to 10% of each side and a scale of 0.9 to 1.1.
* ``rotate``: a random rotation about the centre, up to 10 degrees either way.
* ``elastic``: the U-Net paper's smooth elastic deformation (a random 3x3 grid of
  displacements, interpolated to every pixel), its most important augmentation when
  only a few annotated images exist.
* ``color``: random brightness and contrast.

``augment_pair`` applies the chosen ops in one fixed order, geometry first and colour
last: flip, shift, rotate, elastic, color. Everything is stateless: the randomness comes
from a seed of two integers, split into one sub-seed per op, so an example's flip (say)
is the same whichever other ops are on, and a run can be repeated exactly. All of it is
plain TensorFlow, so it runs inside ``tf.data`` ``map`` as well as eagerly.
"""

from __future__ import annotations

import math

from data_pipeline.tf_setup import tensorflow

AUGMENTATIONS = ("flip", "shift", "color", "elastic", "rotate")
DEFAULT_AUGMENT = ("flip", "shift", "color")

# The order ops are applied in: geometry before colour, so that interpolation never
# blurs a colour change across an edge that then moves.
_ORDER = ("flip", "shift", "rotate", "elastic", "color")

# Sub-seed positions. The first six are those flip, shift and color have always drawn
# from, so runs that used them see the same augmentation as before; new ops take new
# positions at the end (stateless_split is counter-based: splitting into more seeds
# leaves the first ones as they were).
_SEEDS = {"flip": 0, "scale": 1, "shift_x": 2, "shift_y": 3, "brightness": 4,
          "contrast": 5, "rotate": 6, "elastic": 7}

MAX_SHIFT = 0.1  # of each side
SCALE = (0.9, 1.1)
MAX_DEGREES = 10.0
# The paper's 10 px standard deviation on 572x572 tiles, as a fraction of the shorter
# side; at least one pixel, as a smaller displacement barely moves a nearest-sampled mask.
ELASTIC_SIGMA = 10.0 / 572.0
MIN_ELASTIC_SIGMA = 1.0


def parse_augment(value) -> str:
    """The canonical form of a choice of augmentations: names joined by commas, in the
    order of ``AUGMENTATIONS``, "" for none.

    ``True`` means ``DEFAULT_AUGMENT``; ``False``, ``None``, "" and "none" mean none; a
    string such as "elastic,flip" or "flip, rotate" (or a sequence of names) chooses
    those ops. One canonical spelling lets a run's settings be compared and stored.
    """
    if value is True:
        return ",".join(DEFAULT_AUGMENT)
    if value is False or value is None:
        return ""
    if isinstance(value, str):
        text, names = value, value.split(",")
    elif isinstance(value, (tuple, list)):
        text, names = ",".join(map(str, value)), [str(v) for v in value]
    else:
        raise TypeError(f"--augment {value!r}: give True, False or names separated by commas")
    names = [n.strip() for n in names if n.strip()]
    if [n.lower() for n in names] == ["none"]:
        return ""
    for name in names:
        if name.lower() not in AUGMENTATIONS:
            raise ValueError(f"--augment {text!r}: unknown augmentation {name!r}; "
                             f"choose from {', '.join(AUGMENTATIONS)}")
    chosen = {n.lower() for n in names}
    return ",".join(a for a in AUGMENTATIONS if a in chosen)


def augment_pair(image, mask, seed, ops=",".join(DEFAULT_AUGMENT)):
    """Applies the augmentations named in ``ops`` to an image and its mask.

    ``ops`` is the canonical string of ``parse_augment`` (or a tuple of names); the
    named ops run in the order flip, shift, rotate, elastic, color, and the others not
    at all, so ``ops=""`` returns the pair unchanged. Shift and rotate are combined
    into one transform, so the image is interpolated once for both, and so is elastic
    with them: each resampling rounds the mask to the nearest pixel, and two in a row
    would drift its edges off the image's by a pixel. ``seed`` is two
    integers; the same seed gives the same result. The mask's pixels are moved, never
    blended, so it keeps its dtype: the input pipeline passes uint8 masks, a quarter
    of float32's bytes to move.
    """
    tf = tensorflow()
    image = tf.convert_to_tensor(image)
    if not image.dtype.is_floating:
        # The interpolating ops and colour jitter compute in floats in [0, 1]; TF's own
        # error for an 8-bit image names neither the argument nor the fix.
        raise TypeError(f"augment_pair: image is {image.dtype.name}; give floats in [0, 1] "
                        "(tf.image.convert_image_dtype(image, tf.float32) scales uint8)")
    names = set(parse_augment(ops).split(",")) - {""}
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), len(_SEEDS))
    seed_of = {name: seeds[i] for name, i in _SEEDS.items()}

    # Scale and shift without rotation move rows and columns independently: two 1-D
    # resamplings give projective_warp's pixels at a fraction of its cost, and the
    # flip becomes a choice of columns in them instead of a pass of its own.
    axis_aligned = "shift" in names and not names & {"rotate", "elastic"}
    if "flip" in names and not axis_aligned:
        image, mask = random_flip(image, mask, seed_of["flip"])
    transforms = []
    if "shift" in names:
        transforms.append(shift_transform(
            image, seed_of["scale"], seed_of["shift_x"], seed_of["shift_y"]))
    if "rotate" in names:
        transforms.append(rotate_transform(image, seed_of["rotate"]))
    if "elastic" in names:
        h, w = _size(image)
        image, mask = elastic_warp(image, mask, random_displacement(seed_of["elastic"], h, w),
                                   _compose(transforms) if transforms else None)
    elif axis_aligned:
        mirror = flip_drawn(seed_of["flip"]) if "flip" in names else False
        image, mask = axis_aligned_warp(image, mask, transforms[0], mirror)
    elif transforms:
        image, mask = projective_warp(image, mask, _compose(transforms))
    if "color" in names:
        image = random_color(image, seed_of["brightness"], seed_of["contrast"])
    return image, mask


# --- flip -----------------------------------------------------------------------------

def random_flip(image, mask, seed):
    """Mirrors image and mask left to right with probability 1/2.

    Exact (no interpolation): the cheapest way to double the views of each example.
    A branch rather than a select, so an example that is not flipped costs nothing
    and one that is costs one copy (a select computed both and copied again).
    """
    tf = tensorflow()
    return tf.cond(flip_drawn(seed), lambda: (tf.reverse(image, [1]), tf.reverse(mask, [1])),
                   lambda: (image, mask))


def flip_drawn(seed):
    """Whether ``random_flip`` mirrors the example of this seed (a scalar bool)."""
    tf = tensorflow()
    return tf.random.stateless_uniform([], seed) < 0.5


# --- shift and rotate: one projective transform -----------------------------------------
# A transform is the 8 numbers [a0, a1, a2, b0, b1, b2, c0, c1] of
# ImageProjectiveTransformV3: output pixel (x, y) samples the input at
# ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k), k = c0 x + c1 y + 1.

def shift_transform(image, scale_seed, x_seed, y_seed):
    """The transform of a random scale (0.9 to 1.1, about the centre) and shift (up to
    10% of each side): the model must find a car wherever it stands and however large.

    Output pixel (x, y) samples the input at (x / s + tx, y / s + ty).
    """
    tf = tensorflow()
    h, w = (tf.cast(n, tf.float32) for n in _size(image))
    scale = tf.random.stateless_uniform([], scale_seed, *SCALE)
    dx = tf.random.stateless_uniform([], x_seed, -MAX_SHIFT, MAX_SHIFT) * w
    dy = tf.random.stateless_uniform([], y_seed, -MAX_SHIFT, MAX_SHIFT) * h
    inv = 1.0 / scale
    return tf.stack([inv, 0.0, (w - 1) * (1 - inv) / 2 - dx,
                     0.0, inv, (h - 1) * (1 - inv) / 2 - dy, 0.0, 0.0])


def rotate_transform(image, seed):
    """The transform of a random rotation about the image centre, uniform in +-10
    degrees: photos taken a little askew, and micrographs with no "up" at all, should
    not confuse the model, and a small angle keeps the reflected corners small.
    """
    tf = tensorflow()
    h, w = (tf.cast(n, tf.float32) for n in _size(image))
    angle = tf.random.stateless_uniform([], seed, -MAX_DEGREES, MAX_DEGREES) * (math.pi / 180)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                     sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])


def _compose(transforms):
    """One transform equal to applying ``transforms`` in turn (the first one first)."""
    tf = tensorflow()
    if len(transforms) == 1:
        return transforms[0]  # untouched, so a lone shift is exactly the same as ever

    def matrix(t):
        return tf.reshape(tf.concat([t, [1.0]], 0), [3, 3])

    # Applying A and then B samples the input at A(B(p)): the matrices multiply in order.
    total = matrix(transforms[0])
    for t in transforms[1:]:
        total = total @ matrix(t)
    return tf.reshape(total / total[2, 2], [9])[:8]


def projective_warp(image, mask, transform):
    """Resamples image (bilinear) and mask (nearest) by one projective ``transform``.

    Pixels that fall outside are filled by reflecting the image at its borders, which
    continues the background instead of adding black corners the model would learn.
    """
    tf = tensorflow()

    def warp(x, interpolation):
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None], transforms=transform[None], output_shape=tf.shape(x)[:2],
            interpolation=interpolation, fill_mode="REFLECT", fill_value=0.0)[0]

    return warp(image, "BILINEAR"), warp(mask, "NEAREST")


def axis_aligned_warp(image, mask, transform, mirror=False):
    """``projective_warp`` for a transform without rotation or perspective (a1 = b0 =
    c0 = c1 = 0), such as ``shift_transform``'s: output row y samples input row
    b1 y + b2 and output column x input column a0 x + a2, whatever the other axis.
    With ``mirror`` (a bool, or a scalar bool tensor) true, the example is flipped left
    to right first, as ``random_flip`` does.

    Bilinear interpolation of such a map is a 1-D interpolation of the rows followed
    by one of the columns, and nearest sampling a pick of rows and then of columns, so
    each axis costs a gather per tap and a blend instead of four reads and the
    projection of every pixel, and a flip is a reversed choice of columns: the
    default augmentations' costliest step, and the augmented pipeline 1.8x as fast
    on the host (``docs/benchmarks.md``). Borders reflect as in ``projective_warp``; the two agree to float
    rounding (``tests/test_augment.py``).
    """
    tf = tensorflow()
    h, w = _size(image)

    def taps(scale, offset, n, flip=False):
        # Per output index along one axis: the two input indices that bilinear
        # interpolation reads, the nearest one, and the weight of the second.
        coords = _reflect(scale * tf.cast(tf.range(n), tf.float32) + offset, n)
        lower = tf.floor(coords)
        first = tf.cast(lower, tf.int32)
        second = tf.minimum(first + 1, n - 1)
        nearest = tf.cast(tf.floor(coords + 0.5), tf.int32)  # std::round: coords >= 0
        indices = [tf.where(flip, n - 1 - i, i) for i in (first, second, nearest)]
        return indices, coords - lower

    (y0, y1, y_near), wy = taps(transform[4], transform[5], h)
    (x0, x1, x_near), wx = taps(transform[0], transform[2], w, mirror)

    def lerp(a, b, weight):
        return a + (b - a) * weight

    # Two gathers per axis rather than one of both taps then a split, which copies.
    rows = lerp(tf.gather(image, y0), tf.gather(image, y1), tf.reshape(wy, [-1, 1, 1]))
    warped = lerp(tf.gather(rows, x0, axis=1), tf.gather(rows, x1, axis=1),
                  tf.reshape(wx, [1, -1, 1]))
    # TensorFlow gathers a column pixel by pixel but a row in one copy, so the
    # mask's columns (one channel of class ids, as everywhere here) are picked as the
    # rows of its transpose: 3x faster.
    labels = tf.gather(mask[..., 0], y_near)
    labels = tf.transpose(tf.gather(tf.transpose(labels), x_near))[..., None]
    return tf.ensure_shape(warped, image.shape), tf.ensure_shape(labels, mask.shape)


def _reflect(coords, n):
    """Source coordinates mapped into [0, n - 1] as ImageProjectiveTransformV3's REFLECT
    maps them (d c b a | a b c d | d c b a about the outer pixel edges, then clamped),
    step for step: ``_mirror`` folds the same way, but its rounding differs from the
    kernel's by enough to move a nearest-sampled label at large shifts."""
    tf = tensorflow()
    size = tf.cast(n, tf.float32)
    period = 2.0 * size
    below = coords + period * tf.math.floor(-coords / period)  # in (-period, 0]
    below = tf.where(below < -size, below + period, -below - 1.0)
    above = coords - period * tf.math.floor(coords / period)  # in [0, period)
    above = tf.where(above >= size, period - above - 1.0, above)
    mapped = tf.where(coords < 0, below, tf.where(coords > size - 1.0, above, coords))
    return tf.clip_by_value(mapped, 0.0, tf.maximum(size - 1.0, 0.0))


# --- elastic deformation ----------------------------------------------------------------

def random_displacement(seed, height, width, grid=3, sigma=None):
    """A smooth random displacement field, (height, width, 2) float32: dy, then dx.

    As in the U-Net paper: a displacement vector per point of a coarse ``grid`` x
    ``grid`` grid, drawn from a Gaussian with standard deviation ``sigma`` pixels,
    interpolated bicubically to every pixel. The coarse grid makes the deformation
    smooth, like tissue or sheet metal that bends, instead of noise that tears. The
    default ``sigma`` is the paper's 10 px on 572 px tiles scaled to the shorter side,
    and at least 1 px.
    """
    tf = tensorflow()
    if sigma is None:
        shorter = tf.cast(tf.minimum(height, width), tf.float32)
        sigma = tf.maximum(ELASTIC_SIGMA * shorter, MIN_ELASTIC_SIGMA)
    coarse = tf.random.stateless_normal([grid, grid, 2], seed) * sigma
    return tf.image.resize(coarse, tf.stack([height, width]), method="bicubic")


def elastic_warp(image, mask, displacement, transform=None):
    """Samples image (bilinear) and mask (nearest) at (y + dy, x + dx) for every pixel,
    mapped through a projective ``transform`` first where one is given (the elastic
    warp of the transformed image, in one resampling).

    ``displacement`` is (h, w, 2) float32, dy then dx, in pixels: with dx = +2, every
    pixel shows what was 2 pixels to its right. Coordinates that fall outside are
    mirrored at the borders (as ``projective_warp`` reflects), so no black appears.
    A per-pixel field cannot be a projective transform, hence the explicit gathers.
    """
    tf = tensorflow()
    h, w = _size(image)
    ys = tf.cast(tf.range(h), tf.float32)[:, None] + displacement[..., 0]
    xs = tf.cast(tf.range(w), tf.float32)[None, :] + displacement[..., 1]
    if transform is not None:  # where projective_warp would read each displaced pixel
        a0, a1, a2, b0, b1, b2, c0, c1 = tf.unstack(transform)
        k = c0 * xs + c1 * ys + 1.0
        xs, ys = (a0 * xs + a1 * ys + a2) / k, (b0 * xs + b1 * ys + b2) / k
    ys, xs = _mirror(ys, h), _mirror(xs, w)

    def gather(x, rows, cols):
        flat = tf.reshape(x, [-1, tf.shape(x)[-1]])
        return tf.gather(flat, rows * w + cols)

    def clamp(i, n):
        return tf.clip_by_value(i, 0, n - 1)

    y0, x0 = tf.floor(ys), tf.floor(xs)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    y1, x1 = clamp(y0 + 1, h), clamp(x0 + 1, w)
    y0, x0 = clamp(y0, h), clamp(x0, w)
    top = gather(image, y0, x0) * (1 - fx) + gather(image, y0, x1) * fx
    bottom = gather(image, y1, x0) * (1 - fx) + gather(image, y1, x1) * fx
    warped = top * (1 - fy) + bottom * fy

    nearest_y = clamp(tf.cast(tf.floor(ys + 0.5), tf.int32), h)
    nearest_x = clamp(tf.cast(tf.floor(xs + 0.5), tf.int32), w)
    labels = gather(mask, nearest_y, nearest_x)
    return tf.ensure_shape(warped, image.shape), tf.ensure_shape(labels, mask.shape)


def _mirror(coords, n):
    """Coordinates folded into [-0.5, n - 0.5] by mirroring at the outer pixel edges
    (d c b a | a b c d | d c b a, the REFLECT of the projective transforms)."""
    tf = tensorflow()
    period = 2.0 * tf.cast(n, tf.float32)
    t = tf.math.floormod(coords + 0.5, period)
    return tf.where(t >= period / 2, period - t, t) - 0.5


# --- colour -----------------------------------------------------------------------------

def random_color(image, brightness_seed, contrast_seed):
    """Random brightness (+-0.1) and contrast (0.8 to 1.2), clipped back to [0, 1].

    Lighting differs between photos; the mask does not, so only the image changes.
    """
    tf = tensorflow()
    image = tf.image.stateless_random_brightness(image, 0.1, brightness_seed)
    image = tf.image.stateless_random_contrast(image, 0.8, 1.2, contrast_seed)
    return tf.clip_by_value(image, 0.0, 1.0)


def _size(image):
    """(height, width): Python ints when the shape is static, as in tf.data's map."""
    tf = tensorflow()
    dynamic = tf.shape(image)
    return tuple(image.shape[i] if image.shape[i] is not None else dynamic[i] for i in (0, 1))
