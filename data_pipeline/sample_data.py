"""A SYNTHETIC stand-in for Carvana, so that every tool runs out of the box.

THIS IS NOT CARVANA. It draws simple cars on a turntable in a photo booth and writes
them in the exact layout of Kaggle's download::

    <root>/train/<car>_<NN>.jpg              RGB JPEG, NN = 01..16
    <root>/train_masks/<car>_<NN>_mask.gif   palette GIF: index 1 on the car, 0 elsewhere
    <root>/metadata.json                     written last: marks a complete set

``<car>`` is a 12-hex-digit id, ``NN`` one of the 16 turntable angles, 22.5 degrees
apart, as in Carvana: 01 faces the camera, 05 and 13 are the side views, 09 is the
back, and NN and 18 - NN mirror each other. The default ``python -m experiments.train``
and the tests use it; the first call generates it (a few seconds) into
``$UNET_JAX_DATA`` or ``~/.cache/unet-jax`` and later calls reuse it.

To train on the real data, download ``train.zip`` and ``train_masks.zip`` from Kaggle's
*Carvana Image Masking Challenge* (carvana-image-masking-challenge), unzip both into one
folder so that it holds ``train/`` and ``train_masks/``, and pass it to the tools as
``--data-dir /path/to/carvana``.

The set is made to be learnable but not trivial. The cars differ in silhouette (sedan,
hatchback, wagon, SUV, van), paint (white, black, silver and grey ones, close to the
booth's own greys, are the most common, as on the road), size and position. They have
tinted windows with reflections, tyres and rims, lights, plates and a soft shadow on
the floor, which the mask leaves out, as Carvana's do. The best single grey-level
threshold reaches a Dice well below 0.9 on the set, so the U-Net has to learn shape.
The same arguments give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.errors import DataError

VERSION = 2  # bump when the pictures change, so that stale caches are not reused
ANGLES = 16
SUPERSAMPLE = 3  # draw 3x larger, then shrink: antialiased edges, as in a photograph
JPEG_QUALITY = 90
MARKER = "metadata.json"

# Paint colours (RGB) with how common they are; white, black, grey and silver cars sit
# close to the booth's tones, so that brightness alone cannot find the car.
PAINTS = [  # (weight, RGB)
    (0.24, (236, 237, 235)), (0.17, (22, 23, 26)), (0.13, (96, 99, 104)),
    (0.13, (176, 179, 183)), (0.08, (150, 22, 28)), (0.08, (28, 55, 120)),
    (0.04, (24, 40, 72)), (0.04, (45, 80, 58)), (0.04, (196, 182, 150)),
    (0.03, (105, 62, 38)), (0.02, (215, 120, 30))]

# Silhouettes, in fractions of the car's length (x: -0.5 rear to +0.5 front; z: up from
# the floor). ws/wt: windshield base and top x; rt/rw: rear window top and base x;
# hf/tr: hood front and trunk heights; nose/tail: how far the upper body slopes in.
KINDS = {
    "sedan":     dict(clear=0.036, crease=0.145, belt=0.205, roof=0.315, hf=0.175, tr=0.195,
                      ws=0.16, wt=-0.02, rt=-0.2, rw=-0.32, nose=0.035, tail=0.02,
                      width=0.41, wheel=0.069, axles=(0.33, -0.3)),
    "hatchback": dict(clear=0.04, crease=0.15, belt=0.215, roof=0.35, hf=0.18, tr=0.2,
                      ws=0.18, wt=0.0, rt=-0.4, rw=-0.47, nose=0.04, tail=0.012,
                      width=0.44, wheel=0.071, axles=(0.32, -0.32)),
    "wagon":     dict(clear=0.036, crease=0.145, belt=0.205, roof=0.32, hf=0.175, tr=0.2,
                      ws=0.16, wt=-0.02, rt=-0.43, rw=-0.475, nose=0.035, tail=0.012,
                      width=0.4, wheel=0.069, axles=(0.33, -0.31)),
    "suv":       dict(clear=0.05, crease=0.175, belt=0.245, roof=0.385, hf=0.215, tr=0.235,
                      ws=0.2, wt=0.04, rt=-0.43, rw=-0.475, nose=0.025, tail=0.01,
                      width=0.43, wheel=0.08, axles=(0.31, -0.31)),
    "van":       dict(clear=0.04, crease=0.15, belt=0.205, roof=0.37, hf=0.185, tr=0.2,
                      ws=0.31, wt=0.13, rt=-0.465, rw=-0.485, nose=0.03, tail=0.008,
                      width=0.38, wheel=0.066, axles=(0.34, -0.33)),
}


# --- the dataset on disk ------------------------------------------------------------

def default_root() -> Path:
    """Where sample sets are cached: ``$UNET_JAX_DATA``, else the user's cache folder
    (``$XDG_CACHE_HOME/unet-jax``, ``~/.cache/unet-jax``), where the compiled programs
    go too."""
    if os.environ.get("UNET_JAX_DATA"):
        return Path(os.environ["UNET_JAX_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "unet-jax"


def dataset_name(num_cars: int, size, seed: int) -> str:
    """The cache folder's name: the version and every argument, so none is reused wrongly."""
    return f"sample-carvana-v{VERSION}-{num_cars}cars-{size[0]}x{size[1]}-seed{seed}"


