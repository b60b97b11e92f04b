"""unet_jax.tiling: overlap-tile prediction and test-time flips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import tiling
from unet_jax.models import UNet


@pytest.fixture(scope="module")
def narrow_unet():
    model = UNet(base_features=4, depth=2)
    params = model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 16, 16, 3)))["params"]
    apply = jax.jit(lambda x: model.apply({"params": params}, x))
    return lambda tiles: np.asarray(apply(jnp.asarray(tiles)))


def test_one_tile_covering_the_image_gives_the_whole_image_logits(narrow_unet):
    image = np.random.default_rng(0).random((32, 48, 3), np.float32)
    whole = narrow_unet(image[None])[0]
    for overlap in (0.0, 0.25, 0.5):
        tiled = tiling.predict_tiled(narrow_unet, image, (32, 48), overlap, batch_size=2)
        np.testing.assert_array_equal(tiled, whole)


def test_any_image_size_comes_back_at_its_own_size(narrow_unet):
    image = np.random.default_rng(1).random((333, 517, 3), np.float32)
    logits = tiling.predict_tiled(narrow_unet, image, (64, 64), 0.25, batch_size=8)
    assert logits.shape == (333, 517, 1) and np.isfinite(logits).all()
    small = tiling.predict_tiled(narrow_unet, image[:20, :30], (64, 64), 0.25, batch_size=8)
    assert small.shape == (20, 30, 1)  # smaller than one tile: mirrored up to it


def test_blending_a_constant_model_returns_the_constant():
    def constant(tiles):
        return np.full((*tiles.shape[:3], 2), [3.7, -1.25], np.float32)

    image = np.zeros((100, 130, 3), np.float32)
    for overlap in (0.0, 0.25, 0.5, 0.9):
        out = tiling.predict_tiled(constant, image, (32, 48), overlap, batch_size=3)
        np.testing.assert_allclose(out[..., 0], 3.7, rtol=1e-5)
        np.testing.assert_allclose(out[..., 1], -1.25, rtol=1e-5)


def test_every_tile_lands_where_it_was_cut():
    """A "model" that returns its input: whatever the overlap and padding, stitching its
    tiles back must give the image itself, so a misplaced tile or a wrong crop of the
    padding shows."""
    image = np.random.default_rng(2).random((70, 101, 2), np.float32)
    for tile, overlap in (((32, 32), 0.25), ((16, 48), 0.5), ((128, 128), 0.25), ((32, 32), 0.0)):
        out = tiling.predict_tiled(lambda t: t, image, tile, overlap, batch_size=5)
        np.testing.assert_allclose(out, image, atol=1e-6)


def test_tiles_cover_the_length_and_share_the_overlap():
    for length, tile, overlap in ((1918, 512, 0.25), (640, 512, 0.5), (512, 512, 0.3), (97, 32, 0.0)):
        starts = tiling.tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length
        steps = np.diff(starts)
        assert (steps > 0).all() and (steps <= tile * (1 - overlap)).all()
    assert tiling.tile_starts(1918, 512, 0.25) == [0, 352, 703, 1054, 1406]
    with pytest.raises(ValueError):
        tiling.tile_starts(10, 32, 0.25)


def test_gaussian_weights_peak_in_the_middle_and_never_vanish():
    w = tiling.gaussian_weights((32, 48))
    assert w.shape == (32, 48) and 0.95 < w.max() <= 1
    assert w[16, 24] > w[0, 24] > 0 and w[16, 24] > w[16, 0] > 0
    np.testing.assert_allclose(w, w[::-1, ::-1], rtol=1e-6)  # symmetric


def test_gaussian_weights_are_the_documented_gaussian():
    """sigma 1/8 of each side: about 3e-4 at the edge of a large tile, so a neighbour's
    centre wins where tiles overlap. A much wider Gaussian (nearly flat weights) would
    blend tiles almost evenly and still peak in the middle, so pin the values."""
    for tile in ((32, 48), (512, 512), (7, 20)):
        w = tiling.gaussian_weights(tile)
        h, wd = tile
        ys = (np.arange(h) - (h - 1) / 2) / (h / 8)
        xs = (np.arange(wd) - (wd - 1) / 2) / (wd / 8)
        expected = np.exp(-0.5 * ys[:, None] ** 2) * np.exp(-0.5 * xs[None, :] ** 2)
        np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-12)
        assert w.dtype == np.float32
        assert w.max() == w[(h - 1) // 2, (wd - 1) // 2] == w[h // 2, wd // 2]  # centre is max
    w = tiling.gaussian_weights((512, 512))
    middle = w[256, 256]
    assert middle == pytest.approx(1.0, abs=1e-3)  # 255.5 is the centre: 0.99994
    for edge in (w[0, 256], w[-1, 256], w[256, 0], w[256, -1]):
        assert 2e-4 < edge / middle < 5e-4  # exp(-0.5 * (255.5 / 64)**2) = 3.4e-4
    w = tiling.gaussian_weights((32, 48))
    for edge in (w[0, 24], w[-1, 24], w[16, 0], w[16, -1]):
        assert 0 < edge < 1e-3
    assert 0 < w[0, 0] < 1e-6  # a corner: the product of two edges


def test_where_tiles_overlap_the_tile_seen_nearer_its_centre_wins():
    """Each tile's "model" returns the tile's own index everywhere. At a pixel near one
    tile's centre and on a neighbour's outermost row or column, the blend must be the
    first tile's index to within the edge weight (~6e-4 for 32 px); nearly flat
    weights would give about the average of the two."""
    calls = []

    def tile_index(tiles):  # batch k holds tiles k*batch .. k*batch+batch-1, row-major
        first = len(calls) * len(tiles)
        calls.append(first)
        index = first + np.arange(len(tiles), dtype=np.float32)
        return np.broadcast_to(index[:, None, None, None], (*tiles.shape[:3], 1)).copy()

    # Width 64 with 32-px tiles and overlap 0.5: mirrored by 8 on each side to 80, tiles
    # starting at 0, 16, 32, 48; height 32 is one tile, unpadded. A tile starting at s
    # has its centre at s + 15.5 and its edges at s and s + 31 of the padded image, that
    # is at s - 8 and s + 23 of the output. Output column 8 is tile 1's first column
    # and tile 0's column 16; tile 2 starts after it.
    image = np.zeros((32, 64, 3), np.float32)
    assert tiling.padding((32, 64), (32, 32), 0.5) == ((0, 0), (8, 8))
    assert tiling.tile_starts(80, 32, 0.5) == [0, 16, 32, 48]
    out = tiling.predict_tiled(tile_index, image, (32, 32), 0.5, batch_size=3)[..., 0]
    assert len(calls) == 2
    # (output column, the tile that sees it nearest its centre; another sees it at an edge)
    for column, winner in ((8, 0), (7, 0), (23, 1), (24, 1), (39, 2), (40, 2), (55, 3)):
        np.testing.assert_allclose(out[:, column], winner, atol=1e-3, err_msg=str(column))
    # Halfway between two tile centres (between output columns 15 and 16) they blend
    # evenly: the two columns either side mirror each other about 0.5.
    np.testing.assert_allclose(out[:, 15] + out[:, 16], 1.0, atol=1e-5)
    assert 0.1 < out[0, 16] - out[0, 15] < 0.9


def test_bad_overlap_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        tiling.predict_tiled(lambda t: t, np.zeros((8, 8, 1)), (8, 8), overlap=1.0)


# --- test-time flips ----------------------------------------------------------------

def _mirror_symmetric(x):
    """Per-pixel: any flip of the input flips the output the same way."""
    return 3.0 * x[..., :1] - 1.5


def _ramp(x):
    """Not flip-equivariant: adds a left-to-right and a top-to-bottom ramp."""
    h, w = x.shape[1:3]
    return (x[..., :1] + jnp.linspace(-2, 2, w)[None, None, :, None]
            + jnp.linspace(0, 1, h)[None, :, None, None])


def test_tta_changes_nothing_for_a_flip_equivariant_model():
    images = jax.random.uniform(jax.random.key(0, impl="rbg"), (2, 8, 12, 3))
    plain = _mirror_symmetric(images)
    for tta in ("hflip", "flips"):
        np.testing.assert_allclose(tiling.flip_average(_mirror_symmetric, images, tta), plain,
                                   atol=1e-4)
    np.testing.assert_array_equal(tiling.flip_average(_ramp, images, "none"), _ramp(images))


def test_tta_averages_the_probabilities_of_the_flipped_views():
    images = jax.random.uniform(jax.random.key(1, impl="rbg"), (2, 8, 12, 3))
    sig = jax.nn.sigmoid
    views = [sig(_ramp(images)), sig(_ramp(images[:, :, ::-1])[:, :, ::-1])]
    expected = np.mean(views, axis=0)
    got = sig(tiling.flip_average(_ramp, images, "hflip"))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    views += [sig(_ramp(images[:, ::-1])[:, ::-1]),
              sig(_ramp(images[:, ::-1, ::-1])[:, ::-1, ::-1])]
    np.testing.assert_allclose(sig(tiling.flip_average(_ramp, images, "flips")),
                               np.mean(views, axis=0), atol=1e-5)
    assert not np.allclose(got, sig(_ramp(images)), atol=1e-3)  # the ramp is not symmetric


def test_tta_of_several_classes_averages_softmax():
    images = jax.random.uniform(jax.random.key(2, impl="rbg"), (1, 6, 10, 3))

    def three_classes(x):
        return jnp.concatenate([_ramp(x), -_ramp(x), x[..., 1:2]], axis=-1)

    soft = lambda z: jax.nn.softmax(z, axis=-1)  # noqa: E731
    expected = (soft(three_classes(images))
                + soft(three_classes(images[:, :, ::-1])[:, :, ::-1])) / 2
    got = soft(tiling.flip_average(three_classes, images, "hflip"))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="--tta"):
        tiling.flip_average(three_classes, images, "rot90")


@pytest.mark.parametrize("classes", [1, 3])
def test_tta_of_a_confident_model_stays_finite(classes):
    """A trained model's logits reach +-40 and more on clear pixels, where float32's
    probabilities are exactly 0 or 1: their logits would be infinite, and an infinite
    logit becomes NaN in the bilinear resize back to the photo's size."""
    images = jax.random.uniform(jax.random.key(3, impl="rbg"), (1, 6, 10, 3))

    def confident(x):  # pixel by pixel, so every flipped view agrees
        sure = 60.0 * jnp.where(x[..., :1] > 0.5, 1.0, -1.0)
        return jnp.concatenate([sure, -sure, 0 * sure][:classes], axis=-1)

    got = np.asarray(tiling.flip_average(confident, images, "flips"))
    assert np.isfinite(got).all()
    decided = np.asarray(confident(images))
    if classes == 1:
        np.testing.assert_array_equal(got > 0, decided > 0)
    else:
        np.testing.assert_array_equal(got.argmax(-1), decided.argmax(-1))
