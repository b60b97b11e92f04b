"""How a run predicts, as one object, and the jitted programs that do it on the device.

A run predicts a mask in one of three ways (``PredictionMode.how``):

* ``resize``: the image squashed to the training size, as the guide does; the default
  for runs trained on whole resized images.
* ``whole``: the whole image at the training scale in one pass, mirror-padded at the
  bottom and right to a multiple of ``2**depth``; the default for runs trained on
  crops. A fully convolutional network sees the most context this way (a
  crop-trained run scored Dice 0.9609 whole against 0.9597 tiled on the sample set's
  validation images: README, "Full resolution").
* ``tile``: overlap-tile prediction at the training scale (``tiling``), for images
  whose whole pass would not fit in memory; the default beyond ``memory_budget``.

``PredictionMode.from_config`` builds the mode from a run's ``Config``, so validation
during training, predict, evaluate, submit and the benchmark decide alike. Overrides
of ``overlap`` and ``tta`` pass through ``Config`` itself, which checks them.

``predict_batch`` is one jitted program per (image shape, mode, output size): uint8
images in, and the scaling to [0, 1], the padding, the tiles, the flipped views, the
model, the blending, the resize back to the file's own size and the threshold (or
arg-max) all on the device, uint8 masks out. The host only decodes and encodes files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp

from unet_jax import platform, tiling

HOWS = ("resize", "whole", "tile")


def pass_bytes(size: tuple[int, int], base_features: int) -> int:
    """Estimated device memory of one whole-image pass at ``size`` (height, width).

    A U-Net holds most at its first level: each deeper level has twice the channels
    on a quarter of the pixels. XLA's CPU compiler reports exactly four float32 planes
    of the first level's width for a forward pass (``memory_analysis()``, any size,
    width and depth); this allows twice that, for GPU convolution workspaces and the
    views of test-time flips.
    """
    return 4 * 8 * base_features * size[0] * size[1]


def default_memory_budget() -> int:
    """Bytes a whole-image pass may take: half of the accelerator's memory, or on a
    CPU, where the host holds the images as well, a quarter of the memory this
    process may use (``platform.memory_limit``: a container's limit, where lower)."""
    # This process's own device: another process's cannot report its memory.
    try:
        stats = jax.local_devices()[0].memory_stats()
    except (AttributeError, jax.errors.JaxRuntimeError):  # a backend without the figures
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) // 2
    memory = platform.memory_limit()
    return memory // 4 if memory else 4 << 30


def check_threshold(threshold, num_classes: int, flag: str = "--threshold") -> None:
    """ConfigError, naming ``flag``, unless ``threshold`` is a probability in (0, 1)
    that a run of ``num_classes`` can use: one class, or 0.5 (several take the arg-max)."""
    from unet_jax.config import ConfigError

    number = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
    if not (number and 0 < threshold < 1):  # nan too
        shown = f"{threshold:g}" if number else repr(threshold)
        raise ConfigError(f"{flag} {shown}: give a probability in (0, 1), e.g. 0.5")
    if num_classes > 1 and threshold != 0.5:
        raise ConfigError(f"{flag} {threshold:g}: a run of {num_classes} classes takes the "
                          f"most probable class at each pixel, with no threshold; drop {flag}")


def how_of_tile_flag(config, tile: bool | None) -> str | None:
    """The ``how`` the tools' ``--tile`` (True) and ``--no-tile`` (False) ask for: tiles,
    or without tiles what the run's training allows (whole for a crop-trained run,
    resized otherwise); None (no flag) leaves the run's default."""
    if tile not in (None, True, False):  # "no" would be true, and tile
        raise ValueError(f"tile {tile!r}: give True (tiles), False (no tiles) or None "
                         "(the run's own way)")
    if tile is None:
        return None
    return "tile" if tile else ("whole" if config.crop is not None else "resize")


