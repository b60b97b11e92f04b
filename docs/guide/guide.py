# The annotated U-Net guide, in JAX: the one source of docs/guide/README.md and guide.ipynb.
#
# "Percent" notebook format (Jupytext, VS Code, Spyder): "# %% [markdown]" starts a cell
# of markdown written as comment lines, "# %%" a code cell. Rebuild the page, its notebook
# and its figures after any change, here or in the library:
#
#     python -m experiments.guide                  # full size, 4-20 minutes on 2 cores
#     python -m experiments.guide --size tiny --out /tmp/guide   # every cell, ~2 minutes
#
# The code cells read SIZE ("tiny" or "full"), FIGURES, RUNS and PLATFORM; the builder
# sets them, and a notebook falls back to the defaults of the first code cell.

# %% [markdown]
# # U-Net, annotated, in JAX
#
# This is the annotated U-Net guide for the Carvana Image Masking Challenge, rebuilt on
# `unet-jax`: the same chapters in the same order (architecture, training, evaluation,
# results, limitations, future directions), told with this project's JAX and Flax
# code. Nothing here is pasted: the code blocks quote the library with
# `inspect.getsource`, so they are the code that runs, and every number and figure is
# computed by the cell above it. `python -m experiments.guide` reruns all of it and
# rewrites this page, its notebook (`guide.ipynb`) and `figures/`; the footer says on
# what machine and how long it took.
#
# The training runs use the project's built-in sample set, a synthetic stand-in for
# Carvana drawn in Kaggle's exact layout (cars on a turntable, 16 angles, palette-GIF
# masks), at 64x96 pixels and on a 2-core CPU, so that the whole guide rebuilds in
# 4 to 20 minutes. Point `data_dir` at the folder that holds Kaggle's `train/` and
# `train_masks/` to train on the real photographs.

# %% [markdown]
# ## Abstract
#
# U-Net (Ronneberger, Fischer and Brox, MICCAI 2015) labels every pixel of an image. A
# contracting path shrinks the image and widens the features, so that each deeper
# position sees a wider window of the image (measured below: 140 pixels square at the
# bottleneck); an expansive path grows it back to full resolution; skip
# connections hand the decoder the encoder's sharp, full-resolution features at every
# level, so that the output is both right about *what* it sees and precise about
# *where*. This guide builds it in Flax, trains it with a jit-compiled JAX step,
# measures it, and tests the weaknesses and remedies the PyTorch guide lists, each with
# a run you can repeat.
#
# ## Background
#
# Before deep networks, segmentation meant thresholds, region growing and edge
# detectors, tuned by hand for each kind of image. Fully convolutional networks (Long et
# al., 2015) replaced a classifier's dense layers with convolutions and predicted a
# label per pixel, but coarsely. Before them, a network labelled a pixel from a patch
# around it (Ciresan et al., 2012), one forward pass per pixel, sliding the window over
# the image; U-Net labels every pixel of an image (or of a large tile) in one pass, the
# work shared by neighbouring pixels. FCN had already added the coarse predictions of
# earlier layers to its output; U-Net made the decoder as deep and as wide as the
# encoder, concatenated the encoder's feature maps into it at every level (the skip
# connections), and trained well from few annotated images thanks to heavy augmentation. The
# same design segments cells, organs, roads and, here, cars in Kaggle's Carvana
# challenge (5,088 photos of 318 cars at 1918x1280, one binary mask each).

# %% [markdown]
# ## The setup
#
# One cell imports the project and defines the few helpers the later cells use:
# `show` prints a function's or class's source, `save` shows and saves a figure,
# `train` runs `unet_jax.train_and_evaluate` into a temporary folder, and `pick`
# chooses between the quick check's settings and the real ones.

# %%
# Running this notebook needs the unet-jax package and Jupyter: in a clone of the
# repository, `pip install -e . jupyterlab`, then `jupyter lab docs/guide/guide.ipynb`.
# In Colab: clone or upload the
# repository, run `%pip install -e <its folder>` in a cell of its own, restart the
# session, then run all cells (SIZE = "tiny" below checks them in minutes).
# `python -m experiments.guide` rebuilds the published page from docs/guide/guide.py.
import dataclasses
import inspect
import itertools
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SIZE = globals().get("SIZE", "full")  # "tiny": tiny images and models, about 2 minutes
FIGURES = Path(globals().get("FIGURES", "figures"))
RUNS = Path(globals().get("RUNS") or tempfile.mkdtemp(prefix="unet-jax-guide-"))
PLATFORM = globals().get("PLATFORM", "auto")
FIGURES.mkdir(parents=True, exist_ok=True)

import unet_jax

BACKEND = unet_jax.setup_platform(PLATFORM)  # before any JAX work: platform, CPU flags

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import data_pipeline
from unet_jax import checkpoints, configs, models


def pick(tiny, full):
    """The tiny setting when the guide runs in its quick check mode, else the real one."""
    return tiny if SIZE == "tiny" else full


# The quick check's model: the `tiny` preset (width 4, 32x48) at depth 1, which XLA
# compiles in seconds; compiling, not training, is what the quick check spends.
TINY = dataclasses.replace(configs.tiny(), depth=1)


def save(fig, name, dpi=80):
    """Writes ``fig`` to FIGURES/name.png and shows it in a notebook. The PNG is kept
    small, as it is committed: a modest dpi, and 256 colours (half the bytes, no
    visible change for plots and feature maps)."""
    from PIL import Image

    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    with Image.open(path) as png:
        small = png.convert("RGB").quantize(256, dither=Image.Dither.NONE)
    small.save(path, optimize=True)
    if "get_ipython" in globals():  # Jupyter or Colab: unet_jax draws off-screen (Agg)
        from IPython.display import Image, display

        display(Image(filename=str(path)))


def show(*objects):
    """Prints the source of library classes and functions: the code that runs."""
    print("\n\n".join(textwrap.dedent(inspect.getsource(o)).strip() for o in objects))


def n_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def train(name, config):
    """``unet_jax.train_and_evaluate`` into RUNS/name, printing its log lines."""
    return unet_jax.train_and_evaluate(
        config, RUNS / name, log=lambda line: print(line.replace(str(RUNS), "RUNS")))


print(f"SIZE={SIZE}; JAX {jax.__version__} on {BACKEND} ({jax.devices()[0].device_kind}), "
      f"{os.cpu_count()} CPU cores")

# %% [markdown]
# ## Model architecture
#
# The model is four classes in `unet_jax/models.py`, named as in the PyTorch guide:
# `DoubleConv`, `DownSample`, `UpSample` and `UNet`. Flax modules declare their
# sub-layers inline (`@nn.compact`), so each class is one `__call__`; the layout is
# NHWC (height, width, channels last), JAX's native one. The shapes and parameter
# counts below come from `jax.eval_shape`, which traces the model without computing
# anything, so a 512x512 input costs nothing to inspect.
#
# ### Double convolution
#
# Two 3x3 convolutions, each followed by ReLU. `padding="SAME"` is PyTorch's
# `padding=1`: height and width stay as they are, so encoder and decoder maps of a level
# line up for the skip connections without cropping. (The U-Net paper used unpadded,
# "valid" convolutions: each trims a pixel from every border, a 572x572 input tile
# gives a 388x388 map, and each skip had to be cropped to the smaller decoder map. The
# PyTorch guide and this project pad instead, so the output has the input's size.)
# The first convolution sets the channel count (3 to 64 at the top level), the second
# refines at that width.

# %%
show(models.DoubleConv)

# %%
x512 = jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)  # a shape, not an array
block = models.DoubleConv(64)
block_vars = jax.eval_shape(block.init, jax.random.key(0), x512)
y = jax.eval_shape(block.apply, block_vars, x512)
print(f"DoubleConv(64): {x512.shape} -> {y.shape}")
for name, layer in block_vars["params"].items():
    shapes = {k: v.shape for k, v in layer.items()}
    print(f"  {name}: {shapes}: {n_params(layer):,} parameters")
print(f"  total {n_params(block_vars):,} = (3*3*3*64 + 64) + (3*3*64*64 + 64)")

# %% [markdown]
# ### Contracting path (encoder)
#
# A `DownSample` is a `DoubleConv` followed by 2x2 max-pooling with stride 2. It returns
# both maps: the full-resolution one (`down`), kept for the skip connection because it
# still knows exactly where the edges are, and the pooled one, half as high and wide,
# which goes one level deeper where the same 3x3 kernels see twice as far.

# %%
show(models.max_pool, models.DownSample)

# %%
down = models.DownSample(64)
down_vars = jax.eval_shape(down.init, jax.random.key(0), x512)
skip, pooled = jax.eval_shape(down.apply, down_vars, x512)
print(f"DownSample(64): input {x512.shape} -> down (kept for the skip) {skip.shape}, "
      f"pooled (goes deeper) {pooled.shape}; {n_params(down_vars):,} parameters "
      "(pooling has none)")

# %% [markdown]
# ### Expansive path (decoder)
#
# An `UpSample` doubles the resolution with a 2x2 transposed convolution of stride 2
# (`UpConv`: PyTorch's `ConvTranspose2d(c, c // 2, 2, stride=2)`, written as one matrix
# product per input pixel because the CPU backend of XLA, the compiler that turns
# every JAX program into machine code, runs that form faster; same
# parameters, same values), halving the channels, then concatenates the encoder's map
# of the same level (upsampled first, skip second, as in the PyTorch code) and merges
# the two with a `DoubleConv`.

# %%
show(models.UpConv, models.UpSample)

# %%
coarse = jax.ShapeDtypeStruct((1, 32, 32, 1024), jnp.float32)  # the bottleneck's output
skip4 = jax.ShapeDtypeStruct((1, 64, 64, 512), jnp.float32)  # down_4's map, for its skip
up = models.UpSample(512)
up_vars = jax.eval_shape(up.init, jax.random.key(0), coarse, skip4)
print(f"UpSample(512): coarse {coarse.shape} + skip {skip4.shape} -> "
      f"{jax.eval_shape(up.apply, up_vars, coarse, skip4).shape}")
for name, layer in up_vars["params"].items():
    print(f"  {name}: {n_params(layer):,} parameters")

