"""How much arithmetic the U-Net does, counted from its shapes, and how close to the
hardware a measured step runs (model FLOP utilisation, MFU).

Why count by hand: XLA's ``compiled.cost_analysis()`` is exact on a CPU, but on a GPU
it leaves out the convolutions that cuDNN runs (about 14 GFLOP of a 512x512 training
step instead of over 1,000), so a GPU benchmark cannot use it. The U-Net's work is
almost all in its convolutions and its matrix products, and those are simple to count:
a 3x3 convolution from ``cin`` to ``cout`` channels does ``cin * cout``
multiply-adds (2 FLOPs each) for every output pixel and every kernel tap that falls
on the image. Taps that fall on the zero padding at the border are not counted, as
XLA does not count them either; at 512x512 they are 0.26% of the first level's taps
and 4% of the bottleneck's (32x32).

A training step is the forward pass, then, for every layer, the gradient with respect
to its input and the gradient with respect to its weights: each as much arithmetic as
the forward convolution, except that nothing needs the gradient of the image, so the
first convolution's input gradient is never computed. Elementwise work (bias, ReLU,
pooling, the loss, AdamW) is left out: it is a fraction of a percent at the guide's
width, and memory-bound anyway. ``tests/test_flops.py`` checks the count against
XLA's on a CPU, for the guide's U-Net and each variant. For a separable U-Net XLA's
figure is higher: it counts a depthwise convolution's weight gradient once per channel,
as if it mixed them.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple


class Layer(NamedTuple):
    """One multiply-add-heavy operation: its name and its forward FLOPs per image."""
    name: str
    flops: float


def conv_taps(height: int, width: int, kernel: int) -> int:
    """Output-pixel x kernel-tap pairs of a stride-1 'SAME' convolution that read the
    image rather than its zero padding: ``(k*H - pad_taps) * (k*W - pad_taps)``."""
    def along(n: int) -> int:
        half = kernel // 2
        # tap offset d in [-half, half] hits the image for n - |d| of the n outputs
        return sum(n - abs(d) for d in range(-half, kernel - half) if abs(d) < n)
    return along(height) * along(width)


def unet_layers(height: int, width: int, *, in_channels: int = 3, num_classes: int = 1,
                base_features: int = 64, depth: int = 4, skip_connections: bool = True,
                attention: bool = False, separable: bool = False) -> Iterator[Layer]:
    """The U-Net's convolutions and matrix products for one ``height`` x ``width``
    image, in the order the forward pass runs them (``models.UNet``)."""
    def conv3x3(name, h, w, cin, cout):
        if separable:  # 3x3 depthwise (one channel each), then a 1x1 pointwise
            yield Layer(f"{name}.depthwise", 2.0 * conv_taps(h, w, 3) * cin)
            yield Layer(f"{name}.pointwise", 2.0 * h * w * cin * cout)
        else:
            yield Layer(name, 2.0 * conv_taps(h, w, 3) * cin * cout)

    def double_conv(name, h, w, cin, cout):
        yield from conv3x3(f"{name}.conv1", h, w, cin, cout)
        yield from conv3x3(f"{name}.conv2", h, w, cout, cout)

    size = lambda level: (height >> level, width >> level)  # noqa: E731
    width_of = lambda level: base_features * 2 ** level  # noqa: E731
    cin = in_channels
    for level in range(depth):
        yield from double_conv(f"down_{level + 1}", *size(level), cin, width_of(level))
        cin = width_of(level)
    yield from double_conv("bottleneck", *size(depth), cin, width_of(depth))
    for i, level in enumerate(reversed(range(depth))):
        h, w = size(level)
        below, features = width_of(level + 1), width_of(level)
        if attention and skip_connections:  # AttentionGate at the coarser resolution
            inter = max(1, features // 2)
            hg, wg = size(level + 1)
            yield Layer(f"up_{i + 1}.attention", 2.0 * hg * wg * inter * (4 * features + below + 1))
        # the 2x2 up-convolution: one (below x below/2) product per input pixel and tap
        yield Layer(f"up_{i + 1}.up", 2.0 * (h // 2) * (w // 2) * 4 * below * (below // 2))
        cin = below // 2 + (features if skip_connections else 0)
        yield from double_conv(f"up_{i + 1}.conv", h, w, cin, features)
    yield Layer("head", 2.0 * height * width * base_features * num_classes)


def forward_flops(height: int, width: int, **model) -> float:
    """FLOPs of one forward pass over one image (``model``: UNet's options)."""
    return sum(layer.flops for layer in unet_layers(height, width, **model))


def train_flops(height: int, width: int, **model) -> float:
    """FLOPs of one training step per image: forward, input and weight gradients of
    every layer, less the input gradient of the first convolution (the image needs
    none)."""
    layers = list(unet_layers(height, width, **model))
    return 3 * sum(layer.flops for layer in layers) - layers[0].flops


def model_options(config) -> dict:
    """The keyword arguments of ``unet_layers`` for a ``Config``."""
    return dict(in_channels=config.in_channels, num_classes=config.num_classes,
                base_features=config.base_features, depth=config.depth,
                skip_connections=config.skip_connections, attention=config.attention,
                separable=config.separable)


# --- Peak rates, to turn FLOP/s into a utilisation ------------------------------------
# Dense (no structured sparsity) tensor-core peaks in TFLOP/s, by the device_kind JAX
# and torch report. "float32" is the TF32 tensor-core rate: what XLA and cuDNN use for
# float32 convolutions and matrix products on these GPUs by default.
# Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM5: BF16 989.4, TF32 494.7 dense;
# PCIe: 756.5, 378); NVIDIA H200 Tensor Core GPU datasheet (SXM: BF16 989, TF32 494,
# the same compute as H100 SXM; NVL: 835, 418); NVIDIA A100 Tensor Core GPU datasheet
# (BF16 312, TF32 156, both SXM and PCIe).
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float32": 494.0},
    "H200 NVL": {"bfloat16": 835.0, "float32": 418.0},
    "H100 80GB HBM3": {"bfloat16": 989.4, "float32": 494.7},  # SXM5
    "H100 SXM": {"bfloat16": 989.4, "float32": 494.7},
    "H100 PCIe": {"bfloat16": 756.5, "float32": 378.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}


def peak_tflops(device_kind: str, dtype: str) -> tuple[float, str] | None:
    """The dense peak TFLOP/s of a GPU for ``dtype`` and the table entry it came from,
    or None for a device the table does not know (CPUs included: their peak depends
    on clock, vector units and core count, which no portable API reports)."""
    kind = device_kind.upper()
    # longest names first, so "H200 NVL" wins over "H200"
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if all(part in kind for part in name.upper().split()):
            return PEAK_TFLOPS[name][dtype], name
    return None


def utilisation(flops_per_s: float, device_kind: str, dtype: str) -> float | None:
    """Model FLOP utilisation: counted FLOP/s over the device's peak (None: peak unknown)."""
    peak = peak_tflops(device_kind, dtype)
    return None if peak is None else flops_per_s / (peak[0] * 1e12)
