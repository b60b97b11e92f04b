"""Finding image/mask pairs on disk, and checking them before any training starts.

Four layouts are understood:

* Kaggle's Carvana download: ``train/<car>_<NN>.jpg`` (or ``train_hq/``) with
  ``train_masks/<car>_<NN>_mask.gif`` (or ``.png``). ``<car>`` is the car's id and
  ``<NN>`` one of its 16 turntable angles; the id is kept so that splits can keep all
  views of a car together.
* Kaggle's zips as downloaded: ``train.zip`` (or ``train_hq.zip``) and
  ``train_masks.zip`` in one folder; prepared once through the TFDS builder
  (``tfds_carvana``) into ``prepared/`` beside them, then read as above.
* A user's own folders: ``images/`` and ``masks/``, paired by file stem (the mask may
  be ``<stem>.<ext>`` or ``<stem>_mask.<ext>``, or, where the stems do not pair, the
  stems less an ending every mask or every image shares: ISIC's ``_segmentation``),
  in any of JPEG, PNG, GIF, TIFF, BMP, WebP.
  Each image is its own group (Kaggle's ``<car>_<NN>`` photos there keep their car),
  unless ``--group-by`` reads groups from the names (``splits.grouped``).
* Masks beside their images: ``<stem>.<ext>`` and ``<stem>_mask.<ext>`` in one folder,
  or in each sub-folder of it, one per patient or specimen, as the LGG brain MRI set
  (``kaggle_3m/<patient>/``) ships. A sub-folder is its images' group, so that a split
  keeps a patient's slices on one side (a lone sub-folder is the dataset one level
  down: each image its own group).

Every pair is checked up front: that it has its partner, that both files open and are
complete, and that they have the same size. A problem found after an hour of training
would lose that hour, so it is found now and named, with the fix; ``skip_bad=True``
(the ``--skip-bad`` flag) drops such pairs instead and logs a warning listing them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
from collections import Counter
from pathlib import Path

from PIL import UnidentifiedImageError

from data_pipeline.errors import DataError
from data_pipeline.preprocess import (WIDE_MODES, check_no_max_value, ignored_kind,
                                      load_mask, open_within_limit, orientation,
                                      several_values, shown_size, wide_samples)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
LAYOUTS = ("Kaggle's layout (train/ or train_hq/, with train_masks/), Kaggle's train.zip "
           "and train_masks.zip as downloaded, images/ + masks/, nnU-Net's imagesTr/ + "
           "labelsTr/, or <stem>_mask files beside their images")
FIX = "fix or remove the file, or pass --skip-bad to skip such pairs"
RENAME = "rename or remove all but one"  # of files that claim one name

# What a complete file of each format ends with: a file cut short by an interrupted
# download or copy lacks it. Reading the last bytes is instant, where decoding 5000
# photos of 1918x1280 up front takes minutes; only files without it are decoded.
_TRAILERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}


@dataclasses.dataclass(frozen=True)
class Pair:
    """An image, its mask, and the car it shows (the group a split keeps together;
    for a user's own folders, the image's stem, each image its own group, until
    ``splits.grouped`` reads the groups from the names)."""

    image: Path
    mask: Path
    car: str

    @property
    def group(self) -> str:
        """The split's grouping key: the car id, or the group ``--group-by`` read."""
        return self.car


