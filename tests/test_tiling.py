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
