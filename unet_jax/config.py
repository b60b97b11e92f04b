"""One place for a run's settings: the model, the data and the optimisation.

``Config`` is plain data, checked when it is made: a bad value raises ``ConfigError``
with one line that names the setting by its command-line flag and says what to give,
for a library user exactly as for ``python -m experiments.train``. Values are
normalised on the way in (``image_size=64`` is ``(64, 64)``, ``data_dir`` an absolute
path), so two Configs that mean the same run compare equal.

The trainer writes the Config as ``config.json`` next to the checkpoints, so that
evaluation and prediction rebuild the exact model without repeating flags, and a run
can be reproduced from its directory alone. The command-line flags are made from the
fields below (``add_arguments``): each field's ``help`` is its ``--help`` line.
Named presets (the guide's GPU and CPU runs, the quick default) are in ``configs.py``.
The defaults below are the guide's full-width model (``configs.full()``, 31,031,745
parameters); the commands' quick default, width 8, is ``configs.default()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import jax.numpy as jnp

from unet_jax.losses import FOCAL_GAMMA, LOSSES, TVERSKY_ALPHA
from unet_jax.models import REMAT
from unet_jax.optim import SCHEDULES
from unet_jax.tiling import TTA

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MAX_OVERLAP = 0.75  # tiled prediction: at most 16 model calls per pixel
KERNELS = ("auto", "stock")
CACHES = ("memory", "none", "disk")  # --cache's words; anything else is a file prefix
PLATEAU_PATIENCE = 3
PLATEAU_FACTOR = 0.5


# The settings a --resume may change: how long it runs, how data is loaded, and where
# data that moved is now (the validation folder only where the run has one).
RESUME_MAY_CHANGE = ("epochs", "data_dir", "val_data_dir", "cache")


# What config.json records beside the settings (trainer.write_run_files): the devices,
# and the epoch of the --init-from run whose weights the run started from.
RECORDED = frozenset({"device_count", "process_count", "backend", "init_from_epoch"})


class ConfigError(ValueError):
    """A setting the user can fix; the message is one line naming its flag."""


def _field(default, help: str, **flag: Any):
    """A Config field with its ``--help`` text and argparse options (``flag``)."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


