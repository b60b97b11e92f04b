"""Decoding and resizing, the one way: what training, predict, evaluate and submit all use.

An image file becomes uint8 ``(h, w, C)``: any common format and mode (RGB, grayscale,
palette, RGBA, 16-bit, float TIFF), RGB or luminance as the model's ``in_channels``
asks, resized bilinearly (antialiased) to the model's size. A mask file becomes uint8
``(h, w, 1)`` by one rule for binary masks and one for class ids (``load_mask``),
resized by the area each label covers (``resize_labels``), centred as the image is.
``to_float`` scales an image to the [0, 1] the model sees.

Every file is read the way photo viewers and annotation tools show it: a camera's
EXIF orientation tag (a phone photo stored sideways with "turn 90 degrees" in its
header) is applied first, to images and masks alike, and sizes are the sizes shown.
A mask drawn over the photo as shown then lines up with it, and a predicted mask
lines up with the photo a user opens.

The training pipeline caches these uint8 arrays and scales them per batch; prediction
calls the same functions for the same file, so the model sees exactly what it was
trained on. Evaluation reads the true masks with ``load_mask`` at their own size.

Pillow guards against decompression bombs (a small file that decodes to gigabytes):
it warns about an image over ``Image.MAX_IMAGE_PIXELS`` (about 89 million pixels) and
refuses one over twice that. Here anything over the limit is refused, as a one-line
DataError naming the file and its pixel count, which training's up-front check
reports like any bad file (``--skip-bad`` skips it). If such images are genuine, set
``UNET_JAX_MAX_IMAGE_PIXELS`` to a larger count (or 0 for no limit); it is read at
every decode.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import numbers
import os
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline.errors import DataError, SettingError

log = logging.getLogger(__name__)
MAX_PIXELS_VARIABLE = "UNET_JAX_MAX_IMAGE_PIXELS"
# Raised whenever the same file comes to decode to other pixels (2: EXIF orientation
# applied, graded mask edges cut at half scale; 3: masks resized by area, aligned with
# their images), so that caches of decoded examples kept on disk are made anew.
DECODE_VERSION = 3
_PILLOW_LIMIT = Image.MAX_IMAGE_PIXELS  # Pillow's own limit, read (not changed) at import


def _silence_pillow_warning() -> None:
    """Ignores Pillow's DecompressionBombWarning (an image between its limit and twice
    it): ``open_within_limit`` refuses such an image with a DataError, so the warning
    would only repeat that, as two more lines on stderr. Installed at decode time, and
    again whenever another filter (``-W error``, pytest's, ``catch_warnings``) has
    come to decide that warning first."""
    for action, _, category, _, _ in warnings.filters:
        if issubclass(Image.DecompressionBombWarning, category):  # the filter that decides
            if action == "ignore" and category is Image.DecompressionBombWarning:
                return
            break
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def max_image_pixels() -> int | None:
    """The pixel limit for one image: ``$UNET_JAX_MAX_IMAGE_PIXELS`` (0: none), else
    Pillow's default. Read at every decode, so the variable may be set at any time."""
    value = os.environ.get(MAX_PIXELS_VARIABLE)
    if value is None:
        return _PILLOW_LIMIT
    try:
        limit = int(value)
    except ValueError:
        limit = -1
    if limit < 0:
        raise SettingError(f"{MAX_PIXELS_VARIABLE}={value!r}: give a whole number of pixels "
                           "(0 for no limit), or unset it")
    return limit or None


def _over_limit(path, pixels: int | None, limit: int, size=None) -> DataError:
    """The one-line error of an image over the pixel limit, with the way to allow it."""
    shape = f" ({size[0]}x{size[1]})" if size else ""
    found = f"has {pixels:,} pixels{shape}" if pixels else "has more pixels"
    return DataError(f"{path} {found}, over the {limit:,}-pixel limit for one image "
                     "(Pillow's guard against decompression bombs); if it is genuine, allow "
                     f"larger images with {MAX_PIXELS_VARIABLE}=<pixels> (0 for no limit)")


# Formats whose extra frames are more images of the same kind: a TIFF's pages, an
# animation's frames. JPEG is left out on purpose: cameras store previews and depth maps
# as extra frames of a photo (MPO), and the photo is the first.
_MANY_FRAMES = {"TIFF", "GIF", "WEBP", "PNG"}


def _pages(img: Image.Image) -> int:
    """How many images a file holds: 1 for one image, even a TIFF with a smaller
    preview page after it, or a page its header marks as a reduced-resolution copy or
    a transparency mask (NewSubfileType bits 0 and 2); n for a TIFF stack (a
    microscope's slices or time points) or an animated GIF, WebP or PNG."""
    if img.format not in _MANY_FRAMES or getattr(img, "n_frames", 1) == 1:
        return 1
    if img.format != "TIFF":
        return img.n_frames
    size, pages = img.size, 0
    for index in range(img.n_frames):
        img.seek(index)
        pages += img.size == size and not img.tag_v2.get(254, 0) & 0b101
    img.seek(0)
    return pages


def _stack(path, img: Image.Image, pages: int) -> DataError:
    """The one-line error of a file holding several images, with the fix."""
    what = (f"a stack of {pages} images (a multi-page TIFF)" if img.format == "TIFF"
            else f"an animation of {pages} frames (an animated {img.format})")
    return DataError(f"{path} is {what} but each file must hold one image; save each "
                     "page or frame as a file of its own (Pillow's ImageSequence.Iterator),"
                     " images and masks under matching names")


@contextlib.contextmanager
def open_within_limit(path):
    """``Image.open`` of ``path``, an image over the pixel limit raising a one-line
    DataError (when opened, or when a frame or tile turns out larger as it loads), and
    so does a multi-page TIFF stack, which would otherwise be read as its first page
    alone, and an animation, which would be read as its first frame. Pillow's other
    errors pass through, for callers that tell them apart."""
    limit = max_image_pixels()
    # Set at every decode and never restored: decoding threads all set the same value
    # (saving and restoring it would race between them), and Pillow reads it again
    # while loading some formats (GIF frames, TIFF tiles).
    Image.MAX_IMAGE_PIXELS = limit
    _silence_pillow_warning()
    try:
        with Image.open(path) as img:
            width, height = img.size
            if limit and width * height > limit:  # Pillow only warns up to twice its limit
                raise _over_limit(path, width * height, limit, img.size)
            pages = _pages(img)
            if pages > 1:
                raise _stack(path, img, pages)
            yield img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Above twice the limit Pillow refuses before returning the image (and so does
        # its warning, under ``python -W error``); its message holds the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _over_limit(path, int(found.group(1)) if found else None, limit) from None


@contextlib.contextmanager
def open_image(path):
    """``Image.open`` of ``path``; any problem (not an image, truncated, over the pixel
    limit), when opening or while the caller decodes it, becomes a one-line DataError
    naming the file."""
    try:
        with open_within_limit(path) as img:
            yield img
    except DataError:
        raise
    except UnidentifiedImageError:
        tiff = (", such as a TIFF of more than 4 bands or of 16-bit bands beyond grayscale, "
                "which satellite tools write: save 3 bands, or one, as 8-bit or as 16-bit "
                "grayscale" if str(path).lower().endswith((".tif", ".tiff")) else "")
        raise DataError(f"{path} cannot be decoded (not an image, or a format Pillow does "
                        f"not read{tiff}); fix or remove the file") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's decode errors
        if os.path.isdir(path):
            raise DataError(f"{path} is a folder, not an image: pass the image files in "
                            "it (data_pipeline.find_images lists them)") from None
        what = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path} cannot be decoded ({what}); fix or remove the file") from None


IN_MEMORY = "the in-memory image"  # what messages call an array or a Pillow image


def name_of(source) -> str:
    """How messages name an image: its path, or ``IN_MEMORY`` (not its pixels)."""
    return str(source) if isinstance(source, (str, os.PathLike)) else IN_MEMORY


def image_source(source):
    """``source`` as ``opened`` takes it: a path (str or os.PathLike), a Pillow image,
    or a numpy array (a JAX array or another array-like becomes one); anything else
    raises a one-line error saying what to give, rather than failing deep in Pillow."""
    if isinstance(source, (str, os.PathLike, Image.Image, np.ndarray)):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        raise DataError(f"an image given as {len(source)} bytes: give a file path, a Pillow "
                        "image or a numpy array (a file's bytes open with "
                        "PIL.Image.open(io.BytesIO(data)))")
    if hasattr(source, "__array__"):
        return np.asarray(source)
    raise TypeError(f"an image is a file path, a Pillow image or a numpy array, not a "
                    f"{type(source).__name__}" + (": pass the images one at a time"
                                                  if isinstance(source, (list, tuple)) else ""))


@contextlib.contextmanager
def opened(source, max_value: float = 0.0):
    """A Pillow image of ``source``: an image file (``open_image``), a Pillow image, or
    a numpy array (``from_array``), so that images a program holds in memory are read
    by the very rules files are."""
    source = image_source(source)
    if isinstance(source, Image.Image):
        if wide_samples(source):  # read from the source: a copy has no tile left
            check_no_max_value(IN_MEMORY, max_value)
        # A copy: draft() would shrink the caller's own (unloaded JPEG) image in place.
        copy = source.copy()
        copy.format = source.format  # the orientation rule reads a PNG's header alone
        yield copy
    elif isinstance(source, np.ndarray):
        yield from_array(source, max_value)
    else:
        with open_image(source) as img:
            yield img


def wide_samples(img: Image.Image) -> bool:
    """Whether an unloaded image file holds 16-bit samples that Pillow reads as 8-bit
    colour or alpha (its decoder's raw mode, e.g. 'RGB;16B'; a 16-bit-per-pixel BMP's
    packed 5-6-5 colour, 'BGR;16', is 8-bit colour already)."""
    return img.mode in ("RGB", "RGBA", "LA") and any(
        re.search(r";16[BLN]", str(t.args)) for t in getattr(img, "tile", ()))


def check_no_max_value(name: str, max_value: float) -> None:
    """Refuses ``--max-value`` for a 16-bit colour image, which Pillow reads by its
    high byte alone: the raw values it would scale are gone (12-bit colour would
    stay nearly black without a word)."""
    if max_value:
        raise DataError(f"{name} is a 16-bit image with colour or alpha channels, which is "
                        "read by its high byte (Pillow has no such 16-bit mode), so "
                        f"--max-value cannot scale it: {EIGHT_BIT_COLOUR} and train "
                        "without --max-value (or save them as 16-bit grayscale without "
                        "alpha, for --in-channels 1)")


def from_array(array: np.ndarray, max_value: float = 0.0) -> Image.Image:
    """A Pillow image of a numpy array (height, width), (height, width, 1), 3 (RGB) or
    4 (RGBA) channels, read as the same pixels in a file would be: uint8 as it is;
    16-bit colour by its high byte, as Pillow reads such files; 16-bit grayscale,
    32-bit and float values brought to 8 bits by the rule for such files
    (``eight_bits``)."""
    values = array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
    if not (values.ndim == 2 or (values.ndim == 3 and values.shape[-1] in (3, 4))) or (
            0 in values.shape):
        raise DataError(f"{IN_MEMORY} has shape {array.shape}: give (height, width) or "
                        "(height, width, channels) with 1, 3 or 4 channels")
    if values.dtype == bool or not (np.issubdtype(values.dtype, np.integer)
                                    or np.issubdtype(values.dtype, np.floating)):
        raise DataError(f"{IN_MEMORY} is {values.dtype}: give uint8, 16-bit or float values")
    floats = np.issubdtype(values.dtype, np.floating)
    if floats and not max_value and values.size and np.mean(values < 0) > 0.05:
        # Clipped to 0, as a file's would be: a normalised tensor (mean 0) would lose
        # half its pixels without a word. A cubic resize's overshoot (a few pixels
        # just below 0) is clipped as before.
        raise DataError(f"{IN_MEMORY} holds values from {float(values.min()):g} to "
                        f"{float(values.max()):g}, normalised: give the image itself, "
                        "floats in [0, 1] or 0..255 values")
    if values.ndim == 3 and values.dtype in (np.uint16, np.int16):
        # As Pillow reads a 16-bit colour file: its high byte (it has no 16-bit colour
        # mode), which --max-value cannot scale: refused, as for such a file.
        check_no_max_value(IN_MEMORY, max_value)
        if values.size and int(values.max()) <= 255:
            raise DataError(f"{IN_MEMORY} is {values.dtype} colour with values up to "
                            f"{int(values.max())}: read by its high byte, as 16-bit colour "
                            "is, it would be black; give .astype(np.uint8) for 8-bit values")
        values = (np.clip(values, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
    elif values.dtype != np.uint8:
        kind = ("float" if np.issubdtype(values.dtype, np.floating) else
                "16-bit" if values.dtype.itemsize == 2 else "int")
        values = eight_bits(values.astype(np.float32), kind, IN_MEMORY, max_value)
    return Image.fromarray(np.ascontiguousarray(values))


# EXIF orientation (tag 274) -> the transpose that shows the image upright; 5 to 8
# turn it a quarter, so its shown width and height are its stored height and width.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image, 1 to 8; 1 (as stored) without one.

    Read from the header alone: Pillow would decode a whole PNG to look for an
    orientation stored after its pixels, which the PNG standard does not allow, so a
    PNG counts only what its header holds. An unreadable EXIF block counts as none.
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - any malformed EXIF: the pixels are still valid
        return 1
    value = value if value in _UPRIGHT else 1
    if img.format == "TIFF" and value != 1 and _pillow_turns_tiffs():
        if value >= 5:
            raise DataError(
                f"{img.filename} is a TIFF whose orientation tag ({value}) turns it a "
                "quarter, which Pillow does not read consistently; save it upright "
                "without the tag (or as PNG)")
        return 1  # Pillow turns it as it loads
    return value


@functools.cache
def _pillow_turns_tiffs() -> bool:
    """Whether this Pillow applies a TIFF's orientation itself as it loads (recent
    versions do, and get a quarter turn's size wrong): a 2x1 TIFF tagged "rotate 180"
    is read back to see."""
    exif = Image.Exif()
    exif[_ORIENTATION_TAG] = 3
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 255]], np.uint8)).save(buffer, "TIFF", exif=exif)
    with Image.open(buffer) as img:
        return int(np.asarray(img)[0, 0]) == 255


