"""The U-Net's options (no skip connections, attention gates, separable convolutions):
parameter counts worked out by hand, what each option changes (stock kernels), the
gradients and a short overfit of each with the CPU kernels, and their flags."""

import argparse
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training import train_state

from unet_jax import Config, UNet, cpu_kernels, create_model, per_image_loss
from unet_jax import config as config_lib
from unet_jax.losses import LossSpec
from unet_jax.models import SeparableConv
from unet_jax.train import create_optimizer, loss_spec

# XLA's CPU compiler with LLVM's optimisations off: compiling is most of these tests'
# time, and this cuts it to about a third; the values are the same up to rounding.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

SMALL = dict(base_features=4, depth=2)
OPTIONS = {"no_skips": dict(skip_connections=False), "attention": dict(attention=True),
           "separable": dict(separable=True)}


# --- Parameter counts by hand --------------------------------------------------------

def conv(k, cin, cout, bias=True):
    """A k x k convolution: k*k*cin*cout weights, plus cout biases."""
    return k * k * cin * cout + (cout if bias else 0)


def separable(cin, cout):
    """3x3 depthwise (9*cin, no bias), then 1x1 pointwise (cin*cout + cout)."""
    return conv(3, 1, cin, bias=False) + conv(1, cin, cout)


def double_conv(cin, cout, sep=False):
    one = separable if sep else (lambda i, o: conv(3, i, o))
    return one(cin, cout) + one(cout, cout)


def gate(c, c_g):
    """W_x: 2x2 stride 2, no bias; W_g: 1x1 with bias; psi: 1x1 to one channel."""
    f = max(1, c // 2)
    return conv(2, c, f, bias=False) + conv(1, c_g, f) + conv(1, f, 1)


def unet_count(in_ch, classes, base, depth, skips=True, attention=False, sep=False):
    total, cin = 0, in_ch
    for i in range(depth):
        total += double_conv(cin, base * 2 ** i, sep)
        cin = base * 2 ** i
    x = base * 2 ** depth
    total += double_conv(cin, x, sep)  # bottleneck
    for i in reversed(range(depth)):
        c = base * 2 ** i  # this level's features, and its skip's channels
        total += conv(2, x, x // 2)  # up-convolution, halves the channels
        total += gate(c, x) if attention else 0
        total += double_conv(x // 2 + (c if skips else 0), c, sep)
        x = c
    return total + conv(1, base, classes)  # head


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def param_shapes(model, shape=(1, 16, 16, 3)):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))["params"]


def test_the_hand_count_is_the_guides_31_031_745():
    assert unet_count(3, 1, 64, 4) == 31_031_745 == count(param_shapes(UNet()))


@pytest.mark.parametrize("options,in_ch,classes", [
    (dict(skip_connections=False), 3, 1), (dict(attention=True), 3, 1),
    (dict(separable=True), 3, 1), (dict(separable=True, attention=True), 1, 3),
    (dict(separable=True, skip_connections=False), 1, 3), (dict(attention=True), 1, 2)])
def test_small_parameter_counts_by_hand_and_output_shapes(options, in_ch, classes):
    model = UNet(num_classes=classes, **SMALL, **options)
    out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0),
                                    jnp.zeros((2, 16, 32, in_ch)))
    assert count(variables["params"]) == unet_count(
        in_ch, classes, 4, 2, options.get("skip_connections", True),
        options.get("attention", False), options.get("separable", False))
    assert out.shape == (2, 16, 32, classes) and out.dtype == jnp.float32


def test_full_width_parameter_counts():
    # No skips: each up level's first conv reads C channels instead of 2C, 9*C*C fewer
    # weights: 31,031,745 - 9 * (512**2 + 256**2 + 128**2 + 64**2) = 27,898,305.
    assert unet_count(3, 1, 64, 4, skips=False) == 31_031_745 - 9 * 348_160 == 27_898_305
    # Attention: 3*C**2 + C + 1 per gate (W_x 2*C**2, W_g C**2 + C/2, psi C/2 + 1).
    assert all(gate(c, 2 * c) == 3 * c * c + c + 1 for c in (64, 128, 256, 512))
    assert unet_count(3, 1, 64, 4, attention=True) == 31_031_745 + 1_045_444 == 32_077_189
    assert unet_count(3, 1, 64, 4, sep=True) == 5_982_364
    for options, expected in [(dict(skip_connections=False), 27_898_305),
                              (dict(attention=True), 32_077_189),
                              (dict(separable=True), 5_982_364)]:
        assert count(param_shapes(UNet(**options))) == expected, options


# --- What each option changes --------------------------------------------------------

def random_params(model, shape=(1, 16, 16, 3), seed=0):
    """Parameters drawn with numpy, so no initialiser is compiled: He-scaled kernels,
    biases in +-0.1 (non-zero, so that a misplaced bias shows)."""
    shapes = param_shapes(model, shape)
    leaves, treedef = jax.tree.flatten(shapes)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    rng = np.random.default_rng(seed)
    values = []
    for path, leaf in zip(paths, leaves):
        if "bias" in path:
            values.append(rng.uniform(-0.1, 0.1, leaf.shape))
        else:
            fan_in = int(np.prod(leaf.shape[:-1]))
            values.append(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape))
    return jax.tree.unflatten(treedef, [jnp.asarray(v, jnp.float32) for v in values])