# %% [markdown]
# ### Skip connections, bottleneck and final layer: the whole `UNet`
#
# `UNet.__call__` is the PyTorch guide's `forward` as a loop, after `check_batch` has
# named any batch it would misread (PyTorch's NCHW order, 0..255 integers, a size the
# pools cannot halve four times): each `DownSample` appends
# its full-resolution map to `skips`; the bottleneck, a `DoubleConv` at 1024 channels,
# works on the smallest map (32x32 for a 512x512 input); the decoder takes the skips
# in reverse, the deepest first; a 1x1 convolution, the head, turns the 64 features
# of each pixel into one logit, an unbounded score that the sigmoid turns into the
# probability of "car" (the head's section below says why the model stops at the
# logit). The options `skip_connections`, `attention` and `separable` are the
# experiments of the last chapters; all are off in the guide's U-Net.
#
# The PyTorch guide's layer names, and this project's (the parameter tree's keys, and
# the names the rest of this guide uses):
#
# | PyTorch guide | unet-jax |
# |---|---|
# | `down_convolution_1` ... `down_convolution_4` | `down_1` ... `down_4` |
# | `bottle_neck` | `bottleneck` |
# | `up_convolution_1` ... `up_convolution_4` (deepest first) | `up_1` ... `up_4` (deepest first) |
# | `out` | `head` |

# %%
show(models.UNet)

# %% [markdown]
# ### The bottleneck: how much of the image one position sees
#
# The bottleneck's value is context: every position there summarises a large square
# of the input, its *receptive field*. For the contracting path the classic recurrence
# computes it: with `r` the field and `j` the distance in input pixels between
# neighbouring positions (the jump), each 3x3 convolution adds `2 * j` to `r`, and each
# 2x2 pooling adds `j` and doubles `j`. The decoder needs more care: a transposed
# convolution with kernel 2 and stride 2 maps two neighbouring outputs to the *same*
# input position, so the recurrence overcounts; following the interval of positions
# back through every layer (and through the skips, whose fields are smaller) gives the
# exact answer, which depends on where the pixel sits relative to the 16-pixel grid of
# the pools.

# %%
def contracting_receptive_field(depth=4):
    """(layer, receptive field r, jump j) down to the bottleneck, by the recurrence."""
    r, j, rows = 1, 1, []
    for level in range(1, depth + 1):
        r += 2 * (2 * j)  # two 3x3 convolutions, each (3 - 1) * j
        rows.append((f"down_{level} DoubleConv", r, j))
        r, j = r + j, 2 * j  # 2x2 max-pool, stride 2
        rows.append((f"down_{level} max_pool", r, j))
    rows.append(("bottleneck DoubleConv", r + 2 * (2 * j), j))
    return rows