def shown_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) of an opened image as shown, its EXIF orientation applied."""
    width, height = img.size
    return (width, height) if orientation(img) >= 5 else (height, width)


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (itself when it says nothing)."""
    method = _UPRIGHT.get(orientation(img))
    return img.transpose(method) if method is not None else img


def image_size_of(path) -> tuple[int, int]:
    """(height, width) of an image file as shown (its EXIF orientation applied), from
    its header alone (nothing is decoded); of an in-memory image (``opened``), too."""
    path = image_source(path)
    if isinstance(path, np.ndarray):
        return tuple(path.shape[:2])
    with opened(path) as img:
        return shown_size(img)


def scaled_size(size, scale: float) -> tuple[int, int]:
    """(height, width) of an image of ``size`` (height, width) resized by ``scale``.

    Rounded to whole pixels, at least 1: what ``--scale`` makes of every image, for
    training crops and tiled prediction alike (a 1918x1280 photo at 0.5 is 959x640).
    """
    return tuple(max(1, round(s * scale)) for s in size)


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1], the model's input scale."""
    return np.asarray(image, np.float32) / 255.0


# Pillow's bilinear filter widens its support when shrinking (it antialiases), so a
# 1918x1280 photo shrunk to 96x64 keeps thin details instead of aliasing. BOX is the
# exact area average.
RESIZE = {"bilinear": Image.Resampling.BILINEAR, "area": Image.Resampling.BOX}
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