def sample_dataset_dir(root=None, *, num_cars: int = 24, size=(240, 160), seed: int = 0) -> Path:
    """The sample dataset's directory, generated on first use and reused after.

    Args:
      root: the dataset directory itself; by default ``default_root() / dataset_name(...)``.
      num_cars: cars, 16 images each; the default 24 (384 images) leaves several cars
        for a car-disjoint validation split.
      size: (width, height) of every image; 240x160 keeps Carvana's 3:2 (1918x1280).
      seed: the same seed gives byte-identical files.

    A directory is reused only when its ``metadata.json`` (written last) matches the
    arguments; a sample set made with other arguments is replaced.
    """
    size = _check_args(num_cars, size)
    given = root is not None
    root = Path(root) if given else default_root() / dataset_name(num_cars, size, seed)
    if _metadata(num_cars, size, seed) != _read_marker(root):
        try:
            generate(root, num_cars=num_cars, size=size, seed=seed)
        except OSError as e:
            where = ("" if given else " (set UNET_JAX_DATA to a writable folder for it, "
                     "or train on your own data with --data-dir)")
            raise DataError(f"cannot write the sample dataset to {root} "
                            f"({e.strerror or e}){where}") from None
    return root


def generate(root, *, num_cars: int = 24, size=(240, 160), seed: int = 0) -> Path:
    """Writes the sample set to ``root``, atomically.

    Everything is written to a hidden sibling folder, ``metadata.json`` last, which is
    then renamed to ``root``: an interrupted run leaves no ``root`` a later call could
    take for a complete set, only the sibling, which later calls ignore and clear away
    once it is an hour old. A ``root`` holding other files is never deleted: only an
    empty one or an earlier sample set (one with our ``metadata.json``) is replaced.
    """
    size = _check_args(num_cars, size)
    root = Path(root)
    if root.exists() and not _is_sample_set(root) and any(p.is_file() for p in root.rglob("*")):
        raise DataError(f"{root} holds files but no complete sample set (no {MARKER}); "
                        "it is left alone: remove it or pass another directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_temporaries(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / "train").mkdir()
        (tmp / "train_masks").mkdir()
        ids = []
        for index in range(num_cars):
            car_id = car_identifier(seed, index)
            ids.append(car_id)
            car = random_car(np.random.default_rng([seed, index]))
            for angle in range(1, ANGLES + 1):
                rng = np.random.default_rng([seed, index, angle])
                image, mask = render(car, angle, size, rng)
                image.save(tmp / "train" / f"{car_id}_{angle:02d}.jpg", quality=JPEG_QUALITY)
                mask.save(tmp / "train_masks" / f"{car_id}_{angle:02d}_mask.gif")
        marker = dict(_metadata(num_cars, size, seed), images=num_cars * ANGLES, cars=ids)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))  # last: the set is complete
        _replace(tmp, root, _metadata(num_cars, size, seed))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def car_identifier(seed: int, index: int) -> str:
    """A Kaggle-like car id (12 hex digits), fixed by the seed and the car's index."""
    return hashlib.sha1(f"unet-jax-sample-{seed}-{index}".encode()).hexdigest()[:12]


def _check_args(num_cars, size) -> tuple[int, int]:
    width, height = (int(s) for s in size)
    if int(num_cars) < 1 or width < 16 or height < 16:
        raise ValueError(f"need num_cars >= 1 and a size of at least 16x16, got "
                         f"num_cars={num_cars}, size={size}")
    return width, height


def _metadata(num_cars, size, seed) -> dict:
    return {"synthetic": True, "version": VERSION, "num_cars": int(num_cars),
            "size": [int(size[0]), int(size[1])], "seed": int(seed), "angles": ANGLES}