def input_interval(lo, hi, depth=4, level=None, decoder=True):
    """The input pixels (first, last) that can reach positions lo..hi, along one axis,
    of a decoder map (``decoder``, level 0 = full resolution) or an encoder map
    (level ``depth`` = the bottleneck). Walks the layers backwards."""
    level = 0 if level is None else level
    lo, hi = lo - 2, hi + 2  # the level's DoubleConv: two 3x3 convolutions
    if not decoder:
        if level == 0:
            return lo, hi
        return input_interval(2 * lo, 2 * hi + 1, depth, level - 1, decoder=False)  # un-pool
    # decoder: the upsampled map (each position comes from position // 2 one level
    # down) and the skip of the same level, concatenated
    deep = input_interval(lo // 2, hi // 2, depth, level + 1, decoder=level + 1 < depth)
    skip = input_interval(lo, hi, depth, level, decoder=False)
    return min(deep[0], skip[0]), max(deep[1], skip[1])


for layer, r, j in contracting_receptive_field():
    print(f"{layer:24} receptive field {r:3} px, jump {j:2} px")
widths = {p % 16: input_interval(p, p)[1] - input_interval(p, p)[0] + 1 for p in range(64, 80)}
print("\noutput pixel's receptive field by its position modulo 16 (the pooling grid):")
print("  " + ", ".join(f"{p}: {w}" for p, w in widths.items()))
RF_BOTTLENECK = contracting_receptive_field()[-1][1]
RF_OUTPUT = sorted(set(widths.values()))
print(f"bottleneck: {RF_BOTTLENECK} px; output: {' or '.join(map(str, RF_OUTPUT))} px")

# %% [markdown]
# The check: for a random input, the receptive field is exactly the set of input pixels
# with a non-zero gradient (a constant input would light fewer: max-pooling sends each
# window's gradient to one pixel, and ties leave the others at zero). `jax.grad` of one bottleneck position (summed over its channels), and of one
# output logit, with respect to a 256x256 random input, through a narrow U-Net (width 4:
# the field does not depend on the width) with random weights; `capture_intermediates`
# hands us the bottleneck's output without changing the model.

# %%
def random_params(model, x, seed=0):
    """He-scaled random parameters of the right shapes, drawn with numpy from the shapes
    ``jax.eval_shape`` gives: no initialiser to compile, for measurements that need
    weights of a sensible scale, not trained ones."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)

    def draw(s):
        if len(s.shape) == 1:
            return jnp.zeros(s.shape, s.dtype)  # biases
        return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape), s.dtype)

    return jax.tree.map(draw, shapes)


rf_model = models.UNet(base_features=4)
rf_x = jax.random.uniform(jax.random.key(1), (1, 256, 256, 3))
rf_params = random_params(rf_model, rf_x)


@jax.jit
def rf_gradients(x, position):
    def bottleneck(x):
        _, state = rf_model.apply({"params": rf_params}, x, capture_intermediates=(
            lambda module, method: module.name == "bottleneck"))
        b = state["intermediates"]["bottleneck"]["__call__"][0]
        return b[0, position // 16, position // 16].sum()

    def output(x):
        return rf_model.apply({"params": rf_params}, x)[0, position, position, 0]

    return jax.grad(bottleneck)(x)[0], jax.grad(output)(x)[0]


rf_maps = {}
for position in (128, 130):
    for what, grad in zip(("bottleneck", "output"), rf_gradients(rf_x, position)):
        g = np.abs(np.asarray(grad)).sum(-1)
        rows, cols = np.nonzero(g)
        measured = (rows.min(), rows.max())
        if what == "bottleneck":
            computed = input_interval(position // 16, position // 16, level=4, decoder=False)
        else:
            computed = input_interval(position, position)
        rf_maps[what, position] = g
        print(f"{what:10} position {position}: gradient non-zero over rows "
              f"{measured[0]}..{measured[1]} ({measured[1] - measured[0] + 1} px); computed "
              f"{computed[0]}..{computed[1]} ({computed[1] - computed[0] + 1} px): "
              f"{'match' if tuple(measured) == tuple(computed) else 'MISMATCH'}")

fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
for ax, key in zip(axes, [("bottleneck", 128), ("output", 128), ("output", 130)]):
    g = rf_maps[key]
    ax.imshow(np.log10(g + 1e-30), cmap="magma", vmin=np.log10(g.max()) - 12)
    lo, hi = (input_interval(key[1] // 16, key[1] // 16, level=4, decoder=False)
              if key[0] == "bottleneck" else input_interval(key[1], key[1]))
    ax.add_patch(plt.Rectangle((lo - 0.5, lo - 0.5), hi - lo + 1, hi - lo + 1, fill=False,
                               ec="cyan", lw=1.5))
    ax.set_title(f"{key[0]} at ({key[1]}, {key[1]}): {hi - lo + 1} px", fontsize=9)
    ax.axis("off")
fig.suptitle("log |d position / d input| on a 256x256 input; cyan: the computed field",
             fontsize=10)
save(fig, "receptive_field")

# %% [markdown]
# ### Final layer
#
# The head is `nn.Conv(num_classes, (1, 1))`: per pixel, a linear classifier over the
# 64 decoder features, 64 weights and a bias for one class. Its logits stay
# float32 even when the network computes in bfloat16, so that the loss and the
# threshold are computed in full precision.
#
# The output is a logit `z`, not a probability: the sigmoid `σ(z) = 1 / (1 + e^-z)`
# would turn it into one, and `σ(z) > 0.5` exactly where `z > 0`, so prediction
# thresholds the logit at 0 and never computes the sigmoid. The loss takes logits too:
# binary cross-entropy `-[y log σ(z) + (1 - y) log(1 - σ(z))]`, which PyTorch's
# `BCEWithLogitsLoss` and `optax.sigmoid_binary_cross_entropy` compute in the equal
# form `max(z, 0) - z y + log(1 + e^-|z|)`. A sigmoid first, then the log, would round
# `σ(z)` to exactly 1 for a confident pixel (z above about 17 in float32; to 0 only
# below about -88), and a confident wrong one would take `log(1 - 1) = log 0`; folded
# together, the loss stays finite and its gradient is simply `σ(z) - y`.
#
# ### Synthesis: the whole network for a 512x512x3 input
#
# Every block's output shape and parameter count, read from the model itself (shapes by
# `jax.eval_shape` with `capture_intermediates=True`, parameters from the parameter
# tree), and XLA's count of the floating-point operations of one forward pass
# (`jit(...).lower(...).cost_analysis()`, again without running it).

# %%
def level_table(model, input_shape):
    """[(block, output shapes, parameters, GFLOP)] of a U-Net's top-level blocks, in the
    order the data flows, and the variables; from shapes alone (``jax.eval_shape`` of
    ``init``, and of ``apply`` with ``capture_intermediates``), so no image of that
    size is ever computed. A convolution's FLOPs are 2 (one multiply-add) per weight
    per output pixel; the 2x2 up-convolution's output pixels each see one input pixel,
    so a quarter of its weights."""
    from flax.traverse_util import flatten_dict

    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True), variables, x)
    inter = flatten_dict(state["intermediates"])
    gflop = {}
    for path, kernel in flatten_dict(variables["params"]).items():
        if path[-1] != "kernel":
            continue
        out = inter[path[:-1] + ("__call__",)][0]
        macs = np.prod(out.shape[:-1]) * kernel.size / (4 if path[-2] == "up" else 1)
        gflop[path[0]] = gflop.get(path[0], 0) + 2 * macs / 1e9
    rows = []
    for name, params in variables["params"].items():
        out = inter[(name, "__call__")][0]
        shapes = [o.shape for o in out] if isinstance(out, tuple) else [out.shape]
        rows.append((name, shapes, n_params(params), gflop[name]))
    flow = {"down": 0, "bottleneck": 1, "up": 2, "head": 3}
    rows.sort(key=lambda r: (flow[r[0].split("_")[0]], r[0]))
    return rows, variables


def forward_gflops(model, variables, input_shape):
    """XLA's FLOP count of one forward pass (``cost_analysis`` of the lowered program)."""
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    return jax.jit(model.apply).lower(variables, x).cost_analysis()["flops"] / 1e9


guide_unet = models.UNet()  # the guide's U-Net: width 64, depth 4, 3 channels in, 1 out
ARCH, arch_vars = level_table(guide_unet, (1, 512, 512, 3))
print(f"{'block':11}    {'output (H, W, C)':36} {'parameters':>12} {'GFLOP':>7}")
for name, shapes, count, gflop in ARCH:
    print(f"{name:11} -> {' and '.join(str(s[1:]) for s in shapes):36} {count:>12,} "
          f"{gflop:>7.1f}")
TOTAL_PARAMS = n_params(arch_vars)
GFLOP_512 = forward_gflops(guide_unet, arch_vars, (1, 512, 512, 3))
print(f"{'total':11}    {'':36} {TOTAL_PARAMS:>12,} {sum(r[3] for r in ARCH):>7.1f}")
print(f"XLA's count for the whole forward pass at 512x512: {GFLOP_512:.1f} GFLOP (XLA "
      "skips the multiply-adds that fall on the zero padding at the borders, which "
      "more than offsets the biases, ReLUs and pooling)")
assert TOTAL_PARAMS == 31_031_745  # the PyTorch guide's model, to the parameter

# %%
def draw_unet(rows, title):
    """The U: encoder blocks down the left, decoder up the right, skips across."""
    info = {name: (shapes[0][1:], count) for name, shapes, count, _ in rows}
    depth = sum(name.startswith("down_") for name in info)
    fig, ax = plt.subplots(figsize=(11, 5.2))
    pos = {}
    for level in range(depth):
        pos[f"down_{level + 1}"] = (level, -level)
        pos[f"up_{depth - level}"] = (2 * depth - level, -level)
    pos["bottleneck"], pos["head"] = (depth, -depth), (2 * depth + 1.2, 0)
    for name, (x, y) in pos.items():
        (h, w, c), count = info[name]
        ax.add_patch(plt.Rectangle((x - 0.45, y - 0.3), 0.9, 0.6, fc="#dde8f6" if
                                   name.startswith(("down", "bottle")) else "#e6f3df",
                                   ec="black"))
        ax.text(x, y + 0.08, name, ha="center", fontsize=8, weight="bold")
        ax.text(x, y - 0.16, f"{h}x{w}x{c}\n{count:,} p", ha="center", va="center", fontsize=6.5)
    for level in range(depth):
        (x0, y0), (x1, y1) = pos[f"down_{level + 1}"], pos[f"up_{depth - level}"]
        ax.annotate("", (x1 - 0.45, y1), (x0 + 0.45, y0),
                    arrowprops=dict(arrowstyle="->", ls="--", color="gray"))
        ax.text((x0 + x1) / 2, y0 + 0.05, "skip (concatenate)", ha="center", fontsize=6,
                color="gray")
    order = [f"down_{i + 1}" for i in range(depth)] + ["bottleneck"] + \
        [f"up_{i + 1}" for i in range(depth)]
    for a, b in zip(order, order[1:]):
        (xa, ya), (xb, yb) = pos[a], pos[b]
        colour = "firebrick" if yb < ya else "seagreen"
        ax.annotate("", (xb, yb + (0.3 if yb < ya else -0.3)), (xa, ya - (0.3 if yb < ya else -0.3)),
                    arrowprops=dict(arrowstyle="->", color=colour))
    (xa, ya), (xb, yb) = pos[order[-1]], pos["head"]
    ax.annotate("", (xb - 0.45, yb), (xa + 0.45, ya), arrowprops=dict(arrowstyle="->"))
    ax.text(0, -depth, "red: 2x2 max-pool (half the size)", color="firebrick", fontsize=8)
    ax.text(2 * depth, -depth, "green: 2x2 up-convolution (double the size)",
            color="seagreen", fontsize=8, ha="right")
    ax.set_xlim(-0.7, 2 * depth + 1.9)
    ax.set_ylim(-depth - 0.6, 0.6)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    return fig


save(draw_unet(ARCH, f"unet_jax.models.UNet for a 512x512x3 input: {TOTAL_PARAMS:,} "
                     f"parameters, {GFLOP_512:.0f} GFLOP per forward pass"), "architecture",
     dpi=100)

# %% [markdown]
# Read the two columns together. Three quarters of the parameters sit in the two
# deepest blocks (the bottleneck and `up_1`), where the maps are 32x32 and 64x64; the
# full-resolution blocks hold a fraction of a percent of them. The compute is spread
# evenly instead: each level down halves the side and doubles the channels, so
# (pixels x channels²) and with it the FLOPs of a level's convolutions stay about the
# same, and the decoder's blocks cost twice the encoder's (they see twice the channels
# after the concatenation). The narrow variant the runs below use (width 8 instead of
# 64) divides the work of every convolution but the first and the last by 64, which
# is why it trains in minutes on a laptop CPU.

# %% [markdown]
# ## Model training
#
# ### Data loading and preprocessing
#
# The PyTorch guide's `CustomCarvanaDataset` opens each image and mask, resizes both to
# 512x512 and returns tensors. Here `data_pipeline` does that job on the host with
# `tf.data`, in three steps: `find_pairs` matches every image with its mask (Kaggle's
# `train/` and `train_masks/`, or your own `images/` and `masks/`) and checks the files
# before any training starts; `split_pairs` holds out whole cars for validation (all
# 16 views of a car on one side); `InputPipeline` decodes and resizes once into a cache, then
# serves shuffled, optionally augmented numpy batches. Images are float32 in [0, 1],
# masks float32 in {0, 1}, both NHWC.
#
# The split is the one place where this project departs from the PyTorch guide on
# purpose. The guide's `random_split` draws images, so most validation cars also have
# several of their 16 turntable views in the training set: the model is scored on
# views of cars it has learnt, nearly the same photos, and the validation Dice says
# more about memory than about new cars. Held-out cars are what a Kaggle test set is
# (its 6,254 cars are none of the training set's 318). Every preset splits by car,
# the guide's `seed-gpu` and `seed-cpu` included; `--split random` (`split="random"`)
# is the guide's split, for comparing with its figures.

# %%
# The built-in sample set (generated on first use; a small one for the quick check).
DATA_DIR = (data_pipeline.sample_dataset_dir(num_cars=4, size=(96, 64)) if SIZE == "tiny"
            else data_pipeline.sample_dataset_dir())
pairs = data_pipeline.find_pairs(DATA_DIR)
train_pairs, val_pairs = data_pipeline.split_pairs(pairs, method="car", val_fraction=0.2,
                                                   seed=42)
print(f"{len(pairs)} image/mask pairs in {DATA_DIR.name}: e.g. {pairs[0].image.name} with "
      f"{pairs[0].mask.name}; {len(train_pairs)} for training, {len(val_pairs)} for "
      "validation (split by car)")
pipeline = data_pipeline.InputPipeline(train_pairs, image_size=(64, 96), batch_size=8,
                                       train=True, seed=0)
batch = next(pipeline.epoch(1))
for key, value in batch.items():
    print(f"batch[{key!r}]: {value.shape} {value.dtype}, values in "
          f"[{value.min():.2f}, {value.max():.2f}]")

# %% [markdown]
# Resizing a mask needs care the image does not. The image is filtered: each small
# pixel is a weighted mean around the middle of its block of large ones. The usual
# choice for masks, nearest, keeps them binary by copying one large pixel, and when
# the factor is even (1024 to 512) the middle of a 2x2 block lies between pixels, so it
# always copies the one after it: sampled half a large pixel down and right of the
# image's sample, every mask's content sits that far (a quarter of a small pixel) up
# and left of its image, and the model learns to draw its masks up and left. Here each
# small pixel belongs to the object where the object covers at least half of its area
# (`preprocess.resize_labels`): still binary, and centred where the image is. A disk
# centred on a 64x64 grid, halved:

# %%
from PIL import Image

from data_pipeline import preprocess

yy, xx = np.mgrid[:64, :64]
disk = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 20 ** 2).astype(np.uint8)
nearest = Image.fromarray(disk).resize((32, 32), Image.Resampling.NEAREST)
halved = {"nearest": np.asarray(nearest), "resize_labels": preprocess.resize_labels(disk, (32, 32))}
for name, small in halved.items():
    rows, cols = np.nonzero(small)
    print(f"{name:>13}: centre at ({rows.mean():.2f}, {cols.mean():.2f}), "
          f"area x4 {4 * small.sum()} of {disk.sum()} (the image's centre: 15.50, 15.50)")

# %% [markdown]
# Augmentation (`augment=True`) moves an image and its mask together (a random flip,
# a shift of up to 10% and a scale of 0.9 to 1.1, the mask resampled nearest so it
# stays binary) and changes the image's brightness and contrast alone. The U-Net
# paper's smooth elastic deformation and small rotations are there by name
# (`augment="flip,shift,color,elastic,rotate"`). The randomness is drawn from (seed,
# epoch, example), so a run can be repeated, and resumed, exactly. Below: one training
# image, its mask, and what training examples receive of it (cyan: the mask's
# outline, moved with the image).

# %%
one = [train_pairs[0]] * 3
show_size = (160, 240)
plain = next(data_pipeline.InputPipeline(one[:1], image_size=show_size, batch_size=1,
                                         train=False).epoch(0))
augmented = {ops: next(data_pipeline.InputPipeline(
    one, image_size=show_size, batch_size=3, train=True, augment=ops, seed=3).epoch(1))
    for ops in (True, "elastic", "rotate")}


def outline(mask):
    """The pixels of a binary mask that touch the background."""
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:-1, 1:-1] &= m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return m & ~inner


def with_outline(image, mask, colour=(1.0, 1.0, 1.0)):
    out = image.copy()
    out[outline(mask)] = colour
    return out


fig, axes = plt.subplots(2, 4, figsize=(11, 3.9))
axes = axes.ravel()
axes[0].imshow(plain["image"][0])
axes[0].set_title("image", fontsize=9)
axes[1].imshow(plain["mask"][0, ..., 0], cmap="gray")
axes[1].set_title("mask", fontsize=9)
panels = [(True, i) for i in range(3)] + [("elastic", 0), ("elastic", 1), ("rotate", 0)]
for ax, (ops, i) in zip(axes[2:], panels):
    ax.imshow(with_outline(augmented[ops]["image"][i], augmented[ops]["mask"][i, ..., 0],
                           (0.0, 0.9, 1.0)))
    ax.set_title("augment=True" if ops is True else f"augment={ops!r}", fontsize=9)
