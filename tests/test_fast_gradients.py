"""The CPU kernels' hand-written gradients (max-pooling, 3x3 convolution) equal autodiff's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.cpu_kernels import CpuConv, _conv3x3_same, conv3x3, max_pool_2x2
from unet_jax.models import UNet


def reference(x):
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))


@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (1, 4, 4, 1), (3, 2, 10, 7)])
def test_values_and_gradients_match_nn_max_pool(shape):
    rng = np.random.default_rng(0)
    # Few distinct values: most windows hold ties, which must go to the first maximum.
    x = jnp.asarray(rng.integers(0, 3, size=shape).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])).astype(np.float32))
    y_ref, vjp_ref = jax.vjp(reference, x)
    y, vjp = jax.vjp(jax.jit(max_pool_2x2), x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])


def test_relu_zeros_route_to_the_first_position():
    x = jnp.zeros((1, 2, 2, 1))
    grad = jax.grad(lambda x: max_pool_2x2(x).sum())(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_odd_sizes_fall_back_to_nn_max_pool():
    x = jax.random.normal(jax.random.key(0, impl="rbg"), (1, 5, 7, 2))
    np.testing.assert_array_equal(max_pool_2x2(x), reference(x))
    np.testing.assert_array_equal(jax.grad(lambda x: max_pool_2x2(x).sum())(x),
                                  jax.grad(lambda x: reference(x).sum())(x))


def test_bfloat16():
    x = jax.random.normal(jax.random.key(0, impl="rbg"), (2, 4, 4, 3)).astype(jnp.bfloat16)
    grad = jax.grad(lambda x: max_pool_2x2(x).astype(jnp.float32).sum())(x)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(grad, jax.grad(lambda x: reference(x).astype(jnp.float32).sum())(x))


@pytest.mark.parametrize("n,h,w,c,o,path", [
    (4, 32, 40, 8, 16, "XLA's"),
    (1, 64, 72, 16, 8, "row bands (batch 1)"),
    (2, 32, 40, 8, 8, "row bands (batch 2)"),
    (1, 2, 10, 128, 128, "per-pixel products (kernel >> activations)"),
])
def test_conv3x3_gradients_match_autodiff(n, h, w, c, o, path):
    keys = jax.random.split(jax.random.key(0, impl="rbg"), 3)
    x = jax.random.normal(keys[0], (n, h, w, c))
    kernel = jax.random.normal(keys[1], (3, 3, c, o))
    g = jax.random.normal(keys[2], (n, h, w, o))
    y_ref, vjp_ref = jax.vjp(conv3x3, x, kernel)
    y, vjp = jax.vjp(jax.jit(_conv3x3_same), x, kernel)
    np.testing.assert_array_equal(y, y_ref)
    for ours, theirs in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


def test_unet_with_cpu_kernels_has_the_stock_parameters_values_and_gradients():
    stock = UNet(base_features=4, depth=2)
    cpu = UNet(base_features=4, depth=2, conv=CpuConv, pool=max_pool_2x2)
    x = jax.random.uniform(jax.random.key(1, impl="rbg"), (1, 16, 24, 3))
    params = stock.init(jax.random.key(0, impl="rbg"), x)["params"]
    assert (jax.tree.structure(cpu.init(jax.random.key(0, impl="rbg"), x)["params"])
            == jax.tree.structure(params))
    np.testing.assert_allclose(cpu.apply({"params": params}, x),
                               stock.apply({"params": params}, x), rtol=1e-6, atol=1e-6)

    def grads(model):
        return jax.grad(lambda p: model.apply({"params": p}, x).sum())(params)

    ours, theirs = grads(cpu), grads(stock)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_train_step_keeps_no_copy_of_the_kernels():
    # The donated state is updated in place; a copy of a kernel means XLA could not
    # order the update after the kernel's last read (see cpu_kernels._conv3x3_bwd).
    import re

    from unet_jax import Config, create_train_state, train_step

    config = Config(base_features=4, depth=2, image_size=(16, 16))
    state = create_train_state(jax.random.key(0, impl="rbg"), config)
    batch = {"image": jnp.zeros((2, 16, 16, 3)), "mask": jnp.zeros((2, 16, 16, 1))}
    hlo = train_step.lower(state, batch).compile().as_text()
    copies = re.findall(r"f32\[3,3,\d+,\d+\]\{[\d,]+\} copy\((%\S*kernel\S*)\)", hlo)
    assert not copies, f"kernels copied in the train step: {copies}"
