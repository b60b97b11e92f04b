"""The U-Net's topology, shapes, size checks, dtypes and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import Config, UNet, UpConv, init_params
from unet_jax.models import check_input_size

SEED_PARAMETER_COUNT = 31_031_745  # PyTorch: sum(p.numel() for p in UNet(3, 1).parameters())


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def test_parameter_count_matches_the_pytorch_original():
    shapes = jax.eval_shape(UNet(num_classes=1).init, jax.random.key(0, impl="rbg"),
                            jnp.zeros((1, 64, 64, 3)))
    assert count(shapes["params"]) == SEED_PARAMETER_COUNT


def test_parameter_tree_has_the_seed_structure():
    params = jax.eval_shape(UNet().init, jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)))["params"]
    assert sorted(params) == ["bottleneck", "down_1", "down_2", "down_3", "down_4", "head",
                              "up_1", "up_2", "up_3", "up_4"]
    assert [params[f"down_{i}"]["conv"]["conv2"]["kernel"].shape[-1] for i in range(1, 5)] == [64, 128, 256, 512]
    assert params["bottleneck"]["conv2"]["kernel"].shape == (3, 3, 1024, 1024)
    # Up level 1: 1024 -> 512 by the up-convolution, concat with a 512 skip -> 1024 -> 512.
    assert params["up_1"]["up"]["kernel"].shape == (2, 2, 1024, 512)
    assert params["up_1"]["conv"]["conv1"]["kernel"].shape == (3, 3, 1024, 512)
    assert params["up_4"]["conv"]["conv1"]["kernel"].shape == (3, 3, 128, 64)
    assert params["head"]["kernel"].shape == (1, 1, 64, 1)


@pytest.mark.parametrize("batch,height,width,classes,channels", [
    (1, 16, 16, 1, 3), (3, 32, 48, 1, 3), (2, 48, 32, 4, 1), (1, 64, 16, 2, 3)])
def test_output_shapes(batch, height, width, classes, channels):
    model = UNet(num_classes=classes, base_features=4, depth=4)
    x = jnp.zeros((batch, height, width, channels))
    params = model.init(jax.random.key(0, impl="rbg"), x)
    y = model.apply(params, x)
    assert y.shape == (batch, height, width, classes)
    assert y.dtype == jnp.float32


@pytest.mark.parametrize("depth,size", [(1, 6), (2, 12), (3, 40)])
def test_depth_field_changes_levels(depth, size):
    model = UNet(base_features=4, depth=depth)
    params = model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, size, size, 3)))["params"]
    assert sum(k.startswith("down_") for k in params) == depth
    assert params["bottleneck"]["conv1"]["kernel"].shape[-1] == 4 * 2 ** depth


def test_indivisible_size_raises_with_nearest_valid_sizes():
    model = UNet(base_features=4)
    with pytest.raises(ValueError, match=r"100x64.*2\*\*depth = 16.*height 100 -> 96 or 112"):
        model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 100, 64, 3)))
    with pytest.raises(ValueError, match=r"width 50 -> 48 or 56"):
        check_input_size(64, 50, depth=3)
    check_input_size(64, 48, depth=4)  # valid: no error


def test_pytorch_order_and_the_wrong_channel_count_are_named():
    """An NCHW batch was called an indivisible size ('nearest valid sizes: height 3 ->
    4'), and grayscale images given RGB parameters failed in Flax's parameter check."""
    model = UNet(base_features=4, depth=2)
    params = model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"^got shape \(2, 3, 32, 48\), PyTorch's NCHW order "
                       r".*pass x\.transpose\(0, 2, 3, 1\)"):
        model.apply(params, jnp.zeros((2, 3, 32, 48)))
    with pytest.raises(ValueError, match=r"^the images have 1 channel\(s\) but these "
                       r"parameters were made for 3 \(in_channels\): give RGB images"):
        model.apply(params, jnp.zeros((1, 32, 32, 1)))
    assert model.apply(params, jnp.zeros((1, 32, 32, 3))).shape == (1, 32, 32, 1)
    separable = UNet(base_features=4, depth=2, separable=True)
    params = separable.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"^the images have 1 channel\(s\) but these "
                       r"parameters were made for 3"):
        separable.apply(params, jnp.zeros((1, 32, 32, 1)))
    # NHWC whose height fits the depth is not taken for NCHW, whatever its channels.
    assert model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 4, 8, 6)))


@pytest.mark.parametrize("field,value", [("base_features", 0), ("depth", 0),
                                         ("num_classes", 0), ("base_features", 2.5)])
def test_widths_depth_and_classes_must_be_positive_whole_numbers(field, value):
    with pytest.raises(ValueError, match=rf"^UNet\({field}={value!r}\): needs a whole number"):
        UNet(**{field: value}).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    assert UNet(base_features=np.int64(2), depth=1).init(  # numpy whole numbers are fine
        jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = UNet(base_features=4, depth=2, dtype=jnp.bfloat16)
    x = jax.random.uniform(jax.random.key(1, impl="rbg"), (2, 16, 16, 3))
    variables = model.init(jax.random.key(0, impl="rbg"), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    y = model.apply(variables, x)
    assert y.dtype == jnp.float32
    y32 = UNet(base_features=4, depth=2).apply(variables, x)
    np.testing.assert_allclose(y, y32, atol=5e-2)


def test_upconv_equals_flax_conv_transpose():
    """The einsum form computes exactly nn.ConvTranspose(2x2, stride 2)."""
    x = jax.random.normal(jax.random.key(0, impl="rbg"), (2, 5, 7, 6))
    up = UpConv(4)
    variables = up.init(jax.random.key(1, impl="rbg"), x)
    ours = up.apply(variables, x)
    reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID")
    # lax.conv_transpose dilates the input and correlates with the kernel as given,
    # which writes kernel[1 - a, 1 - b] to offset (a, b): the spatially flipped kernel.
    kernel = variables["params"]["kernel"][::-1, ::-1]
    theirs = reference.apply({"params": {"kernel": kernel, "bias": variables["params"]["bias"]}}, x)
    assert ours.shape == (2, 10, 14, 4)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def _loss(model, params, x, y):
    logits = model.apply({"params": params}, x)
    return jnp.mean(jax.nn.softplus(logits) - logits * y)


def test_every_parameter_gets_a_finite_nonzero_gradient():
    config = Config(base_features=4, depth=4)
    model = UNet(base_features=4, depth=4)
    params = init_params(jax.random.key(0, impl="rbg"), config)
    x = jax.random.uniform(jax.random.key(1, impl="rbg"), (2, 32, 32, 3))
    y = (x[..., :1] > 0.5).astype(jnp.float32)
    # Jitted: op by op, the depth-4 backward pass dispatches for most of a minute.
    grads = jax.jit(jax.grad(lambda p: _loss(model, p, x, y)))(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    # every kernel and bias: 4 down DoubleConvs, the bottleneck, 4 x (up-conv + DoubleConv), head
    assert len(flat) == 4 * 4 + 4 + 4 * (2 + 4) + 2
    for path, g in flat:
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), name
        assert np.any(g != 0), f"{name} gets no gradient"


def test_gradient_matches_finite_differences_in_float64():
    with jax.enable_x64(True):
        model = UNet(base_features=2, depth=2, dtype=jnp.float64, param_dtype=jnp.float64)
        x = jax.random.uniform(jax.random.key(1, impl="rbg"), (2, 8, 8, 3), jnp.float64)
        y = (x[..., :1] > 0.5).astype(jnp.float64)
        # Jitted, and initialised from an rbg key: op by op, or with the default
        # threefry generator, XLA compiles for minutes on a 2-core CPU.
        params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)["params"]
        loss = jax.jit(lambda p: _loss(model, p, x, y))
        grads = jax.jit(jax.grad(loss))(params)
        leaves, treedef = jax.tree.flatten(params)
        rng = np.random.default_rng(2)
        direction = jax.tree.unflatten(
            treedef, [jnp.asarray(rng.standard_normal(l.shape)) for l in leaves])
        eps = 1e-6
        shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
        numeric = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        assert abs(float(analytic)) > 1e-6
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)


def test_forward_mode_autodiff_goes_through_the_stock_model():
    """The stock-op model (what GPUs and TPUs run) supports jax.jvp; only the CPU
    kernels' custom VJPs do not."""
    import jax
    import jax.numpy as jnp

    from unet_jax import UNet

    model = UNet(base_features=4, depth=2)
    x = jnp.ones((1, 16, 16, 3))
    params = model.init(jax.random.key(0, impl="rbg"), x)["params"]
    out, tangent = jax.jvp(lambda x: model.apply({"params": params}, x), (x,), (x,))
    assert out.shape == tangent.shape == (1, 16, 16, 1)
    assert bool(jnp.all(jnp.isfinite(tangent))) and float(jnp.abs(tangent).max()) > 0