@dataclasses.dataclass(frozen=True)
class PredictionMode:
    """How a run predicts its masks.

    ``how``: 'resize', 'whole' or 'tile'; ``image_size``: what 'resize' squashes to;
    ``scale``: what 'whole' and 'tile' resize by first (training's ``--scale``);
    ``tile`` and ``overlap``: the tiles; ``tta``: test-time flips; ``depth``: the
    U-Net's, which sizes must divide by ``2**depth``; ``base_features``: its width,
    for the memory estimate. With ``auto`` (the default for crop-trained runs), a
    'whole' image whose pass would take more than ``memory_budget`` bytes is tiled.
    ``threshold``: the probability over which a one-class run's pixel is foreground
    (0.5, where its logit is over 0; a threshold chosen on validation images, say from
    predict's ``--probabilities``, can trade false positives for misses).
    Frozen and hashable, so that a jitted program can take it as a static argument.
    """

    how: str
    image_size: tuple[int, int]
    scale: float
    tile: tuple[int, int]
    overlap: float
    tta: str
    depth: int
    base_features: int
    memory_budget: int
    auto: bool = False
    # Not part of the compiled program (predict_batch takes it as a traced value): modes
    # that differ in it alone compare equal and share their programs.
    threshold: float = dataclasses.field(default=0.5, compare=False)

    @classmethod
    def from_config(cls, config, how: str | None = None, overlap: float | None = None,
                    tta: str | None = None, memory_budget: int | None = None,
                    threshold: float | None = None):
        """The mode a run of ``config`` predicts with, unless ``how``, ``overlap``,
        ``tta`` or ``threshold`` say otherwise. ``Config`` checks the overrides of its
        fields (a bad one raises its ``ConfigError``, naming the flag); ``threshold``
        must lie in (0, 1), for a one-class run. ``memory_budget`` defaults to
        ``default_memory_budget()``."""
        if how is not None and how not in HOWS:
            raise ValueError(f"how {how!r}: choose one of {', '.join(HOWS)}")
        if threshold is not None:
            check_threshold(threshold, config.num_classes)
        if memory_budget is not None and (
                isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral)
                or memory_budget < 1):
            raise ValueError(f"memory_budget {memory_budget!r}: give bytes as a whole number "
                             "above 0 (e.g. 2 << 30 for 2 GiB), or None for the default")
        given = {k: v for k, v in (("overlap", overlap), ("tta", tta)) if v is not None}
        if given:
            config = dataclasses.replace(config, **given)  # runs Config's own checks
        auto = how is None and config.crop is not None
        if how is None:
            how = "resize" if config.crop is None else "whole"
        return cls(how=how, image_size=tuple(config.image_size), scale=config.scale,
                   tile=tuple(config.tile), overlap=config.overlap, tta=config.tta,
                   depth=config.depth, base_features=config.base_features,
                   memory_budget=int(memory_budget or default_memory_budget()), auto=auto,
                   threshold=0.5 if threshold is None else float(threshold))

    @property
    def multiple(self) -> int:
        return 2 ** self.depth

    def padded(self, size: tuple[int, int]) -> tuple[int, int]:
        """``size`` rounded up to a multiple of ``2**depth``: what a whole pass runs on."""
        return tuple(-(-s // self.multiple) * self.multiple for s in size)

    def how_for(self, size: tuple[int, int]) -> str:
        """How an image of ``size`` (at the model's scale) is predicted: ``how``, except
        that an automatic 'whole' beyond the memory budget becomes 'tile'."""
        if (self.how == "whole" and self.auto
                and pass_bytes(self.padded(size), self.base_features) > self.memory_budget):
            return "tile"
        return self.how

    def resolved(self, size: tuple[int, int]) -> "PredictionMode":
        """This mode for an image of ``size``, with ``how_for`` decided: what the jitted
        program is specialised on."""
        return dataclasses.replace(self, how=self.how_for(size), auto=False)

    def images_per_call(self, size: tuple[int, int], batch_size: int) -> int:
        """How many images of ``size`` (at the model's scale) one program call takes:
        up to ``batch_size``, fewer where their whole passes or (tiled) their padded
        copies and sums would not fit the memory budget together."""
        how = self.how_for(size)
        if how == "resize":
            return batch_size
        if how == "whole":
            each = pass_bytes(self.padded(size), self.base_features)
        else:  # the padded image, the weighted sums and the result, float32
            each = 4 * 8 * (size[0] + self.tile[0]) * (size[1] + self.tile[1])
        return max(1, min(batch_size, self.memory_budget // max(each, 1)))

    def describe(self) -> str:
        """How masks are predicted, in words, for the tools' summary lines."""
        tiles = (f"tiles of {self.tile[0]}x{self.tile[1]} at scale {self.scale}, "
                 f"overlap {self.overlap}")
        if self.how == "resize":
            how = f"resized to {self.image_size[0]}x{self.image_size[1]}"
        elif self.how == "tile":
            how = tiles
        else:
            how = f"whole at scale {self.scale}"
            if self.auto:
                how += f" ({tiles} where a pass needs over {self.memory_budget / 2**30:.1f} GiB)"
        how += f", test-time {self.tta}" if self.tta != "none" else ""
        return how + (f", threshold {self.threshold:g}" if self.threshold != 0.5 else "")

    @property
    def logit_threshold(self) -> float:
        """The logit over which a one-class run's pixel is foreground: log(t / (1 - t)),
        0 for the usual 0.5."""
        return math.log(self.threshold / (1 - self.threshold))


def _logits(params, images, count, apply_fn, mode: PredictionMode, tiles_per_call: int):
    """Logits (N, h, w, K) at the model's scale of images (N, h, w, C), traced."""
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    model = functools.partial(apply_fn, {"params": params})
    views = lambda x: tiling.flip_average(model, x, mode.tta)  # noqa: E731
    if mode.how == "tile":
        return tiling.tiled_logits(views, images, mode.tile, mode.overlap, tiles_per_call,
                                   count)
    if mode.how == "whole":
        return tiling.whole_logits(views, images, mode.multiple)
    return views(images)


def to_mask(logits, logit_threshold: float = 0.0):
    """uint8 masks (..., H, W) of logits (..., H, W, K): 1 where the one logit is over
    ``logit_threshold`` (0: probability over 0.5), else the arg-max class id."""
    if logits.shape[-1] == 1:
        return (logits[..., 0] > logit_threshold).astype(jnp.uint8)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("apply_fn", "mode", "tiles_per_call",
                                             "out_size", "masks"))
def predict_batch(params, images, count, apply_fn, mode: PredictionMode,
                  tiles_per_call: int = 8, out_size: tuple[int, int] | None = None,
                  masks: bool = True, logit_threshold=0.0):
    """Masks (or logits) of a batch of images of one size, in one program.

    ``images``: (N, h, w, C) uint8 (or float32 in [0, 1]) at the model's scale, the
    first ``count`` of them real (the rest pad the batch to a fixed shape, so a
    folder compiles once per size); ``mode``: ``PredictionMode.resolved`` for that
    size. The logits are resized bilinearly to ``out_size`` (the files' own size;
    None keeps the model's scale) before the threshold, never the mask after it, for
    smooth edges. Returns uint8 masks (N, H, W) with ``masks`` (a one-class run's
    over ``logit_threshold``, the mode's ``logit_threshold``: a traced value, so that
    another threshold compiles nothing), else float32 logits (N, H, W, K).
    """
    logits = _logits(params, images, count, apply_fn, mode, tiles_per_call)
    logits = logits.astype(jnp.float32)
    if out_size is not None and tuple(logits.shape[1:3]) != tuple(out_size):
        # antialiased when shrinking, as Pillow's bilinear filter (to within 1e-4)
        logits = jax.image.resize(logits, (logits.shape[0], *out_size, logits.shape[-1]),
                                  "linear", antialias=True)
    return to_mask(logits, logit_threshold) if masks else logits