narrow_warned = False  # set once the first dark 16-bit or float image was named
dark_colour_warned = False  # set once the first dark 16-bit colour image was named
extra_band_warned = False  # set once the first image whose 4th band is dropped was named
clipped_warned = False  # set once the first image --max-value does not fit was named


def _to_8_bits(img: Image.Image, path, max_value: float = 0.0) -> Image.Image:
    """A 16-bit, 32-bit or float grayscale image as 8-bit ('L') (``eight_bits``)."""
    kind = "float" if img.mode == "F" else "16-bit" if img.mode.startswith("I;16") else "int"
    return Image.fromarray(eight_bits(np.asarray(img, np.float32), kind, path, max_value))


def eight_bits(values: np.ndarray, kind: str, path, max_value: float = 0.0) -> np.ndarray:
    """uint8 of the values of a 16-bit, 32-bit integer or float image (``kind``
    '16-bit', 'int' or 'float'), ``path`` naming it in the warning below.

    With ``max_value`` (``--max-value``), that value becomes 255 in every such file:
    4095 for a 12-bit camera or scanner (the first file it does not fit, brighter
    than it or a float image within 1, is named). Without it, 16-bit images are scaled by their
    range (65535 -> 255), whatever the image holds, so that every image of a dataset
    is scaled alike; 32-bit integer and float images say nothing of their range:
    float values up to 1 are taken as [0, 1], integers over 255 as 16-bit, anything
    else as 0..255. 12-bit data keeps 17 grey levels that way, a nearly black image
    the model can barely learn from; no rule read from one file can tell 12 bits from
    a dark 16-bit image, so the first such file is named, with the flag that fixes it.
    """
    global narrow_warned, clipped_warned
    top = float(values.max()) if values.size else 0.0
    if max_value:
        # One scale for every file, whatever each holds (a dark frame of raw counts may
        # stay within 1); files it does not fit are named once.
        if not clipped_warned and (top > max_value or kind == "float" and 0 < top <= 1 < max_value):
            clipped_warned = True
            if top > max_value:
                log.warning("%s has values up to %g, over --max-value %g: %.0f%% of its "
                            "pixels turn white; pass the brightest value the data holds "
                            "(65535 for 16-bit)", path, top, max_value,
                            100 * np.mean(values > max_value))
            else:
                log.warning("%s is a float image within [0, 1], and --max-value %g scales "
                            "it nearly black; floats in [0, 1] need no --max-value (train "
                            "without it)", path, max_value)
        values = values * np.float32(255 / max_value)
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if kind == "float" and not narrow_warned and top <= 255:
        _warn_float(values, top, path)
    if kind == "float" and top <= 1:
        values = values * 255
    elif kind == "16-bit" or top > 255:
        if top < 4096 and not narrow_warned:
            narrow_warned = True
            bits = max(int(top).bit_length(), 8)  # a dark first file: no less than 8
            log.warning("%s is a %s image whose values stay below %d: scaled from 65535 "
                        "to 255 it keeps %d grey levels, nearly black; if your data has "
                        "%d bits, pass --max-value %d to train (predict reads it from the "
                        "run), or window the images to 8 bits first", path,
                        "float" if kind == "float" else "16-bit",
                        int(top) + 1, int(np.rint(top / 257)) + 1, bits, 2 ** bits - 1)
        values = values / 257
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _warn_float(values: np.ndarray, top: float, path) -> None:
    """Names the first float image that reaches the model nearly black, each file
    being scaled by its own values: one whose largest value is just over 1 (an
    overshoot of resampling or deconvolution in data that is [0, 1]) is read as
    0..255, while its neighbours within 1 are multiplied by 255; and one of many
    negative values (normalised, z-scored) is clipped at 0."""
    global narrow_warned
    negative = float(np.mean(values < 0)) if values.size else 0.0
    if negative > 0.05:
        narrow_warned = True
        log.warning("%s is a float image with %.0f%% of its values below 0 (normalised?), "
                    "which turn black; scale the images to [0, 1] or 0..255 before "
                    "training", path, 100 * negative)
    elif 1 < top < 4:
        narrow_warned = True
        log.warning("%s is a float image with values up to %g: over 1, it is read as "
                    "0..255 and reaches the model nearly black, while float images within "
                    "1 are read as [0, 1]; if your images are [0, 1], pass --max-value 1 "
                    "(values over 1 turn white)", path, top)


