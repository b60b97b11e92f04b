"""The U-Net of Ronneberger, Fischer and Brox (MICCAI 2015), as the Carvana guide builds it.

The network is a "U": a contracting path (encoder) that halves the resolution four
times while doubling the channels, so that each deeper position sees a wider window of
the image (140 pixels square at the bottleneck, 188 to 204 at the output by where a
pixel falls on the pooling grid: all of a small image, a good part of a 512x512 one)
and describes it in more features; a bottleneck at the bottom of the U; and an
expansive path (decoder) that doubles the resolution four times again. At each level
of the decoder the upsampled features are concatenated with the encoder's features of
the same resolution (the skip connections): the encoder knows *where* edges are, the
decoder knows *what* the object is, and the concatenation gives the decoder both. A
1x1 convolution then turns the 64 features of every pixel into one logit per class.

    input (H, W, 3)
      DownSample  64   ─────────────────────────────── skip ──┐
        DownSample 128  ─────────────────────── skip ──┐       │
          DownSample 256 ─────────────── skip ──┐      │       │
            DownSample 512 ───── skip ──┐       │      │       │
              bottleneck DoubleConv 1024│       │      │       │
            UpSample 512 <──────────────┘       │      │       │
          UpSample 256 <────────────────────────┘      │       │
        UpSample 128 <─────────────────────────────────┘       │
      UpSample 64 <────────────────────────────────────────────┘
    1x1 conv head -> (H, W, num_classes) logits

Layout is NHWC (JAX's native layout on every backend). With 3 input channels and one
class the model has 31,031,745 parameters, exactly as the PyTorch original.

Three options of ``UNet`` try the guide's "future directions", each off by default:
``skip_connections=False`` (why the skips matter), ``attention=True`` (attention gates
on the skips, ``AttentionGate``) and ``separable=True`` (depthwise-separable
convolutions, ``SeparableConv``: the lightweight variant).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
ModuleDef = Any  # a Flax module class, or a functools.partial of one


class DoubleConv(nn.Module):
    """Two 3x3 convolutions, each followed by ReLU: the basic unit of every level.

    'SAME' padding (the guide's ``padding=1``) keeps height and width, so a 512x512 map
    stays 512x512 and encoder and decoder maps line up for the skip connections without
    the cropping of the original paper. The first convolution changes the channel count
    (e.g. 3 -> 64), the second refines at that width; stacking two 3x3 kernels sees a
    5x5 neighbourhood with fewer weights and one more non-linearity than a single 5x5.

    ``conv`` is the convolution module, ``nn.Conv`` by default; the CPU passes
    ``cpu_kernels.CpuConv``, the same module with a faster backward pass there.
    With ``separable`` each 3x3 convolution becomes a ``SeparableConv`` (same name,
    ``conv1``/``conv2``), and the ReLU follows its pointwise part.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv
    separable: bool = False

    @nn.compact
    def __call__(self, x):
        for name in ("conv1", "conv2"):
            if self.separable:
                x = SeparableConv(self.features, self.dtype, self.param_dtype, self.conv,
                                  name=name)(x)
            else:
                x = self.conv(self.features, (3, 3), padding="SAME", use_bias=True,
                              dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
            # named for UNet(remat="convs"), which keeps these and recomputes the rest
            x = nn.relu(checkpoint_name(x, CONV_OUTPUT))
        return x


class SeparableConv(nn.Module):
    """A depthwise-separable 3x3 convolution (MobileNet, Howard et al. 2017): the
    lightweight stand-in for DoubleConv's 3x3 convolutions (``UNet(separable=True)``).

    A 3x3 convolution from ``cin`` to ``cout`` channels looks at the neighbourhood and
    mixes the channels in one step, with ``9 * cin * cout`` weights. The separable form
    does one after the other: a 3x3 *depthwise* convolution (``feature_group_count =
    cin``: each channel filtered on its own, ``9 * cin`` weights) gathers the
    neighbourhood, then a 1x1 *pointwise* convolution (``cin * cout`` weights) mixes
    the channels. That is ``9 * cin + cin * cout + cout`` parameters instead of
    ``9 * cin * cout + cout``, about ``1/9 + 1/cout`` of them, and the same share of
    multiply-adds: the bottleneck's 1024 -> 1024 convolution drops from 9,438,208 to
    1,058,816, and the full-width U-Net from 31,031,745 to 5,982,364 (the 2x2
    up-convolutions, 2,786,240 of those, stay as they are). The price is capacity: a
    channel's spatial filter can no longer depend on the output channel.

    Nothing sits between the two parts. No ReLU, as in Xception (Chollet 2017), which
    found that a non-linearity there hurts (MobileNet's ReLU there comes with a batch
    norm, which this U-Net does not have): DoubleConv applies its ReLU after the
    pointwise convolution, just where it follows the plain 3x3 one. No bias on the
    depthwise part: it would pass through the linear pointwise convolution and only
    add to its bias.

    ``conv`` builds both parts; ``cpu_kernels.CpuConv`` hands grouped and 1x1
    convolutions to XLA unchanged, so they run as with stock ``nn.Conv``.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]
        x = self.conv(channels, (3, 3), padding="SAME", feature_group_count=channels,
                      use_bias=False, name="depthwise", **kw)(x)
        return self.conv(self.features, (1, 1), use_bias=True, name="pointwise", **kw)(x)


CONV_OUTPUT = "conv_output"
REMAT = ("none", "convs", "full")


def remat_policy(remat: str):
    """What a rematerialised block keeps from its forward pass for the backward pass.

    Training keeps every activation of the forward pass until the backward pass has
    used it: at 512x512 that is most of a step's memory. ``jax.checkpoint`` trades it
    for compute: a block keeps only what its policy saves, and recomputes the rest
    from its input when the gradient needs it. 'convs' keeps the convolution outputs
    and recomputes the cheaper work around them (ReLU, pooling, concatenation, and
    the up-convolution's product, about 7% of a decoder level's FLOPs); 'full' keeps
    nothing but the block's input and runs the whole block forward again (about a
    third more arithmetic for a training step, the least memory).
    """
    if remat == "convs":
        return jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT)
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    raise ValueError(f"remat {remat!r}: choose one of {', '.join(REMAT)}")


def max_pool(x):
    """2x2 max-pooling with stride 2 (the guide's ``nn.MaxPool2d(kernel_size=2, stride=2)``).

    Each output pixel is the largest of its 2x2 window: the map halves in height and
    width and keeps its strongest responses, so the next level sees twice as far with
    the same 3x3 kernels.
    """
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))


class DownSample(nn.Module):
    """One level of the contracting path: DoubleConv, then 2x2 max-pooling.

    Returns both the full-resolution feature map (kept for the skip connection, since
    it still holds precise edges) and the pooled map (half the height and width) that
    goes one level deeper, where each pixel summarises a larger part of the image.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv
    pool: Callable = max_pool
    separable: bool = False

    @nn.compact
    def __call__(self, x):
        down = DoubleConv(self.features, self.dtype, self.param_dtype, self.conv,
                          self.separable, name="conv")(x)
        return down, self.pool(down)


class UpConv(nn.Module):
    """2x2 transposed convolution with stride 2: doubles height and width.

    With kernel size equal to stride the output windows do not overlap, so each input
    pixel writes its own 2x2 block: ``out[2i + a, 2j + b] = x[i, j] @ kernel[a, b] +
    bias``. That is one matrix product per input pixel, written here as a single einsum
    and a reshape. It is the same function, with the same parameters, as PyTorch's
    ``ConvTranspose2d(c, c // 2, 2, stride=2)`` (and as Flax's ``nn.ConvTranspose``
    with the kernel flipped spatially, which is how ``lax.conv_transpose`` orients
    it), but XLA's CPU backend lowers the
    weight gradient of the transposed-convolution form to a convolution with a window
    the size of the feature map on a slow generic path; as a matrix product both
    directions use the fast GEMM kernels (several times faster training on CPU, no
    change on GPU).
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (2, 2, in_features, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,),
                          self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        n, h, w, _ = x.shape
        y = jnp.einsum("nhwc,abco->nhawbo", x, kernel)
        return y.reshape(n, 2 * h, 2 * w, self.features) + bias


class AttentionGate(nn.Module):
    """An additive attention gate on a skip connection (Attention U-Net, Oktay et al. 2018).

    A plain skip hands the decoder every encoder feature, the background's as well as
    the object's. The gate weighs each pixel of the skip ``x`` by ``alpha`` in (0, 1),
    computed from ``x`` and from the gating signal ``g``, the decoder's coarser map one
    level down (the input of UpSample, before upsampling), which knows *what* is in the
    image: where that context points to the object, ``alpha`` stays near 1; elsewhere
    it falls towards 0 and the skip's background features are suppressed before they
    reach the decoder. The gate learns where to look from the segmentation loss alone.

        q     = relu(W_x x + W_g g + b_g)      at g's resolution, F = C // 2 channels
        alpha = sigmoid(psi q + b_psi)         one channel
        out   = x * upsample(alpha)            bilinear, back to x's resolution

    The choices are those of the official implementation (``GridAttentionBlock2D``,
    mode "concatenation"): F is half the skip's C channels (at least 1); W_x is a 2x2
    convolution with stride 2 and no bias, which brings x to g's resolution with every
    pixel contributing (a 1x1 convolution with stride 2 would read one pixel in four);
    W_g and psi are 1x1 convolutions with biases; alpha is upsampled bilinearly. Left
    out, to keep the gate a gate: the reference's 1x1 convolution and batch norm on
    ``x * alpha`` (this U-Net has no batch norm, and the DoubleConv after the
    concatenation mixes the gated channels anyway).

    Parameters, for a skip of C channels and a gating signal of C_g: W_x ``2*2*C*F``,
    W_g ``C_g*F + F``, psi ``F + 1``. In the U-Net C_g = 2C, so ``3*C**2 + C + 1`` per
    gate: 786,945 for the deepest skip (C = 512), 1,045,444 for the four gates of the
    full-width model (3.4% more parameters).

    ``alpha`` (N, H, W, 1) is sown into the ``intermediates`` collection, to look at
    where the model attends: ``model.apply(variables, x, mutable=["intermediates"])``.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, g):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inter = max(1, x.shape[-1] // 2)
        theta_x = nn.Conv(inter, (2, 2), strides=(2, 2), padding="VALID", use_bias=False,
                          name="W_x", **kw)(x)
        phi_g = nn.Conv(inter, (1, 1), use_bias=True, name="W_g", **kw)(g)
        q = nn.relu(theta_x + phi_g)
        alpha = nn.sigmoid(nn.Conv(1, (1, 1), use_bias=True, name="psi", **kw)(q))
        alpha = jax.image.resize(alpha, (*x.shape[:3], 1), "bilinear")
        self.sow("intermediates", "alpha", alpha)
        return x * alpha


class UpSample(nn.Module):
    """One level of the expansive path: upsample, concatenate the skip, DoubleConv.

    The transposed convolution doubles the resolution and halves the channels (1024 ->
    512 at the first level). The result is concatenated with the encoder map of the same
    level (upsampled first, skip second, as in the guide), restoring the channel count,
    and a DoubleConv merges the coarse "what" from below with the fine "where" from the
    skip.

    With ``attention`` an ``AttentionGate``, gated by the input ``x``, weighs the skip
    first. Without a skip (``skip=None``, ``UNet(skip_connections=False)``) the
    DoubleConv sees the upsampled map alone, half the channels: the "where" must then
    survive the trip through the bottleneck, which is what the skips spare the decoder.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv
    attention: bool = False
    separable: bool = False

    @nn.compact
    def __call__(self, x, skip=None):
        if self.attention and skip is not None:
            skip = AttentionGate(self.dtype, self.param_dtype, name="attention")(skip, x)
        x = UpConv(x.shape[-1] // 2, self.dtype, self.param_dtype, name="up")(x)
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
        return DoubleConv(self.features, self.dtype, self.param_dtype, self.conv,
                          self.separable, name="conv")(x)


def valid_sizes(size: int, depth: int) -> tuple[int, int]:
    """The nearest sizes at or below and above ``size`` that ``2**depth`` divides."""
    step = 2 ** depth
    lower = max(step, size // step * step)
    upper = -(-size // step) * step
    return lower, upper if upper != lower else lower + step


def check_counts(**counts):
    """Refuses a width, depth or class count that is not a whole number >= 1, which
    would otherwise fail deep inside an initializer (a fan-in of zero)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"UNet({name}={value!r}): needs a whole number >= 1")


def check_input_size(height: int, width: int, depth: int) -> None:
    """Raises ValueError unless 2**depth divides both height and width.

    Every level halves the map with a 2x2 pool and the decoder doubles it back; an odd
    size at any level would make the upsampled map one pixel smaller than its skip and
    the concatenation impossible. Rather than silently pad or crop (the artifacts the
    guide warns about under "Sensitivity to Input Size"), we ask for a valid size.
    """
    step = 2 ** depth
    bad = [(name, s) for name, s in (("height", height), ("width", width)) if s % step]
    if bad:
        hints = ", ".join(f"{name} {s} -> {' or '.join(map(str, dict.fromkeys(valid_sizes(s, depth))))}"
                          for name, s in bad)
        raise ValueError(
            f"input size {height}x{width} (HxW) is not divisible by 2**depth = {step}; "
            f"nearest valid sizes: {hints}")


def check_batch(model: "UNet", x) -> None:
    """Raises a one-line error for a batch the U-Net would misread or fail on deep
    inside Flax: not NHWC (PyTorch's NCHW is named as such), not floats, another
    channel count than its parameters were made for, a size the pooling cannot halve
    ``depth`` times, or settings that do not fit together."""
    if x.ndim != 4:
        raise ValueError(f"expected an NHWC batch of rank 4, got shape {x.shape}")
    if x.shape[1] in (1, 3, 4) and x.shape[3] > 4 and x.shape[1] % 2 ** model.depth:
        raise ValueError(f"got shape {x.shape}, PyTorch's NCHW order (batch, channels, "
                         "height, width); Flax takes NHWC (batch, height, width, "
                         "channels): pass x.transpose(0, 2, 3, 1)")
    first = model.variables.get("params", {}).get("down_1", {}).get("conv", {}).get("conv1", {})
    # A plain convolution's kernel is (3, 3, in, out); a separable one's depthwise
    # kernel (3, 3, 1, in).
    kernel = first.get("kernel", first.get("depthwise", {}).get("kernel"))
    channels = None if kernel is None else kernel.shape[-1 if "depthwise" in first else 2]
    if channels is not None and channels != x.shape[3]:
        # Flax would stop inside the first convolution with a shape mismatch.
        raise ValueError(f"the images have {x.shape[3]} channel(s) but these parameters "
                         f"were made for {channels} (in_channels): give "
                         f"{'RGB' if channels == 3 else 'grayscale'} images, or "
                         f"parameters made with in_channels={x.shape[3]}")
    if not jnp.issubdtype(x.dtype, jnp.floating):  # 0..255 would saturate every ReLU
        raise TypeError(f"images are {x.dtype}: the U-Net takes floats in [0, 1]; "
                        "divide 0..255 values by 255 (data_pipeline.to_float)")
    check_counts(base_features=model.base_features, depth=model.depth,
                 num_classes=model.num_classes)
    if model.attention and not model.skip_connections:
        raise ValueError("attention gates weigh the skip connections: they need "
                         "skip_connections=True")
    check_input_size(x.shape[1], x.shape[2], model.depth)


class UNet(nn.Module):
    """The full U-Net: ``depth`` DownSamples, a bottleneck, ``depth`` UpSamples, a 1x1 head.

    Attributes:
      num_classes: output channels; 1 for binary segmentation (one logit per pixel,
        trained with sigmoid BCE), C > 1 for C-way softmax.
      base_features: width of the first level (64 in the paper); level i has
        ``base_features * 2**i`` channels and the bottleneck ``base_features *
        2**depth`` (1024).
      depth: number of down/up levels (4 in the paper). Inputs must be divisible by
        ``2**depth``.
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision on GPU/TPU).
      param_dtype: parameter dtype; keep float32 so that small updates are not lost.
      conv, pool: the 3x3 convolution module and the 2x2 pooling function, stock
        ``nn.Conv`` and ``max_pool`` by default (``unet_jax.train.create_model``
        swaps in ``cpu_kernels`` on a CPU: same parameters, same values).
      remat: 'none', or rematerialise each level's block (``remat_policy``): 'convs'
        or 'full' trade compute for memory. The parameters and the values are the
        same (a checkpoint serves every setting); only the gradient's memory changes.

    Options, the guide's "future directions" (all off, the guide's U-Net, by default):
      skip_connections: False drops the skips, leaving an encoder-decoder that must
        carry every detail through the bottleneck: the experiment that shows why the
        skips matter. Without them the 23 layers between input and output are also
        far harder to train: in the run of docs/guide it never left predicting the
        car's share of pixels everywhere. 27,898,305 parameters at full width.
      attention: an ``AttentionGate`` on every skip, gated by the decoder's coarser
        map (Attention U-Net); needs the skips. 32,077,189 parameters at full width.
      separable: depthwise-separable 3x3 convolutions (``SeparableConv``) everywhere,
        the lightweight variant for small devices. 5,982,364 parameters at full width.

    Input ``(N, H, W, C)`` float in [0, 1]; output ``(N, H, W, num_classes)`` logits
    (pre-sigmoid / pre-softmax), float32 also when computing in bfloat16, so that
    losses and thresholds are computed in full precision.
    """

    num_classes: int = 1
    base_features: int = 64
    depth: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv
    pool: Callable = max_pool
    skip_connections: bool = True
    attention: bool = False
    separable: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, x):
        check_batch(self, x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, conv=self.conv,
                  separable=self.separable)
        down_block, double_conv, up_block = DownSample, DoubleConv, UpSample
        if self.remat != "none":  # same modules, same names: the same parameters
            policy = remat_policy(self.remat)
            down_block, double_conv, up_block = (nn.remat(block, policy=policy)
                                                 for block in (DownSample, DoubleConv, UpSample))

        # Contracting path: keep each level's pre-pool map for its skip connection.
        skips = []
        for i in range(self.depth):
            down, x = down_block(self.base_features * 2 ** i, pool=self.pool,
                                 name=f"down_{i + 1}", **kw)(x)
            skips.append(down)

        # Bottleneck: the most compressed, most abstract view of the whole image.
        x = double_conv(self.base_features * 2 ** self.depth, name="bottleneck", **kw)(x)

        # Expansive path: the deepest skip joins the first up level, and so on.
        for i, skip in enumerate(reversed(skips)):
            if not self.skip_connections:
                skip = None  # the decoder must rebuild the details from below alone
            x = up_block(self.base_features * 2 ** (self.depth - 1 - i), name=f"up_{i + 1}",
                         attention=self.attention, **kw)(x, skip)

        # Head: a per-pixel linear classifier over the 64 decoder features.
        logits = nn.Conv(self.num_classes, (1, 1), name="head", dtype=self.dtype,
                         param_dtype=self.param_dtype)(x)
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32))