for ax in axes:
    ax.axis("off")
save(fig, "augmentation")

# %% [markdown]
# ### The training loop
#
# The PyTorch loop mutates a model and an optimizer in place. JAX has no hidden state:
# a training step is a pure function from (state, batch) to a new state, which
# `jax.jit` compiles once, for the whole step, into one XLA program.
#
# | the PyTorch guide | unet-jax (`unet_jax.train`) |
# |---|---|
# | `model.train()`; `y_pred = model(img)` | `logits = state.apply_fn({"params": params}, batch["image"])` inside `loss_fn(params)` |
# | `loss = criterion(y_pred, mask)` (`BCEWithLogitsLoss`) | `losses.per_image_loss("bce", logits, mask).mean()` |
# | `optimizer.zero_grad()` | nothing to reset: gradients are return values, never accumulated |
# | `loss.backward()` | `grads, aux = jax.grad(loss_fn, has_aux=True)(state.params)` |
# | `optimizer.step()` (`AdamW`, lr 3e-4) | `state = state.apply_gradients(grads=grads)` (`optax.adamw`) |
# | runs op by op from Python | `@jax.jit`: one compiled program per input shape |
# | the old weights are overwritten in place | `donate_argnames=("state",)`: XLA reuses the old state's buffers for the new one |
# | `loss.item()` every step (waits for the device) | metrics are read one step late, so the host never waits |
# | `model.eval()`; `with torch.no_grad():` | `eval_step`: a separate jitted function that computes no gradient |
#
# AdamW is Adam with decoupled weight decay (Loshchilov and Hutter, 2019). Adam scales
# each parameter's step by running averages of its gradient and of its squared
# gradient, so every weight moves at a similar pace whatever the size of its
# gradients. Weight decay pulls every weight a little towards zero at each step, which
# keeps them small; AdamW applies it to the weights directly (`w -= lr * wd * w`)
# rather than adding it to the gradient, where Adam's scaling would weaken it for the
# weights with large gradients. The decay is 0.01, PyTorch's default and the guide's
# (`--weight-decay`).

# %%
show(unet_jax.train_step)

# %% [markdown]
# What `jit` and donation do, measured on a small model: the first call traces and
# compiles the step (or, when an earlier run compiled the same program, loads it from
# JAX's persistent compilation cache, which every command of this project turns on:
# then it takes a fraction of a second), later calls run the compiled program; after a call, the donated
# input state is gone (its buffers now hold the new state), which is why the loop
# always rebinds `state = ...`.

# %%
demo_config = pick(TINY, configs.tiny())
demo_state = unet_jax.create_train_state(jax.random.key(0), demo_config)
demo_batch = next(data_pipeline.InputPipeline(
    train_pairs, image_size=demo_config.image_size, batch_size=4, train=True).epoch(1))
times = []
for step in range(4):
    old_kernel = jax.tree.leaves(demo_state.params)[0]
    start = time.perf_counter()
    demo_state, metrics = unet_jax.train_step(demo_state, demo_batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    if step == 0:
        print(f"after a step, the donated input's buffers are deleted: {old_kernel.is_deleted()}")
print(f"step 1 (trace + compile or load + run): {times[0]:.2f} s; steps 2-4 (run): "
      f"{', '.join(f'{t * 1000:.1f} ms' for t in times[1:])}; loss {float(metrics['loss']):.4f}")

# %% [markdown]
# ### Hyperparameters for a GPU
#
# The PyTorch guide trained on a GPU at 512x512 with batch 32, AdamW at lr 3e-4, for 6
# epochs. Those settings are the preset `seed-gpu`; its CPU example (10% of the cars,
# batch 4, 2 epochs) is `seed-cpu`. Batch 32 at 512x512 is a question of memory: the
# feature maps of one image, counted from the shapes, give a lower bound of what a
# training step keeps for its backward pass.

# %%
for name in ("seed-gpu", "seed-cpu", "default"):
    c = configs.PRESETS[name]()
    print(f"{name:9} image {c.image_size[0]}x{c.image_size[1]}, batch {c.batch_size}, "
          f"lr {c.learning_rate:g}, {c.epochs} epochs, width {c.base_features}, subset {c.subset}")


def feature_map_bytes(model, input_shape):
    """Bytes of the outputs of every convolution (3x3, 2x2 up, 1x1) for one input in
    float32, from shapes: the maps the backward pass needs at the least."""
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, capture_intermediates=(
        lambda module, method: isinstance(module, (nn.Conv, models.UpConv)))), variables, x)
    return sum(4 * int(np.prod(a.shape)) for a in jax.tree.leaves(state["intermediates"]))


per_image = feature_map_bytes(guide_unet, (1, 512, 512, 3))
print(f"\nfeature maps of one 512x512 image in the guide's U-Net: {per_image / 2**20:,.0f} MiB;"
      f" batch 4: {4 * per_image / 2**30:.1f} GiB; batch 32: {32 * per_image / 2**30:.1f} GiB"
      f" (plus {TOTAL_PARAMS * 4 * 4 / 2**30:.2f} GiB of parameters, gradients and AdamW's"
      " two moments)")

# %% [markdown]
# That count is a floor, not what a GPU needs. Measured on an NVIDIA H200
# ([docs/benchmarks.md](../benchmarks.md), and the README's GPU section), the training
# step at batch 32 peaked at 82 GB of GPU memory in float32 (the guide's precision; XLA
# also tries convolution algorithms with large workspaces while it compiles, and keeps
# more than the convolution outputs) and at 20.6 GB in bfloat16, which was also more
# than twice as fast. PyTorch's eager float32 step peaked at 32 GB. So on any recent
# GPU train in bfloat16; on a card with less memory, `--remat convs` (15.5 GB) or a
# smaller `--batch-size` lowers it further. This guide's build runs on a CPU, so its
# other figures are CPU figures. The commands for a GPU, with JAX's CUDA build
# installed (`pip install -e '.[cuda]'`):
#
# ```bash
# python -m experiments.train --platform gpu --data-dir ~/carvana --preset seed-gpu --dtype bfloat16
# python -m experiments.benchmark --platform gpu --dtype bfloat16 --image-size 512 --batch-size 32
# ```

# %% [markdown]
# ## Model evaluation
#
# ### The minimal CPU example
#
# The PyTorch guide's CPU example cut the data to 10%, the batch to 4 and the epochs to
# 2; at 512x512 that is still about an hour and a half on a 2-core CPU (the `seed-cpu`
# preset's docstring). This project's default preset makes a different
# trade: the guide's topology at an eighth of its width (`base_features=8`) on 64x96
# images, batch 8, 8 epochs at lr 2e-3, on all of the sample set. One call trains it:
# `train_and_evaluate` is the whole loop (epochs, validation, checkpoints, metrics.csv,
# plots), the same function `python -m experiments.train` calls. Each epoch's line
# gives the mean training loss, then the validation images' loss and two overlap
# scores between predicted and true masks, Dice and IoU, each 1 for a perfect mask and
# 0 for one that misses the car entirely (defined under "Loss and Dice per epoch"
# below).

# %%
MAIN = pick(dataclasses.replace(TINY, data_dir=str(DATA_DIR), epochs=2),
            dataclasses.replace(configs.default(), data_dir=str(DATA_DIR)))
print({k: v for k, v in MAIN.to_dict().items()
       if k in ("base_features", "depth", "image_size", "batch_size", "epochs",
                "learning_rate", "loss", "split")})
main_run = train("main", MAIN)
MAIN_DIR = main_run["workdir"]

# %% [markdown]
# ### Inference on one image
#
# The PyTorch guide's `single_image_inference` loads the weights, resizes an image,
# runs the model and thresholds the logits at 0. `unet_jax.inference.Predictor` does
# the same from a run directory: it restores the best checkpoint (by validation Dice)
# and the run's settings from `config.json`, feeds the image exactly as training did,
# resizes the logits (not the thresholded mask) back to the image's own size and only
# then thresholds, so edges stay smooth at full resolution.

# %%
from unet_jax.inference import Predictor

predictor = Predictor(MAIN_DIR)
image_path = val_pairs[0].image
start = time.perf_counter()
[(path, picture, mask)] = list(predictor.predict_files([image_path], images=True))
first = time.perf_counter() - start
start = time.perf_counter()
list(predictor.predict_files([image_path]))
again = time.perf_counter() - start
print(f"{path.name}: mask {mask.shape} (the image's own size), {mask.mean():.0%} car; "
      f"first call {first:.2f} s (compiles, or loads from the compile cache), second "
      f"{again * 1000:.0f} ms")
fig, axes = plt.subplots(1, 3, figsize=(10, 2.6))
for ax, (img, title) in zip(axes, [(picture, "image"), (mask, "predicted mask"),
                                   (with_outline(picture, mask, (1, 0.1, 0.1)), "outline")]):
    ax.imshow(img, cmap="gray")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
save(fig, "single_image_inference")

# %% [markdown]
# ## Experiments and results
#
# ### Loss and Dice per epoch
#
# The run's `metrics.csv` holds one row per epoch. Dice, `2|P∩T| / (|P|+|T|)`, is
# Carvana's leaderboard metric; it is computed per validation image and averaged. IoU
# (intersection over union, or Jaccard), `|P∩T| / |P∪T|`, weighs the same overlap
# against the union of the two masks. It is never above Dice, and one gives the other:
# `IoU = Dice / (2 - Dice)`, so Dice 0.95 is IoU 0.905. Both ignore correctly rejected
# background, which pixel accuracy counts: a mask of nothing scores 78% pixel
# accuracy on images whose car covers 22% of the pixels, and Dice 0.

# %%
import csv

with open(MAIN_DIR / "metrics.csv") as f:
    history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
epochs = [int(r["epoch"]) for r in history]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="training loss")
ax1.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation loss")
ax1.set_xlabel("epoch")
ax1.set_ylabel("BCE")
ax1.legend()
ax1.grid(alpha=0.3)
ax2.plot(epochs, [r["val_dice"] for r in history], "o-", color="seagreen", label="Dice")
ax2.plot(epochs, [r["val_iou"] for r in history], "o-", color="gray", label="IoU")
ax2.set_xlabel("epoch")
ax2.set_ylabel("validation score")
ax2.legend()
ax2.grid(alpha=0.3)
save(fig, "loss_and_dice")
best = main_run["best"]
print(f"best validation Dice {best['val_dice']:.4f} (IoU {best['val_iou']:.4f}) at epoch "
      f"{best['epoch']}; last epoch: training loss {history[-1]['train_loss']:.4f}, "
      f"validation loss {history[-1]['val_loss']:.4f}; training speed after the first "
      f"(compiling) epoch: {np.median([r['train_img_per_s'] for r in history[1:]] or [0]):.0f} "
      "images/s")