def load_image(path, image_size=None, in_channels: int = 3,
               resize: str = "bilinear", scale: float = 1.0,
               max_value: float = 0.0) -> np.ndarray:
    """uint8 (h, w, in_channels) of an image file of any common format and mode, at
    ``image_size`` (height, width), or at its own size times ``scale`` if None.
    ``path`` may also be an image in memory, a Pillow image or a numpy array
    (``opened``), read by the same rules.

    Grayscale, palette, CMYK and RGBA images become RGB (alpha is dropped) for 3
    channels; anything becomes luminance for 1. 16-bit grayscale and float images are
    scaled to 8 bits, their ``max_value`` (if given) to 255 (``_to_8_bits``); 16-bit
    colour, which Pillow reads by its high byte, refuses a ``max_value``.
    The EXIF orientation is applied (``upright``). A JPEG at least twice
    ``image_size`` is decoded at 1/2, 1/4 or 1/8 scale (``draft``: the JPEG decoder's
    own scaling, far cheaper than a full decode), never below ``image_size``, then
    resized.
    """
    if resize not in RESIZE:
        raise ValueError(f"resize {resize!r}: choose one of {', '.join(RESIZE)}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels {in_channels!r}: 1 (grayscale) or 3 (RGB)")
    if image_size is not None and not (
            isinstance(image_size, (tuple, list)) and len(image_size) == 2
            and all(isinstance(n, numbers.Integral) and n > 0 for n in image_size)):
        raise ValueError(f"image_size {image_size!r}: give (height, width), two whole "
                         "numbers over 0")
    global dark_colour_warned, extra_band_warned
    mode = "RGB" if in_channels == 3 else "L"
    with opened(path, max_value) as img:
        wide = wide_samples(img)
        if wide:
            check_no_max_value(name_of(path), max_value)
        if not extra_band_warned and _extra_band(img):
            extra_band_warned = True
            log.warning("%s has a 4th band beside RGB (an extra one, such as "
                        "near-infrared), which is not read: the U-Net takes 1 or 3 "
                        "channels; save the 3 bands to learn from as the images",
                        name_of(path))
        height, width = image_size or scaled_size(shown_size(img), scale)
        if image_size or scale != 1:
            # Never below the target size; the decoder scales the image as stored.
            img.draft(mode, (height, width) if orientation(img) >= 5 else (width, height))
        img = upright(img)
        if img.mode in WIDE_MODES:
            img = _to_8_bits(img, name_of(path), max_value)
        elif img.mode == "P":
            img = img.convert("RGBA")  # applies the palette, transparency included
        img = img.convert(mode)
        if img.size != (width, height):
            img = img.resize((width, height), RESIZE[resize])
        pixels = np.asarray(img, np.uint8).reshape(height, width, in_channels)
    if wide and not dark_colour_warned and pixels.size and 0 < pixels.max() < 32:
        # 11- and 12-bit colour (satellite, pathology scanners): its high byte is 0..15.
        # (An all-black tile, a satellite image's no-data, says nothing.)
        dark_colour_warned = True
        log.warning("%s is 16-bit colour, read by its high byte (Pillow has no 16-bit "
                    "colour mode): its values reach only %d of 255, nearly black; %s",
                    name_of(path), int(pixels.max()), EIGHT_BIT_COLOUR)
    return pixels