def random_params_of(module, x, seed=0):
    """Every parameter of ``module`` (biases too) drawn from N(0, 0.5**2)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(rng.normal(0, 0.5, l.shape), jnp.float32) for l in leaves])


def images(n=2, size=16, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(size=(n, size, size, 3)).astype(np.float32))


@functools.partial(jit, static_argnums=0)
def forward(model, params, x):
    """Logits, and the attention gates' alphas (in "intermediates") where there are any."""
    return model.apply({"params": params}, x, mutable=["intermediates"])


def test_without_skips_the_decoder_reads_the_upsampled_map_alone():
    plain, no_skips = UNet(**SMALL), UNet(**SMALL, skip_connections=False)
    params = random_params(no_skips)
    # Up level 1: the up-convolution 16 -> 8 channels, then conv1 reads those 8 alone
    # (8 + 8 with the skip); level 2: 8 -> 4, conv1 reads 4 (4 + 4).
    assert params["up_1"]["up"]["kernel"].shape == (2, 2, 16, 8)
    assert params["up_1"]["conv"]["conv1"]["kernel"].shape == (3, 3, 8, 8)
    assert params["up_2"]["conv"]["conv1"]["kernel"].shape == (3, 3, 4, 4)
    assert param_shapes(plain)["up_2"]["conv"]["conv1"]["kernel"].shape == (3, 3, 8, 4)

    # The U-Net with the skip's weights (conv1's second half of input channels: the
    # concatenation is upsampled first, skip second) set to zero is the no-skip model;
    # with any other weights there, the skips change the output.
    def with_skip_weights(params, value):
        params = jax.tree.map(lambda a: a, params)  # new dicts, the same arrays
        for level in ("up_1", "up_2"):
            conv1 = params[level]["conv"]["conv1"]
            conv1["kernel"] = jnp.concatenate(
                [conv1["kernel"], jnp.full_like(conv1["kernel"], value)], axis=2)
        return params

    x = images()
    expected = forward(no_skips, params, x)[0]
    np.testing.assert_allclose(forward(plain, with_skip_weights(params, 0.0), x)[0], expected,
                               rtol=1e-5, atol=1e-6)
    with_skips = forward(plain, with_skip_weights(params, 0.05), x)[0]
    assert float(jnp.abs(with_skips - expected).max()) > 1e-2


def test_attention_weights_lie_in_zero_one_and_an_open_gate_is_the_plain_unet():
    model = UNet(**SMALL, attention=True)
    params = random_params(model)
    assert sorted(params["up_1"]["attention"]) == ["W_g", "W_x", "psi"]
    assert "bias" not in params["up_1"]["attention"]["W_x"]
    # W_x reads the 8-channel skip 2x2 at a time into 4; W_g the 16-channel gate.
    assert params["up_1"]["attention"]["W_x"]["kernel"].shape == (2, 2, 8, 4)
    assert params["up_1"]["attention"]["W_g"]["kernel"].shape == (1, 1, 16, 4)
    assert params["up_1"]["attention"]["psi"]["kernel"].shape == (1, 1, 4, 1)

    x = images()
    logits, state = forward(model, params, x)
    alphas = state["intermediates"]
    assert alphas["up_1"]["attention"]["alpha"][0].shape == (2, 8, 8, 1)  # the level-2 skip
    assert alphas["up_2"]["attention"]["alpha"][0].shape == (2, 16, 16, 1)
    for level in ("up_1", "up_2"):
        alpha = np.asarray(alphas[level]["attention"]["alpha"][0])
        assert alpha.min() > 0 and alpha.max() < 1, level
        assert alpha.max() - alpha.min() > 1e-3, f"{level}: alpha does not vary over pixels"

    # Gate forced open: psi's weights 0 and bias 100 make alpha = sigmoid(100) = 1.0 in
    # float32, so the skips pass unchanged and the model is the plain U-Net with the
    # same remaining parameters.
    opened = jax.tree.map(lambda a: a, params)  # new dicts, the same arrays
    plain_params = jax.tree.map(lambda a: a, params)
    for level in ("up_1", "up_2"):
        psi = opened[level]["attention"]["psi"]
        psi["kernel"] = jnp.zeros_like(psi["kernel"])
        psi["bias"] = jnp.full_like(psi["bias"], 100.0)
        del plain_params[level]["attention"]
    plain = forward(UNet(**SMALL), plain_params, x)[0]
    logits_opened, state = forward(model, opened, x)
    assert np.all(state["intermediates"]["up_2"]["attention"]["alpha"][0] == 1.0)
    np.testing.assert_allclose(logits_opened, plain, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(logits - plain).max()) > 1e-3  # a working gate changes the output


