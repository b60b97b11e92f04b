"""Rematerialisation (Config.remat): the same parameters and gradients, less kept.

What a rematerialised block saves is what the forward pass keeps for the backward
pass (JAX's residuals), measured here from the shapes alone. XLA's CPU compiler
undoes the recomputation (its common-subexpression pass merges the recomputed
convolutions with the forward ones: the compiled step has the same 30 convolutions
and the same temporary memory either way), so the memory it buys is a GPU's; the
GPU suite of ``experiments.benchmark`` measures it there.
"""

import jax
import numpy as np
import pytest

from unet_jax import losses
from unet_jax.config import Config
from unet_jax.train import create_model, init_params

SIZE, BATCH = 32, 2
RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
MASKS = (RNG.uniform(size=(BATCH, SIZE, SIZE, 1)) > 0.5).astype(np.float32)


def model_and_loss(remat: str):
    config = Config(base_features=8, depth=2, image_size=SIZE, kernels="stock", remat=remat)
    model = create_model(config)

    def loss(params):
        logits = model.apply({"params": params}, IMAGES)
        return losses.per_image_loss("bce", logits, MASKS).mean()

    return config, model, loss


def kept_for_backward_bytes(remat: str) -> int:
    """Bytes of the residuals the forward pass keeps for the gradient (from shapes)."""
    config, model, loss = model_and_loss(remat)
    params = jax.eval_shape(lambda key: init_params(key, config, model), jax.random.key(0))
    residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(residuals))


@pytest.fixture(scope="module")
def fast_compile():
    """Compiled without most optimisations: the same values, less compile time."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def test_remat_keeps_the_parameters_and_the_gradients(fast_compile):
    config, model, loss = model_and_loss("none")
    params = init_params(jax.random.key(0), config, model)
    grads = jax.jit(jax.grad(loss))(params)
    for remat in ("convs", "full"):
        config, model, loss = model_and_loss(remat)
        # the same parameter tree: checkpoints and the torch import keep working
        shapes = jax.eval_shape(lambda key: init_params(key, config, model), jax.random.key(0))
        assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                     jax.jit(jax.grad(loss))(params), grads)


def test_remat_keeps_less_for_the_backward_pass():
    none, convs, full = map(kept_for_backward_bytes, ("none", "convs", "full"))
    # 'convs' drops the ReLU outputs, pooled maps and concatenations (about a third);
    # 'full' keeps each block's input alone (under a third of the plain model's)
    assert convs < 0.7 * none and full < 0.7 * convs, (none, convs, full)