# How 16-bit colour of fewer bits reaches the model at its range.
EIGHT_BIT_COLOUR = ("save the images as 8-bit colour scaled by their range first (values "
                    "* 255 / 4095 for 12-bit data)")


def _extra_band(img: Image.Image) -> bool:
    """Whether an RGB TIFF holds a 4th band that is not alpha (its ExtraSamples
    unspecified: near-infrared, say), which Pillow reads as RGB without a word."""
    if img.format != "TIFF" or img.mode != "RGB":
        return False
    tags = getattr(img, "tag_v2", {})
    return tags.get(262) == 2 and tags.get(277, 3) >= 4  # photometric RGB, samples


def reset_warnings() -> None:
    """Forgets which of the once-per-run warnings above were given: each training run
    gives its own, and its end-of-run hint reads its own."""
    global narrow_warned, clipped_warned, dark_colour_warned, extra_band_warned
    narrow_warned = clipped_warned = dark_colour_warned = extra_band_warned = False


# Colour spaces whose black is not all zeros: converted to RGB before a mask is read.
_OTHER_COLOUR_MODES = ("CMYK", "YCbCr", "LAB", "HSV")


def load_mask(path, image_size=None, num_classes: int = 1, scale: float = 1.0,
              ignore_index: int | None = None) -> np.ndarray:
    """uint8 (h, w, 1) of a mask file at ``image_size`` (or its own size times
    ``scale`` if None): {0, 1} for binary masks (``num_classes`` 1), else class ids;
    pixels of value ``ignore_index`` (``--ignore-index``) keep that value, which the
    losses and metrics leave out.

    One rule for every format. Palette images are read as their indices, never their
    colours (Kaggle's GIFs hold index 1 on the car, whose colour may well be black).
    Alpha is never part of the mask: LA masks use L, RGBA masks R, G and B. Colour
    masks take the largest of R, G, B (for several classes, a mask whose colours code
    the classes is an error: only grey colour masks hold ids). 16-bit masks keep their
    values (0/65535 and 0/1 masks alike; class ids are often stored as 16-bit).

    Binary masks: any non-zero value is foreground (Kaggle's index 1, users' 0/255),
    except in JPEG and lossy WebP masks, cut at 128: lossy compression leaves their
    black at 1, 2, 3...; and in masks with graded edges (values between 0 and 255
    beside 255 itself: anti-aliased or smoothly resized), cut at half their scale
    (``_soft``). Class ids are kept, and an id the model has no class for is an error.
    Resized by ``resize_labels``, so no new values appear and the mask stays on the
    image. The EXIF orientation is applied, as for images.
    """
    values, bands, lossy = _mask_bands(path)
    size = tuple(image_size or scaled_size(values.shape[:2], scale))
    if values.ndim == 3:  # several bands: the largest of them
        if num_classes > 1 and (values != values[..., :1]).any():
            raise _colour_coded(path, values, num_classes)
        values = values.max(axis=-1)
    # A lossy mask's void is no one value: compression spreads it like the rest.
    void = None if ignore_index is None or lossy else values == ignore_index
    if num_classes == 1:
        if void is not None:  # read as background, so that it sets no threshold
            values = np.where(void, 0, values)
        graded = "P" not in bands and _soft(values)  # palette indices are not levels
        values = values >= _half(values) if lossy or graded else values > 0
    else:
        check_class_ids(values, num_classes, path, lossy, ignore_index)
        values = values.astype(np.uint8)  # float or 16-bit ids, all below 256 by now
    if void is not None and void.any():
        values = np.where(void, ignore_index, values)
    return resize_labels(values.astype(np.uint8) if void is not None else values, size,
                         ignore_index)[..., None]