def _images_in(folder: Path) -> list[Path]:
    """Image files of a folder in name order; hidden files (macOS ``._x.jpg``) skipped.
    A link to a file that is gone counts, so that the check names it."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                  and (p.is_file() or p.is_symlink() and not p.exists()))


def _nested(folder: Path) -> str:
    """"b1/, b2/": the sub-folders of ``folder`` that hold image files, which are not
    read (a dataset's files sit in its folders themselves); '' if there are none."""
    try:
        subs = sorted(p for p in folder.iterdir()
                      if p.is_dir() and not p.name.startswith((".", "__MACOSX")))
        with_images = [f"{p.name}/" for p in subs if _images_in(p)]
    except OSError:  # unreadable: nothing to add
        return ""
    more = f" and {len(with_images) - 4} more" if len(with_images) > 4 else ""
    return ", ".join(with_images[:4]) + more


def unnested(folder: Path) -> Path:
    """``folder``, or the one folder inside it that holds image files where ``folder``
    holds none: ``unzip train.zip -d train`` and Windows' "Extract All" put Kaggle's
    photos in ``train/train/``, and the Oxford-IIIT Pet set its trimaps in
    ``annotations/trimaps/``, beside ``xmls/``."""
    if not folder.is_dir() or _images_in(folder):
        return folder
    inside = [p for p in folder.iterdir()
              if p.is_dir() and not p.name.startswith((".", "__MACOSX")) and _images_in(p)]
    return inside[0] if len(inside) == 1 else folder


def _unzip_hint(folder: Path) -> str:
    """"; unzip X first" for a folder holding a zip where files were expected (Kaggle's
    "Download All" archive, say), else nothing."""
    zips = sorted(p.name for p in folder.glob("*.zip"))
    for images in ("train", "train_hq"):
        # Kaggle's images without their masks: unzipping gives no pairs.
        if f"{images}.zip" in zips and "train_masks.zip" not in zips and not (
                folder / "train_masks").is_dir() and _kaggle_photos(folder / f"{images}.zip"):
            return (f"; it holds Kaggle's {images}.zip but not train_masks.zip: download "
                    "train_masks.zip into it too")
    return f"; unzip {zips[0]} first" if zips else ""


def _kaggle_photos(archive: Path) -> bool:
    """Whether a zip holds Kaggle's Carvana photos (``train/<car>_<NN>.jpg``), not a
    user's own dataset that happens to be named train.zip."""
    import zipfile

    try:
        with zipfile.ZipFile(archive) as z:
            return any(CARVANA_NAME.fullmatch(Path(name).stem) for name in z.namelist()[:50])
    except (OSError, zipfile.BadZipFile):
        return False


def _beside_folders(root: Path) -> list[Path]:
    """The folders of a dataset whose masks sit beside their images: ``root`` if it
    holds an image and its ``<stem>_mask`` file; else, where one of its sub-folders
    does, every sub-folder holding images (one whose masks are missing is named by
    the pairing, not left out); [] for neither."""
    def images_of(folder: Path) -> list[Path]:
        try:
            return _images_in(folder)
        except OSError:  # unreadable (lost+found): holds nothing this can use
            return []

    def holds_pairs(files: list[Path]) -> bool:
        stems = {p.stem for p in files}
        return any(stem.endswith("_mask") and stem[:-5] in stems for stem in stems)

    if holds_pairs(images_of(root)):
        return [root]
    try:
        subs = sorted(p for p in root.iterdir()
                      if p.is_dir() and not p.name.startswith((".", "__MACOSX")))
    except OSError:
        return []
    found = {sub: images_of(sub) for sub in subs}
    if not any(holds_pairs(files) for files in found.values()):
        return []
    return [sub for sub, files in found.items() if files]


def detect_layout(data_dir, flag: str = "--data-dir") -> tuple[Path, Path, str]:
    """(image folder, mask folder, ``'kaggle'``, ``'folders'`` or ``'beside'``) of a
    dataset; each folder may hold its files one folder down (``unnested``). Beside:
    both are the dataset's root (``_beside_folders`` finds the pairs' folders). Errors
    name the folder by ``flag``."""
    root = Path(data_dir).expanduser().absolute()
    if root.is_file():
        raise DataError(f"{flag} {root} is a file: pass the folder that holds images/ "
                        "and masks/ (or Kaggle's train/ and train_masks/)")
    if not root.is_dir():
        raise DataError(f"{flag} {root}: no such directory")
    masks = root / "train_masks"
    for images in (root / "train", root / "train_hq"):
        if images.is_dir() and masks.is_dir():
            return unnested(images), unnested(masks), "kaggle"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return unnested(root / "images"), unnested(root / "masks"), "folders"
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():  # nnU-Net's raw data
        return root / "imagesTr", root / "labelsTr", "folders"
    if (root / "train_masks.zip").is_file():  # Kaggle's zips, as downloaded
        from data_pipeline import tfds_carvana

        if tfds_carvana.holds_kaggle_zips(root):
            return detect_layout(tfds_carvana.prepare_zip_folder(root, flag), flag)
    if _beside_folders(root):
        return root, root, "beside"
    raise DataError(f"{flag} {root} matches no known layout: expected "
                    f"{LAYOUTS}{_unzip_hint(root) or _masks_csv_hint(root) or _layout_hint(root)}")


def _masks_csv_hint(root: Path) -> str:
    """Kaggle's photos with train_masks.csv (the masks as run-length codes) but without
    the mask images: what to download, since training reads the GIFs."""
    if not any((root / name).is_dir() for name in ("train", "train_hq")):
        return ""
    if not any((root / name).is_file() for name in ("train_masks.csv", "train_masks.csv.zip")):
        return ""
    return ("; it holds Kaggle's train_masks.csv (the masks as run-length codes) but no "
            "train_masks/: download train_masks.zip and unzip it here, as training reads "
            "the mask images")


# Words in the folder names other tools and datasets use for images and for masks
# (ISIC's ISIC2018_Task1-2_Training_Input/ and ..._GroundTruth/, DRIVE's 1st_manual/).
_IMAGE_WORDS = {"images", "image", "img", "imgs", "input", "inputs", "raw", "original",
                "originals", "photos", "rgb"}
_MASK_WORDS = {"masks", "mask", "label", "labels", "gt", "truth", "groundtruth",
               "annotations", "annotation", "segmentations", "segmentation", "targets",
               "target", "manual", "trimaps"}


def _words(name: str) -> set[str]:
    """The words of a folder name, camel case split too (VOC's JPEGImages/)."""
    name = re.sub(r"([a-z0-9])([A-Z])|([A-Z])([A-Z][a-z])", r"\1\3 \2\4", name)
    return set(re.split(r"[^a-z0-9]+", name.lower()))


# A folder of a layout and the folder beside it that makes it one.
_PARTNERS = {"images": "masks", "masks": "images", "train": "train_masks",
             "train_masks": "train"}


def _layout_hint(root: Path) -> str:
    """What ``root`` holds and the renaming that would make it a layout: "; it holds
    image/ and label/: rename them images/ and masks/", or "; pass its parent" for a
    folder of images given itself, or "; pass X" for a dataset one folder down; else
    what it holds. Where several folders could hold the masks (DRIVE's 1st_manual/ of
    vessels beside mask/ of its field of view), the user picks: the name alone cannot
    tell labels from other masks."""
    try:
        folders = sorted(p.name for p in root.iterdir()
                         if p.is_dir() and not p.name.startswith("."))
    except OSError:  # unreadable: the message without a hint is still right
        return ""
    # A mask word wins: image_masks/ and label_images/ hold masks.
    masks = [name for name in folders if _words(name) & _MASK_WORDS]
    images = [name for name in folders if _words(name) & _IMAGE_WORDS and name not in masks]
    # X/ beside X_labels/ (Massachusetts Roads' train/ and train_labels/, CamVid's).
    beside = [(x, y) for x in folders if x not in masks for y in masks if y.lower(
        ).startswith(x.lower()) and _words(y[len(x):]) & _MASK_WORDS]
    validation = ""
    if beside and not (len(images) == 1 and len(masks) == 1):
        x, y = next((pair for pair in beside if pair[0] in images),
                    next((pair for pair in beside if "train" in _words(pair[0])), beside[0]))
        images, masks = [x], [y]
        val = [pair for pair in beside if _words(pair[0]) & {"val", "valid", "validation"}]
        if val and val[0] != (x, y):
            validation = (f"; its {val[0][0]}/ and {val[0][1]}/, renamed so in a folder of "
                          "their own, are a validation set for --val-data-dir")
    # Masks as annotation files (COCO's JSON, VOC's XML) are not mask images.
    drawn = [name for name in masks if _images_in(unnested(root / name))]
    try:
        notes = [p.name for name in masks if name not in drawn
                 for p in sorted((root / name).iterdir())
                 if p.suffix.lower() in (".json", ".xml")]
    except OSError:  # unreadable: no hint from it
        notes = []
    if masks and not drawn and notes:
        return (f"; {masks[0]}/ holds no mask images ({', '.join(notes[:2])}): the masks "
                "must be images, one per photo; draw them from the annotations first "
                "(for COCO's JSON, pycocotools' annToMask)")
    masks = drawn or masks
    images = [name for name in images if _images_in(unnested(root / name))] or images
    if len(images) == 1 and len(masks) == 1:
        renames = [f"{old}/ to {new}/" for old, new in ((images[0], "images"),
                                                        (masks[0], "masks"))
                   if old != new]
        return (f"; it holds {images[0]}/ and {masks[0]}/: rename {' and '.join(renames)}"
                f"{validation}")
    if "JPEGImages" in folders and "SegmentationClass" in masks:  # Pascal VOC, unpacked
        return ("; it holds Pascal VOC's JPEGImages/ and SegmentationClass/: rename "
                "JPEGImages/ to images/ and SegmentationClass/ to masks/ "
                "(SegmentationObject/ numbers objects, not classes)")
    if len(images) == 1 and masks:
        listed = ", ".join(f"{name}/" for name in masks)
        also = f"{images[0]}/ to images/ and " if images[0] != "images" else ""
        return (f"; it holds {images[0]}/ and {len(masks)} folders that could hold its "
                f"masks ({listed}): rename {also}the one with the labels to learn (not, "
                "say, a field-of-view mask) to masks/")
    partner = _PARTNERS.get(root.name)
    if partner and (root.parent / partner).is_dir():
        return f"; {root.name}/ is one of its folders: pass its parent, {root.parent}"
    if _images_in(root):
        return ("; it holds images itself: put them in images/ and their masks in masks/ "
                "beside it, or save each mask beside its image as <stem>_mask.png")
    if instances := _instance_folders(root, folders):
        return instances
    for name in folders[:4]:  # the DSB download's own folder: stage1_train/ in it
        try:
            inner = sorted(p.name for p in (root / name).iterdir()
                           if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        if instances := _instance_folders(root / name, inner):
            return f"; in {name}/,{instances[1:]}"
    inside = [name for name in folders
              if any((root / name / a).is_dir() and (root / name / b).is_dir()
                     for a, b in (("images", "masks"), ("train", "train_masks"),
                                  ("JPEGImages", "SegmentationClass")))
              or _beside_folders(root / name)]
    if inside:  # the first: Kaggle's LGG download holds kaggle_3m/ twice
        return f"; {inside[0]}/ in it holds a dataset: pass {root / inside[0]}"
    shown = ", ".join(f"{name}/" for name in folders[:6]) or "no folders"
    return f"; it holds {shown}"


def _instance_folders(root: Path, folders: list[str]) -> str:
    """"; its folders each hold one image and a mask per object ..." for the Data
    Science Bowl 2018's ``<id>/images/<id>.png`` with ``<id>/masks/*.png``; else ''."""
    for name in folders[:3]:
        masks = root / name / "masks"
        images = root / name / "images"
        if (images.is_dir() and masks.is_dir() and len(_images_in(images)) == 1
                and len(_images_in(masks)) > 1):
            return (f"; each of its folders ({name}/ ...) holds one image in images/ and "
                    "one mask per object in masks/ (the Data Science Bowl 2018's layout): "
                    "merge each image's masks into one (their maximum) and put the images "
                    "in images/ and the merged masks in masks/, of the same names")
    return ""


def _by_stem(files: list[Path], strip: str = "") -> tuple[dict[str, Path], list[str]]:
    """Files keyed by stem (less the ``strip`` suffix), and the problems of stems
    shared by several files (``e0.png`` and ``e0.jpg``). Such a stem is dropped
    whole: which file its mask belongs to, or which mask ``e0_mask.png`` of
    predict would be, is a guess, so neither file is used."""
    claims: dict[str, list[Path]] = {}
    for f in files:
        stem = f.stem[: -len(strip)] if strip and f.stem.endswith(strip) else f.stem
        claims.setdefault(stem, []).append(f)
    found = {stem: paths[0] for stem, paths in claims.items() if len(paths) == 1}
    # The others by name where they share the first's folder, else by path (predict's
    # inputs may come from several folders: patA/slice_001.png and patB/...).
    problems = [f"{paths[0]} and "
                f"{', '.join(str(p.name if p.parent == paths[0].parent else p) for p in paths[1:])}"
                f" both claim the name {stem!r}; {RENAME}"
                for stem, paths in claims.items() if len(paths) > 1]
    return found, problems


_EXTRA_MASK = re.compile(r"(.+)_mask_\d+")  # <stem>_mask_1: a second mask of <stem>


def _pairs_beside(root: Path) -> tuple[list[Pair], list[str]]:
    """The pairs of a dataset whose masks sit beside their images (``<stem>_mask``
    files are the masks), each sub-folder its pairs' group (where there are several:
    a lone one is the dataset unzipped one level down); and the problems."""
    pairs, problems = [], []
    folders = _beside_folders(root)
    for folder in folders:
        found = _images_in(folder)
        # BUSI's second lesion of an image: "<stem>_mask_1.png" beside "<stem>_mask.png".
        extra = {}
        for p in found:
            if (more_of := _EXTRA_MASK.fullmatch(p.stem)) is not None:
                extra.setdefault(more_of.group(1), []).append(p)
        found = [p for p in found if _EXTRA_MASK.fullmatch(p.stem) is None]
        images, clashes = _by_stem([p for p in found if not p.stem.endswith("_mask")])
        masks, more = _by_stem([p for p in found if p.stem.endswith("_mask")], strip="_mask")
        problems += clashes + more
        for stem, image in images.items():
            if stem in extra and stem not in masks and len(extra[stem]) == 1:
                problems.append(f"{image}'s mask is named {extra[stem][0].name}: rename it "
                                f"{stem}_mask{extra[stem][0].suffix}")
            elif stem in extra:
                named = ", ".join(sorted(p.name for p in [masks.get(stem), *extra[stem]] if p))
                problems.append(f"{image} has several masks ({named}); merge them into its "
                                f"{stem}_mask file (every object of each: their maximum) and "
                                "remove the others")
            elif stem not in masks:
                problems.append(f"{image} has no mask (expected {folder / stem}_mask.png "
                                "or another image format beside it)")
            else:
                # One folder alone is the dataset one level down, not one patient:
                # each image its own group, as in the root.
                group = stem if len(folders) == 1 else folder.name
                pairs.append(Pair(image, masks[stem], group))
        problems += [f"{mask} has no image (expected {folder / stem}.png or similar beside "
                     "it)" for stem, mask in masks.items() if stem not in images]
        problems += [f"{files[0]} has no image (expected {folder / stem}.png or similar "
                     "beside it)" for stem, files in extra.items() if stem not in images]
    if (nested := _nested(root)) and _beside_folders(root) == [root]:
        log.warning("%s: the images in its sub-folders (%s) are not read; move them into "
                    "%s/ itself to use them", root, nested, root.name)
    return sorted(pairs, key=lambda p: p.image), problems


def _expected_mask(mask_dir: Path, stem: str, layout: str, masks: dict) -> str:
    """The names a missing mask may have, the one the dataset's other masks use first
    (``masks/x_mask.png or masks/x.png``): the name the user will look for."""
    if layout == "kaggle":
        return str(mask_dir / f"{stem}_mask.gif")
    named = list(masks.values())
    ext = Counter(p.suffix for p in named).most_common(1)[0][0] if named else ".png"
    names = [f"{stem}{ext}", f"{stem}_mask{ext}"]
    if sum(p.stem.endswith("_mask") for p in named) * 2 > len(named):
        names.reverse()
    unread = _unread_arrays(mask_dir, stem)
    return (f"{mask_dir / names[0]} or {mask_dir / names[1]}, in any image format"
            + (f"; {unread.name} is an array file, which is not read: save each mask as a "
               "PNG (Image.fromarray(mask.astype(np.uint8)).save(...))" if unread else ""))


def _unread_arrays(folder: Path, stem: str) -> Path | None:
    """A numpy or NIfTI file of ``stem`` in ``folder`` (masks saved as arrays), if any."""
    for suffix in (".npy", ".npz", ".nii", ".nii.gz"):
        for name in (stem, f"{stem}_mask"):
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


CARVANA_NAME = re.compile(r"[0-9a-f]{12}_\d{2}")  # 00087a6bd4dc_01: car, view


def _common_ending(stems) -> str:
    """The ending all ``stems`` share from a separator on, with something before it in
    each ("_segmentation" of ISIC's masks, "_training" of DRIVE's images); ''."""
    stems = list(stems)
    if len(stems) < 2:
        return ""
    common = os.path.commonprefix([stem[::-1] for stem in stems])[::-1]
    start = re.search(r"[_\-. ]", common)
    ending = common[start.start():] if start else ""
    # A number in it ("_slice_05") may be what tells the files apart in another folder.
    if any(part.isdigit() for part in re.split(r"[_\-. ]", ending)):
        return ""
    return ending if ending and all(len(stem) > len(ending) for stem in stems) else ""


def _paired_by_endings(images: dict, masks: dict, image_dir: Path, mask_dir: Path):
    """(images, masks) keyed by their stems less the ending all of each share, where
    that pairs most images and the names themselves do not: ISIC's
    ``ISIC_0000000.jpg`` with ``ISIC_0000000_segmentation.png``, DRIVE's
    ``21_training.tif`` with ``21_manual1.gif``. None otherwise. Said in a warning,
    with an example, for the user to check."""
    if len(images.keys() & masks.keys()) * 2 >= len(images):
        return None
    endings = _common_ending(images), _common_ending(masks)
    if not any(endings):
        return None
    renamed = [{stem.removesuffix(ending): path for stem, path in files.items()}
               for files, ending in zip((images, masks), endings)]
    paired = renamed[0].keys() & renamed[1].keys()
    if (any(len(new) < len(old) for new, old in zip(renamed, (images, masks)))
            or len(paired) * 2 < len(images)):
        return None
    example = min(paired)
    less = " and ".join(f"{folder.name}/'s {ending!r}" for folder, ending in
                        zip((image_dir, mask_dir), endings) if ending)
    log.warning("%s: masks paired with images by their names less %s (%s with %s); "
                "check that these are the pairs", mask_dir, less,
                renamed[0][example].name, renamed[1][example].name)
    return renamed


_CHANNEL_FILE = re.compile(r"(.+)_(\d{4})")  # nnU-Net: case_0000 is channel 0 of case


def _nnunet_cases(images: dict, masks: dict, image_dir: Path) -> dict | None:
    """Images keyed by case where they are named as nnU-Net names them: one file per
    channel, ``<case>_0000.png`` beside the label ``<case>.png`` (an RGB PNG is one
    file, channel 0 alone). None where the names are not so. A case of several channel
    files (``_0000``, ``_0001``: modalities) is a DataError: one file is one image here."""
    if len(images.keys() & masks.keys()) * 2 >= len(images):
        return None
    found = {stem: _CHANNEL_FILE.fullmatch(stem) for stem in images}
    if not all(found.values()):
        return None
    cases: dict[str, list[str]] = {}
    for match in found.values():
        cases.setdefault(match[1], []).append(match[2])
    if len(cases.keys() & masks.keys()) * 2 < len(cases):
        return None
    several = sorted(case for case, channels in cases.items() if channels != ["0000"])
    if several:
        case = several[0]
        names = ", ".join(f"{case}_{c}" for c in sorted(cases[case]))
        raise DataError(
            f"{image_dir}: nnU-Net's files of one channel each ({names}: case {case!r}); "
            "unet-jax reads one file per image, grayscale or RGB: merge each case's "
            "channels into one RGB file (PIL.Image.merge), or keep the _0000 files alone")
    return {match[1]: images[stem] for stem, match in found.items()}


def match_pairs(data_dir, flag: str = "--data-dir") -> tuple[list[Pair], list[str]]:
    """Pairs by name (not yet checked), and the problems of files without a partner."""
    image_dir, mask_dir, layout = detect_layout(data_dir, flag)
    if layout == "beside":
        return _pairs_beside(image_dir)
    images, problems = _by_stem(_images_in(image_dir))
    masks, more = _by_stem(_images_in(mask_dir), strip="_mask")
    problems += more
    if layout == "folders" and (cases := _nnunet_cases(images, masks, image_dir)):
        images = cases
    elif layout == "folders" and (renamed := _paired_by_endings(images, masks, image_dir,
                                                                mask_dir)):
        images, masks = renamed
    pairs, claimed = [], set()
    # Kaggle names photos <car>_<NN>: the car is all before the last underscore. Its
    # photos in images/ (milesial/Pytorch-UNet's data/imgs, renamed) keep their cars
    # together too: 16 views of one car on both sides of a split flatter validation.
    by_car = layout == "kaggle" or bool(images) and all(
        CARVANA_NAME.fullmatch(image.stem) for image in images.values())
    for stem, image in images.items():
        mask = masks.get(stem)
        base = stem.removesuffix("_mask")
        if mask is None and base != stem and base not in images:
            # An image whose own name ends in _mask (x_mask.tif) and its mask of the
            # same stem (masks/x_mask.png), which the suffix rule filed under x.
            if masks.get(base, Path()).stem == stem:
                mask = masks[base]
                claimed.add(base)
        if mask is None:
            problems.append(f"{image} has no mask (expected "
                            f"{_expected_mask(mask_dir, stem, layout, masks)})")
            continue
        car = image.stem.rsplit("_", 1)[0] if by_car else image.stem
        pairs.append(Pair(image, mask, car))
    problems += [f"{mask} has no image (expected {image_dir / stem}.jpg or similar)"
                 for stem, mask in masks.items()
                 if stem not in images and stem not in claimed]
    for folder in (image_dir, mask_dir) if pairs else ():  # without pairs: in the error
        if nested := _nested(folder):
            log.warning("%s: the images in its sub-folders (%s) are not read; move them "
                        "into %s/ itself to use them", folder, nested, folder.name)
    return sorted(pairs, key=lambda p: p.image), problems


def image_problem(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height) as shown, None) for a readable, complete image file; (None,
    what is wrong) else.

    Opening reads only the header (the size); the data is decoded only where the
    file's end does not prove it complete, which keeps checking thousands of files
    fast and still catches a truncated JPEG.
    """
    if path.is_symlink() and not path.exists():
        return None, f"is a link to {os.readlink(path)}, which does not exist"
    fmt = None  # unknown until Pillow opens the file
    try:
        with open_within_limit(path) as img:
            size, fmt = shown_size(img)[::-1], img.format
            if not _looks_complete(path, fmt):
                img.load()  # raises on data that ends early
    except DataError as e:  # over the pixel limit: the message names the file and the fix
        return None, str(e).removeprefix(f"{path} ")
    except UnidentifiedImageError:
        return None, "cannot be read as an image (unknown format or not an image file)"
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        what = " ".join(str(e).split()) or type(e).__name__
        if "truncated" in what or _riff_truncated(path):
            return None, f"is truncated: its {fmt or 'WEBP'} data ends early"
        return None, f"cannot be read as an image ({what})"
    return size, None


def _header(pair: Pair) -> tuple[int, bool]:
    """From the image's header, read once: the EXIF orientation (2 to 8) that turns or
    mirrors it but not its mask (0 where it is stored upright, or its mask carries the
    same tag), and whether it holds more than 8 bits a sample (what --max-value scales)."""
    with open_within_limit(pair.image) as img:
        turn, wide = orientation(img), img.mode in WIDE_MODES or wide_samples(img)
    if turn != 1:
        with open_within_limit(pair.mask) as mask:
            turn = 0 if orientation(mask) == turn else turn
    return (0 if turn == 1 else turn), wide


def _name_turned_images(pairs: list[Pair], turns: list[int]) -> None:
    """Warns once of images whose EXIF orientation their masks lack. Both are read as
    viewers show them, which is right for masks drawn on the photo as shown (as most
    annotation tools draw them); a mask drawn on the stored pixels is turned against
    its photo, and where the turn keeps the size (a half turn, a mirror, a square
    photo) nothing else can tell."""
    turned = [(pair, turn) for pair, turn in zip(pairs, turns) if turn]
    if turned:
        (first, turn), more = turned[0], len(turned) - 1
        log.warning("%s carr%s an EXIF orientation tag (%d) that turns or mirrors %s as "
                    "viewers show %s, and %s not: every file is read as shown, so the "
                    "masks must be drawn on the photos as shown (most annotation tools do); "
                    "one drawn on the stored pixels is misaligned: check the run's "
                    "predictions.png",
                    f"{first.image} and {more} other image(s)" if more else first.image,
                    "y" if more else "ies", turn, *(("them", "them", "their masks do")
                                                   if more else ("it", "it", "its mask does")))


def _spread(pairs: list[Pair], count: int) -> list[Pair]:
    """At most ``count`` pairs spread evenly over ``pairs``: the masks the dataset-wide
    checks read, enough for what most of a dataset's masks show."""
    return pairs[::max(1, len(pairs) // count)][:count]


def _name_class_masks(pairs: list[Pair], sample: int = 8,
                      ignore_index: int | None = None) -> None:
    """Warns where masks look like several classes to a run that reads them as one
    (milesial/Pytorch-UNet maps each value to a class; here that takes
    --num-classes): a few masks spread over the dataset are read, enough for a
    dataset whose masks hold classes, which most of its masks show."""
    for pair in _spread(pairs, sample):
        try:
            found = several_values(pair.mask, ignore_index)
        except DataError:  # named where it is read
            continue
        if found:
            what, ids = found
            fix = (f"pass --num-classes {ids}" if ids else
                   "store class ids 0..C-1 and pass --num-classes C")
            log.warning("%s holds %s: read as a binary mask, every non-zero pixel "
                        "foreground; if they are classes, %s (instance labels, one value "
                        "per object, are right as they are)", pair.mask, what, fix)
            return


def _check_binary_ignore(pairs: list[Pair], ignore_index: int, sample: int = 8) -> None:
    """Refuses --ignore-index where a binary run's masks hold that value as their
    foreground (0/255 masks with --ignore-index 255: every object pixel would be left
    out), and warns where lossy masks cannot have it applied; from a few masks spread
    over the dataset, as ``_name_class_masks`` reads them."""
    kinds = []
    for pair in _spread(pairs, sample):
        try:
            kinds.append((pair.mask, ignored_kind(pair.mask, ignore_index)))
        except DataError:  # named where it is read
            continue
    lossy = [mask for mask, kind in kinds if kind == "lossy"]
    if lossy:
        log.warning("%s is a lossy (JPEG) mask: compression spreads its values, so "
                    "--ignore-index %d cannot pick its pixels out and is not applied to "
                    "such masks; save the masks as PNG", lossy[0], ignore_index)
    foreground = [mask for mask, kind in kinds if kind == "foreground"]
    if foreground and not any(kind == "objects" for _, kind in kinds):
        raise DataError(f"{foreground[0]}: {ignore_index} is its objects' own value, the "
                        f"foreground of a binary mask, and --ignore-index {ignore_index} "
                        "would leave every object pixel out; drop --ignore-index, or give "
                        "the pixels to leave out a value of their own")


def _turned(path: Path) -> bool:
    """True when an image's EXIF orientation turns it a quarter (5 to 8)."""
    with open_within_limit(path) as img:
        return orientation(img) >= 5


def _riff_truncated(path: Path) -> bool:
    """True for a WebP file shorter than its RIFF header says (Pillow decodes WebP
    as it opens it, and names a cut one only as "could not create decoder object")."""
    with path.open("rb") as f:
        header = f.read(12)
        size = os.fstat(f.fileno()).st_size
    return (header[:4] == b"RIFF" and header[8:12] == b"WEBP"
            and int.from_bytes(header[4:8], "little") + 8 > size)


def _looks_complete(path: Path, fmt: str | None) -> bool:
    """True when the file's last bytes show a complete file of its format."""
    if fmt in _TRAILERS:
        with path.open("rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 32))
            # Some writers pad the end, some cameras append data: both only cost a decode.
            return f.read().rstrip(b"\x00\r\n ").endswith(_TRAILERS[fmt])
    if fmt == "WEBP":  # Pillow has decoded it to open it
        return True
    if fmt == "BMP":  # its header states the file's size
        with path.open("rb") as f:
            header = f.read(6)
            return int.from_bytes(header[2:6], "little") <= os.fstat(f.fileno()).st_size
    return False  # TIFF and others: decode to be sure


def check_pair(pair: Pair, num_classes: int = 1, max_value: float = 0.0,
               ignore_index: int | None = None) -> str | None:
    """None if the pair is usable, else one line saying which file is wrong and how.

    With several classes the mask is decoded too and its class ids checked at the
    file's own size (``preprocess.check_class_ids``): an id on a few pixels that
    resizing drops would otherwise pass unseen. With ``max_value``, a 16-bit colour
    image, which it cannot scale, is named now rather than while the epoch decodes.
    """
    image_size, problem = image_problem(pair.image)
    if problem:
        return f"{pair.image} {problem}"
    mask_size, problem = image_problem(pair.mask)
    if problem:
        return f"{pair.mask} {problem}"
    if image_size != mask_size:
        problem = (f"{pair.mask} is {mask_size[0]}x{mask_size[1]} but its image "
                   f"{pair.image.name} is {image_size[0]}x{image_size[1]}")
        if mask_size == image_size[::-1] and _turned(pair.image):
            problem += (" as shown (its EXIF orientation turns it a quarter; files are "
                        "read as viewers show them): rotate the mask to match the "
                        "photo as shown, or save the photo upright without the tag")
        return problem
    try:
        if num_classes > 1:
            load_mask(pair.mask, None, num_classes, ignore_index=ignore_index)
        if max_value:
            with open_within_limit(pair.image) as img:
                if wide_samples(img):
                    check_no_max_value(str(pair.image), max_value)
    except DataError as e:
        return str(e)
    return None


def find_pairs(data_dir, *, skip_bad: bool = False, check: bool = True,
               num_classes: int = 1, workers: int = 16,
               max_value: float = 0.0, ignore_index: int | None = None,
               flag: str = "--data-dir") -> list[Pair]:
    """Every usable image/mask pair under ``data_dir``, in name order.

    The layout is detected (``detect_layout``: Kaggle's, ``images/`` + ``masks/``, or
    masks beside their images). With ``check``,
    every file is opened in a pool of ``workers`` threads (the work is file reads and
    Pillow's C decoders, which release the GIL). A bad pair raises a DataError naming
    the first bad file, unless ``skip_bad``, which drops the bad pairs and logs a
    warning listing them. ``num_classes`` > 1 checks each mask's class ids as well,
    and ``max_value`` (--max-value) refuses 16-bit colour images, which it cannot scale;
    ``ignore_index`` (--ignore-index) is a mask value allowed beside the class ids.
    The folder's errors name it by ``flag`` (``--val-data-dir`` for a validation set).
    """
    pairs, problems = match_pairs(data_dir, flag)
    checked = []  # the problems of matched pairs
    if check and pairs:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            found = list(pool.map(lambda pair: check_pair(pair, num_classes, max_value,
                                                          ignore_index), pairs))
            checked = [p for p in found if p]
            problems += checked
            pairs = [pair for pair, p in zip(pairs, found) if not p]
            headers = list(pool.map(_header, pairs))  # (turn its mask lacks, wide)
        _name_turned_images(pairs, [turn for turn, _ in headers])
        if num_classes == 1:
            _name_class_masks(pairs, ignore_index=ignore_index)
            if ignore_index is not None:
                _check_binary_ignore(pairs, ignore_index)
        if max_value and pairs and not any(wide for _, wide in headers):
            log.warning("--max-value %g: every image of %s is 8-bit, which --max-value "
                        "leaves as it is (it scales 16-bit, 32-bit and float images); "
                        "drop it", max_value, data_dir)
    if problems and not skip_bad and not pairs:
        # Every file wrong alike (binary masks for --num-classes 3, say): skipping the
        # bad pairs is no way out. A matched pair's problem is named first: every pair
        # has it, while images without masks (most of Pascal VOC's) may be left out.
        more = f" ({len(problems)} problems in all)" if len(problems) > 1 else ""
        first = checked[0] if checked else problems[0]
        raise DataError(f"{first}{more}; --skip-bad would leave no pair")
    if problems and not skip_bad:
        more = (f" ({len(problems)} problems in all; --skip-bad skips them and lists each)"
                if len(problems) > 1 else "")
        # A problem that says its own fix (two files of one name) gets --skip-bad alone.
        fix = (f", {FIX.split(', ', 1)[1]}" if problems[0].endswith(RENAME) else f"; {FIX}")
        raise DataError(f"{problems[0]}{fix}{more}")
    if problems:
        shown = problems[:50]
        rest = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        log.warning("skipping %d bad image/mask pair(s):\n  %s%s", len(problems),
                    "\n  ".join(shown), rest)
    if not pairs:
        image_dir, mask_dir, layout = detect_layout(data_dir, flag)
        empty = [d for d in (image_dir, mask_dir) if layout != "beside" and not _images_in(d)]
        names = " and ".join(f"{d.name}/" for d in empty)
        why = (f" ({names} {'hold' if len(empty) > 1 else 'holds'} no image files"
               f"{_nested_hint(empty)})" if empty else "")
        raise DataError(f"{flag} {data_dir}: no usable image/mask pairs in it{why}")
    return pairs


def _nested_hint(folders: list[Path]) -> str:
    """"; sub-folders are not read: images/ has b1/, b2/" for folders whose images are
    one level down, else ''."""
    found = [f"{d.name}/ has {nested}" for d in folders if (nested := _nested(d))]
    return f"; sub-folders are not read: {'; '.join(found)}" if found else ""


def warn_if_all_background(pairs, side: str, num_classes: int = 1,
                           ignore_index: int | None = None) -> bool:
    """Logs a warning, and returns True, where no mask of ``pairs`` (one side of a
    split) holds a foreground pixel. A validation side of empty masks scores Dice 1
    at every epoch, so the "best" checkpoint is picked among ties; it happens where a
    split holds out a folder of cases without findings (BUSI's normal/, a sub-folder
    being a group). Masks are read until the first with foreground: one, as a rule."""
    from data_pipeline.preprocess import load_mask

    for pair in pairs:
        values = load_mask(pair.mask, None, num_classes, ignore_index=ignore_index)
        if ((values > 0) & (values != (-1 if ignore_index is None else ignore_index))).any():
            return False
    if pairs:
        why = ("every validation Dice is 1 and the best epoch is picked among ties"
               if side == "validation" else "the model can learn background alone")
        log.warning("none of the %d %s masks holds foreground: %s; where the split held "
                    "out a folder of cases without findings, pass --split random, "
                    "--group-by or --val-data-dir", len(pairs), side, why)
    return bool(pairs)


def check_crop_fits(pairs, crop: tuple[int, int], scale: float, multiple: int = 1) -> None:
    """Raises DataError unless every image, resized by ``scale``, is at least a crop
    in each direction: a scale that shrinks a photo to a few pixels would train on
    mirrored copies of them and score near-empty validation images. Only the file
    headers are read. The crop the message offers is a multiple of ``multiple`` (the
    U-Net's ``2**depth``), as a crop must be."""
    from data_pipeline.preprocess import image_size_of, scaled_size

    sizes = [(scaled_size(image_size_of(p.image), scale), p.image) for p in pairs]
    (height, width), image = min(sizes, key=lambda s: (min(s[0][0] / crop[0],
                                                           s[0][1] / crop[1]), str(s[1])))
    if height < crop[0] or width < crop[1]:
        fits = [min(size, side) // multiple * multiple
                for size, side in zip((height, width), crop)]
        lower = (f" or lower --crop to at most {fits[0]} {fits[1]}" if min(fits) > 0 else
                 "")
        # Height x width, as --crop H W takes them (a photo's own size reads W x H).
        raise DataError(f"{image} is {height}x{width} (height x width) at --scale {scale}, "
                        f"smaller than --crop {crop[0]} {crop[1]}; raise --scale{lower}")


def find_images(path, *, skip_bad: bool = False, by_stem: bool = True) -> list[Path]:
    """The images to predict: one image file, or a folder's images in name order,
    less the masks kept beside them (``x_mask.png`` beside ``x.png``), with a warning;
    or, for a list of such paths (a shell pattern's files), the images of each, in
    the order given.

    With ``by_stem`` (predict: its outputs are named by stem), two images of one stem
    (``e0.png``, ``e0.jpg``) would write the same ``e0_mask.png``: a DataError naming
    both, or with ``skip_bad`` both are left out with a warning. Without it (submit,
    whose rows are keyed by the whole file name) both are kept. The files are not
    opened: ``check_images`` checks them, before any is predicted, so that a
    truncated photo is named now, not an hour into a run.
    """
    given = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    found = list(dict.fromkeys(image for one in given for image in _images_of(one)))
    images, problems = _by_stem(found) if by_stem else ({str(p): p for p in found}, [])
    if problems and not skip_bad:
        raise DataError(f"{problems[0]}: their masks would share one output file; "
                        "or pass --skip-bad to leave them out")
    if problems:
        log.warning("skipping images whose names clash:\n  %s", "\n  ".join(problems))
    if not images:  # every file of the folder clashed with another
        raise DataError(f"--input {' '.join(map(str, given))}: no images left to predict")
    kept = set(images.values())
    return [image for image in found if image in kept]


def _images_of(path) -> list[Path]:
    """``find_images`` of one file or folder, before the names are compared."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            unzip = "; unzip it and give the folder" if path.suffix.lower() == ".zip" else ""
            raise DataError(f"--input {path} is not an image file "
                            f"(expected one of {', '.join(IMAGE_SUFFIXES)}){unzip}")
        return [path]
    if not path.is_dir():
        raise DataError(f"--input {path}: no such file or directory")
    path = unnested(path)
    found = _images_in(path)
    stems = {p.stem for p in found}
    # Masks kept beside their images (x.tif, x_mask.tif; BUSI's x_mask_1.png too) are
    # not images to segment.
    def mask_of(p):
        extra = _EXTRA_MASK.fullmatch(p.stem)
        base = extra.group(1) if extra else p.stem[:-5] if p.stem.endswith("_mask") else None
        return base if base in stems else None

    if beside := [p for p in found if mask_of(p)]:
        log.warning("--input %s: leaving out %d file(s) named as the masks of images beside "
                    "them (%s for %s); give a folder of images alone to predict them too",
                    path, len(beside), beside[0].name, mask_of(beside[0]))
        left_out = set(beside)
        found = [p for p in found if p not in left_out]
    if not found:
        raise DataError(f"--input {path}: the folder holds no images "
                        f"({', '.join(IMAGE_SUFFIXES)}){_nested_hint([path])}"
                        f"{_unzip_hint(path)}")
    if nested := _nested(path):
        log.warning("--input %s: the images in its sub-folders (%s) are not read; give "
                    "each folder as --input", path, nested)
    return found


def check_images(paths, *, skip_bad: bool = False, workers: int = 16) -> list[Path]:
    """The readable, complete images of ``paths``, in order, each checked as
    ``find_pairs`` checks a pair (headers, and the data where the file's end does not
    prove it complete). A bad one raises a DataError naming it and the fix, unless
    ``skip_bad``, which leaves the bad ones out with a warning listing them."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        found = list(pool.map(lambda p: image_problem(p)[1], paths))
    problems = [f"{p} {problem}" for p, problem in zip(paths, found) if problem]
    if problems and not skip_bad:
        more = (f" ({len(problems)} bad images in all; --skip-bad skips them and lists "
                "each)" if len(problems) > 1 else "")
        raise DataError(f"{problems[0]}; fix or remove the file, or pass --skip-bad to "
                        f"skip such images{more}")
    if problems:
        rest = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        log.warning("skipping %d bad image(s):\n  %s%s", len(problems),
                    "\n  ".join(problems[:50]), rest)
    good = [p for p, problem in zip(paths, found) if not problem]
    if not good:
        raise DataError("--input: none of its images can be read (see above); fix them")
    return good
