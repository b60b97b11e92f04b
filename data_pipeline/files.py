"""Finding image/mask pairs on disk, and checking them before any training starts.

Two layouts are understood:

* Kaggle's Carvana download: ``train/<car>_<NN>.jpg`` (or ``train_hq/``) with
  ``train_masks/<car>_<NN>_mask.gif`` (or ``.png``). ``<car>`` is the car's id and
  ``<NN>`` one of its 16 turntable angles; the id is kept so that splits can keep all
  views of a car together.
* A user's own folders: ``images/`` and ``masks/``, paired by file stem (the mask may
  be ``<stem>.<ext>`` or ``<stem>_mask.<ext>``), any of JPEG, PNG, GIF, TIFF, BMP.

Every pair is checked up front: that it has its partner, that both files open, are
not truncated, and have the same size. A problem found after an hour of training would
lose that hour, so it is found now and named, with the fix; ``skip_bad=True`` (the
``--skip-bad`` flag) drops such pairs instead and lists them as a warning.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_pipeline.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff")

# What a complete file of each format ends with: a file cut short by an interrupted
# download or copy lacks it. Checking the last bytes is instant, where decoding every
# 1918x1280 photo up front would take minutes.
_TRAILERS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",), "GIF": (b";",)}


@dataclasses.dataclass(frozen=True)
class Pair:
    """An image, its mask, and the group it belongs to (the car, for Carvana)."""

    image: Path
    mask: Path
    group: str


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def detect_layout(data_dir) -> tuple[Path, Path, str]:
    """(image folder, mask folder, 'kaggle' or 'folders') of a dataset directory."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: no such directory")
    masks = root / "train_masks"
    for images in (root / "train", root / "train_hq"):
        if images.is_dir() and masks.is_dir():
            return images, masks, "kaggle"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return root / "images", root / "masks", "folders"
    raise DataError(f"--data-dir {root}: expected Kaggle's layout (train/ and train_masks/) "
                    "or images/ and masks/ folders")


def _problem(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """(size, None) for a readable, complete image file; (None, what is wrong) else."""
    try:
        with Image.open(path) as img:
            size, fmt = img.size, img.format
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return None, f"cannot be read as an image ({type(e).__name__})"
    trailers = _TRAILERS.get(fmt)
    if trailers:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 16))
            tail = f.read().rstrip(b"\x00\r\n ")
        if not any(tail.endswith(t) for t in trailers):
            # Some cameras append data after the image; only a failed decode is final.
            try:
                with Image.open(path) as img:
                    img.load()
            except (OSError, ValueError, SyntaxError):
                return None, f"is truncated (its {fmt} data ends early)"
    return size, None


def check_pair(pair: Pair) -> str | None:
    """None if the pair is usable, else one line saying which file is wrong and how."""
    image_size, problem = _problem(pair.image)
    if problem:
        return f"{pair.image} {problem}"
    mask_size, problem = _problem(pair.mask)
    if problem:
        return f"{pair.mask} {problem}"
    if image_size != mask_size:
        return (f"{pair.mask} is {mask_size[0]}x{mask_size[1]} but its image {pair.image.name} "
                f"is {image_size[0]}x{image_size[1]}")
    return None


def match_pairs(data_dir) -> tuple[list[Pair], list[str]]:
    """Pairs by name, and the problems of files without a partner."""
    image_dir, mask_dir, layout = detect_layout(data_dir)
    masks = {}
    for m in _images_in(mask_dir):
        stem = m.stem[:-5] if m.stem.endswith("_mask") else m.stem
        masks.setdefault(stem, m)
    pairs, problems, used = [], [], set()
    for image in _images_in(image_dir):
        mask = masks.get(image.stem)
        if mask is None:
            expected = (f"{mask_dir.name}/{image.stem}_mask.gif" if layout == "kaggle"
                        else f"{mask_dir.name}/{image.stem}.png")
            problems.append(f"{image} has no mask (expected {expected})")
            continue
        used.add(image.stem)
        group = image.stem.rsplit("_", 1)[0] if layout == "kaggle" else image.stem
        pairs.append(Pair(image, mask, group))
    for stem, mask in sorted(masks.items()):
        if stem not in used:
            problems.append(f"{mask} has no image (expected {image_dir.name}/{stem}.*)")
    return pairs, problems


def find_pairs(data_dir, *, skip_bad: bool = False, check: bool = True) -> list[Pair]:
    """Every usable image/mask pair under ``data_dir``, in name order.

    Raises DataError naming the first bad file (and how many there are) unless
    ``skip_bad``, which drops bad pairs and warns on stderr with the list.
    """
    pairs, problems = match_pairs(data_dir)
    if check and pairs:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            found = list(pool.map(check_pair, pairs))
        problems += [p for p in found if p]
        pairs = [pair for pair, p in zip(pairs, found) if not p]
    if problems and not skip_bad:
        more = f" ({len(problems)} problems in all)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; fix or remove the file, or pass --skip-bad "
                        "to skip such pairs")
    if problems:
        listing = "\n  ".join(problems)
        print(f"warning: skipping {len(problems)} bad image/mask pair(s):\n  {listing}",
              file=sys.stderr)
    if not pairs:
        raise DataError(f"--data-dir {data_dir}: no usable image/mask pairs")
    return pairs


def find_images(path) -> list[Path]:
    """The images to predict: one file, or a folder's images in name order."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"--input {path}: no such file or directory")
    images = _images_in(path)
    if not images:
        raise DataError(f"--input {path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images
