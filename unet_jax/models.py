"""The U-Net of Ronneberger, Fischer and Brox (MICCAI 2015), as the Carvana guide builds it.

The network is a "U": a contracting path (encoder) that halves the resolution four
times while doubling the channels, so that deep layers see the whole car; a bottleneck
at the bottom of the U; and an expansive path (decoder) that doubles the resolution
four times again. At each level of the decoder the upsampled features are concatenated
with the encoder's features of the same resolution (the skip connections): the encoder
knows *where* edges are, the decoder knows *what* the object is, and the concatenation
gives the decoder both. A 1x1 convolution then turns the 64 features of every pixel
into one logit per class.

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
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


class DoubleConv(nn.Module):
    """Two 3x3 convolutions, each followed by ReLU: the basic unit of every level.

    'SAME' padding (the guide's ``padding=1``) keeps height and width, so a 512x512 map
    stays 512x512 and encoder and decoder maps line up for the skip connections without
    the cropping of the original paper. The first convolution changes the channel count
    (e.g. 3 -> 64), the second refines at that width; stacking two 3x3 kernels sees a
    5x5 neighbourhood with fewer weights and one more non-linearity than a single 5x5.
    The convolutions are ``conv3x3`` (plain ``lax.conv_general_dilated``) with a
    backward pass arranged for the CPU; parameters and values are ``nn.Conv``'s.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for name in ("conv1", "conv2"):
            x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=True,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                        conv_general_dilated=_conv_general_dilated)(x)
            x = nn.relu(x)
        return x


def conv3x3(x, kernel, padding="SAME"):
    """The U-Net's convolution: 3x3, stride 1, NHWC input, HWIO kernel, NHWC output.

    The forward pass is exactly ``lax.conv_general_dilated``. The backward pass
    (``_conv3x3_bwd``) computes the same gradients, up to float rounding, but for two
    shapes where XLA's CPU convolutions are slow it arranges the work differently.
    """
    return lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def _conv3x3_same(x, kernel):
    return conv3x3(x, kernel)


def _conv3x3_fwd(x, kernel):
    return conv3x3(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, g):
    """Input and kernel gradients; the kernel gradient waits for the input gradient.

    The optimizer updates each kernel in place (the train step donates its state).
    Nothing orders that update after the last read of the old kernel, which is the
    input gradient of this layer, so XLA keeps a copy of every 3x3 kernel alive
    through the step (79 MB more peak memory at 512x512 batch 1). Adding 0 * one element
    of the input gradient to the kernel gradient (exact: it adds zero) makes the
    update depend on that read, and the copies go away (tests/test_fast_gradients.py
    checks the compiled step). The price: the first convolution's input gradient,
    which nothing needs, is computed too (0.5% of a step).
    """
    x, kernel = residuals
    dx = _input_grad(g, kernel, x)
    dk = _kernel_grad(x, g, kernel) + 0.0 * dx[0, 0, 0, 0]
    return dx, dk


_conv3x3_same.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def _input_grad(g, kernel, x):
    """d loss / d x: the convolution of ``g`` with the flipped, transposed kernel.

    XLA flips and transposes the kernel in one slow loop (~80 ms for the 1024x1024
    bottleneck kernel, more than the convolution itself at 8x8). Where the kernel is
    much larger than the activations, one matrix product (``kernel @ g^T`` for all
    nine taps and all pixels) followed by adding up the nine shifted taps reads the
    kernel as it is: 2-3% faster training at 128x128 in all.
    """
    n, h, w, _ = g.shape
    if kernel.size < 16 * g.size:
        return jax.linear_transpose(lambda x: conv3x3(x, kernel), x)(g)[0]
    # The kernel is the left operand, contracted over its last (contiguous) axis, so
    # the product reads it in place; only the small taps array is transposed after.
    taps = jnp.einsum("abco,nhwo->abcnhw", kernel, g)
    taps = jnp.pad(taps, ((0, 0), (0, 0), (0, 0), (0, 0), (1, 1), (1, 1)))
    # x[i, j] met kernel tap (a, b) at output pixel (i + 1 - a, j + 1 - b).
    dx = sum(taps[a, b, :, :, 2 - a:2 - a + h, 2 - b:2 - b + w] for a in range(3) for b in range(3))
    return jnp.transpose(dx, (1, 2, 3, 0))


def _kernel_grad(x, g, kernel):
    """d loss / d kernel: for each tap, the sum over pixels of input times output gradient.

    XLA computes it as a convolution whose "channels" are the batch images, at a
    fraction of its usual speed when there are fewer than four of them, and on one
    core. With a small batch we cut the maps into bands of rows (each with the one-row
    borders it needs) and treat the bands as more images, which also spreads the work
    over the cores: 24% more images/s training at 512x512 batch 1, for 80 MB more
    memory. Batches of four or more are left to XLA, which is faster there.
    """
    n, h, w, c = x.shape
    bands = 1
    while n < 4 and n * bands < 16 and h % (2 * bands) == 0 and h // (2 * bands) >= 8:
        bands *= 2
    if bands == 1:
        return jax.linear_transpose(lambda k: conv3x3(x, k), kernel)(g)[0]
    rows = h // bands
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x_bands = jnp.stack([padded[:, i * rows:(i + 1) * rows + 2] for i in range(bands)], axis=1)
    x_bands = x_bands.reshape(n * bands, rows + 2, w + 2, c)
    g_bands = g.reshape(n * bands, rows, w, g.shape[-1])
    return jax.linear_transpose(lambda k: conv3x3(x_bands, k, "VALID"), kernel)(g_bands)[0]


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                          rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                          precision=None, **kwargs):
    """``nn.Conv``'s convolution hook: DoubleConv's 3x3 'SAME' convolutions go through
    ``_conv3x3_same`` (same parameters, same forward pass); anything else to lax."""
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    if (rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1) and padding == "SAME"
            and tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(rhs_dilation or (1, 1)) == (1, 1)
            and feature_group_count == 1 and precision is None and not kwargs
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc):
        return _conv3x3_same(lhs, rhs)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)


