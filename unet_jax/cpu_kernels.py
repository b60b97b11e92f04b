"""CPU kernels for the U-Net's backward pass: same values, arranged for XLA's CPU backend.

``models.py`` builds the U-Net from stock Flax ops (``nn.Conv``, ``nn.max_pool``), which
run as they are on GPUs and TPUs. On a CPU, XLA's lowering of two of their gradients is
slow or memory-hungry, so ``CpuConv`` and ``max_pool_2x2`` below keep the same forward
pass and parameters but compute the backward pass another way. ``unet_jax.train
.create_model`` passes them to the model (its ``conv`` and ``pool`` fields) only when
JAX runs on a CPU; ``Config.kernels = "stock"`` turns them off.

Measured, and kept only where they still pay: ``docs/benchmarks.md``. Both are
``jax.custom_vjp`` functions, so forward-mode autodiff (``jax.jvp``) does not go through
them; use the stock ops for that.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


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


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                          rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                          precision=None, **kwargs):
    """``nn.Conv``'s convolution hook: 3x3 'SAME' convolutions go through
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

    Same values and gradients as
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


# nn.Conv with the CPU backward pass for its 3x3 'SAME' convolutions: the same module,
# parameter names and forward values, so the parameter tree does not change. One
# module-level object, so models built with it hash equal and compile once.
CpuConv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