# %% [markdown]
# Reading the curves: in the first epoch the training loss is above the validation
# loss, because it is the mean over an epoch that starts from random weights, while
# the validation loss is measured once, at the epoch's end. After that, both fall
# while Dice rises; the validation loss does not fall as steadily as the training
# loss, since 80 images of 5 unseen cars are a small and noisy sample. A validation
# loss that turns upward while the training loss keeps falling is the sign of
# overfitting to watch in longer runs; the best checkpoint is chosen by validation
# Dice, so such epochs never replace it.
#
# ### Predictions and their errors
#
# Four validation images (cars the model never trained on), the prediction's outline
# over each, and where it is wrong: red pixels are predicted car but background (false
# positives), blue ones car the model missed (false negatives).

# %%
def load_run(run_dir):
    """(params, config, jitted apply) of a run's best checkpoint."""
    params, config, _ = checkpoints.restore_params(run_dir)
    model = unet_jax.create_model(config)
    return params, config, jax.jit(lambda p, x: model.apply({"params": p}, x))


def dice(pred, true):
    total = pred.sum() + true.sum()
    return 1.0 if total == 0 else 2.0 * (pred & true).sum() / total


def error_map(image, pred, true):
    """The image, dimmed, with false positives red and false negatives blue."""
    out = 0.6 * image
    out[pred & ~true] = (1.0, 0.15, 0.15)
    out[~pred & true] = (0.15, 0.35, 1.0)
    return out


main_params, main_config, main_apply = load_run(MAIN_DIR)
val_pairs = data_pipeline.read_split(MAIN_DIR / "split.json")[1]  # the run's own split
val_batch = next(data_pipeline.InputPipeline(  # every validation image, in one batch
    val_pairs, image_size=main_config.image_size, batch_size=len(val_pairs),
    train=False).epoch(0))
VAL_IMAGES, VAL_MASKS = val_batch["image"], val_batch["mask"][..., 0] > 0.5
main_pred = np.asarray(main_apply(main_params, VAL_IMAGES))[..., 0] > 0
rows = [0, 2, 4, 6]
fig, axes = plt.subplots(len(rows), 3, figsize=(8, 1.9 * len(rows)))
for row, i in enumerate(rows):
    img = VAL_IMAGES[i]
    panels = [(img, "image"), (with_outline(img, main_pred[i], (1, 0.1, 0.1)), "prediction"),
              (error_map(img, main_pred[i], VAL_MASKS[i]),
               f"errors (Dice {dice(main_pred[i], VAL_MASKS[i]):.3f})")]
    for ax, (picture, title) in zip(axes[row], panels):
        ax.imshow(picture)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
save(fig, "predictions")
wrong = main_pred != VAL_MASKS
print(f"{len(VAL_IMAGES)} validation images: Dice {np.mean([dice(p, t) for p, t in zip(main_pred, VAL_MASKS)]):.4f}; "
      f"{wrong.mean():.2%} of their pixels are wrong: {(main_pred & ~VAL_MASKS).sum()} false "
      f"positives, {(~main_pred & VAL_MASKS).sum()} false negatives")

# %% [markdown]
# ### Inside the trained network: what each level sees
#
# `apply(..., capture_intermediates=True)` returns every module's output next to the
# logits, without touching the model's code. A block has 8 to 128 channels here, too
# many to show; for one validation image, each panel shows the channel of its block
# whose values follow the true mask most closely (the largest correlation with the
# mask shrunk to the map's size, of either sign: a channel that is dark on the car
# says "car" as clearly as a bright one). The top row goes down the contracting path,
# the bottom row up the expansive path to the logit, drawn with 0, the threshold, in
# white: red is predicted car, blue background (the colours stop at +-10).

# %%
main_model = unet_jax.create_model(main_config)
sample = VAL_IMAGES[:1]
_, state = main_model.apply({"params": main_params}, sample, capture_intermediates=True)
inter = state["intermediates"]
depth = main_config.depth
path = ([(f"down_{i}", inter[f"down_{i}"]["__call__"][0][0]) for i in range(1, depth + 1)]
        + [("bottleneck", inter["bottleneck"]["__call__"][0])]
        + [(f"up_{i}", inter[f"up_{i}"]["__call__"][0]) for i in range(1, depth + 1)]
        + [("head (logit)", inter["head"]["__call__"][0])])


def mask_channel(fmap, mask):
    """The channel of ``fmap`` (1, h, w, C) that correlates most with ``mask``
    (H, W), averaged over the pixels each map position covers, and that correlation."""
    fmap = np.asarray(fmap[0], np.float64)
    h, w, _ = fmap.shape
    small = mask.reshape(h, mask.shape[0] // h, w, mask.shape[1] // w).mean((1, 3))
    flat = fmap.reshape(h * w, -1) - fmap.reshape(h * w, -1).mean(0)
    target = small.ravel() - small.mean()
    corr = flat.T @ target / (np.linalg.norm(flat, axis=0) * np.linalg.norm(target) + 1e-12)
    best = np.abs(corr).argmax()
    return fmap[..., best], corr[best]


fig, axes = plt.subplots(2, depth + 2, figsize=(2.1 * (depth + 2), 3.8))
axes[0, 0].imshow(sample[0])
axes[0, 0].set_title("input", fontsize=8)
correlations = {}
for ax, (name, fmap) in zip(list(axes[0, 1:]) + list(axes[1]), path):
    channel, correlations[name] = mask_channel(fmap, VAL_MASKS[0].astype(np.float64))
    if name.startswith("head"):
        # The logits along the border reach -100 (the model is surest there): the
        # colours stop at +-10, a probability of 0.99995 either way, so that the car,
        # not the frame, sets the scale.
        shown = ax.imshow(channel, cmap="RdBu_r", vmin=-10, vmax=10)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, extend="both").ax.tick_params(
            labelsize=6)
    else:
        ax.imshow(channel, cmap="viridis")
    ax.set_title(f"{name}\n{'x'.join(map(str, fmap.shape[1:]))}", fontsize=8)
for ax in axes.ravel():
    ax.axis("off")
save(fig, "feature_maps")
print("correlation of each panel's channel with the mask: "
      + ", ".join(f"{name.split()[0]} {c:+.2f}" for name, c in correlations.items()))

# %% [markdown]
# What to look for: the first levels' channels still look like the photo (edges, the
# car's body against the floor), at full detail; going down, the maps get coarser
# (4x6 positions at the bottleneck for a 64x96 image) and more abstract, one position
# standing for a large part of the car; going up, the decoder brings the detail back
# level by level, until the head's logit outlines the car at full resolution. Bright
# or dark rims along the borders of some maps are no fault: each 3x3 convolution pads
# the map with zeros, so positions at the edge see a frame of zeros that no position
# inside sees, and some channels learn to mark where the image ends.
#
# ### What the skip connections carry
#
# At each decoder level two maps meet: the upsampled one from below (`up_i/up`, the
# transposed convolution's output), computed from a map of half the resolution, and
# the skip, the encoder's map at full resolution for that level. The first two rows
# show both (mean absolute activation over the channels). To measure what a skip
# contributes, cut it in the trained model: `nn.intercept_methods` hands one `UpSample`
# zeros instead of its skip, without changing the model's code, and the whole
# validation set is predicted again. The errors are split into those within 2 pixels
# of the true outline and those elsewhere (the third row: one image, each skip cut).

# %%
from scipy import ndimage


