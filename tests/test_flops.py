"""The analytic FLOP count against XLA's own count on a CPU, and the peak-rate table."""

import jax
import numpy as np
import pytest

from unet_jax import flops
from unet_jax.config import Config
from unet_jax.train import create_train_state, predict_step, train_step


def xla_flops(lowered) -> float:
    cost = lowered.compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


VARIANTS = {"guide": {}, "attention": {"attention": True}, "separable": {"separable": True},
            "no skips": {"skip_connections": False}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_count_matches_xla_within_2_percent(variant):
    """Width 16: wide enough that the convolutions dominate as they do at the guide's
    width (XLA also counts the elementwise work the formula leaves out: bias, ReLU,
    pooling, loss, AdamW, about 1% here and less at full width). Compiled without
    most optimisations (the same arithmetic, a third of the compile time)."""
    h, w, n = 64, 48, 2
    config = Config(base_features=16, depth=2, image_size=(h, w), kernels="stock",
                    **VARIANTS[variant])
    state = jax.eval_shape(lambda key: create_train_state(key, config), jax.random.key(0))
    batch = {"image": jax.ShapeDtypeStruct((n, h, w, 3), np.float32),
             "mask": jax.ShapeDtypeStruct((n, h, w, 1), np.float32)}
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        train = xla_flops(train_step.lower(state, batch))
        forward = xla_flops(predict_step.lower(state.params, batch["image"], state.apply_fn))
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
    model = flops.model_options(config)
    layers = list(flops.unet_layers(h, w, **model))
    # XLA counts a depthwise convolution's weight gradient (batch_group_count = its
    # channels) once per channel: cin times the arithmetic it needs.
    inflated = sum((layer.flops / (2 * flops.conv_taps(h >> level, w >> level, 3)) - 1)
                   * layer.flops for layer, level in zip(layers, levels(layers))
                   if layer.name.endswith(".depthwise"))
    assert n * (flops.train_flops(h, w, **model) + inflated) == pytest.approx(train, rel=0.02)
    # The forward pass's elementwise share is 3% where separable convolutions do a
    # ninth of the arithmetic.
    rel = 0.04 if config.separable else 0.02
    assert n * flops.forward_flops(h, w, **model) == pytest.approx(forward, rel=rel)


def levels(layers) -> list[int]:
    """The resolution level (0: full) of each layer of a depth-2 U-Net, by its name."""
    level = {"down_1": 0, "down_2": 1, "bottleneck": 2, "up_1": 1, "up_2": 0, "head": 0}
    return [level[layer.name.split(".")[0]] for layer in layers]


def test_the_guides_model_at_512():
    # a 3x3 'SAME' convolution reads the image with 7 x 7 of its 9 x 9 taps on 3 x 3
    assert flops.conv_taps(3, 3, 3) == 49 and flops.conv_taps(1, 1, 3) == 1
    forward = flops.forward_flops(512, 512)
    first = next(flops.unet_layers(512, 512))
    assert first.flops == 2 * 3 * 64 * (3 * 512 - 2) ** 2
    assert forward == pytest.approx(380.78e9, rel=1e-4)
    assert flops.train_flops(512, 512) == 3 * forward - first.flops


def test_peak_rates_by_device_kind():
    assert flops.peak_tflops("NVIDIA H200", "bfloat16") == (989.0, "H200")
    assert flops.peak_tflops("NVIDIA H200 NVL", "float32") == (418.0, "H200 NVL")
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989.4
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "float32")[0] == 156.0
    assert flops.peak_tflops("cpu", "float32") is None
    assert flops.utilisation(494.5e12, "NVIDIA H200", "bfloat16") == pytest.approx(0.5)
    assert flops.utilisation(1e12, "cpu", "float32") is None