@dataclasses.dataclass
class Config:
    """A run's settings: each field is a command-line flag of ``experiments.train``
    (``learning_rate`` is ``--lr``; ``help(Config)`` and ``--help`` give each one's
    meaning). Checked and normalised as it is made (a bad value is a one-line
    ``ConfigError`` naming the flag); ``Config.load(run_dir / "config.json")`` reads a
    run's own, ``dataclasses.replace`` changes one and checks it again.
    ``Config()`` is the guide's U-Net (31,031,745 parameters);
    ``Config(base_features=8, image_size=128)`` a narrow one for a laptop's CPU.
    """

    # Model (the guide's U-Net by default: 31,031,745 parameters for 3 in / 1 out).
    in_channels: int = _field(3, "input channels: 3 (RGB) or 1 (grayscale)", choices=(1, 3))
    num_classes: int = _field(1, "output classes: 1 for binary masks (sigmoid), C > 1 for "
                              "masks of class ids 0..C-1 (softmax)")
    base_features: int = _field(64, "U-Net width: channels of the first level (the guide's 64)")
    depth: int = _field(4, "U-Net levels (the guide's 4); sizes must be divisible by 2**depth")
    dtype: str = _field("float32", "compute dtype; bfloat16 pays off on GPUs, not CPUs",
                        choices=tuple(DTYPES))
    kernels: str = _field("auto", "'auto': the faster CPU backward kernels when JAX runs on "
                          "a CPU, stock Flax ops elsewhere; 'stock': stock ops everywhere",
                          choices=KERNELS)
    skip_connections: bool = _field(True, "the U-Net's skip connections; --no-skip-connections "
                                    "drops them (the guide's 'why skips matter' experiment)")
    attention: bool = _field(False, "attention gates on the skip connections (Attention "
                             "U-Net, Oktay et al. 2018)")
    separable: bool = _field(False, "depthwise-separable 3x3 convolutions: the lightweight "
                             "U-Net, about a fifth of the parameters")
    remat: str = _field("none", "trade compute for training memory: 'convs' keeps only "
                        "the convolution outputs for the backward pass and recomputes the "
                        "rest, 'full' recomputes each block from its input; same model, "
                        "same checkpoints", choices=REMAT)

    # Data.
    data_dir: Optional[str] = _field(None, "Kaggle Carvana layout (train/, train_masks/), "
                                     "images/ + masks/ folders, or x.png beside x_mask.png "
                                     "(per patient in sub-folders) (default: the built-in "
                                     "synthetic sample set)")
    val_data_dir: Optional[str] = _field(
        None, "a validation set of its own, in any layout --data-dir takes (a dataset's "
        "official validation images, say): every image of --data-dir then trains, and no "
        "split is drawn (--split, --val-fraction unused)", metavar="DIR")
    image_size: tuple[int, int] = _field((64, 96), "size (H W, or one number for a square) "
                                         "whole images are resized to (without --crop)",
                                         nargs="+", metavar=("H", "W"))
    crop: Optional[tuple[int, int]] = _field(
        None, "train on random crops of H W (or one number) taken from each image at its "
        "own resolution times --scale, never squashed; prediction then takes whole images "
        "at that scale in one pass (tiles where a pass would not fit in memory)",
        nargs="+", metavar=("H", "W"))
    scale: float = _field(1.0, "with --crop: resize every image by this factor first "
                          "(0.5 makes a 1918x1280 photo 959x640)")
    crops_per_image: int = _field(1, "with --crop: random crops drawn from each image per "
                                  "epoch, so that a few images give enough steps")
    split: str = _field("car", "validation split: by car (no car on both sides; in your "
                        "own folders by --group-by's group, else per image) or per image, "
                        "as the guide", choices=("car", "random"))
    group_by: str = _field("", "a regular expression that reads each image's group from "
                           "its file name (its first (...) group), for your own folders: "
                           "'^(patient\\d+)_' keeps all of patient12_*.png on one side of "
                           "the split; groups take the cars' place in --split car and "
                           "--subset", metavar="REGEX")
    val_fraction: float = _field(0.2, "share of the cars (the --group-by groups; the images "
                                 "with --split random) for validation")
    subset: float = _field(1.0, "fraction of the cars to use, e.g. 0.1 as the guide's CPU run")
    augment: str = _field("", "augmentations by name, comma-separated: flip, shift "
                          "(with scale), color, elastic, rotate; --augment alone is "
                          "flip,shift,color; 'none' for none", nargs="?",
                          const="flip,shift,color", metavar="OPS")
    max_value: float = _field(0.0, "the value of 16-bit and float images shown as white: "
                              "4095 for a 12-bit camera or scanner; 0 scales by the "
                              "file's type (65535 for 16-bit; floats as [0, 1] or 0..255)",
                              metavar="V")
    cache: str = _field("memory", "decoded images: 'memory', 'none', 'disk' (memory-mapped "
                        "files in the user's cache folder, for data larger than memory, "
                        "reused by later runs), or a file prefix for such files elsewhere "
                        "(a folder: files in it)")
    skip_bad: bool = _field(False, "skip unreadable or unmatched image/mask pairs (listed "
                            "as a warning) instead of stopping")
    ignore_index: Optional[int] = _field(
        None, "a mask value (2..255, no class id) whose pixels take no part in the loss "
        "or the scores: Pascal VOC's and Cityscapes' 255 on borders and unlabelled areas",
        metavar="V")

    # Optimisation (the guide: AdamW, lr 3e-4, BCE).
    loss: str = _field("bce", "bce (the guide's), dice, bce_dice, focal or tversky (the "
                       "last two for small objects on a large background)", choices=LOSSES)
    focal_gamma: float = _field(FOCAL_GAMMA, "--loss focal: gamma, how strongly pixels the "
                                "model already gets right are faded out (0: BCE)")
    tversky_alpha: float = _field(TVERSKY_ALPHA, "--loss tversky: weight of false positives; "
                                  "false negatives weigh 1 - alpha (0.5: soft Dice)")
    learning_rate: float = _field(3e-4, "AdamW learning rate", flag="--lr")
    weight_decay: float = _field(1e-2, "AdamW weight decay (torch's default, as the guide)")
    schedule: str = _field("constant", "learning-rate schedule after the warm-up: constant "
                           "(the guide's), cosine (to zero at the last step, as big_vision), "
                           "poly (nnU-Net's lr * (1 - t)**0.9) or plateau (times "
                           "--plateau-factor whenever validation Dice goes "
                           "--plateau-patience epochs without a new best, as "
                           "milesial/Pytorch-UNet)", choices=SCHEDULES)
    warmup_epochs: float = _field(0.0, "epochs over which the rate climbs linearly from "
                                  "near zero to --lr (fractions allowed; 0: none)")
    plateau_patience: int = _field(PLATEAU_PATIENCE, "--schedule plateau: epochs without a "
                                   "new best validation Dice before the rate is lowered")
    plateau_factor: float = _field(PLATEAU_FACTOR, "--schedule plateau: what the rate is "
                                   "multiplied by each time")
    clip_norm: float = _field(0.0, "clip the gradients to this global L2 norm (milesial's "
                              "1.0); 0: no clipping")
    ema: float = _field(0.0, "keep an exponential moving average of the weights with this "
                        "decay (e.g. 0.999), ramped up from 0 over the first steps; "
                        "validation, predict, evaluate, submit and export then use it; "
                        "0: none")
    batch_size: int = _field(8, "global batch size, split over all devices")
    epochs: int = _field(12, "total epochs; with --resume a larger value extends the run")
    seed: int = _field(42, "seed for initialisation, split, order and augmentation")
    init_from: Optional[str] = _field(
        None, "fine-tune: start from the weights another run is used by (its best "
        "checkpoint; an --ema run's averaged weights), e.g. a Carvana run for your own "
        "data or the guide's weights from experiments.import_torch, instead of a random "
        "start; the U-Net's width, depth and variant must match; a different "
        "--num-classes starts a new head, and --in-channels 1 from an RGB run sums the "
        "first layer's colour weights", metavar="RUN")

    # Prediction: how validation during training and, by default, predict, evaluate
    # and submit predict this run's masks (their --tile, --overlap, --tta override it).
    overlap: float = _field(0.25, "tiled prediction: fraction of a tile its neighbour "
                            "shares (0.5 is slower and slightly smoother)")
    tta: str = _field("none", "test-time augmentation of predict, evaluate and submit "
                      "(validation during training uses none): none, hflip (average with "
                      "the left-right mirror) or flips (also upside down and both)",
                      choices=TTA)

    # Checkpoints.
    keep_checkpoints: int = _field(2, "how many of the latest checkpoints to keep (the "
                                   "best by validation Dice is kept as well)")

    def __post_init__(self):
        from data_pipeline.augment import parse_augment

        self._coerce_types()
        # Only the size the run uses must fit the depth: with --crop, whole images are
        # never resized to --image-size, so its default may not stop a deeper U-Net.
        self.image_size = normalize_image_size(self.image_size,
                                               self.depth if self.crop is None else None)
        if self.crop is not None:
            self.crop = normalize_image_size(self.crop, self.depth, "--crop")
        try:
            self.augment = parse_augment(self.augment)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name in ("data_dir", "val_data_dir", "init_from"):  # absolute: config.json
            # must still find it
            if getattr(self, name) == "":  # an unset variable in a script: not "here"
                raise ConfigError(f"{flag(name)} '': give a folder, or leave the flag out")
            if getattr(self, name) is not None:
                setattr(self, name, str(Path(getattr(self, name)).expanduser().resolve()))
        for name in ("batch_size", "epochs", "base_features", "depth", "num_classes",
                     "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag(name)} {value}: give a whole number of at least 1")
        if self.num_classes > 256:  # masks and predicted class ids are 8-bit maps
            raise ConfigError(f"--num-classes {self.num_classes}: at most 256 (class ids "
                              "0..255, as 8-bit masks and predicted PNGs hold them)")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"--in-channels {self.in_channels}: give 1 (grayscale) or 3 (RGB)")
        if not 0 <= self.seed < 2**63:  # JAX's keys take a 64-bit signed seed
            raise ConfigError(f"--seed {self.seed}: give a number from 0 to 2**63 - 1")
        for name, values in (("dtype", DTYPES), ("kernels", KERNELS), ("loss", LOSSES),
                             ("split", ("car", "random")), ("remat", REMAT)):
            if getattr(self, name) not in values:
                raise ConfigError(f"{flag(name)} {getattr(self, name)!r}: choose one of "
                                  f"{', '.join(values)}")
        try:
            re.compile(self.group_by)
        except re.error as e:
            raise ConfigError(f"--group-by {self.group_by!r} is not a regular expression "
                              f"({e}); e.g. '^(patient\\d+)_'") from None
        if self.val_data_dir is not None:
            self._check_val_data_dir()
        if self.group_by and self.split != "car":
            raise ConfigError(f"--group-by keeps each group on one side of the split by "
                              f"group (--split car, the default), not of --split "
                              f"{self.split}: drop one of the two")
        if not (math.isfinite(self.max_value) and self.max_value >= 0):
            raise ConfigError(f"--max-value {self.max_value}: give the brightest value of "
                              "your images, e.g. 4095 for 12-bit data (0: by file type)")
        if not 0 < self.subset <= 1:
            raise ConfigError(f"--subset {self.subset}: give a fraction in (0, 1]")
        if not 0 < self.val_fraction < 1:
            percent = (f" ({self.val_fraction:g}% is {self.val_fraction / 100:g})"
                       if 1 < self.val_fraction < 100 else "")
            if self.val_fraction == 0:  # milesial's "no validation"
                percent = (" (validation picks the checkpoint that predict uses, so it "
                           "cannot be off: give a small one, such as 0.05, or a validation "
                           "set of its own with --val-data-dir)")
            raise ConfigError(f"--val-fraction {self.val_fraction}: give a fraction in "
                              f"(0, 1){percent}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError(f"--lr {self.learning_rate}: give a positive learning rate")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"--weight-decay {self.weight_decay}: give 0 or more")
        if not (math.isfinite(self.focal_gamma) and self.focal_gamma >= 0):
            raise ConfigError(f"--focal-gamma {self.focal_gamma}: give 0 or more, e.g. 2")
        if not 0 <= self.tversky_alpha <= 1:
            raise ConfigError(f"--tversky-alpha {self.tversky_alpha}: give a value in [0, 1]")
        # A loss's own setting with another loss would be ignored without a word.
        for name, loss, default in (("focal_gamma", "focal", FOCAL_GAMMA),
                                    ("tversky_alpha", "tversky", TVERSKY_ALPHA)):
            if self.loss != loss and getattr(self, name) != default:
                raise ConfigError(f"{flag(name)} {getattr(self, name)} needs --loss {loss} "
                                  f"(the loss is {self.loss}): drop it or pass --loss {loss}")
        self._check_optimisation()
        if self.attention and not self.skip_connections:
            raise ConfigError("--attention gates the skip connections: drop "
                              "--no-skip-connections or --attention")
        if not (math.isfinite(self.scale) and 0 < self.scale <= 8):
            raise ConfigError(f"--scale {self.scale}: give a factor in (0, 8], e.g. 0.5")
        if self.crop is None and self.scale != 1:
            raise ConfigError(f"--scale {self.scale} needs --crop H W: without it whole "
                              "images are resized to --image-size")
        if not isinstance(self.crops_per_image, int) or self.crops_per_image < 1:
            raise ConfigError(f"--crops-per-image {self.crops_per_image}: give a whole "
                              "number of at least 1")
        if self.crop is None and self.crops_per_image != 1:
            raise ConfigError(f"--crops-per-image {self.crops_per_image} needs --crop H W "
                              "(without it, raise --epochs to see each image more often)")
        if not (math.isfinite(self.overlap) and 0 <= self.overlap <= MAX_OVERLAP):
            # Tiles per pixel grow as 1 / (1 - overlap)**2: 16 at 0.75, 10,000 at 0.99.
            raise ConfigError(f"--overlap {self.overlap}: give a fraction in [0, "
                              f"{MAX_OVERLAP}], e.g. 0.25 (0.5 for smoother seams)")
        if self.tta not in TTA:
            raise ConfigError(f"--tta {self.tta!r}: choose one of {', '.join(TTA)}")
        if not self.cache:
            raise ConfigError("--cache '': give 'memory', 'none', 'disk' or a file prefix")
        if self.cache.lower() in CACHES:
            self.cache = self.cache.lower()  # MEMORY is memory, not a file prefix
        near = [word for word in CACHES if _edits(self.cache.lower(), word) <= (
            2 if word == "memory" else 1)]
        if self.cache not in CACHES and near and not set("/\\.") & set(self.cache):
            # 'memmory' had been a file prefix: gigabytes written into the current folder.
            raise ConfigError(f"--cache {self.cache!r}: did you mean {near[0]!r}? (a file "
                              f"prefix is a path, such as ./{self.cache})")
        if self.cache not in CACHES:  # absolute, as data_dir: a prefix
            prefix = Path(self.cache).expanduser().resolve()  # of the run's files
            # A folder (one that exists, or a path ending in a separator) holds the
            # files: decoded-<hash>.images.npy in it, not <folder>-<hash>... beside it.
            if self.cache.endswith(("/", os.sep)) or prefix.is_dir():
                prefix = prefix / "decoded"
            self.cache = str(prefix)
        if self.ignore_index is not None:
            low = max(self.num_classes, 2)  # binary masks read 0 and 1 as classes
            if not low <= self.ignore_index <= 255:
                raise ConfigError(
                    f"--ignore-index {self.ignore_index}: give a mask value from {low} to "
                    f"255, none of the class ids 0..{low - 1} (masks are 8-bit), e.g. 255")

    def _check_val_data_dir(self) -> None:
        """A validation set of its own replaces the split of --data-dir."""
        if self.data_dir is None:
            raise ConfigError("--val-data-dir needs --data-dir: the built-in sample set "
                              "is split by car; give the training folder as --data-dir")
        if self.val_data_dir == self.data_dir:
            raise ConfigError(f"--val-data-dir {self.val_data_dir} is --data-dir: "
                              "validation on the training images flatters every score; "
                              "give a folder of other images, or drop --val-data-dir to "
                              "split --data-dir")
        default = Config.__dataclass_fields__
        for name in ("split", "val_fraction"):
            if getattr(self, name) != default[name].default:
                raise ConfigError(f"{flag(name)} {shown(getattr(self, name))} splits "
                                  f"--data-dir, which --val-data-dir leaves whole: drop "
                                  "one of the two")

    def _check_optimisation(self) -> None:
        """The schedule, clipping and averaging settings (see ``unet_jax.optim``)."""
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule!r}: choose one of "
                              f"{', '.join(SCHEDULES)}")
        if not (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs):
            example = f", e.g. {min(1, self.epochs / 2):g}" if self.warmup_epochs else ""
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs}: give 0 or more and "
                              f"fewer than --epochs {self.epochs}{example}")
        if not isinstance(self.plateau_patience, int) or self.plateau_patience < 1:
            raise ConfigError(f"--plateau-patience {self.plateau_patience}: give a whole "
                              "number of epochs, at least 1")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"--plateau-factor {self.plateau_factor}: give a factor in "
                              "(0, 1), e.g. 0.5")
        for name, default in (("plateau_patience", PLATEAU_PATIENCE),
                              ("plateau_factor", PLATEAU_FACTOR)):
            if self.schedule != "plateau" and getattr(self, name) != default:
                raise ConfigError(f"{flag(name)} {getattr(self, name)} needs --schedule "
                                  f"plateau (the schedule is {self.schedule}): drop it or "
                                  "pass --schedule plateau")
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise ConfigError(f"--clip-norm {self.clip_norm}: give a norm above 0 (e.g. "
                              "1.0), or 0 for no clipping")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"--ema {self.ema}: give a decay in [0, 1), e.g. 0.999, or 0 "
                              "for no averaging")

    def _coerce_types(self) -> None:
        """Each field as its declared type, so that ``Config(overlap="0.3")`` (a value
        read from a file or a form) works and ``Config(epochs="ten")`` is a ConfigError
        naming the flag, not a TypeError deep inside a check."""
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), _base_type(field.type)
            what = {bool: "true or false", int: "a whole number", float: "a number",
                    str: "a value"}[kind]
            if value is None:
                # A null in a JSON or YAML file: None where a setting has no "unset"
                # had built a U-Net without skip connections, or failed in a check.
                if "Optional" in str(field.type):
                    continue
                shown_as = "a size (H W)" if "tuple" in str(field.type) else what
                default = (repr(field.default) if kind is str
                           else shown(field.default, field.name))
                raise ConfigError(f"{flag(field.name)} None: give {shown_as} (the default "
                                  f"is {default})")
            if "tuple" in str(field.type) or (kind is str and
                                              isinstance(value, (bool, list, tuple))):
                continue  # sizes are checked below; augment=True or a list of names
            if kind is bool:
                if not isinstance(value, bool):
                    raise ConfigError(f"{flag(field.name)} {value!r}: give true or false")
                continue
            try:
                setattr(self, field.name, _as_type(value, kind))
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(f"{flag(field.name)} {value!r}: give {what}") from None

    @property
    def compute_dtype(self):
        """The jnp dtype of ``dtype``: what the convolutions compute in (parameters
        stay float32)."""
        return DTYPES[self.dtype]

    @property
    def data_cache(self) -> str:
        """Where the input pipeline keeps decoded images: 'memory', 'none', or a file
        prefix; 'disk' is one in the user's cache folder, found on the machine that
        runs (config.json keeps the word, so a run resumed elsewhere finds its own)."""
        if self.cache == "disk":
            from unet_jax.compile_cache import user_cache_dir

            return str(user_cache_dir() / "data" / "decoded")
        return self.cache

    @property
    def tile(self) -> tuple[int, int]:
        """The size of the tiles tiled prediction cuts: the training crop, or
        ``image_size`` for a run trained on whole resized images."""
        return self.crop or self.image_size

    def to_dict(self) -> dict:
        """The settings as a plain dict (``from_dict`` reads it back)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The settings as ``config.json`` holds them (``load`` reads it back)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def differences(self, other: "Config") -> list[str]:
        """Names of the fields whose values differ (both are normalised)."""
        return [f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Builds a Config from a dict: its settings, and what ``config.json`` records
        beside them (the devices a run used). Any other key is refused rather than
        dropped: a misspelt setting would leave its default without a word, and a
        setting of a newer unet-jax might change what the run's weights mean."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - RECORDED)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(map(str, unknown))}: not "
                              "fields of unet_jax.Config (misspelt, or from a newer "
                              "unet-jax: upgrade it)")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def load(cls, path) -> "Config":
        """The Config of a ``config.json`` file (a run directory's), checked."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _edits(a: str, b: str) -> int:
    """Levenshtein distance: the insertions, deletions and substitutions from a to b."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        row, last = [i], row
        for j, y in enumerate(b, 1):
            row.append(min(last[j] + 1, row[j - 1] + 1, last[j - 1] + (x != y)))
    return row[-1]


def flag(name: str) -> str:
    """The command-line flag of a Config field: ``learning_rate`` -> ``--lr``."""
    field = {f.name: f for f in dataclasses.fields(Config)}[name]
    return field.metadata.get("flag", "--" + name.replace("_", "-"))


def as_flag(name: str, value) -> str | None:
    """The flag that sets field ``name`` to ``value``, as a user types it
    (``--num-classes 3``, ``--no-skip-connections``); None where no flag says it (a
    setting left unset, such as no ``--crop``)."""
    if isinstance(value, bool):
        return flag(name) if value else "--no-" + flag(name)[2:]
    if value is None:
        return None
    return f"{flag(name)} {shown(value, name)}"


def normalize_image_size(value, depth, flag_name: str = "--image-size") -> tuple[int, int]:
    """(height, width) from one number or two, checked against the U-Net's depth."""
    from unet_jax.models import check_input_size

    # numpy's integers (from an array, a loop over np.arange) are whole numbers too.
    many = isinstance(value, Iterable) and not isinstance(value, str)
    sizes = list(value) if many else [value]
    if len(sizes) not in (1, 2) or not all(isinstance(s, numbers.Integral)
                                           and not isinstance(s, bool) for s in sizes):
        raise ConfigError(f"{flag_name} {' '.join(map(str, sizes))}: give one or two whole "
                          "numbers, H [W]")
    height, width = (int(s) for s in (sizes * 2 if len(sizes) == 1 else sizes))
    if height <= 0 or width <= 0:
        raise ConfigError(f"{flag_name} {height} {width}: sizes must be positive")
    if isinstance(depth, int) and depth >= 1:
        try:
            check_input_size(height, width, depth)
        except ValueError as e:
            raise ConfigError(f"{flag_name}: {e}") from None
    return height, width


# --- Command-line flags, one per field ------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, defaults: Config | None = None) -> None:
    """Adds one flag per Config field, with its help, type and choices.

    Every flag defaults to None (argparse.SUPPRESS would hide it from ``overrides``),
    so that ``overrides`` can tell a flag the user gave from one left out, which is
    what presets and ``--resume`` need. The help shows the values of ``defaults``
    (the command's default preset).
    """
    defaults = defaults or Config()
    group = parser.add_argument_group("run settings (unet_jax.Config; without --preset, "
                                      "the values in brackets)")
    for field in dataclasses.fields(Config):
        meta = dict(field.metadata)
        help_text = f"{meta.pop('help')} [{shown(getattr(defaults, field.name), field.name)}]"
        name = meta.pop("flag", "--" + field.name.replace("_", "-"))
        kind = _base_type(field.type)
        if kind is bool:
            group.add_argument(name, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            group.add_argument(name, dest=field.name, type=kind, default=None,
                               help=help_text, **meta)


def overrides(args: argparse.Namespace) -> dict:
    """The Config fields the user gave on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
            if getattr(args, f.name, None) is not None}


def _as_type(value, kind):
    """``value`` as ``kind`` (int, float or str); ValueError if it is not one."""
    if isinstance(value, bool) and kind is not str:
        raise ValueError(value)
    if kind is int and not isinstance(value, int):
        number = float(value)
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    return kind(value)


def _base_type(annotation):
    text = str(annotation)
    for kind in (bool, int, float, str):
        if kind.__name__ in text and "tuple" not in text:
            return kind
    return int  # tuple[int, int]: one number per argument (nargs)


def shown(value, name: str = "") -> str:
    """A setting's value as a user types it: ``(64, 96)`` -> ``64 96``; None is the
    sample set for ``data_dir``, else 'none'."""
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    if value is None:
        return "sample set" if name == "data_dir" else "none"
    return str(value) if value != "" else "none"