def _mask_bands(path) -> tuple[np.ndarray, tuple, bool]:
    """(values, bands, lossy) of a mask file as shown (EXIF orientation applied): (h, w)
    or (h, w, k) without its alpha bands, palette indices for 'P' (never the colours:
    Kaggle's GIFs hold index 1 on the car, whose colour may well be black); and whether
    its format is lossy (JPEG, MPO, a camera's JPEG with extra frames, lossy WebP)."""
    with open_image(path) as m:
        lossy = m.format in ("JPEG", "MPO") or (m.format == "WEBP" and _lossy_webp(path))
        m = upright(m)
        if m.mode in _OTHER_COLOUR_MODES:
            m = m.convert("RGB")
        bands, values = m.getbands(), np.asarray(m)
    if values.ndim == 3:
        values = values[..., [i for i, band in enumerate(bands) if band not in ("A", "a", "X")]]
    return values, bands, lossy


def several_values(path, ignore_index: int | None = None) -> tuple[str, int | None] | None:
    """What makes a mask file look like several classes, not one object, to a run that
    reads it as binary (any non-zero pixel foreground, ``load_mask``): ("values 0, 1,
    2", 3), the count C where the values are the class ids 0..C-1 (else None), or
    ("2 colours", None); None for what is a binary mask: two values, a lossy JPEG's
    noise around them, graded edges (in grey or in one colour), float levels. Pixels
    of ``ignore_index`` are not a value."""
    values, bands, lossy = _mask_bands(path)
    if lossy or (values.dtype.kind not in "ub" and "P" not in bands):
        return None  # compression noise, or float or signed levels: not class ids
    colours = None
    if values.ndim == 3:
        lit = values.reshape(-1, values.shape[-1])
        lit = lit[lit.max(axis=1) > 0].astype(np.float32)
        # One colour at several brightnesses (an anti-aliased red object) is one object.
        colours = len(np.unique(np.round(lit / lit.max(axis=1, keepdims=True), 1), axis=0))
        values = values.max(axis=-1)
    if ignore_index is not None:
        values = np.where(values == ignore_index, 0, values)
    if "P" not in bands and _soft(values):
        return None
    if colours is not None and colours > 1:
        return f"{colours} colours", None
    found = np.unique(values)
    if len(found) <= 2:
        return None
    shown = ", ".join(map(str, found[:6])) + (", ..." if len(found) > 6 else "")
    ids = len(found) if np.array_equal(found, np.arange(len(found))) else None
    return f"values {shown}", ids


def ignored_kind(path, ignore_index: int) -> str | None:
    """What a binary run with ``--ignore-index`` reads in a mask file: 'lossy' (a JPEG
    mask: compression spreads its values, so none is picked out and ignored),
    'foreground' (the value is the mask's only non-zero one, or its full scale with
    graded edges around it: the object itself, as in a 0/255 mask with
    ``--ignore-index 255``), 'objects' (other non-zero values: the ignored pixels beside
    the objects) or None (no non-zero pixel)."""
    values, bands, lossy = _mask_bands(path)
    if lossy:
        return "lossy"
    if values.ndim == 3:
        values = values.max(axis=-1)
    other = (values != 0) & (values != ignore_index)
    if (values == ignore_index).any() and (not other.any() or (
            "P" not in bands and values.dtype.kind == "u"
            and ignore_index == np.iinfo(values.dtype).max and _soft(values))):
        return "foreground"
    return "objects" if other.any() else None