def _read_marker(root: Path):
    """The arguments a complete sample set in ``root`` was made with, else None."""
    try:
        marker = json.loads((root / MARKER).read_text())
        return {key: marker[key] for key in _metadata(1, (16, 16), 0)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_sample_set(root: Path) -> bool:
    """Whether ``root`` holds a complete sample set, of any version or arguments."""
    try:
        return json.loads((root / MARKER).read_text()).get("synthetic") is True
    except (OSError, ValueError, AttributeError):
        return False


def _replace(tmp: Path, root: Path, wanted: dict) -> None:
    """Moves the finished ``tmp`` to ``root``; an older sample set there goes first."""
    if root.exists():
        if _read_marker(root) == wanted:
            return  # another process finished the same set first: keep theirs
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        root.rename(old / "set")
        try:
            tmp.rename(root)
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        tmp.rename(root)
    except OSError:
        if _read_marker(root) != wanted:  # not a racing twin that finished first
            raise


def _clear_stale_temporaries(root: Path, age_s: float = 3600) -> None:
    """Removes what runs killed mid-generation left beside ``root`` (not the live ones)."""
    for leftover in root.parent.glob(f".{root.name}.*-*"):
        try:
            if time.time() - leftover.stat().st_mtime > age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


# --- one car ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Face:
    """A flat polygon of the car model, in the car's frame, with its outward normal."""
    points: np.ndarray  # (n, 3)
    normal: np.ndarray  # (3,)
    role: str


@dataclasses.dataclass(frozen=True)
class Car:
    """One car's fixed traits and its booth: the same in all 16 of its photographs."""
    kind: str
    shape: dict
    paint: np.ndarray
    glass: np.ndarray
    rim: np.ndarray
    dark_roof: bool
    parts: tuple  # (lower body, upper body, cabin): lists of Faces, drawn in that order
    glass_faces: tuple  # windows: Faces inset in the cabin's sides and ends
    offset: np.ndarray  # the car's place on the turntable, in its own frame
    camera_distance: float
    camera_height: float
    zoom: float  # the car's length in a side view, as a fraction of the image width
    centre: tuple  # where the turntable's axis appears, as fractions of (width, height)
    wall: float
    floor: float
    turntable: float
    tint: np.ndarray
    light: tuple  # (x slope, y slope, falloff) of the uneven studio light


def random_car(rng) -> Car:
    """One car: a kind of body with jittered proportions, a paint, and a booth to stand in.

    Proportions are jittered by a few percent so that no two cars of a kind share a
    silhouette; paints are drawn with real-world frequencies (mostly white, black,
    grey and silver) and shifted slightly, so colour identifies neither car nor kind.
    """
    kind = list(KINDS)[rng.integers(len(KINDS))]
    shape = dict(KINDS[kind])
    height = rng.uniform(0.94, 1.06)  # jitter heights together: the pieces stay convex
    for key in ("clear", "crease", "belt", "hf", "tr"):
        shape[key] *= height
    shape["roof"] *= height * rng.uniform(0.95, 1.06)
    shape["width"] *= rng.uniform(0.94, 1.06)
    shape["wheel"] *= rng.uniform(0.94, 1.08)
    shape["ws"] += rng.uniform(-0.02, 0.02)
    shape["rt"] = min(shape["rt"] + rng.uniform(-0.03, 0.03), shape["rw"] + 0.01)
    weights = np.array([w for w, _ in PAINTS])
    paint = np.array(PAINTS[rng.choice(len(PAINTS), p=weights / weights.sum())][1], float)
    paint = np.clip(paint * rng.uniform(0.9, 1.08) + rng.integers(-8, 9, 3), 8, 250)
    glass = np.array([30.0, 36, 42]) * rng.uniform(0.6, 1.6)
    rim = np.array([190.0, 192, 196]) if rng.random() < 0.65 else np.array([60.0, 61, 64])
    lower, upper, cabin, windows = _body(shape)
    wall = rng.uniform(0.8, 0.97)
    return Car(
        kind=kind, shape=shape, paint=paint, glass=glass, rim=rim * rng.uniform(0.85, 1.05),
        dark_roof=bool(rng.random() < 0.12), parts=(lower, upper, cabin), glass_faces=windows,
        offset=np.array([rng.uniform(-0.06, 0.06), rng.uniform(-0.04, 0.04), 0.0]),
        camera_distance=rng.uniform(2.3, 3.2), camera_height=rng.uniform(0.3, 0.48),
        zoom=rng.uniform(0.66, 0.86),
        centre=(0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.04, 0.06)),
        wall=wall, floor=wall - rng.uniform(0.08, 0.3), turntable=rng.uniform(-0.06, 0.05),
        tint=1 + rng.uniform(-0.015, 0.015, 3),
        light=(rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.04), rng.uniform(0.05, 0.18)))


