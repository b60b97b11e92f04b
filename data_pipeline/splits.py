"""Training/validation splits: by car (the default) or per image, and their files.

Carvana photographs each car from 16 angles; neighbouring angles look nearly the same.
A per-image split (the guide's ``random_split(dataset, [0.8, 0.2])``) puts views of the
same car on both sides, so validation partly measures memory and its Dice is inflated.
Splitting by car keeps all 16 views of a car on one side and measures what matters:
how well the model segments cars it has never seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.files import Pair

METHODS = ("car", "random")


def _groups(pairs: list[Pair]) -> dict[str, list[Pair]]:
    groups: dict[str, list[Pair]] = {}
    for pair in pairs:
        groups.setdefault(pair.group, []).append(pair)
    return groups


def subset_by_group(pairs: list[Pair], fraction: float, seed: int = 42) -> list[Pair]:
    """A seeded ``fraction`` of the groups (cars), with all their images."""
    if not 0 < fraction <= 1:
        raise DataError(f"--subset {fraction}: give a fraction in (0, 1]")
    if fraction == 1:
        return list(pairs)
    groups = _groups(pairs)
    names = sorted(groups)
    keep = max(1, round(fraction * len(names)))
    chosen = set(np.random.default_rng(seed).permutation(names)[:keep].tolist())
    return [p for p in pairs if p.group in chosen]


def split_pairs(pairs: list[Pair], *, method: str = "car", val_fraction: float = 0.2,
                seed: int = 42, subset: float = 1.0) -> tuple[list[Pair], list[Pair]]:
    """(train, validation) pairs, seeded and reproducible.

    ``method='car'`` assigns whole groups (cars) to one side, about ``val_fraction`` of
    them to validation; ``'random'`` splits images one by one as the guide does (with
    numpy's generator: torch's own random_split order cannot be reproduced without
    torch). ``subset`` first keeps that fraction of the cars, for quick runs.
    """
    if method not in METHODS:
        raise DataError(f"--split {method!r}: choose one of {', '.join(METHODS)}")
    pairs = subset_by_group(pairs, subset, seed)
    rng = np.random.default_rng(seed)
    if method == "car":
        names = sorted(_groups(pairs))
        if len(names) < 2:
            raise DataError(f"a split by car needs at least 2 cars, the data has {len(names)}; "
                            "add data, raise --subset, or use --split random")
        n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
        val_names = set(rng.permutation(names)[:n_val].tolist())
        train = [p for p in pairs if p.group not in val_names]
        val = [p for p in pairs if p.group in val_names]
    else:
        if len(pairs) < 2:
            raise DataError(f"a split needs at least 2 images, the data has {len(pairs)}")
        n_val = min(len(pairs) - 1, max(1, round(val_fraction * len(pairs))))
        order = rng.permutation(len(pairs))
        val_idx = set(order[:n_val].tolist())
        train = [p for i, p in enumerate(pairs) if i not in val_idx]
        val = [p for i, p in enumerate(pairs) if i in val_idx]
    return train, val


def write_split(path, train: list[Pair], val: list[Pair]) -> None:
    """``{"train": [...], "validation": [...]}``: the image files of each side."""
    record = {"train": [str(p.image) for p in train], "validation": [str(p.image) for p in val]}
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def read_split(path) -> tuple[list[Pair], list[Pair]]:
    """The (train, validation) pairs of a split file, each image with its mask and car,
    found again by the same rules that paired them (the files are not re-checked)."""
    from data_pipeline.files import match_pairs

    try:
        record = json.loads(Path(path).read_text())
        images = {side: [Path(i) for i in record[side]] for side in ("train", "validation")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a split file written by unet-jax ({e})") from None
    known: dict[Path, Pair] = {}
    for root in sorted({i.parent.parent for side in images.values() for i in side}):
        known.update((p.image, p) for p in match_pairs(root)[0])
    missing = [i for side in images.values() for i in side if i not in known]
    if missing:
        raise DataError(f"{path}: {missing[0]} (or its mask) is gone ({len(missing)} files "
                        "missing); restore the data or start a new run")
    return [known[i] for i in images["train"]], [known[i] for i in images["validation"]]