def resize_labels(labels: np.ndarray, size: tuple[int, int],
                  ignore_index: int | None = None) -> np.ndarray:
    """uint8 labels (h, w) at ``size`` (height, width): each pixel takes the label that
    covers most of its area, so no new value appears. ``labels``: class ids, or a
    boolean mask.

    Nearest picks one source pixel per output pixel, and at an even factor (--scale
    0.5, 1024 -> 512) always the one after the middle of its block, where the image's
    filter samples the middle itself: sampled half a source pixel down and right,
    every training mask's content lay that far (a quarter of an output pixel) up and
    left of its image, and the model learned to draw its masks up and left of the
    object (about a sixth more boundary error after upsampling, on ellipses at scale
    0.5). The area a label covers is centred where the image is. A
    pixel covered half and half takes the higher label (the object), as nnU-Net
    resamples its segmentations; ``ignore_index``, no object, loses every tie (VOC's
    void ring would otherwise take each object's boundary pixels).
    """
    if labels.shape == tuple(size):
        return labels.astype(np.uint8, copy=False)

    def cover(plane):  # bool or 0/1: the share of each pixel where it is 1, in 0..255
        ones = plane.view(np.uint8) if plane.dtype == bool else plane.astype(np.uint8)
        plane = ones * np.uint8(255)  # 8 bits: 3x faster than float
        return np.asarray(Image.fromarray(plane).resize(tuple(size)[::-1],
                                                        Image.Resampling.BOX))

    if labels.dtype == bool or labels.max() <= 1:  # binary: one plane
        return (cover(labels) >= 128).astype(np.uint8)  # 127.5, half, rounds up
    present = np.flatnonzero(np.bincount(labels.ravel()))  # np.unique sorts: 4x slower
    if len(present) == 1:
        return np.full(size, present[0], np.uint8)
    # argmax takes the first of equals: planes from the highest label down, the
    # ignored value last.
    order = sorted(present[::-1], key=lambda label: label == ignore_index)
    planes = [cover(labels == label) for label in order]
    return np.asarray(order)[np.argmax(planes, axis=0)].astype(np.uint8)


def _half(values: np.ndarray) -> float:
    """The cut of a mask whose edges are graded: half its type's full scale (128 for
    8 bits, 32768 for 16; for floats 0.5 of masks in [0, 1], else 128 or 32768 by
    their largest value, overshoot allowed)."""
    if values.dtype.kind == "u":
        return (int(np.iinfo(values.dtype).max) + 1) // 2
    if values.dtype.kind == "f":
        # By the scale the values are on, allowing a smooth filter's overshoot (a [0, 1]
        # mask resized bicubic reaches 1.15): under 2 it is [0, 1], under 512 0..255.
        top = float(values.max(initial=0))
        return 0.5 if top < 2 else 128 if top < 512 else 32768
    return 128


def _fractional(values: np.ndarray) -> bool:
    """Whether a float mask holds values that are no whole number: levels between
    background and object (a mask resized smoothly in float, or a soft label)."""
    return values.dtype.kind == "f" and bool(np.any(values != np.round(values)))