def _prism(profile, half_width, roles) -> list[Face]:
    """A convex side profile (x, z) extruded across the car, narrowing with height.

    ``half_width(z)`` tapers the sides: a lower body that tucks in at the sill and a
    cabin leaning inwards (tumblehome) catch the light differently, as real panels do.
    Every face is kept, even those where two pieces meet: where the pieces' widths
    differ, a missing face would let the background show through the car.
    """
    profile = np.asarray(profile, float)
    hw = np.array([half_width(z) for z in profile[:, 1]])
    right = np.stack([profile[:, 0], hw, profile[:, 1]], 1)
    left = right * [1, -1, 1]
    centre = np.array([profile[:, 0].mean(), 0, profile[:, 1].mean()])
    faces = [_face(right, "side", centre), _face(left[::-1], "side", centre)]
    for i, role in enumerate(roles):
        j = (i + 1) % len(profile)
        faces.append(_face(np.stack([left[i], left[j], right[j], right[i]]), role, centre))
    return faces


def _face(points, role, inside) -> Face:
    """A Face with its normal (Newell's method), turned to point away from ``inside``."""
    nxt = np.roll(points, -1, 0)
    normal = np.array([np.sum((points[:, 1] - nxt[:, 1]) * (points[:, 2] + nxt[:, 2])),
                       np.sum((points[:, 2] - nxt[:, 2]) * (points[:, 0] + nxt[:, 0])),
                       np.sum((points[:, 0] - nxt[:, 0]) * (points[:, 1] + nxt[:, 1]))])
    normal /= np.linalg.norm(normal) + 1e-12
    if normal @ (points.mean(0) - inside) < 0:
        normal = -normal
    return Face(points, normal, role)


def _body(s: dict):
    """The car model: lower body, upper body, cabin (three convex prisms) and windows.

    Three convex pieces stacked bottom to top need no depth sorting: drawing each
    piece's camera-facing faces in that order hides what should be hidden, for a
    camera above the beltline, as Carvana's is.
    """
    hw = s["width"] / 2
    clear, crease, belt, roof = s["clear"], s["crease"], s["belt"], s["roof"]
    mid = clear + 0.45 * (crease - clear)
    lower = _prism([(-0.47, clear), (0.47, clear), (0.5, mid), (0.5, crease), (-0.5, crease),
                    (-0.5, mid)],
                   lambda z: hw * (0.93 + 0.07 * (z - clear) / (crease - clear)),
                   ["bottom", "chin", "bumper_front", "shelf", "bumper_rear", "chin"])
    upper_profile = [(-0.5, crease), (0.5, crease), (0.5 - s["nose"], s["hf"]), (s["ws"], belt),
                     (s["rw"], belt), (-0.5 + s["tail"], s["tr"])]
    upper = _prism(upper_profile, lambda z: hw * (1 - 0.25 * (z - crease)),
                   ["bottom", "nose", "hood", "shelf", "trunk", "tail"])
    cabin_hw = lambda z: hw * (0.95 - 1.6 * (z - belt))  # noqa: E731 (tumblehome)
    cabin_profile = np.array([(s["rw"], belt), (s["ws"], belt), (s["wt"], roof), (s["rt"], roof)])
    cabin = _prism(cabin_profile, cabin_hw,
                   ["bottom", "windshield", "roof", "rear_window"])
    # Windows: the cabin's sides inset by the pillars, and its ends inset by a frame.
    inset = _inset(cabin_profile, [0.012, 0.022, 0.014, 0.02])
    windows = []
    centre = np.array([cabin_profile[:, 0].mean(), 0, (belt + roof) / 2])
    pillars = [(s["ws"] + s["rw"]) / 2 + 0.01]  # B-pillar; a van's long cabin has a C too
    if s["ws"] - s["rw"] > 0.6:
        pillars = [s["ws"] - 0.3 * (s["ws"] - s["rw"]), s["ws"] - 0.64 * (s["ws"] - s["rw"])]
    edges = [-1.0] + [x for p in sorted(pillars) for x in (p - 0.013, p + 0.013)] + [1.0]
    for x0, x1 in zip(edges[::2], edges[1::2]):
        pane = _clip(inset, [(x0, -1), (x1, -1), (x1, 1), (x0, 1)])
        for sign in (1, -1):
            pts = np.array([(x, sign * cabin_hw(z) * 1.002, z) for x, z in pane])
            windows.append(_face(pts if sign > 0 else pts[::-1], "side_window", centre))
    for face in cabin:
        if face.role in ("windshield", "rear_window"):
            a, b, c, d = face.points
            pts = [_bilerp(a, b, c, d, u, v) for u, v in
                   ((0.07, 0.08), (0.07, 0.9), (0.93, 0.9), (0.93, 0.08))]
            windows.append(Face(np.array(pts) + face.normal * 1e-3, face.normal, face.role))
    return lower, upper, cabin, tuple(windows)