def test_separable_conv_is_a_depthwise_then_pointwise_factorisation():
    """Nothing between the two parts: the pair is one 3x3 convolution whose kernel is
    depthwise[a, b, c] * pointwise[c, o], with the pointwise bias."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 5, 3)).astype(np.float32))
    layer = SeparableConv(7)
    params = random_params_of(layer, x)
    assert params["depthwise"]["kernel"].shape == (3, 3, 1, 3)
    assert set(params["depthwise"]) == {"kernel"}  # no bias before the pointwise conv
    assert params["pointwise"]["kernel"].shape == (1, 1, 3, 7)
    dense = params["depthwise"]["kernel"][:, :, 0, :, None] * params["pointwise"]["kernel"][0, 0]
    reference = nn.Conv(7, (3, 3), padding="SAME").apply(
        {"params": {"kernel": dense, "bias": params["pointwise"]["bias"]}}, x)
    np.testing.assert_allclose(layer.apply({"params": params}, x), reference,
                               rtol=1e-5, atol=1e-5)

    model_params = param_shapes(UNet(**SMALL, separable=True))
    conv1 = model_params["down_1"]["conv"]["conv1"]
    assert conv1["depthwise"]["kernel"].shape == (3, 3, 1, 3)
    assert conv1["pointwise"]["kernel"].shape == (1, 1, 3, 4)


def test_attention_without_skips_is_refused():
    with pytest.raises(ValueError, match="skip_connections=True"):
        param_shapes(UNet(**SMALL, attention=True, skip_connections=False))


# --- Gradients, CPU kernels, training ------------------------------------------------

def blobs(n=2, size=16, seed=0):
    """Noisy images with a bright disc, and the discs as masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = rng.uniform(0, 0.6, (n, size, size, 3)).astype(np.float32)
    mask = np.zeros((n, size, size, 1), np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(5, size - 5), rng.uniform(5, size - 5), rng.uniform(3, 5)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        image[i][disc] += 0.4
        mask[i][disc] = 1.0
    return {"image": jnp.asarray(image), "mask": jnp.asarray(mask)}


@jit
def step_with_gradients(state, batch):
    """``train_step``'s update (mean BCE, AdamW), returning the loss and gradients."""
    def loss(params):
        logits = state.apply_fn({"params": params}, batch["image"])
        return per_image_loss("bce", logits, batch["mask"]).mean()
    value, grads = jax.value_and_grad(loss)(state.params)
    return state.apply_gradients(grads=grads), value, grads


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_trains_every_parameter_and_overfits_a_tiny_batch(name):
    """With the CPU kernels, as training on a CPU runs it: every parameter gets a finite,
    non-zero gradient, and 40 AdamW steps on one batch of two 16x16 images cut the
    loss by a clear factor. (The forward checks above run the stock kernels.)"""
    config = Config(**SMALL, image_size=16, learning_rate=1e-2, **OPTIONS[name])
    model = create_model(config, backend="cpu")
    assert model.conv is cpu_kernels.CpuConv
    state = train_state.TrainState.create(apply_fn=model.apply, params=random_params(model),
                                          tx=create_optimizer(config))
    batch = blobs()
    state, first, grads = step_with_gradients(state, batch)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert len(flat) == len(jax.tree.leaves(state.params))
    for path, g in flat:
        key = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), key
        assert np.any(g != 0), f"{key} gets no gradient"
    for _ in range(39):
        state, last, _ = step_with_gradients(state, batch)
    assert float(last) < 0.25 * float(first), (float(first), float(last))


def test_separable_conv_with_the_cpu_kernels_equals_stock():
    """``CpuConv`` hands the grouped (depthwise) and 1x1 convolutions to XLA unchanged:
    same values and gradients as stock ``nn.Conv``."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 6)).astype(np.float32))
    params = random_params_of(SeparableConv(5), x)

    @functools.partial(jit, static_argnums=0)
    def value_and_grads(conv, params, x):
        f = lambda p, x: jnp.sum(jnp.sin(SeparableConv(5, conv=conv).apply({"params": p}, x)))
        return f(params, x), jax.grad(f, argnums=(0, 1))(params, x)

    stock = value_and_grads(nn.Conv, params, x)
    fast = value_and_grads(cpu_kernels.CpuConv, params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), fast, stock)


# --- Flags -----------------------------------------------------------------------------

def test_options_and_loss_settings_are_flags():
    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser)
    text = parser.format_help()
    for flag in ("--skip-connections", "--no-skip-connections", "--attention", "--separable",
                 "--focal-gamma", "--tversky-alpha"):
        assert flag in text, flag
    args = parser.parse_args(["--no-skip-connections", "--separable", "--loss", "focal",
                              "--focal-gamma", "1.5"])
    config = dataclasses.replace(Config(), **config_lib.overrides(args))
    model = create_model(config)
    assert (model.skip_connections, model.attention, model.separable) == (False, False, True)
    assert loss_spec(config) == LossSpec("focal", focal_gamma=1.5, tversky_alpha=0.3)
    assert config_lib.overrides(parser.parse_args(["--attention"])) == {"attention": True}
    default = create_model(Config())
    assert (default.skip_connections, default.attention, default.separable) == (True, False, False)
