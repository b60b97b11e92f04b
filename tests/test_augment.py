"""data_pipeline.augment: choosing ops by name, each op alone, image and mask together."""

import numpy as np
import pytest

from data_pipeline import augment as aug
from data_pipeline.tf_setup import tensorflow

tf = tensorflow()
H, W = 32, 48
GEOMETRIC = ("flip", "shift", "rotate", "elastic")


def seed(*values):
    return tf.constant(values, tf.int64)


def random_image(c=3, key=0):
    return np.random.default_rng(key).random((H, W, c), dtype=np.float32)


def class_mask(key=0):
    """Class ids {0, 1, 2} in 4x4 blocks: many edges, where bilinear would blend labels."""
    blocks = np.random.default_rng(key).integers(0, 3, (H // 4, W // 4))
    return np.kron(blocks, np.ones((4, 4)))[..., None].astype(np.float32)


def shape_mask():
    """An off-centre box and a triangle: no symmetry, so a flip or shift shows."""
    y, x = np.mgrid[:H, :W]
    box = (5 <= y) & (y < 20) & (4 <= x) & (x < 18)
    triangle = (x > 26) & (y - 8 > x - 26) & (y < 28)
    mask = box | triangle
    return mask[..., None].astype(np.float32)


def run(image, mask, s, ops):
    image, mask = aug.augment_pair(tf.constant(image), tf.constant(mask), s, ops)
    return image.numpy(), mask.numpy()


# --- choosing ops --------------------------------------------------------------------

def test_parse_augment_gives_the_canonical_form():
    assert aug.parse_augment(True) == "flip,shift,color" == ",".join(aug.DEFAULT_AUGMENT)
    for none in (False, None, "", "none", " None "):
        assert aug.parse_augment(none) == ""
    assert aug.parse_augment("elastic,flip") == "flip,elastic"
    assert aug.parse_augment("flip, rotate") == "flip,rotate"
    assert aug.parse_augment("rotate,flip,rotate, flip") == "flip,rotate"
    assert aug.parse_augment(("color", "shift")) == "shift,color"
    everything = aug.parse_augment(",".join(reversed(aug.AUGMENTATIONS)))
    assert everything == "flip,shift,color,elastic,rotate"
    assert aug.parse_augment(everything) == everything


def test_unknown_augmentation_names_the_flag_and_the_choices():
    with pytest.raises(ValueError) as e:
        aug.parse_augment("flp")
    assert str(e.value) == ("--augment 'flp': unknown augmentation 'flp'; "
                            "choose from flip, shift, color, elastic, rotate")
    with pytest.raises(ValueError, match="unknown augmentation 'twist'"):
        aug.augment_pair(tf.zeros((H, W, 3)), tf.zeros((H, W, 1)), seed(0, 0), "flip,twist")


# --- elastic_warp and random_displacement ------------------------------------------------

def test_zero_displacement_is_the_identity():
    image, mask = random_image(), class_mask()
    warped, labels = aug.elastic_warp(tf.constant(image), tf.constant(mask), tf.zeros((H, W, 2)))
    np.testing.assert_array_equal(warped, image)
    np.testing.assert_array_equal(labels, mask)


def test_integer_displacement_moves_pixels_and_mirrors_at_the_border():
    image, mask = random_image(), class_mask()
    field = np.zeros((H, W, 2), np.float32)
    field[..., 1] = 2.0  # dx: each pixel shows what was 2 to its right
    warped, labels = (t.numpy() for t in aug.elastic_warp(image, mask, field))
    for out, src in ((warped, image), (labels, mask)):
        np.testing.assert_array_equal(out[:, :-2], src[:, 2:])
        np.testing.assert_array_equal(out[:, -2:], src[:, [-1, -2]])  # mirrored
    field = np.zeros((H, W, 2), np.float32)
    field[..., 0] = -3.0  # dy: each pixel shows what was 3 above it
    warped, labels = (t.numpy() for t in aug.elastic_warp(image, mask, field))
    for out, src in ((warped, image), (labels, mask)):
        np.testing.assert_array_equal(out[3:], src[:-3])
        np.testing.assert_array_equal(out[:3], src[[2, 1, 0]])


def test_half_pixel_displacement_blends_the_image_but_not_the_mask():
    image, mask = random_image(), class_mask()
    field = np.zeros((H, W, 2), np.float32)
    field[..., 1] = 0.5
    warped, labels = (t.numpy() for t in aug.elastic_warp(image, mask, field))
    np.testing.assert_allclose(warped[:, :-1], (image[:, :-1] + image[:, 1:]) / 2, atol=1e-6)
    np.testing.assert_array_equal(labels[:, :-1], mask[:, 1:])


def test_random_displacement_is_smooth_seeded_and_scaled():
    field = aug.random_displacement(seed(1, 2), H, W, sigma=3.0).numpy()
    assert field.shape == (H, W, 2) and field.dtype == np.float32
    np.testing.assert_array_equal(field, aug.random_displacement(seed(1, 2), H, W, sigma=3.0))
    assert not np.allclose(field, aug.random_displacement(seed(1, 3), H, W, sigma=3.0))
    np.testing.assert_allclose(aug.random_displacement(seed(1, 2), H, W, sigma=1.5),
                               field / 2, rtol=1e-5, atol=1e-6)
    # smooth: neighbours differ far less than the field varies (noise would not)
    step = np.abs(np.diff(field, axis=0)).mean() + np.abs(np.diff(field, axis=1)).mean()
    assert 0 < step < 0.2 * field.std()
    # default sigma: 10 px on a 572 px side; at least 1 px on small images
    big = aug.random_displacement(seed(4, 5), 572, 600)
    np.testing.assert_allclose(big, aug.random_displacement(seed(4, 5), 572, 600, sigma=10.0),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(aug.random_displacement(seed(4, 5), H, W),
                               aug.random_displacement(seed(4, 5), H, W, sigma=1.0), rtol=1e-6)


def test_elastic_warp_moves_image_and_mask_alike():
    mask = shape_mask()
    field = aug.random_displacement(seed(7, 7), H, W, sigma=4.0)
    warped, labels = (t.numpy() for t in aug.elastic_warp(mask, mask, field))
    assert (labels != mask).mean() > 0.05
    assert ((warped > 0.5) == (labels > 0.5)).mean() >= 0.97


# --- augment_pair -----------------------------------------------------------------------

@pytest.mark.parametrize("ops", [*aug.AUGMENTATIONS, ",".join(aug.AUGMENTATIONS)])
def test_masks_keep_their_labels(ops):
    image, mask = random_image(), class_mask()
    for s in range(3):
        _, labels = run(image, mask, seed(s, 1), ops)
        assert set(np.unique(labels)) <= {0.0, 1.0, 2.0}


@pytest.mark.parametrize("ops", [*aug.AUGMENTATIONS, "flip,shift,rotate,elastic,color"])
def test_uint8_masks_move_as_float_masks_do(ops):
    """The input pipeline augments uint8 masks: every op must move them to the same
    labels as float ones, and keep their dtype."""
    image, mask = random_image(), class_mask()
    for s in range(3):
        as_float = run(image, mask, seed(s, 4), ops)
        as_uint8 = run(image, mask.astype(np.uint8), seed(s, 4), ops)
        assert as_uint8[1].dtype == np.uint8
        np.testing.assert_array_equal(as_uint8[1], as_float[1])
        np.testing.assert_array_equal(as_uint8[0], as_float[0])


@pytest.mark.parametrize("ops", [*GEOMETRIC, "flip,shift,rotate,elastic"])
def test_image_and_mask_move_together(ops):
    """The image shows its own mask in white: after any geometric op the bright pixels
    must still be the mask's, but for a few on the edges (bilinear against nearest)."""
    mask = shape_mask()
    image = np.repeat(mask, 3, axis=-1)
    results = [run(image, mask, seed(s, 3), ops) for s in range(4)]
    for warped, labels in results:
        assert ((warped.mean(-1) > 0.5) == (labels[..., 0] > 0.5)).mean() >= 0.97
    assert sum(not np.array_equal(labels, mask) for _, labels in results) >= 2
    again = run(image, mask, seed(0, 3), ops)
    np.testing.assert_array_equal(again[0], results[0][0])
    np.testing.assert_array_equal(again[1], results[0][1])
    assert len({r[0].tobytes() for r in results}) >= 2  # another seed, another result


@pytest.mark.parametrize("ops", ["shift,elastic", "rotate,elastic", "flip,shift,rotate,elastic"])
def test_elastic_with_a_transform_resamples_once_so_the_mask_stays_on_the_image(ops):
    """Nearest sampling twice in a row drifts the mask's edges off the image's (1.5-1.7%
    of the pixels disagreed here that way); one resampling keeps them within what a
    single op leaves (0.2-0.3%)."""
    mask = shape_mask()
    image = np.repeat(mask, 3, axis=-1)
    off = [((w.mean(-1) > 0.5) != (labels[..., 0] > 0.5)).mean()
           for w, labels in (run(image, mask, seed(s, 3), ops) for s in range(8))]
    assert np.mean(off) <= 0.006, off


def test_no_ops_leave_the_pair_unchanged():
    image, mask = random_image(), class_mask()
    for ops in ("", ()):
        out = run(image, mask, seed(1, 1), ops)
        np.testing.assert_array_equal(out[0], image)
        np.testing.assert_array_equal(out[1], mask)


def test_an_8_bit_image_is_refused_naming_the_fix():
    image = (random_image() * 255).astype(np.uint8)
    with pytest.raises(TypeError, match=r"image is uint8; give floats in \[0, 1\] "
                       r"\(tf.image.convert_image_dtype"):
        run(image, class_mask(), seed(1, 1), "flip,shift,color")


def test_flip_alone_mirrors_or_keeps():
    image, mask = random_image(), class_mask()
    flipped = 0
    for s in range(8):
        out_image, out_mask = run(image, mask, seed(s, 0), "flip")
        if np.array_equal(out_mask, mask[:, ::-1]):
            flipped += 1
            np.testing.assert_array_equal(out_image, image[:, ::-1])
        else:  # nothing else may happen: no shift, no colour
            np.testing.assert_array_equal(out_mask, mask)
            np.testing.assert_array_equal(out_image, image)
    assert 0 < flipped < 8


@pytest.mark.parametrize("ops", ["shift", "rotate", "elastic"])
def test_each_geometric_op_moves_image_and_mask(ops):
    image, mask = random_image(), class_mask()
    for s in range(3):
        out_image, out_mask = run(image, mask, seed(s, 2), ops)
        assert not np.array_equal(out_image, image) and not np.array_equal(out_mask, mask)


def test_color_changes_the_image_only():
    image, mask = random_image(), class_mask()
    for s in range(3):
        out_image, out_mask = run(image, mask, seed(s, 2), "color")
        np.testing.assert_array_equal(out_mask, mask)
        assert np.abs(out_image - image).mean() > 1e-3
        assert out_image.min() >= 0 and out_image.max() <= 1


def test_an_op_draws_the_same_whatever_else_is_on():
    image, mask = random_image(), shape_mask()
    for s in range(3):
        k = seed(s, 9)
        np.testing.assert_array_equal(run(image, mask, k, "flip,color")[1],
                                      run(image, mask, k, "flip")[1])
        np.testing.assert_array_equal(run(image, mask, k, "flip,shift,color,elastic,rotate")[1],
                                      run(image, mask, k, "flip,shift,elastic,rotate")[1])


def test_rotation_angles_stay_within_ten_degrees_and_use_the_range():
    """The angle is drawn in degrees and turned into radians: up to 10 degrees either
    way, spread over the range (not always about 0), and a rotation about the centre."""
    image = tf.zeros((H, W, 3))
    limit = np.radians(aug.MAX_DEGREES)
    assert aug.MAX_DEGREES == 10.0
    cx, cy = (W - 1) / 2, (H - 1) / 2
    angles = []
    for s in range(200):
        t = aug.rotate_transform(image, seed(s, 11)).numpy().astype(np.float64)
        cos, sin = t[0], t[3]
        assert cos >= np.cos(limit) - 1e-6 and abs(sin) <= np.sin(limit) + 1e-6, (s, t)
        np.testing.assert_allclose([t[1], t[4], t[6], t[7]], [-sin, cos, 0.0, 0.0], atol=1e-6)
        assert cos ** 2 + sin ** 2 == pytest.approx(1.0, abs=1e-5)  # a rotation, no scale
        # the centre maps to itself
        np.testing.assert_allclose([cos * cx - sin * cy + t[2], sin * cx + cos * cy + t[5]],
                                   [cx, cy], atol=1e-4)
        angles.append(np.degrees(np.arctan2(sin, cos)))
    angles = np.array(angles)
    assert angles.min() < -8 and angles.max() > 8  # the draws reach both ends
    assert np.mean(np.abs(angles) > 2) > 0.6  # uniform in +-10: 80% beyond 2 degrees
    # augment_pair draws the rotation from its own sub-seed, the same transform
    k = seed(3, 11)
    sub = tf.random.experimental.stateless_split(k, len(aug._SEEDS))[aug._SEEDS["rotate"]]
    mask = shape_mask()
    expected = aug.projective_warp(tf.constant(np.repeat(mask, 3, -1)), tf.constant(mask),
                                   aug.rotate_transform(image, sub))[1].numpy()
    np.testing.assert_array_equal(run(np.repeat(mask, 3, -1), mask, k, "rotate")[1], expected)


def test_shift_then_rotate_is_one_transform_in_that_order():
    """Combining the transforms must equal warping twice: first A, then B."""
    image = np.repeat(shape_mask(), 3, axis=-1)
    move = tf.constant([1.0, 0.0, -5.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # content 5 px right
    angle = np.pi / 6
    c, s, cx, cy = np.cos(angle), np.sin(angle), (W - 1) / 2, (H - 1) / 2
    turn = tf.constant([c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy, 0.0, 0.0],
                       tf.float32)
    once = aug.projective_warp(image, image[..., :1], aug._compose([move, turn]))[1].numpy()
    twice = aug.projective_warp(*aug.projective_warp(image, image[..., :1], move), turn)[1]
    swapped = aug.projective_warp(image, image[..., :1], aug._compose([turn, move]))[1]
    assert (once == twice.numpy()).mean() >= 0.98
    assert (swapped.numpy() == twice.numpy()).mean() < 0.95


def test_default_ops_draw_as_the_original_augmentation():
    """flip, shift and color use the sub-seeds they always used, so earlier runs
    resume with the same batches. The reference is the original implementation; the
    separable resampling that replaced its projective warp gives the same masks and
    the same images to float rounding."""
    def original(image, mask, s):
        seeds = tf.random.experimental.stateless_split(s, 6)
        flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
        image = tf.where(flip, tf.reverse(image, [1]), image)
        mask = tf.where(flip, tf.reverse(mask, [1]), mask)
        scale = tf.random.stateless_uniform([], seeds[1], 0.9, 1.1)
        dx = tf.random.stateless_uniform([], seeds[2], -0.1, 0.1) * W
        dy = tf.random.stateless_uniform([], seeds[3], -0.1, 0.1) * H
        inv = 1.0 / scale
        transform = tf.stack([inv, 0.0, (W - 1) * (1 - inv) / 2 - dx,
                              0.0, inv, (H - 1) * (1 - inv) / 2 - dy, 0.0, 0.0])[None]

        def warp(x, interpolation):
            return tf.raw_ops.ImageProjectiveTransformV3(
                images=x[None], transforms=transform, output_shape=[H, W],
                interpolation=interpolation, fill_mode="REFLECT", fill_value=0.0)[0]

        image = tf.image.stateless_random_brightness(warp(image, "BILINEAR"), 0.1, seeds[4])
        image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seeds[5])
        return tf.clip_by_value(image, 0.0, 1.0).numpy(), warp(mask, "NEAREST").numpy()

    image, mask = random_image(), class_mask()
    flipped = set()
    for s in range(8):
        expected = original(tf.constant(image), tf.constant(mask), seed(s, 5))
        got = run(image, mask, seed(s, 5), aug.parse_augment(True))
        np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(got[1], expected[1])
        flipped.add(bool(aug.flip_drawn(tf.random.experimental.stateless_split(
            seed(s, 5), 6)[0])))
    assert flipped == {True, False}  # both branches of the folded flip were compared


@pytest.mark.parametrize("shape", [(32, 48), (33, 517), (1, 1), (2, 20), (517, 3)])
def test_the_separable_warp_equals_the_projective_warp(shape):
    """axis_aligned_warp, the fast path of shift without rotation, samples what
    ImageProjectiveTransformV3 samples (bilinear image, nearest mask, reflected borders),
    for the shift's own transforms and for scales and shifts far beyond them (borders
    reflected more than once), flipped or not."""
    h, w = shape
    rng = np.random.default_rng(h * w)
    image = tf.constant(rng.random((h, w, 3), dtype=np.float32))
    mask = tf.constant(rng.integers(0, 4, (h, w, 1)).astype(np.float32))
    transforms = [aug.shift_transform(image, *tf.random.experimental.stateless_split(
        seed(k, 1), 3)) for k in range(6)]
    transforms += [tf.constant([sx, 0.0, tx, 0.0, sy, ty, 0.0, 0.0], tf.float32)
                   for sx, tx, sy, ty in [(1.0, 0.5, 1.0, -0.5), (0.3, -7.3, 2.5, 4.1),
                                          (3.1, -2.0 * w, 0.45, 1.5 * h), (1.0, 0.0, 1.0, 0.0)]]
    for k, transform in enumerate(transforms):
        mirror = k % 2 == 1
        source = (tf.reverse(image, [1]), tf.reverse(mask, [1])) if mirror else (image, mask)
        expected = aug.projective_warp(*source, transform)
        got = aug.axis_aligned_warp(image, mask, transform, mirror)
        np.testing.assert_allclose(got[0].numpy(), expected[0].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got[1].numpy(), expected[1].numpy())


def test_runs_inside_tf_data_as_eagerly():
    image, mask = random_image(), class_mask()
    ops = ",".join(aug.AUGMENTATIONS)
    ds = tf.data.Dataset.from_tensors((image, mask)).map(
        tf.autograph.experimental.do_not_convert(
            lambda i, m: aug.augment_pair(i, m, seed(3, 4), ops)))
    assert [s.shape for s in ds.element_spec] == [(H, W, 3), (H, W, 1)]
    graph_image, graph_mask = next(ds.as_numpy_iterator())
    eager_image, eager_mask = run(image, mask, seed(3, 4), ops)
    np.testing.assert_allclose(graph_image, eager_image, atol=1e-5)
    np.testing.assert_array_equal(graph_mask, eager_mask)
