"""Training/validation splits: by car (the default) or per image, and their files.

Carvana photographs each car from 16 angles; neighbouring angles look nearly the same.
A per-image split (the guide's ``random_split(dataset, [0.8, 0.2])``) puts views of the
same car on both sides, so validation partly measures memory and its Dice is inflated.
Splitting by car keeps all 16 views of a car on one side and measures what matters:
how well the model segments cars it has never seen. A user's own folders have the same
problem with the slices of one patient or the frames of one video; their file names
usually say which group an image belongs to, and ``group_by`` reads it from them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.files import Pair

log = logging.getLogger(__name__)

# <group><number>, the number last, the group with a letter: patient12_slice040,
# TCGA_CS_4941_19960909_12 (not 0001, whose leading digits are no group).
NUMBERED = r"^(.*?[^\W\d_].*?)[_-]?\d+$"

METHODS = ("car", "random")


def _rng(seed: int, stream: int) -> np.random.Generator:
    """A generator for one use of ``seed``: the subset and the split draw independently."""
    return np.random.default_rng([stream, seed % 2**63])


def subset_by_car(pairs: list[Pair], fraction: float, seed: int = 42) -> list[Pair]:
    """A seeded ``fraction`` of the cars (at least one), with all their images.

    Taken by car so that a quick run on part of the data can still be split by car.
    """
    if not 0 < fraction <= 1:
        raise DataError(f"--subset {fraction}: give a fraction in (0, 1]")
    if fraction == 1:
        return list(pairs)
    cars = sorted({p.car for p in pairs})
    keep = max(1, round(fraction * len(cars)))
    chosen = set(_rng(seed, 0).permutation(cars)[:keep].tolist())
    return [p for p in pairs if p.car in chosen]


subset_by_group = subset_by_car  # the name other modules knew first


def grouped(pairs: list[Pair], pattern: str) -> list[Pair]:
    """The pairs with each one's group read from its image's file name by ``pattern``.

    The regular expression is searched in the name without its extension; its first
    group, or the whole match if it has no group, names the group:
    ``'^(patient\\d+)_'`` puts ``patient12_slice040.png`` in ``patient12``. Every
    image must match: one left over would silently be a group of its own, on either
    side of the split.
    """
    regex = re.compile(pattern)

    def group_of(name: str, regex=regex):
        found = regex.search(name)
        return found and (found.group(1) if regex.groups else found.group(0))

    named, unmatched = [], []
    for pair in pairs:
        group = group_of(pair.image.stem)
        if group:
            named.append(dataclasses.replace(pair, car=group))
        else:
            unmatched.append(pair.image)
    if unmatched:
        names = ", ".join(p.name for p in unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
        # The folder that holds them all: one patient's, or the dataset's.
        where = Path(os.path.commonpath([p.parent for p in unmatched]))
        anycase = re.compile(pattern, re.I)
        case = ("; (?i) at its start ignores case" if any(
            group_of(p.stem, anycase) for p in unmatched) else "")
        raise DataError(f"--group-by '{pattern}' finds no group in the names of "
                        f"{len(unmatched)} of {len(pairs)} images in {where} "
                        f"({names}); give a pattern that every image name matches, its "
                        f"first (...) the group{case}")
    return named


def _name_numbered_groups(pairs: list[Pair]) -> None:
    """Warns where each image is its own group but the names number images of a few
    groups (per-patient slices flattened into one folder): a split by image puts
    slices of one patient on both sides, and validation then flatters the model."""
    if len({p.car for p in pairs}) < len(pairs):
        return  # groups are known already (Kaggle's cars, per-patient folders)
    prefixes = [re.match(NUMBERED, p.image.stem) for p in pairs]
    groups = Counter(found.group(1) for found in prefixes if found)
    # Subjects carry numbers (patient12, TCGA_CS_4941); classes (Abyssinian_1, cat_3)
    # do not, and a split by image is right for them.
    if (all(prefixes) and 1 < len(groups) <= len(pairs) / 2
            and max(groups.values()) <= len(pairs) / 2
            and all(any(ch.isdigit() for ch in group) for group in groups)):
        example = max(groups, key=groups.get)
        log.warning("the image names number images of %d groups (%d named %s...), but each "
                    "image is its own group in the split, so one group's images can fall "
                    "on both sides and flatter validation: if each group is one subject's "
                    "(a patient's slices, a scene's frames), pass --group-by '%s' to keep "
                    "it on one side", len(groups), groups[example], example, NUMBERED)


def _n_val(n: int, val_fraction: float, what: str) -> int:
    """How many of ``n`` units go to validation: rounded, and neither side empty."""
    if n < 2:
        fix = {"cars": ", or use --split random",
               "groups": ", or give --group-by a pattern that finds more groups"}
        raise DataError(f"a split needs at least 2 {what}, the data has {n}; add data, "
                        f"raise --subset{fix.get(what, '')}")
    return min(n - 1, max(1, round(val_fraction * n)))


def split_pairs(pairs: list[Pair], *, method: str = "car", val_fraction: float = 0.2,
                seed: int = 42, subset: float = 1.0,
                group_by: str = "") -> tuple[list[Pair], list[Pair]]:
    """(train, validation) pairs, seeded and reproducible, each in name order.

    ``method='car'`` puts whole cars on one side, ``val_fraction`` of the cars (rounded)
    in validation. ``'random'`` splits image by image like the guide; the guide's exact
    split cannot be reproduced without torch's generator, so numpy's
    ``default_rng(seed)`` draws it. ``subset`` first keeps that fraction of the cars,
    for quick runs. ``group_by`` (see ``grouped``) names the groups that take the
    cars' place, for both.
    """
    if method not in METHODS:
        raise DataError(f"--split {method!r}: choose one of {', '.join(METHODS)}")
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: give a fraction in (0, 1)")
    if group_by:
        pairs = grouped(pairs, group_by)
    elif method == "car":
        _name_numbered_groups(pairs)
    # Sorted first, so that the split depends on the files alone, not the listing order.
    pairs = sorted(subset_by_car(pairs, subset, seed), key=lambda p: p.image)
    rng = _rng(seed, 1)
    if method == "car":
        cars = sorted({p.car for p in pairs})
        val_cars = set(rng.permutation(cars)[: _n_val(len(cars), val_fraction,
                                                              "groups" if group_by else "cars")].tolist())
        is_val = [p.car in val_cars for p in pairs]
    else:
        val_idx = set(rng.permutation(len(pairs))[: _n_val(len(pairs), val_fraction,
                                                              "images")].tolist())
        is_val = [i in val_idx for i in range(len(pairs))]
    train = [p for p, v in zip(pairs, is_val) if not v]
    val = [p for p, v in zip(pairs, is_val) if v]
    return train, val


def given_split(train: list[Pair], val: list[Pair], *, seed: int = 42, subset: float = 1.0,
                group_by: str = "") -> tuple[list[Pair], list[Pair]]:
    """(train, validation) pairs of a dataset that comes with its own validation set
    (``--val-data-dir``), each in name order: no split is drawn, ``subset`` keeps that
    fraction of the training cars (or ``group_by`` groups) alone. A car, group or
    image name on both sides is warned about: the same subject in both sets (or the
    same photo, copied) flatters validation as a leaking split does."""
    if group_by:
        train, val = grouped(train, group_by), grouped(val, group_by)
    train = sorted(subset_by_car(train, subset, seed), key=lambda p: p.image)
    shared = sorted({p.car for p in train} & {p.car for p in val})
    if shared:
        log.warning("%d of the %d validation groups (%s...) are in the training images too "
                    "(cars, --group-by groups, or else file names): if they are the same "
                    "subjects or photos, validation flatters the model; remove them from "
                    "one side", len(shared), len({p.car for p in val}), shared[0])
    return train, sorted(val, key=lambda p: p.image)


def write_split(path, train: list[Pair], val: list[Pair], data_dir=None,
                val_data_dir=None) -> None:
    """Writes ``{"train": [...], "validation": [...], "data_dir": ...}``, the image
    files of each side and the dataset they come from (with ``val_data_dir``, a
    validation set of its own, also ``"validation_data_dir"``).

    The masks and cars are found again from the images by the pairing rules, so the
    file stays readable by any tool. Written atomically: an interrupted run never
    leaves half a split for ``--resume`` to read.
    """
    record = {"train": [str(p.image) for p in train],
              "validation": [str(p.image) for p in val]}
    if data_dir is not None:
        record["data_dir"] = str(_root(data_dir))
    if val_data_dir is not None:
        record["validation_data_dir"] = str(_root(val_data_dir))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def _root(data_dir) -> Path:
    return Path(data_dir).expanduser().absolute()  # as files.detect_layout reads it


def read_split(path, data_dir=None, otherwise: str = "start a new run",
               val_data_dir=None, val_flag: str = "--val-data-dir",
               sides=("train", "validation")) -> tuple[list[Pair], list[Pair]]:
    """The (train, validation) pairs of a split file, each image with its mask and car.

    The files are not re-checked (they were when the split was made). If the data has
    moved, ``data_dir`` is where to look for the same images: by their path within
    the dataset the file records (one patient's ``slice_1.png`` is not another's), or
    else by file name, where the name is one image's alone on each side (the data
    unzipped into another nesting, or a file written before it recorded its dataset).
    Where the images are missing, the error offers to restore them, to give the folder
    they moved to, or ``otherwise``: the caller's own way out. A run with a validation
    set of its own (``--val-data-dir``) finds its validation images in
    ``val_data_dir`` when they moved (given by the caller's ``val_flag``), and the
    training images in ``data_dir``. Only the ``sides`` asked for are looked up (the
    other is an empty list): scoring the validation images needs no training folder.
    """
    from data_pipeline.files import match_pairs

    try:
        record = json.loads(Path(path).read_text())
        images = {side: [Path(i).expanduser().absolute() for i in record[side]]
                  for side in ("train", "validation")}
        recorded = {side: _root(record[key]) if isinstance(record.get(key), str) else None
                    for side, key in (("train", "data_dir"),
                                      ("validation", "validation_data_dir"))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a split file written by unet-jax ({e}); "
                        "remove it to make a new split") from None
    own = recorded["validation"] is not None  # a validation set of its own
    if not own:
        recorded["validation"] = recorded["train"]
    given = {"train": data_dir, "validation": val_data_dir if own else data_dir}
    there = Counter(i.name for side in images.values() for i in side)
    # One listing per folder, whichever sides it serves (a dataset's folder serves both).
    pairs_in = functools.cache(lambda root: match_pairs(root)[0])
    resolved = {side: [] for side in images}
    for side in sides:
        find = _finder(given[side], recorded[side], images[side], there, pairs_in)
        resolved[side] = [find(i) for i in images[side]]
    missing = [(side, i) for side in sides for i, pair in zip(images[side], resolved[side])
               if pair is None]
    if missing:
        side, image = missing[0]
        flag = val_flag if own and side == "validation" else "--data-dir"
        where = f" in {given[side]}" if given[side] is not None else ""
        raise DataError(f"{path}: {image} (or its mask) is not found{where} "
                        f"({len(missing)} missing); restore the data, give the folder "
                        f"it moved to ({flag}), or {otherwise}")
    return resolved["train"], resolved["validation"]


def _finder(given, recorded: Path | None, images: list[Path], there: Counter, pairs_in):
    """A function from a recorded image to its Pair (None where it is not found): in
    the folder ``given`` for data that moved, else in the ``recorded`` dataset (or,
    in a file from before datasets were recorded, beside the images' folders).
    ``pairs_in``: a folder's pairs (``files.match_pairs``)."""
    if given is not None:
        root = _root(given)
        pairs = pairs_in(root)
        by_path = {_within(p.image, root): p for p in pairs}
        # A name found once on each side identifies its image in another nesting too
        # (images/images/ unzipped, train/ instead of the prepared zips); a name that
        # several folders share (one patient's slice_1.png, another's) only by path.
        here = Counter(p.image.name for p in pairs)
        by_name = {p.image.name: p for p in pairs if here[p.image.name] == 1}

        def find(image: Path) -> Pair | None:
            if recorded is not None and (inside := _within(image, recorded)) in by_path:
                return by_path[inside]
            return by_name.get(image.name) if there[image.name] == 1 else None
        return find
    found = {}
    # Files before the dataset was recorded: images/ (or train/) sits in its root.
    roots = [recorded] if recorded is not None else sorted({i.parent.parent for i in images})
    for root in roots:
        try:
            found.update((p.image, p) for p in pairs_in(root))
        except DataError:  # the folder is gone: its images are reported below
            pass
    return found.get


def _within(image: Path, root: Path) -> Path | None:
    """``image``'s path inside ``root``, None where it lies elsewhere."""
    try:
        return image.relative_to(root)
    except ValueError:
        return None
