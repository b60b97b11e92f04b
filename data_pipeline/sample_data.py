"""A built-in, synthetic stand-in for Carvana, so that every tool runs out of the box.

THIS IS NOT CARVANA. It draws simple cars in a photo booth, in Kaggle's exact layout:
``train/<car>_<NN>.jpg`` (RGB JPEG) and ``train_masks/<car>_<NN>_mask.gif`` (palette
GIF holding index 1 on the car, 0 elsewhere), 16 turntable angles per car. It is what
the default ``python -m experiments.train`` and the tests use. For real work download
``train.zip`` and ``train_masks.zip`` from Kaggle's *Carvana Image Masking Challenge*,
unzip both into one folder and pass it as ``--data-dir``.

The cars differ in silhouette (sedan, hatchback, SUV, van), colour (dark, white and
silver ones close to the booth's greys included), size and position; they have windows
with reflections, wheels, lights and a soft shadow on the floor (the shadow is not part
of the mask, as in Carvana), so no colour or brightness threshold separates car from
background. The set is deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VERSION = 1
ANGLES = 16
SUPERSAMPLE = 3  # draw large, then shrink: antialiased edges, like a photograph

# Body colours (RGB): dark, white and silver ones are close to the booth's tones.
COLOURS = [(20, 20, 24), (235, 235, 232), (170, 172, 176), (150, 20, 25), (25, 50, 120),
           (40, 90, 60), (200, 200, 205), (90, 92, 96), (210, 150, 30), (110, 20, 60),
           (60, 60, 66), (245, 245, 245)]

# Silhouettes: (body height, cabin height, cabin start, cabin end, roof taper), as
# fractions of the car's length.
SHAPES = {"sedan": (0.16, 0.13, 0.28, 0.78, 0.12), "hatchback": (0.17, 0.15, 0.25, 0.92, 0.06),
          "suv": (0.21, 0.17, 0.22, 0.93, 0.05), "van": (0.24, 0.19, 0.12, 0.97, 0.03)}


def default_root() -> Path:
    return Path(os.environ.get("UNET_JAX_DATA", Path.home() / ".cache" / "unet-jax"))


def sample_dataset_dir(root=None, *, num_cars: int = 24, size=(240, 160), seed: int = 0) -> Path:
    """The sample dataset's directory, generated on first use and reused after.

    ``root`` is the dataset directory itself; by default a folder named after the
    version and arguments under ``$UNET_JAX_DATA`` or ``~/.cache/unet-jax``.
    """
    if root is None:
        name = f"sample-carvana-v{VERSION}-{num_cars}cars-{size[0]}x{size[1]}-seed{seed}"
        root = default_root() / name
    root = Path(root)
    if not (root / "metadata.json").is_file():
        generate(root, num_cars=num_cars, size=size, seed=seed)
    return root


def generate(root, *, num_cars: int = 24, size=(240, 160), seed: int = 0) -> Path:
    """Writes the dataset to ``root``; atomically, so an interrupted run leaves nothing
    that a later call would take for a complete dataset."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        (tmp / "train").mkdir()
        (tmp / "train_masks").mkdir()
        for index in range(num_cars):
            car_id = hashlib.sha1(f"{seed}-{index}".encode()).hexdigest()[:12]
            rng = np.random.default_rng([seed, index])
            car = random_car(rng)
            for angle in range(ANGLES):
                image, mask = render(car, angle, size, np.random.default_rng([seed, index, angle]))
                name = f"{car_id}_{angle + 1:02d}"
                image.save(tmp / "train" / f"{name}.jpg", quality=90)
                mask.save(tmp / "train_masks" / f"{name}_mask.gif")
        (tmp / "metadata.json").write_text(json.dumps(
            {"version": VERSION, "cars": num_cars, "angles": ANGLES, "size": list(size),
             "seed": seed, "synthetic": True}))  # written last: marks a complete set
        if root.exists():
            shutil.rmtree(root)  # an incomplete earlier attempt
        try:
            tmp.rename(root)
        except OSError:  # another process finished first: keep theirs
            if not (root / "metadata.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def random_car(rng) -> dict:
    """One car's fixed traits: silhouette, colour, size, place in the booth."""
    shape = list(SHAPES)[rng.integers(len(SHAPES))]
    colour = np.array(COLOURS[rng.integers(len(COLOURS))]) + rng.integers(-12, 13, 3)
    return {"shape": shape, "colour": np.clip(colour, 0, 255),
            "length": rng.uniform(0.55, 0.78),      # of the image width, seen from the side
            "width": rng.uniform(0.36, 0.44),       # of its length
            "ground": rng.uniform(0.72, 0.86),      # floor contact line, of the height
            "offset": rng.uniform(-0.08, 0.08),     # horizontal position, of the width
            "wheel": rng.uniform(0.075, 0.095),     # wheel radius, of the length
            "glass": rng.uniform(0.1, 0.35),        # window tint brightness
            "wall": rng.uniform(0.78, 0.95),        # booth brightness
            "floor": rng.uniform(0.55, 0.75)}


def _booth(rng, width, height, car) -> np.ndarray:
    """A photo booth: a bright wall with a soft gradient, a darker floor, uneven light."""
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(-1, 1, width)[None, :]
    horizon = car["ground"] - 0.22
    wall = car["wall"] - 0.08 * y + 0.04 * np.cos(2.0 * x)
    floor = car["floor"] + 0.15 * (y - horizon) - 0.05 * x ** 2
    blend = 1 / (1 + np.exp(-(y - horizon) * 60))
    grey = (1 - blend) * wall + blend * floor
    tint = 1 + rng.uniform(-0.03, 0.03, 3)
    return np.clip(grey[..., None] * tint * 255, 0, 255)


def _outline(car, angle: int, width: int, height: int):
    """Polygons of the car seen at turntable ``angle``: (body, cabin, windows, wheels,
    lights), in pixel coordinates. Side views show the profile; towards the front and
    back the profile shortens and the car's front or rear face appears beside it."""
    theta = 2 * np.pi * angle / ANGLES
    length = car["length"] * width
    side = abs(np.cos(theta)) * length
    face = abs(np.sin(theta)) * car["width"] * length
    total = side + face
    cx = width / 2 + car["offset"] * width
    x0 = cx - total / 2
    ground = car["ground"] * height
    body_h, cabin_h, c0, c1, taper = SHAPES[car["shape"]]
    wheel_r = car["wheel"] * length
    body_top = ground - wheel_r * 0.6 - body_h * length
    roof = body_top - cabin_h * length
    facing_left = np.cos(theta) >= 0  # which end the front face shows at
    if np.sin(theta) < 0:
        facing_left = not facing_left
    sx0 = x0 + face if facing_left else x0
    fx0 = x0 if facing_left else x0 + side

    body = [(sx0, body_top), (sx0 + side, body_top), (sx0 + side, ground - wheel_r * 0.6),
            (sx0, ground - wheel_r * 0.6)]
    cab_a, cab_b = sx0 + c0 * side, sx0 + c1 * side
    t = taper * side
    cabin = [(cab_a, body_top), (cab_a + t * 2, roof), (cab_b - t, roof), (cab_b, body_top)]
    inset = 0.18 * cabin_h * length
    windows = [(cab_a + inset * 1.2, body_top - inset * 0.3), (cab_a + t * 2 + inset * 0.5, roof + inset),
               (cab_b - t - inset * 0.5, roof + inset), (cab_b - inset * 1.2, body_top - inset * 0.3)]
    wheels = []
    if side > 0.25 * length:
        for frac in (0.18, 0.82):
            wheels.append((sx0 + frac * side, ground - wheel_r, wheel_r))
    parts = {"body": body, "cabin": cabin, "windows": windows, "wheels": wheels,
             "face": None, "lights": []}
    if face > 0.05 * length:
        face_box = [(fx0, body_top), (fx0 + face, body_top), (fx0 + face, ground - wheel_r * 0.4),
                    (fx0, ground - wheel_r * 0.4)]
        wind = [(fx0 + face * 0.12, body_top), (fx0 + face * 0.2, roof),
                (fx0 + face * 0.8, roof), (fx0 + face * 0.88, body_top)]
        parts["face"] = (face_box, wind)
        for frac in (0.15, 0.85):
            wheels.append((fx0 + frac * face, ground - wheel_r * 0.8, wheel_r * 0.8))
        lh = 0.05 * length
        parts["lights"] = [(fx0 + face * 0.06, body_top + lh, fx0 + face * 0.26, body_top + 2 * lh),
                           (fx0 + face * 0.74, body_top + lh, fx0 + face * 0.94, body_top + 2 * lh)]
    return parts


def render(car, angle: int, size, rng):
    """(RGB image, palette mask) of ``car`` at ``angle``: drawn large, then shrunk."""
    width, height = size
    W, H = width * SUPERSAMPLE, height * SUPERSAMPLE
    parts = _outline(car, angle, W, H)
    colour = tuple(int(c) for c in car["colour"])
    darker = tuple(int(c * 0.6) for c in car["colour"])
    lighter = tuple(int(min(255, c * 1.25 + 30)) for c in car["colour"])
    glass = tuple(int(255 * car["glass"] * f) for f in (0.8, 0.9, 1.0))

    canvas = Image.fromarray(_booth(rng, W, H, car).astype(np.uint8))
    # Shadow: a blurred dark ellipse on the floor under the car (not in the mask).
    xs = [p[0] for p in parts["body"]] + ([p[0] for p in parts["face"][0]] if parts["face"] else [])
    ground = car["ground"] * H
    shadow = Image.new("L", (W, H), 0)
    ImageDraw.Draw(shadow).ellipse([min(xs) - 0.04 * W, ground - 0.03 * H,
                                    max(xs) + 0.04 * W, ground + 0.04 * H], fill=150)
    shadow = shadow.filter(ImageFilter.GaussianBlur(6 * SUPERSAMPLE))
    canvas = Image.composite(Image.new("RGB", (W, H), (35, 35, 38)), canvas, shadow)

    draw = ImageDraw.Draw(canvas)
    mask = Image.new("L", (W, H), 0)
    mdraw = ImageDraw.Draw(mask)
    if parts["face"]:
        face_box, wind = parts["face"]
        draw.polygon(face_box, fill=darker)
        draw.polygon(wind, fill=colour)
        inner = [(x * 0.92 + sum(p[0] for p in wind) / 4 * 0.08, y * 0.9 + sum(p[1] for p in wind) / 4 * 0.1)
                 for x, y in wind]
        draw.polygon(inner, fill=glass)
        for poly in (face_box, wind):
            mdraw.polygon(poly, fill=255)
        for light in parts["lights"]:
            draw.rectangle(light, fill=(250, 245, 220) if angle < ANGLES // 2 else (200, 20, 20))
    draw.polygon(parts["cabin"], fill=colour)
    draw.polygon(parts["body"], fill=colour)
    top = parts["body"][0][1]
    bottom = parts["body"][2][1]
    band = top + 0.25 * (bottom - top)
    draw.rectangle([parts["body"][0][0], band, parts["body"][1][0], band + 0.12 * (bottom - top)],
                   fill=lighter)  # a highlight along the flank
    draw.rectangle([parts["body"][0][0], bottom - 0.2 * (bottom - top), parts["body"][1][0], bottom],
                   fill=darker)
    if parts["body"][1][0] - parts["body"][0][0] > 4:
        draw.polygon(parts["windows"], fill=glass)
        if rng.random() < 0.6:  # a reflection on the glass
            w = parts["windows"]
            x = w[0][0] + rng.uniform(0.2, 0.7) * (w[3][0] - w[0][0])
            draw.polygon([(x, w[0][1]), (x + 0.04 * W, w[1][1]), (x + 0.07 * W, w[1][1]),
                          (x + 0.03 * W, w[0][1])], fill=(225, 230, 235))
    for poly in (parts["body"], parts["cabin"]):
        mdraw.polygon(poly, fill=255)
    for x, y, r in parts["wheels"]:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(18, 18, 20))
        draw.ellipse([x - 0.55 * r, y - 0.55 * r, x + 0.55 * r, y + 0.55 * r], fill=(150, 152, 158))
        mdraw.ellipse([x - r, y - r, x + r, y + r], fill=255)

    image = canvas.resize((width, height), Image.LANCZOS)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 3.0, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    binary = (np.asarray(mask.resize((width, height), Image.BOX)) >= 128).astype(np.uint8)
    gif = Image.fromarray(binary, mode="P")
    gif.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    return image, gif