def _inset(polygon, distances) -> np.ndarray:
    """A convex polygon (counter-clockwise) with edge i moved inwards by distances[i]."""
    p = np.asarray(polygon, float)
    lines = []
    for i in range(len(p)):
        a, b = p[i], p[(i + 1) % len(p)]
        d = (b - a) / np.linalg.norm(b - a)
        inward = np.array([-d[1], d[0]])
        lines.append((a + inward * distances[i], d))
    out = []
    for i in range(len(p)):
        (a0, d0), (a1, d1) = lines[i - 1], lines[i]
        t = np.linalg.solve(np.stack([d0, -d1], 1), a1 - a0)[0]
        out.append(a0 + t * d0)
    return np.array(out)


def _bilerp(a, b, c, d, u, v):
    """The point at (u across, v along) on the quad a-b-c-d (a-b along, a-d across)."""
    return (1 - u) * ((1 - v) * a + v * b) + u * ((1 - v) * d + v * c)


# --- one photograph ----------------------------------------------------------------

class _Camera:
    """A pinhole camera in front of the turntable, looking slightly down at the car."""

    def __init__(self, car: Car, width: int, height: int):
        self.position = np.array([0.0, -car.camera_distance, car.camera_height])
        target = np.array([0.0, 0.0, 0.17])
        self.forward = (target - self.position) / np.linalg.norm(target - self.position)
        self.right = np.array([1.0, 0, 0])
        self.up = np.cross(self.right, self.forward)
        self.focal = car.zoom * width * car.camera_distance
        self.cx, self.cy = car.centre[0] * width, car.centre[1] * height

    def project(self, points) -> np.ndarray:
        rel = np.asarray(points) - self.position
        depth = rel @ self.forward
        return np.stack([self.cx + self.focal * (rel @ self.right) / depth,
                         self.cy - self.focal * (rel @ self.up) / depth], -1)

    def rays(self, u, v) -> np.ndarray:
        """World directions through pixel positions ``u``, ``v`` (for the background)."""
        return (self.forward + ((u - self.cx) / self.focal)[..., None] * self.right
                - ((v - self.cy) / self.focal)[..., None] * self.up)


class _Layers:
    """The car drawn twice at once: colour on black (premultiplied) and coverage."""

    def __init__(self, width, height):
        self.image = Image.new("RGB", (width, height), 0)
        self.mask = Image.new("L", (width, height), 0)
        self.draw, self.mdraw = ImageDraw.Draw(self.image), ImageDraw.Draw(self.mask)

    def polygon(self, points, colour):
        """Every car part is in the mask: body, glass, lights, mirrors and wheels."""
        pts = [tuple(p) for p in np.asarray(points, float)]
        if len(pts) >= 3:
            self.draw.polygon(pts, fill=_rgb(colour))
            self.mdraw.polygon(pts, fill=255)

    def line(self, points, colour, width):
        if len(points) < 2:
            return
        self.draw.line([tuple(p) for p in np.asarray(points, float)], fill=_rgb(colour),
                       width=max(1, int(round(width))))


def _rgb(colour):
    return tuple(int(c) for c in np.clip(np.round(colour), 0, 255))


def _shade(base, normal):
    """Studio lighting of a flat panel: soft boxes above and behind the camera, and the
    white booth mirrored in the gloss of the paint.

    Panels facing up catch the ceiling's light and panels facing down the floor's
    shade, so one paint shows several tones on one car, as a photographed one does;
    the reflection lifts black paint towards the greys of the floor and its shadow.
    """
    key = np.array([0.0, -0.55, 0.83])
    lit = 0.6 + 0.35 * max(0.0, normal @ key) + 0.2 * normal[2]
    reflection = 30 * (0.5 + 0.5 * normal[2]) + 25 * max(0.0, normal[2]) ** 4
    return np.asarray(base) * lit + reflection


def _clip(subject, clipper) -> np.ndarray:
    """Sutherland-Hodgman: the part of polygon ``subject`` inside convex ``clipper``."""
    clipper = np.asarray(clipper, float)
    orientation = 1 if _area(clipper) > 0 else -1
    out = [np.asarray(p, float) for p in subject]
    for i in range(len(clipper)):
        a, b = clipper[i], clipper[(i + 1) % len(clipper)]
        points, out = out, []
        for j, p in enumerate(points):
            q = points[(j + 1) % len(points)]
            sp, sq = orientation * _cross(a, b, p), orientation * _cross(a, b, q)
            if sp >= 0:
                out.append(p)
            if sp * sq < 0:
                out.append(p + (q - p) * sp / (sp - sq))
        if not out:
            break
    return np.array(out)