def _soft(values: np.ndarray) -> bool:
    """Whether a binary mask has graded edges: it reaches its type's full scale (255
    for 8 bits) and its values between 0 and that lie on a thin ring around the
    full-scale pixels (at least 90% of them within 2 pixels of one, diagonals
    included; values under 1/32 of full scale, a Lanczos filter's ringing, are not
    counted). Masks drawn with anti-aliasing, or resized with a smooth filter, have
    such a ring at every edge, which "any non-zero" would count as foreground, growing
    each object by a pixel or more. Objects of a level of their own (a grey one beside
    a white one) are not a ring, and 0/1 and class-id masks never reach full scale:
    both keep "any non-zero". A float mask is graded where any value is fractional
    (whole-number floats are ids or 0/1, read like integers)."""
    if values.dtype.kind == "f":  # float levels: graded wherever one is fractional
        return _fractional(values)
    if values.dtype.kind != "u" or not values.size:
        return False
    full = np.iinfo(values.dtype).max
    top = values == full
    between = (values > full // 32) & ~top
    if not top.any() or not between.any():
        return False
    near = top
    for _ in range(2):  # grow the full-scale pixels by one pixel, diagonals too, twice
        grown = near.copy()
        grown[1:] |= near[:-1]
        grown[:-1] |= near[1:]
        wide = grown.copy()
        wide[:, 1:] |= grown[:, :-1]
        wide[:, :-1] |= grown[:, 1:]
        near = wide
    return (between & near).sum() >= 0.9 * between.sum()


def _lossy_webp(path) -> bool:
    """Whether a WebP file's pixels are lossy: its image chunk is VP8 (lossy) rather
    than VP8L (lossless), the first frame's for an animation of one frame. Pillow does
    not say, so the RIFF chunks are walked."""
    with open(path, "rb") as f:
        f.seek(12)  # "RIFF", the size, "WEBP"
        while len(header := f.read(8)) == 8:
            kind, size = header[:4], int.from_bytes(header[4:], "little")
            if kind in (b"VP8 ", b"VP8L"):
                return kind == b"VP8 "
            if kind == b"ANMF":  # a frame: 16 bytes of placement, then its own chunks
                f.seek(16, os.SEEK_CUR)
                continue
            f.seek(size + size % 2, os.SEEK_CUR)  # chunks are padded to even sizes
    return False


def _colour_coded(path, values: np.ndarray, num_classes: int) -> DataError:
    """The one-line error of a mask that codes its classes as colours (red for one,
    green for another), which no channel rule can read as class ids."""
    colours = np.unique(values.reshape(-1, values.shape[-1]), axis=0)
    shown = ", ".join(str(tuple(int(v) for v in c)) for c in colours[:4])
    more = f" and {len(colours) - 4} more" if len(colours) > 4 else ""
    return DataError(f"{path} codes classes as colours ({shown}{more}) but a model of "
                     f"{num_classes} classes needs class ids, one value per pixel; map each "
                     f"colour to its id (0..{num_classes - 1}) and save the ids as a "
                     "grayscale or palette PNG (README: 'Colour-coded masks')")


def check_class_ids(values: np.ndarray, num_classes: int, path, lossy: bool = False,
                    ignore_index: int | None = None) -> None:
    """Raises DataError unless every value of a mask is a class id below ``num_classes``
    or ``ignore_index``.

    The one rule for class ids; ``files.check_pair`` applies it to each source mask
    before training, so an id on pixels that resizing would drop is found too. The
    fix it names depends on what the mask looks like, since "more classes" is the
    wrong one for most masks that fail: a mask of only 0 and 255 (or 65535), a
    ``lossy`` JPEG mask (compression spreads a binary mask's 0 and 255 over dozens of
    values) and one with graded edges are binary masks, for ``--num-classes 1``;
    values 0..N may number objects (instance labels), which are foreground alike.
    """
    if _fractional(values):
        shown = values[values != np.round(values)].flat[0]
        raise DataError(f"{path} holds {shown:g}, which is no class id: class ids are whole "
                        f"numbers 0..{num_classes - 1}; store the label map as integers "
                        "(or, for a soft binary mask, train with --num-classes 1: it is cut "
                        "at half its scale)")
    if not values.size or (values.max() < num_classes and values.min() >= 0):
        return
    found = np.unique(values)
    if ignore_index is not None and not lossy:
        found = found[found != ignore_index]
        if not found.size or (found.max() < num_classes and found.min() >= 0):
            return
        values = np.where(values == ignore_index, 0, values)  # for the checks below
    have = f"the model has {num_classes} classes (--num-classes {num_classes})"
    if len(found) <= 2 and found.max() in (255, 65535) and found.min() == 0:
        raise DataError(f"{path} holds only 0 and {int(found.max())}, a binary mask, but "
                        f"{have}; train with --num-classes 1 for binary masks, or store "
                        f"class ids 0..{num_classes - 1}")
    if lossy:
        raise DataError(f"{path} is a JPEG mask: lossy compression spreads its values "
                        f"({len(found)} of them, up to {int(found.max())}), so it cannot "
                        f"hold class ids, but {have}; train with --num-classes 1 for "
                        "binary masks (read as foreground from 128 up), or store class ids "
                        "in PNG masks")
    if found.max() in (255, 65535) and _soft(values):
        raise DataError(f"{path} holds values from 0 to {int(found.max())} with graded "
                        f"edges, a binary mask drawn anti-aliased or resized smoothly, but "
                        f"{have}; train with --num-classes 1 for binary masks, or store "
                        f"class ids 0..{num_classes - 1}")
    if found.min() < 0:
        raise DataError(f"{path} holds {int(found.min())}, which is no class id; fix the "
                        "mask: class ids are 0 (background) to C-1")
    if found.max() == 255 and len(found) > 1 and found[-2] < num_classes:
        raise DataError(f"{path} holds class ids below {num_classes} and 255, Pascal VOC's "
                        "'void' (object borders, unlabelled pixels), which would be learned "
                        "as one more class; pass --ignore-index 255 to leave those pixels "
                        "out of the loss and the scores")
    if len(found) <= num_classes and found.max() > 2 * num_classes:
        # Classes stored as grey levels (0, 127, 255), which other tools map to ids.
        raise DataError(f"{path} holds the values {', '.join(map(str, found))}, classes "
                        f"as grey levels, but {have}, which take the class ids "
                        f"0..{num_classes - 1}; store each class as its id (0 the "
                        "background, then 1, 2, ...)")
    # Read by train and evaluate alike: the fix is named as a training flag.
    raise DataError(f"{path} holds class {int(found.max())} but the model has "
                    f"{num_classes} classes (0..{num_classes - 1}); train with "
                    f"--num-classes {int(found.max()) + 1} if its values are class ids, "
                    "with --num-classes 1 if they number objects (instance labels: all "
                    "foreground), or fix the mask")


def load_example(pair, image_size, in_channels: int = 3, resize: str = "bilinear",
                 num_classes: int = 1, scale: float = 1.0, max_value: float = 0.0,
                 ignore_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (h, w, C), mask uint8 (h, w, 1)) of one ``files.Pair`` at
    ``image_size``, or at the image's own size times ``scale`` if None; any decoding
    problem is a DataError naming the file."""
    return (load_image(pair.image, image_size, in_channels, resize, scale, max_value),
            load_mask(pair.mask, image_size, num_classes, scale, ignore_index))