def cut_skip(level):
    """An interceptor: ``up_<level>`` receives zeros instead of its skip connection."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name == f"up_{level}":
            x, skip = args
            return next_fun(x, jnp.zeros_like(skip), **kwargs)
        return next_fun(*args, **kwargs)

    return interceptor


def mean_dice(preds, trues):
    return float(np.mean([dice(p, t) for p, t in zip(preds, trues)]))


EDGE_BAND = np.stack([ndimage.binary_dilation(outline(t), iterations=2) for t in VAL_MASKS])
depth = main_config.depth
print(f"{'skip cut':18} {'val Dice':>9} {'wrong px':>9} {'within 2 px of an edge':>23} "
      f"{'elsewhere':>10}")
cut_preds = {}
for level in [None, *range(depth, 0, -1)]:  # the finest skip (down_1 -> up_<depth>) first
    if level is None:
        pred, name = main_pred, "none (as trained)"
    else:
        with nn.intercept_methods(cut_skip(level)):
            pred = np.asarray(main_model.apply({"params": main_params}, VAL_IMAGES))[..., 0] > 0
        name = f"down_{depth - level + 1} -> up_{level}"
        cut_preds[level] = pred
    wrong = pred != VAL_MASKS
    print(f"{name:18} {mean_dice(pred, VAL_MASKS):>9.4f} {wrong.sum():>9} "
          f"{(wrong & EDGE_BAND).sum():>23} {(wrong & ~EDGE_BAND).sum():>10}")
print(f"(the 2-pixel band around the outlines covers {EDGE_BAND.mean():.0%} of the pixels)")

fig, axes = plt.subplots(3, depth, figsize=(2.6 * depth, 6.2), squeeze=False)
for i in range(1, depth + 1):
    level = depth - i + 1  # up_1 meets down_<depth>'s skip, and so on
    upsampled = inter[f"up_{i}"]["up"]["__call__"][0]
    skip_map = inter[f"down_{level}"]["__call__"][0][0]
    pred = cut_preds[i][0]
    for row, (picture, title, cmap) in enumerate([
            (np.abs(np.asarray(upsampled[0])).mean(-1), f"up_{i}: upsampled", "magma"),
            (np.abs(np.asarray(skip_map[0])).mean(-1), f"skip from down_{level}", "magma"),
            (error_map(VAL_IMAGES[0], pred, VAL_MASKS[0]),
             f"down_{level} skip cut: Dice {dice(pred, VAL_MASKS[0]):.3f}", None)]):
        axes[row, i - 1].imshow(picture, cmap=cmap)
        axes[row, i - 1].set_title(title, fontsize=8)
        axes[row, i - 1].axis("off")
save(fig, "skip_connections")

# %% [markdown]
# Read the table as how much this trained decoder relies on each skip, not as a pure
# measure of what each skip carries: zeroing half of a layer's input puts the layer in
# a state it never saw in training. That is why cutting the finest skip costs far more
# than edges (most of its wrong pixels lie away from any outline: the last DoubleConv,
# fed half zeros, loses the car's body too), and why the cost does not follow the
# levels' order: how training spread the work over the levels is its own choice, which
# another seed may make differently. What the cuts do show is that the decoder uses
# every skip, and that the path through the bottleneck alone does not give the mask.

# %% [markdown]
# ### Why the skips matter: the same run without them
#
# `UNet(skip_connections=False)` (`Config(skip_connections=False)`, flag
# `--no-skip-connections`) drops the concatenations: the decoder has only the
# bottleneck's coarse maps to rebuild every edge from. Same data, same settings, same
# seed:

# %%
NOSKIP = dataclasses.replace(MAIN, skip_connections=False)
noskip_run = train("no-skips", NOSKIP)
noskip_params, _, noskip_apply = load_run(noskip_run["workdir"])
noskip_pred = np.asarray(noskip_apply(noskip_params, VAL_IMAGES))[..., 0] > 0

print(f"\n{'':15} {'parameters':>11} {'best val Dice':>14} {'wrong px':>9} "
      f"{'within 2 px of an edge':>23}")
for name, run, pred in [("with skips", main_run, main_pred),
                        ("without skips", noskip_run, noskip_pred)]:
    wrong = pred != VAL_MASKS
    params = checkpoints.restore_params(run["workdir"])[0]
    print(f"{name:15} {n_params(params):>11,} {run['best']['val_dice']:>14.4f} "
          f"{wrong.sum():>9} {(wrong & EDGE_BAND).sum():>23}")

fig, axes = plt.subplots(2, 3, figsize=(8, 3.6))
for row, i in enumerate([0, 4]):
    img = VAL_IMAGES[i]
    for ax, (picture, title) in zip(axes[row], [
            (with_outline(img, VAL_MASKS[i], (0.1, 1, 0.1)), "true outline"),
            (error_map(img, main_pred[i], VAL_MASKS[i]),
             f"with skips: Dice {dice(main_pred[i], VAL_MASKS[i]):.3f}"),
            (error_map(img, noskip_pred[i], VAL_MASKS[i]),
             f"without: Dice {dice(noskip_pred[i], VAL_MASKS[i]):.3f}")]):
        ax.imshow(picture)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
save(fig, "skips_vs_no_skips")

# %% [markdown]
# The skips are also the network's short paths. With them, the input reaches the head
# through as few as five layers (`down_1`'s two convolutions, the skip, `up_<depth>`'s
# two, the head); without them, every signal, and every gradient on its way back,
# passes through all of the deep path. How much of each survives, measured on the
# freshly initialised models (the state both runs started from) and one batch:

# %%
batch = {"image": VAL_IMAGES[:8], "mask": VAL_MASKS[:8, ..., None].astype(np.float32)}
print(f"{'at initialisation':18} {'shortest path (layers)':>23} {'logits std':>11} "
      f"{'gradient norm at down_1':>24}")
init_grad = {}
for name, config in [("with skips", MAIN), ("without skips", NOSKIP)]:
    model = unet_jax.create_model(config)
    params = unet_jax.init_params(jax.random.key(config.seed), config, model)

    def loss_fn(params):
        logits = model.apply({"params": params}, batch["image"])
        return unet_jax.per_image_loss("bce", logits, batch["mask"]).mean(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    grad_norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads["down_1"])))
    if config.skip_connections:  # down_1's two convolutions, up_<depth>'s two, the head
        layers = 2 + 2 + 1
    else:  # every DoubleConv, the bottleneck's, every up-convolution, the head
        layers = 4 * config.depth + 2 + config.depth + 1
    print(f"{name:18} {layers:>23} {float(logits.std()):>11.2e} {grad_norm:>24.2e}")
    init_grad[name] = grad_norm

# %% [markdown]
# What the run without skips learned, against the simplest guess there is: the same
# probability at every pixel, the share of car pixels, whose BCE is the entropy of
# that share and whose Dice is 0 (a probability below 0.5 everywhere predicts no car):

# %%
share = float(VAL_MASKS.mean())
prior_bce = -(share * np.log(share) + (1 - share) * np.log(1 - share))
last = noskip_run["history"][-1]
print(f"car pixels: {share:.1%} of the validation masks; the constant guess scores a BCE "
      f"of {prior_bce:.4f}")
print(f"without skips, epoch {last['epoch']}: training loss {last['train_loss']:.4f}, "
      f"validation loss {last['val_loss']:.4f}, best validation Dice "
      f"{noskip_run['best']['val_dice']:.4f}")
print(f"gradient at down_1 at initialisation, with skips / without: "
      f"{init_grad['with skips'] / init_grad['without skips']:,.0f}x")

# %% [markdown]
# So this run did not blur the car: it never got past the constant guess. Its deep
# path is 23 layers from input to output, and at initialisation the gradient that
# reaches the first block through them is thousands of times weaker than through the
# five-layer path the skips open, with logits that hardly depend on the input. The
# guide's U-Net has no normalisation layers, the usual cure for such a deep plain path
# (milesial/Pytorch-UNet puts batch normalisation after every convolution); with the
# skips it needs none. Why the deep path starts so weak: Flax's default initialisation
# (LeCun normal, variance 1/fan-in; He's 2/fan-in is what keeps a ReLU layer's scale)
# roughly halves the signal's power at every ReLU layer, and 23 in a row compound it
# (PyTorch's default, uniform with a third of that variance, starts weaker still). The
# skips do two jobs here: they bring the encoder's full-resolution maps, which the
# trained decoder relies on (the cut-skip table above), and they make the network
# trainable at all.

# %% [markdown]
# ### Learning-rate schedules and averaged weights: measured, not assumed
#
# The guide trains at one constant AdamW rate. Trainers of the field do more: a
# linear **warm-up** from near zero (`--warmup-epochs`), so that the first, large
# gradients of random weights do not throw the model far; then a decay to zero, by a
# **cosine** (big_vision, `--schedule cosine`) or nnU-Net's **polynomial**
# `(1 - t/T)^0.9` (`--schedule poly`), or a cut by a factor when validation Dice has
# stopped improving (milesial's `--schedule plateau`). **Gradient clipping**
# (`--clip-norm`) rescales each batch's gradients so that their global L2 norm is at
# most the limit. An **exponential
# moving average** of the weights (`--ema DECAY`) is a second copy of the parameters,
# `ema = d * ema + (1 - d) * params` after each step, which validation, the best
# checkpoint and every command then use. Its decay ramps up as
# `min(DECAY, (1 + n) / (10 + n))` at step `n`: a fixed 0.999 would still hold 9% of
# the random initial weights after 2,400 steps.
#
# The same run as above, with one epoch of warm-up, then cosine from the same peak
# rate, and an EMA of the weights:

# %%
from experiments import recipes

RECIPE = "cosine+ema"
recipe_run = train(RECIPE, recipes.recipe_config(MAIN, RECIPE, MAIN.seed))
print(f"\nbest validation Dice: constant {main_run['best']['val_dice']:.4f}, "
      f"{RECIPE} {recipe_run['best']['val_dice']:.4f}")
save(recipes.figure({"constant": [main_run["history"]], RECIPE: [recipe_run["history"]]}),
     "recipes")

# %% [markdown]
# One run per recipe says little: changing only the seed (the split, the initial
# weights, the batch order) moves the best Dice as much. `python -m experiments.recipes`
# trains the `default` preset on the sample set once per recipe and seed; the same seed
# gives every recipe the same split and start, so the gains are read seed by seed.
# Its table for three seeds, as committed with the project:

# %%
sweep = Path(unet_jax.__file__).resolve().parents[1] / "docs" / "results" / "recipes-sample"
if sweep.with_suffix(".json").is_file():
    measured = json.loads(sweep.with_suffix(".json").read_text())
    print(measured["machine"], f"- {measured['epochs']} epochs")
    print(recipes.table(measured["rows"], measured["seeds"]))
else:
    print("python -m experiments.recipes --platform cpu --seeds 3 --out docs/results/recipes-sample")

# %% [markdown]
# On this short run no schedule beats the constant rate: cosine loses 0.019 Dice on
# average and 0.04 on one seed, and twice the peak rate does not recover it. A cosine
# spends its last epochs at a rate near zero, which suits a long run that has
# converged, not eight epochs that have not. The EMA leaves the best Dice where it was
# (-0.001, less than the 0.006 between seeds) but raises the last epoch's from 0.960
# to 0.963 and halves its spread: averaged weights smooth the noise of the last
# steps, which matters when the last checkpoint, not the best, is the one kept. No
# gain is larger than the seeds' spread, so every preset keeps the constant rate;
# the settings are there for longer runs and other data, to be measured the same way.

# %% [markdown]
# ## Observed limitations of CPU training
#
# The PyTorch guide found CPU training slow, memory-hungry and hard to scale, and
# inference too slow for real time. Measured numbers make that concrete.
# [docs/benchmarks.md](../benchmarks.md) holds the project's measurements, JAX against
# the guide's own PyTorch code on the same CPU, with their machine. Its first table,
# quoted here, is the oldest: its PyTorch processes had JAX loaded too (about 160 MB
# more memory) and an unfused AdamW, and it has no `torch.compile` row. The fairer
# comparison is that page's "PyTorch at its fairest" table, measured on another CPU
# (an AVX2 AMD EPYC), which the README quotes.

# %%
ROOT = Path(unet_jax.__file__).resolve().parents[1]
bench_doc = ROOT / "docs" / "benchmarks.md"
BENCH_DOC = {}  # configuration -> JAX images/s, as the document's results table gives it
if bench_doc.is_file():
    lines = bench_doc.read_text().splitlines()
    cpu = next(i for i, l in enumerate(lines) if l.startswith("- CPU:"))
    cpu_lines = [lines[cpu]] + list(itertools.takewhile(lambda l: l.startswith("  "),
                                                        lines[cpu + 1:]))
    print(" ".join(l.strip().removeprefix("- ") for l in cpu_lines))  # the whole bullet
    results = next(i for i, l in enumerate(lines) if l.startswith("## Results"))
    first = next(i for i in range(results, len(lines)) if lines[i].startswith("|"))
    for line in lines[first:]:
        if not line.startswith("|"):
            break  # the end of the results table
        if set(line) <= set("|-: "):
            continue  # the header's rule
        cells = [c.strip() for c in line.strip("|").split("|")]
        print(f"{cells[0]:24} {cells[1]:>9} {cells[2]:>11} {cells[6]:>20}")
        BENCH_DOC[cells[0]] = cells[1]
else:
    print("docs/benchmarks.md is in the repository: clone it to read the measurements")

# %% [markdown]
# And a short measurement on the machine that built this guide: the guide's full-width
# model, a real `train_step` (AdamW, BCE) at 128x128 and a forward pass at the guide's
# 512x512, each in a fresh process by `python -m experiments.benchmark`:

# %%
def benchmark(*args):
    """One experiments.benchmark invocation; its JSON result."""
    result = subprocess.run([sys.executable, "-m", "experiments.benchmark", *args,
                             "--platform", "cpu", "--json"], capture_output=True, text=True,
                            cwd=ROOT if (ROOT / "experiments").is_dir() else None)
    if result.returncode != 0:
        raise RuntimeError(f"experiments.benchmark {' '.join(args)}: "
                           f"{(result.stderr or result.stdout).strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


bench_runs = pick(
    [("infer", ["--mode", "infer", "--image-size", "32", "--batch-size", "1",
                "--base-features", "4", "--steps", "2", "--warmup", "0"])],
    [("train", ["--mode", "train", "--image-size", "128", "--batch-size", "4",
                "--steps", "3", "--warmup", "1"]),
     ("infer", ["--mode", "infer", "--image-size", "512", "--batch-size", "1",
                "--steps", "3", "--warmup", "1"])])
for i, (mode, args) in enumerate(bench_runs):
    r = benchmark(*args)
    m = r["machine"]
    if i == 0:
        print(f"CPU: {m['cpu']}, {m['cores']} cores ({', '.join(m['isa']) or 'no AVX2'}), "
              f"load average {m['load_avg']:.1f} at the start")
    h, w = r["image_size"]
    print(f"{mode} {h}x{w}, batch {r['batch_size']}, width {r['base_features']}: "
          f"{r['img_per_s']:.3f} images/s ({r['step_s']:.2f} s per step), "
          f"{r['gflops_per_s']:.0f} GFLOP/s, compile {r['compile_s']:.1f} s"
          f"{' (loaded from the compile cache)' if r['cache'].get('cache_hits') else ''}, "
          f"peak memory {r['peak_rss_mb'] / 1000:.2f} GB")
rate = BENCH_DOC.get("train 512x512, batch 4")
if rate:
    trained = int(0.8 * 5088)  # the guide's random_split(..., [0.8, 0.2])
    hours = 6 * trained / float(rate) / 3600
    print(f"the PyTorch guide's GPU recipe (6 epochs of the {trained:,} training images of "
          f"Carvana's 5,088 at 512x512) at the 512x512 training speed of "
          f"docs/benchmarks.md (batch 4, {rate} images/s): {hours:.0f} hours of CPU")

# %% [markdown]
# The last line puts the PyTorch guide's GPU recipe into CPU time, which is why the
# runs in this guide shrink the images and the width. A busy machine slows every
# figure above: the load average shows how shared it was. GPU figures, from an H200,
# are in [docs/benchmarks.md](../benchmarks.md).

# %% [markdown]
# ## Limitations and weaknesses of U-Net
#
# ### 1. Memory and compute grow with the image
#
# Both grow with the number of pixels. Counted from shapes for the guide's U-Net, at
# the sizes a Carvana user meets (the photos are 1918x1280; 1920x1280 is the nearest
# size the network accepts, see 4.):

# %%
print(f"{'input':>10} {'GFLOP/forward':>14} {'feature maps/image':>19}")
for h, w in [(128, 128), (256, 256), (512, 512), (1024, 1024), (1280, 1920)]:
    shape = (1, h, w, 3)
    gflop = forward_gflops(guide_unet, arch_vars, shape)
    print(f"{h:>4}x{w:<5} {gflop:>14,.0f} {feature_map_bytes(guide_unet, shape) / 2**30:>15.2f} GiB")

# %% [markdown]
# ### 2. Overfitting on small datasets
#
# A model that fits its training images better than new ones shows it as a gap
# between training and validation loss. The runs here train without augmentation and
# validate on other cars (the split is by car, so no view of a validation car is ever
# trained on). The last epoch of the two runs so far; `augment=True` and more cars are
# the usual remedies when the gap grows:

# %%
for name, run in [("main", main_run), ("without skips", noskip_run)]:
    last = run["history"][-1]
    print(f"{name:14} epoch {last['epoch']}: training loss {last['train_loss']:.4f}, "
          f"validation loss {last['val_loss']:.4f} (gap {last['val_loss'] - last['train_loss']:+.4f})")

# %% [markdown]
# ### 3. Multi-scale context
#
# Each output pixel sees a fixed window of the input, its receptive field (computed and
# checked in the architecture chapter). Whatever lies outside it cannot influence the
# pixel, however large the image:

# %%
for h, w in [(64, 96), (512, 512), (1280, 1918)]:
    print(f"{h}x{w}: an output pixel sees at most {max(RF_OUTPUT)}x{max(RF_OUTPUT)} px, "
          f"{min(1.0, max(RF_OUTPUT) / w):.0%} of the width and "
          f"{min(1.0, max(RF_OUTPUT) / h):.0%} of the height")

# %% [markdown]
# ### 4. Sensitivity to input size
#
# Four 2x2 poolings halve the map four times and the decoder doubles it back; a side
# that 16 does not divide would leave an upsampled map one pixel short of its skip,
# and the concatenation fails (or, with padding or cropping, shifts the map, the
# artifacts the PyTorch guide warns about). unet-jax refuses such sizes with the
# nearest ones that work, rather than padding silently:

# %%
for h, w in [(1280, 1918), (512, 512), (160, 240)]:
    try:
        models.check_input_size(h, w, depth=4)
        print(f"{h}x{w}: accepted")
    except ValueError as e:
        print(f"{h}x{w}: {e}")
print("nearest valid widths for 1918 at depth 4 and 5:", models.valid_sizes(1918, 4),
      models.valid_sizes(1918, 5))

# %% [markdown]
# ### 5. Beyond biomedical images
#
# The runs in this guide are cars, not cells: the network needs no change for them,
# only the data. What does not transfer is the data: a model trained on the sample set's
# drawings has never seen a photograph, and should be trained on Kaggle's photos
# (`data_dir`) before it is used on them. What a trained model has learnt does carry
# part of the way: `init_from` starts a new run from another run's weights
# (fine-tuning), so a few dozen images of your own start from the edges and shapes a
# Carvana model already knows rather than from random numbers. Only the same network
# takes them; another number of classes gets a new 1x1 head, and a grayscale run can
# start from an RGB one, its first layer's kernels summed over colour
# ([unet_jax/finetune.py](../../unet_jax/finetune.py) explains both).
#
# ### 6. Class imbalance: small objects
#
# A car fills a good part of its image, so plain BCE learns it. When the foreground is
# a few percent of the pixels, predicting "background" everywhere already gives a low
# BCE, and the gradient that would find the objects is a small share of the total. A
# small dataset shows it: 64x64 images of small reddish discs (radius 1.5-3.5 px, 1 to
# 3 per image) on a textured background with larger faint blobs as distractors, in
# the `images/` + `masks/` layout any user's data can have.

# %%
from PIL import Image


def small_objects_dataset(root, n=200, size=64, seed=0):
    """``n`` images of small discs (the objects) and larger faint blobs (distractors)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    red = np.array([1.0, -0.5, -0.5])
    for i in range(n):
        low = rng.uniform(0.2, 0.8, (4, 4, 3))  # a smooth background: 4x4 noise, enlarged
        image = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize(
            (size, size), Image.BICUBIC), np.float32) / 255
        image += rng.normal(0, 0.05, image.shape)
        mask = np.zeros((size, size), bool)
        for _ in range(rng.integers(1, 4)):
            r, (cy, cx) = rng.uniform(1.5, 3.5), rng.uniform(4, size - 4, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            mask |= disc
            image[disc] += rng.uniform(0.15, 0.3) * red
        for _ in range(rng.integers(1, 4)):
            r, (cy, cx) = rng.uniform(5, 9), rng.uniform(0, size, 2)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += rng.uniform(0.1, 0.2) * red
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(
            root / "images" / f"{i:04d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{i:04d}.png")
    return root


SMALL_DIR = small_objects_dataset(RUNS / "small-objects", n=pick(48, 200), size=pick(32, 64))
small_pairs = data_pipeline.find_pairs(SMALL_DIR)
fraction = np.mean([np.asarray(Image.open(p.mask)) > 0 for p in small_pairs])
constant_bce = -(fraction * np.log(fraction) + (1 - fraction) * np.log(1 - fraction))
print(f"{len(small_pairs)} images, foreground {fraction:.1%} of the pixels; predicting "
      f"a probability of {fraction:.3f} everywhere scores a BCE of {constant_bce:.3f} "
      "(against 0.693 for a coin toss) and finds no object at all (Dice 0)")

# %% [markdown]
# Four losses from `unet_jax.losses`, the same model and settings otherwise:
# `bce` (the guide's), `bce_dice` (BCE plus soft Dice, a ratio over the object's and
# the predicted pixels that ignores the correctly rejected background, so missing half
# of a small object costs as much as missing half of a large one), `focal` (BCE with each
# pixel weighted by how wrong it still is, so the many easy background pixels stop
# dominating) and `tversky` (a soft Dice that charges a missed object pixel more than
# a false alarm). `Config(loss=...)`, flag `--loss`:

# %%
SMALL = pick(
    dataclasses.replace(TINY, data_dir=str(SMALL_DIR), image_size=(32, 32),
                        split="random", epochs=1),
    dataclasses.replace(configs.default(), data_dir=str(SMALL_DIR), image_size=(64, 64),
                        split="random", epochs=6))
print(f"focal loss gamma {SMALL.focal_gamma}; Tversky alpha {SMALL.tversky_alpha} "
      f"(false positives), beta {1 - SMALL.tversky_alpha:.1f} (false negatives)")
loss_runs = {}
for loss in ("bce", "bce_dice", "focal", "tversky"):
    print(f"--- loss {loss}")
    loss_runs[loss] = train(f"small-{loss}", dataclasses.replace(SMALL, loss=loss))

# %%
small_val = data_pipeline.read_split(RUNS / "small-bce" / "split.json")[1]
small_batch = next(data_pipeline.InputPipeline(
    small_val, image_size=SMALL.image_size, batch_size=8, train=False).epoch(0))
small_true = small_batch["mask"][..., 0] > 0.5
fig, axes = plt.subplots(2, 5, figsize=(11, 4.8))
for row, i in enumerate([0, 1]):
    axes[row, 0].imshow(with_outline(small_batch["image"][i], small_true[i], (0.1, 1, 0.1)))
    axes[row, 0].set_title("image, true outline", fontsize=8)
print(f"{'loss':9} {'best val Dice':>13} {'Dice per epoch'}")
for col, (loss, run) in enumerate(loss_runs.items(), start=1):
    params, _, apply = load_run(run["workdir"])
    pred = np.asarray(apply(params, small_batch["image"]))[..., 0] > 0
    for row, i in enumerate([0, 1]):
        axes[row, col].imshow(error_map(small_batch["image"][i], pred[i], small_true[i]))
        axes[row, col].set_title(f"{loss}: Dice {dice(pred[i], small_true[i]):.2f}", fontsize=8)
    per_epoch = " ".join(f"{r['val_dice']:.2f}" for r in run["history"])
    print(f"{loss:9} {run['best']['val_dice']:>13.4f} {per_epoch}")
for ax in axes.ravel():
    ax.axis("off")
save(fig, "losses_small_objects")
blind = [loss for loss, run in loss_runs.items() if run["best"]["val_dice"] < 0.05]
print(f"after {SMALL.epochs} epoch(s), {len(blind)} of {len(loss_runs)} losses still find no "
      f"disc (Dice < 0.05){': ' + ', '.join(blind) if blind else ''}")

# %% [markdown]
# Every run starts where the constant guess is: all background, Dice 0. What differs
# is how hard each loss pushes towards the discs from there. BCE averages over every
# pixel, so the discs' few percent give a few percent of the gradient. Focal loss
# fades out the pixels the model gets right, but at the constant guess the discs are
# not the only pixels it gets wrong, and the background's many half-sure pixels
# still outweigh them. `bce_dice` adds soft Dice, a ratio over the disc pixels, to the
# BCE: a strong push, but its own gradient shrinks with the probabilities it
# multiplies, which start near 0. Tversky weighs a missed disc pixel 0.7 against a
# false alarm's 0.3, which tips the balance from the first steps. So in 6 short epochs
# only Tversky got going. That says how fast each loss leaves the trivial answer on
# rare objects, not where each ends: the `bce_dice` and focal runs, continued to four
# times as many epochs (`resume=True`, as `--resume` does):

# %%
LONGER = SMALL.epochs * 4
for loss in ("bce_dice", "focal"):
    longer = unet_jax.train_and_evaluate(  # log=None: the summary below, not 24 lines
        dataclasses.replace(SMALL, loss=loss, epochs=LONGER), RUNS / f"small-{loss}",
        resume=True, log=None)["history"]
    found = next((r["epoch"] for r in longer if r["val_dice"] >= 0.05), None)
    print(f"{loss}: first finds discs (Dice >= 0.05) "
          f"{f'at epoch {found}' if found else 'in none of them'}; best validation Dice "
          f"{max(r['val_dice'] for r in longer):.4f} in {LONGER} epochs")

# %% [markdown]
# For a dataset of small objects, try `--loss tversky` or `bce_dice` first, and give
# any loss enough epochs before judging it.

# %% [markdown]
# ## Future directions, tried
#
# ### 1. Attention gates
#
# An attention gate (Oktay et al., 2018) weighs each pixel of a skip by a factor in
# (0, 1) computed from the skip and the decoder's coarser map, so that background
# features can be suppressed before they reach the decoder. `Config(attention=True)`
# (flag `--attention`) puts one on every skip. Same data and settings as the main run:

# %%
show(models.AttentionGate.__call__)

# %%
ATTENTION = dataclasses.replace(MAIN, attention=True)
attention_run = train("attention", ATTENTION)
att_params, att_config, _ = load_run(attention_run["workdir"])
_, att_state = jax.jit(lambda p, x: unet_jax.create_model(att_config).apply(
    {"params": p}, x, mutable=["intermediates"]))(att_params, VAL_IMAGES[:4])
alphas = [att_state["intermediates"][f"up_{i}"]["attention"]["alpha"][0]
          for i in range(1, att_config.depth + 1)]
fig, axes = plt.subplots(2, len(alphas) + 1, figsize=(2.4 * (len(alphas) + 1), 3.6))
for row in range(2):
    axes[row, 0].imshow(VAL_IMAGES[row])
    axes[row, 0].set_title("image", fontsize=8)
    for col, alpha in enumerate(alphas, start=1):
        axes[row, col].imshow(np.asarray(alpha[row, ..., 0]), cmap="gray", vmin=0, vmax=1)
        axes[row, col].set_title(f"up_{col} gate ({alpha.shape[1]}x{alpha.shape[2]})",
                                 fontsize=8)
for ax in axes.ravel():
    ax.axis("off")
save(fig, "attention_gates")
att_masks = VAL_MASKS[:4]
for level, alpha in enumerate(alphas, start=1):
    a = np.asarray(alpha[..., 0])  # (4, h, w), each gate at its level's resolution
    h, w = a.shape[1:]
    car = att_masks.reshape(4, h, att_masks.shape[1] // h, w, att_masks.shape[2] // w
                            ).mean((2, 4)) > 0.5
    print(f"up_{level} gate: mean {a[car].mean():.2f} on the car, {a[~car].mean():.2f} on "
          f"the background")

# %% [markdown]
# Compare the figure with the promise above: a gate is free to learn whatever lowers
# the loss, and "pass the car, drop the background" is only one such rule. The means
# printed above say what each gate of this run learnt; where a gate is lower on the car
# than around it, that level's skip passes the background and the car's outline, and
# the car's interior comes from the decoder's upsampled path, which already knows where
# the car is. On this dataset the gates bought nothing: compare the attention run's
# best Dice with the main run's in the table below, against the spread of the seeds
# (about 0.006, "Learning-rate schedules" above). Oktay et al. measured their gain on
# pancreas CT, a small organ in a large, cluttered scan: the case where knowing where
# to look matters, and the one to try them on.
#
# ### 2. A lightweight U-Net
#
# Depthwise-separable convolutions (MobileNet) split each 3x3 convolution into a
# per-channel 3x3 filter and a 1x1 channel mix, with about a ninth of the weights and
# multiply-adds. `Config(separable=True)` (flag `--separable`) uses them in every
# `DoubleConv`:

# %%
show(models.SeparableConv)

# %%
SEPARABLE = dataclasses.replace(MAIN, separable=True)
separable_run = train("separable", SEPARABLE)

# %% [markdown]
# All four variants side by side. First at the guide's full width: parameters, XLA's
# FLOP count of a 512x512 forward pass, and the time of a forward pass (inference, the
# use a lightweight model is for) measured here at 256x256, the variants interleaved
# call by call so that a busy machine slows them alike. Then the runs of this guide at
# the narrow width: parameters, training speed (the median over the epochs after the
# first, from each run's `metrics.csv`) and the best validation Dice.

# %%
variants = {"U-Net (main run)": MAIN, "no skips": NOSKIP, "attention gates": ATTENTION,
            "separable": SEPARABLE}
runs = {"U-Net (main run)": main_run, "no skips": noskip_run,
        "attention gates": attention_run, "separable": separable_run}
width, side = pick(4, 64), pick(32, 256)
timing_x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, side, side, 3)), jnp.float32)
forward = {}
for name, config in variants.items():
    model = models.UNet(base_features=width, depth=config.depth,
                        skip_connections=config.skip_connections, attention=config.attention,
                        separable=config.separable)
    params = random_params(model, timing_x)
    apply = jax.jit(model.apply)
    jax.block_until_ready(apply({"params": params}, timing_x))  # compile
    _, variables = level_table(model, (1, 512, 512, 3))
    forward[name] = dict(apply=apply, params=params, times=[], count=n_params(params),
                         gflop=forward_gflops(model, variables, (1, 512, 512, 3)))