def _cross(o, a, b) -> float:
    """Positive when ``b`` lies to the left of the line from ``o`` through ``a``."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _area(polygon) -> float:
    """Twice the signed area (shoelace): its sign gives the polygon's orientation."""
    x, y = polygon[:, 0], polygon[:, 1]
    return float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _hull(points) -> np.ndarray:
    """The convex hull of 2-D points (monotone chain): a tyre's outline seen at an angle."""
    pts = sorted(map(tuple, np.asarray(points)))
    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and _cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and _cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def _circle(centre, radius, n=24) -> np.ndarray:
    """A circle in the car's side plane (x, z) at lateral position centre[1]."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([centre[0] + radius * np.cos(t), np.full(n, centre[1]),
                     centre[2] + radius * np.sin(t)], 1)


def render(car: Car, angle: int, size, rng):
    """(RGB photograph, palette mask) of ``car`` at turntable position ``angle`` (1..16).

    The car is drawn at SUPERSAMPLE times the size onto black, with its coverage in a
    second layer, and both are shrunk by box filtering: the coverage is then exactly
    the antialiased alpha with which the car is laid over the booth, and thresholding
    it at one half gives a mask aligned with the photograph's edges.
    """
    width, height = size
    W, H = width * SUPERSAMPLE, height * SUPERSAMPLE
    theta = -np.pi / 2 + 2 * np.pi * (angle - 1) / ANGLES  # 01: the front faces the camera
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
    camera = _Camera(car, W, H)
    to_world = lambda p: (np.asarray(p) + car.offset) @ rot.T  # noqa: E731
    eye = (camera.position @ rot) - car.offset  # the camera, in the car's frame
    facing = lambda face: face.normal @ (eye - face.points.mean(0)) > 0  # noqa: E731
    project = lambda p: camera.project(to_world(p))  # noqa: E731
    world_normal = lambda face: rot @ face.normal  # noqa: E731
    layers = _Layers(W, H)
    s, hw = car.shape, car.shape["width"] / 2
    px = W / 240  # one pixel of the 240-wide image, for line widths

    wheels = [(x, side * hw * 0.98, s["wheel"]) for x in s["axles"] for side in (1, -1)]
    near = lambda y: (eye[1] - y) * np.sign(y) > 0  # noqa: E731 (the camera sees that side)
    for x, y, r in wheels:
        if not near(y):
            _wheel(layers, project, car, (x, y, r), outer_visible=False)
    for sign in (1, -1):
        if not near(sign * hw):
            _mirror(layers, project, car, sign)

    lower, upper, cabin = car.parts
    for part in (lower, upper):
        for face in part:
            if facing(face):
                colour = car.paint if part is upper or face.role == "side" else car.paint * 0.75
                layers.polygon(project(face.points), _shade(colour, world_normal(face)))
    for face in lower + upper:
        if facing(face):
            _details(layers, project, car, face, world_normal(face), px)
    for face in cabin:
        if facing(face):
            black_roof = car.dark_roof and face.role == "roof"
            paint = np.array([20.0, 20, 22]) if black_roof else car.paint
            layers.polygon(project(face.points), _shade(paint, world_normal(face)))
    for face in car.glass_faces:
        if facing(face):
            _window(layers, project, car, face, world_normal(face), rng)
    for sign in (1, -1):
        if near(sign * hw):
            _mirror(layers, project, car, sign)
    for x, y, r in wheels:
        if near(y):
            _wheel(layers, project, car, (x, y, r), outer_visible=True)

    car_rgb = np.asarray(layers.image.reduce(SUPERSAMPLE), np.float32)
    alpha = np.asarray(layers.mask.reduce(SUPERSAMPLE), np.float32)[..., None] / 255
    studio = _studio(car, camera, width, height)
    pixels = _booth(car, theta, studio) * (1 - alpha) + car_rgb
    pixels *= studio.light
    pixels += 2.0 * rng.standard_normal(pixels.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    binary = (alpha[..., 0] >= 0.5).astype(np.uint8)
    mask = Image.frombytes("P", (width, height), binary.tobytes())
    mask.putpalette([0, 0, 0, 255, 255, 255])  # as Kaggle's: index 0 black, 1 white
    return image, mask


def _wheel(layers, project, car, wheel, outer_visible):
    """A tyre (a short dark cylinder: the hull of its two rims' outlines) and, when its
    outer side faces the camera, the rim and hub: what makes a car read as a car."""
    x, y, r = wheel
    sign = np.sign(y)
    outer = _circle((x, y + sign * 0.008, r), r)
    inner = _circle((x, y - sign * 0.055, r), r)
    layers.polygon(_hull(np.concatenate([project(outer), project(inner)])), (24, 24, 26))
    if outer_visible:
        layers.polygon(project(_circle((x, y + sign * 0.01, r), 0.93 * r)), (38, 38, 41))
        layers.polygon(project(_circle((x, y + sign * 0.011, r), 0.62 * r)), car.rim)
        layers.polygon(project(_circle((x, y + sign * 0.012, r), 0.2 * r, 12)), car.rim * 0.55)


def _mirror(layers, project, car, sign):
    """A door mirror: a small box beside the windshield that juts out of the
    silhouette in front and back views, where a threshold would cut it off."""
    s = car.shape
    x, z, hw = s["ws"] - 0.015, s["belt"] + 0.008, s["width"] / 2 * 0.94
    box = np.array([(x + dx, hw + dy, z + dz) for dx in (0, -0.035) for dy in (0, 0.05)
                    for dz in (0, 0.035)]) * [1, sign, 1]
    layers.polygon(_hull(project(box)), car.paint * 0.8)


def _details(layers, project, car, face, normal, px):
    """Lights, grille, plates, wheel arches and door seams on one visible panel."""
    s = car.shape
    if face.role in ("nose", "tail", "bumper_front", "bumper_rear"):
        a, b, c, d = face.points
        quad = lambda u0, u1, v0, v1: project(np.array(  # noqa: E731
            [_bilerp(a, b, c, d, u, v) for u, v in ((u0, v0), (u0, v1), (u1, v1), (u1, v0))]))
        if face.role == "nose":
            for u0 in (0.05, 0.72):
                layers.polygon(quad(u0, u0 + 0.23, 0.15, 0.85), (225, 228, 232))
        elif face.role == "tail":
            for u0 in (0.04, 0.74):
                layers.polygon(quad(u0, u0 + 0.22, 0.1, 0.9), (165, 25, 28))
        elif face.role == "bumper_front":
            layers.polygon(quad(0.2, 0.8, 0.15, 0.85), (30, 31, 34))
            layers.polygon(quad(0.4, 0.6, 0.3, 0.75), (228, 228, 222))
        else:
            layers.polygon(quad(0.4, 0.6, 0.3, 0.8), (228, 228, 222))
        return
    if face.role != "side":
        return
    sign = np.sign(face.points[0, 1])
    outline = project(face.points)
    for x in s["axles"]:  # a dark arch around each wheel, kept inside the panel
        arch = project(_circle((x, sign * s["width"] / 2, s["wheel"]), s["wheel"] * 1.18, 24))
        layers.polygon(_clip(arch, outline), (28, 28, 30))
    seam = _shade(car.paint, normal) * 0.55
    y = sign * s["width"] / 2 * 1.001
    for x in (s["ws"] + 0.005, (s["ws"] + s["rw"]) / 2 + 0.02, s["rw"] + 0.06):  # doors
        seg = np.array([(x, y, s["clear"] + 0.01), (x, y, s["belt"] - 0.005)])
        layers.line(_clip_segment(project(seg), outline), seam, 0.6 * px)


def _clip_segment(segment, polygon):
    """A segment cut to a convex polygon (Cyrus-Beck); empty when outside it."""
    p, q = np.asarray(segment, float)
    polygon = np.asarray(polygon, float)
    area = _area(polygon)
    t0, t1 = 0.0, 1.0
    for i in range(len(polygon)):
        a, b = polygon[i], polygon[(i + 1) % len(polygon)]
        inward = np.sign(area) * np.array([a[1] - b[1], b[0] - a[0]])
        num, den = inward @ (p - a), inward @ (q - p)
        if abs(den) < 1e-12:
            if num < 0:
                return np.empty((0, 2))
        elif den > 0:
            t0 = max(t0, -num / den)
        else:
            t1 = min(t1, -num / den)
    return np.array([p + t0 * (q - p), p + t1 * (q - p)]) if t0 < t1 else np.empty((0, 2))


def _window(layers, project, car, face, normal, rng):
    """Tinted glass: dark, lighter where it faces the bright ceiling, and sometimes a
    bright streak of reflected softbox, so glass is neither uniformly dark nor light."""
    outline = project(face.points)
    glass = car.glass + 95 * max(0.0, normal[2]) ** 1.5 + 14 * max(0.0, -normal[1])
    layers.polygon(outline, glass)
    if rng.random() < 0.55:
        lo, hi = outline.min(0), outline.max(0)
        x0 = rng.uniform(lo[0], hi[0])
        w = rng.uniform(0.06, 0.25) * (hi[0] - lo[0]) + 1
        slant = rng.uniform(0.2, 0.8) * (hi[1] - lo[1])
        band = np.array([(x0, hi[1] + 1), (x0 + slant, lo[1] - 1), (x0 + slant + w, lo[1] - 1),
                         (x0 + w, hi[1] + 1)])
        layers.polygon(_clip(band, outline), glass + rng.uniform(60, 150))


@dataclasses.dataclass
class _Studio:
    """What of the booth stays fixed while the turntable turns (computed once per car)."""
    grey: np.ndarray   # (H, W) brightness without the car's shadow
    floor: np.ndarray  # (H, W) the floor's share of it: what the shadow darkens
    box: tuple         # slices of the pixels whose floor lies near the turntable
    fx: np.ndarray     # floor coordinates of those pixels
    fy: np.ndarray
    light: np.ndarray  # (H, W, 3) uneven light and colour cast over the whole frame


_last_studio: list = [(None, None, None)]  # (car, size, _Studio): its 16 angles share one


def _studio(car: Car, camera: _Camera, width, height) -> _Studio:
    """The photo booth: a white wall curving into a grey floor and a turntable, each
    pixel found by casting its ray, so floor, turntable and shadow keep the camera's
    perspective and the shadow lies where the tyres touch the floor."""
    cached_car, cached_size, cached = _last_studio[0]
    if cached_car is car and cached_size == (width, height):
        return cached
    ss = SUPERSAMPLE
    u = (np.arange(width) * ss + (ss - 1) / 2)[None, :].repeat(height, 0)
    v = (np.arange(height) * ss + (ss - 1) / 2)[:, None].repeat(width, 1)
    d = camera.rays(u, v)
    cam = camera.position
    wall_y = 2.2
    down = d[..., 2] < -1e-6  # rays that meet the floor; the others go far away
    t_floor = -cam[2] / np.minimum(d[..., 2], -1e-6)
    fx = np.where(down, cam[0] + t_floor * d[..., 0], 0.0)
    fy = np.where(down, cam[1] + t_floor * d[..., 1], 1e3)
    t_wall = (wall_y - cam[1]) / d[..., 1]
    wz, wx = cam[2] + t_wall * d[..., 2], cam[0] + t_wall * d[..., 0]
    wall = car.wall * (1.02 - 0.05 * np.clip(wz, 0, 2) - 0.03 * np.abs(wx) ** 1.5)
    on_floor = 1 / (1 + np.exp(np.clip((fy - wall_y + 0.35) / 0.18, -30, 30)))
    r = np.hypot(fx, fy)
    floor = car.floor * (1.0 - 0.05 * np.clip(r, 0, 3))
    floor = floor + car.turntable * (r < 0.78) - 0.05 * np.exp(-((r - 0.78) / 0.006) ** 2)
    floor = 242 * on_floor * floor
    near = np.argwhere(r < 0.8)
    (r0, c0), (r1, c1) = (near.min(0), near.max(0) + 1) if len(near) else ((0, 0), (0, 0))
    box = (slice(r0, r1), slice(c0, c1))
    x = np.linspace(-1, 1, width)[None, :]
    y = np.linspace(-1, 1, height)[:, None]
    gx, gy, falloff = car.light  # uneven studio light, over car and booth alike
    light = (1 + gx * x + gy * y - falloff * (x ** 2 + y ** 2) / 2)[..., None] * car.tint
    studio = _Studio(grey=floor + 242 * (1 - on_floor) * wall, floor=floor, box=box,
                     fx=fx[box], fy=fy[box], light=light.astype(np.float32))
    _last_studio[0] = (car, (width, height), studio)
    return studio


def _booth(car: Car, theta, studio: _Studio) -> np.ndarray:
    """The booth at one turntable angle: the studio darkened by the car's shadow,
    deepest under the body and at the tyres' contact patches, fading out past the
    footprint. The shadow is never in the mask, as in Carvana's."""
    c, s = np.cos(-theta), np.sin(-theta)
    qx = c * studio.fx - s * studio.fy - car.offset[0]
    qy = s * studio.fx + c * studio.fy - car.offset[1]
    half = np.array([0.47, car.shape["width"] / 2])
    ox, oy = np.abs(qx) - half[0], np.abs(qy) - half[1]
    sd = np.hypot(np.maximum(ox, 0), np.maximum(oy, 0)) + np.minimum(np.maximum(ox, oy), 0)
    shadow = 0.5 / (1 + np.exp(np.clip(sd / 0.05, -30, 30)))
    for x in car.shape["axles"]:
        for side in (1, -1):
            dist2 = (qx - x) ** 2 + (qy - side * car.shape["width"] / 2) ** 2
            shadow += 0.35 * np.exp(-dist2 / 0.0015)
    grey = studio.grey.copy()
    grey[studio.box] -= studio.floor[studio.box] * np.clip(shadow, 0, 0.8)
    return np.clip(grey, 0, 255).astype(np.float32)[..., None]