def max_pool_2x2(x):
    """2x2 max-pooling with stride 2 (the guide's ``MaxPool2d(2, 2)``) of an NHWC map.

    Each output pixel is the largest of its 2x2 window: the map halves in size and
    keeps its strongest responses. Same values and gradients as
    ``nn.max_pool(x, (2, 2), strides=(2, 2))``; even sizes (all the U-Net ever pools)
    take the faster path below, odd ones fall back to ``nn.max_pool``.
    """
    if x.shape[1] % 2 or x.shape[2] % 2:
        return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    return _max_pool_even(x)


@jax.custom_vjp
def _max_pool_even(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _max_pool_even_fwd(x):
    y = _max_pool_even(x)
    return y, (x, y)  # both stay alive anyway: x is the skip, y the next conv's input


def _max_pool_even_bwd(residuals, g):
    """Routes each output gradient to the first maximum of its window (row-major order).

    That is what ``nn.max_pool``'s gradient (XLA's select-and-scatter) and PyTorch's
    ``MaxPool2d`` do, ties included (a window holding a NaN gets no gradient here).
    XLA's CPU backend expands select-and-scatter into iotas, an argmax reduce-window
    over five arrays and a scatter; four compares and a select are one elementwise
    fusion instead: measured 3% less CPU time per 128x128 training step and 0.65 GB
    less working memory for a 512x512 batch of 4.
    """
    x, y = residuals
    n, h, w, c = x.shape
    windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
    taken = jnp.zeros(y.shape, bool)
    masks = []
    for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)):
        first = (windows[:, :, a, :, b, :] == y) & ~taken
        taken = taken | first
        masks.append(first)
    # masks[2a + b] has shape (n, h/2, w/2, c); lay them back out as 2x2 windows.
    mask = jnp.stack(masks, axis=-2).reshape(n, h // 2, w // 2, 2, 2, c)
    mask = mask.transpose(0, 1, 3, 2, 4, 5)
    grad = jnp.where(mask, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    return (grad.reshape(n, h, w, c),)


_max_pool_even.defvjp(_max_pool_even_fwd, _max_pool_even_bwd)


class DownSample(nn.Module):
    """One level of the contracting path: DoubleConv, then 2x2 max-pooling.

    Returns both the full-resolution feature map (kept for the skip connection, since
    it still holds precise edges) and the pooled map (half the height and width) that
    goes one level deeper, where each pixel summarises a larger part of the image.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        down = DoubleConv(self.features, self.dtype, self.param_dtype, name="conv")(x)
        pooled = max_pool_2x2(down)
        return down, pooled


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


class UpSample(nn.Module):
    """One level of the expansive path: upsample, concatenate the skip, DoubleConv.

    The transposed convolution doubles the resolution and halves the channels (1024 ->
    512 at the first level). The result is concatenated with the encoder map of the same
    level (upsampled first, skip second, as in the guide), restoring the channel count,
    and a DoubleConv merges the coarse "what" from below with the fine "where" from the
    skip.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skip):
        x = UpConv(x.shape[-1] // 2, self.dtype, self.param_dtype, name="up")(x)
        x = jnp.concatenate([x, skip], axis=-1)
        return DoubleConv(self.features, self.dtype, self.param_dtype, name="conv")(x)


def valid_sizes(size: int, depth: int) -> tuple[int, int]:
    """The nearest sizes at or below and above ``size`` that ``2**depth`` divides."""
    step = 2 ** depth
    lower = max(step, size // step * step)
    upper = -(-size // step) * step
    return lower, upper if upper != lower else lower + step


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

    Input ``(N, H, W, C)`` float in [0, 1]; output ``(N, H, W, num_classes)`` logits
    (pre-sigmoid / pre-softmax), float32 also when computing in bfloat16, so that
    losses and thresholds are computed in full precision.
    """

    num_classes: int = 1
    base_features: int = 64
    depth: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4:
            raise ValueError(f"expected an NHWC batch of rank 4, got shape {x.shape}")
        check_input_size(x.shape[1], x.shape[2], self.depth)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        # Contracting path: keep each level's pre-pool map for its skip connection.
        skips = []
        for i in range(self.depth):
            down, x = DownSample(self.base_features * 2 ** i, name=f"down_{i + 1}", **kw)(x)
            skips.append(down)

        # Bottleneck: the most compressed, most abstract view of the whole image.
        x = DoubleConv(self.base_features * 2 ** self.depth, name="bottleneck", **kw)(x)

        # Expansive path: the deepest skip joins the first up level, and so on.
        for i, skip in enumerate(reversed(skips)):
            x = UpSample(self.base_features * 2 ** (self.depth - 1 - i), name=f"up_{i + 1}",
                         **kw)(x, skip)

        # Head: a per-pixel linear classifier over the 64 decoder features.
        logits = nn.Conv(self.num_classes, (1, 1), name="head", **kw)(x)
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32))