for _ in range(3):
    for entry in forward.values():
        start = time.perf_counter()
        jax.block_until_ready(entry["apply"]({"params": entry["params"]}, timing_x))
        entry["times"].append(time.perf_counter() - start)
print(f"{f'width {width}':18} {'parameters':>12} {'GFLOP at 512x512':>17} "
      f"{f'forward {side}x{side}':>16}")
for name, entry in forward.items():
    print(f"{name:18} {entry['count']:>12,} {entry['gflop']:>17.0f} "
          f"{np.median(entry['times']) * 1000:>13.0f} ms")
print(f"\n{f'width {MAIN.base_features} runs':18} {'parameters':>12} {'training img/s':>17} "
      f"{'best val Dice':>16}")
for name, run in runs.items():
    speed = np.median([r["train_img_per_s"] for r in run["history"][1:]] or
                      [run["history"][0]["train_img_per_s"]])
    params = checkpoints.restore_params(run["workdir"])[0]
    print(f"{name:18} {n_params(params):>12,} {speed:>17.0f} {run['best']['val_dice']:>16.4f}")
plain, light = forward["U-Net (main run)"], forward["separable"]
print(f"\nseparable against the U-Net at width {width}: {light['count'] / plain['count']:.0%} of "
      f"the parameters, {light['gflop'] / plain['gflop']:.0%} of the FLOPs, "
      f"{np.median(light['times']) / np.median(plain['times']):.2f}x the time of a forward "
      "pass on this machine")

# %% [markdown]
# FLOPs are not time. A full 3x3 convolution does 9 x (input channels) multiply-adds
# for every value it writes; a depthwise one does 9, so memory traffic rather than
# arithmetic bounds it, and how fast it runs depends on the kernels a backend has for
# it. Measure on the hardware the model is meant for before calling a variant light:
# the table above does that for this machine.

# %% [markdown]
# ### 3.-8. Further directions
#
# Multi-scale feature fusion (pyramid pooling, dilated convolutions) would widen the
# receptive field computed above without more pooling; the loss comparison above is
# the imbalance remedy in practice; semi-supervised learning, domain adaptation, 3D
# and video extensions, and transformer blocks in the bottleneck are open for
# experiments of your own. Each needs a `UNet` field, a `Config` field and a run, like
# the three options tried here: the guide's own code makes them easy to compare.
