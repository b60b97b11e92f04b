"""Predict masks for new images with a trained run (the guide's single_image_inference).

Restores the parameters alone (the best checkpoint by validation Dice, unless
``--epoch`` says otherwise), predicts the way the run was trained (resized to its
training size, or for a run trained on crops, the whole image at the training scale;
``--tile``/``--no-tile``, ``--overlap`` and ``--tta`` choose otherwise), and writes,
for each input image, a PNG mask at the image's own size: 0/255 for a binary model, the
class ids (0..C-1) for several classes. ``--viz`` adds the guide's side-by-side figure
(input, predicted mask) and an overlay, one colour per class; ``--probabilities`` the
foreground probability of a one-class run as an 8-bit PNG (0..255 for 0..1), or of a
run of several classes each class's but the background's (its softmax), for choosing
another threshold or averaging several runs' predictions.
"""

from __future__ import annotations

from pathlib import Path

from experiments import common

EXAMPLES = """
python -m experiments.predict --checkpoint runs/unet-20261124-120000 --input car.jpg --output out/
python -m experiments.predict --checkpoint RUN_DIR --input test_images/ --output masks/ --viz
python -m experiments.predict --checkpoint RUN_DIR --input big.tif --output out/ --tile --tta hflip
"""


def parse_args(argv=None):
    p = common.make_parser("experiments.predict", __doc__.split("\n\n")[0], EXAMPLES)
    common.add_checkpoint_flags(p)
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="image files or folders of images (a shell pattern such as "
                        "photos/*.jpg gives several)")
    p.add_argument("--output", required=True, help="folder for <name>_mask.png files")
    p.add_argument("--viz", action="store_true", help="also write <name>_viz.png: input, "
                   "predicted mask, overlay")
    p.add_argument("--probabilities", action="store_true", help="also write "
                   "<name>_prob.png, a one-class run's foreground probability as 0..255 "
                   "(the mask is where it is over --threshold); for several classes, "
                   "<name>_prob<c>.png for each class c from 1 (the mask is the most "
                   "probable class)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.start_platform(args.platform, args)
    import numpy as np

    import data_pipeline
    from unet_jax import rundir
    from unet_jax.progress import progress

    if Path(args.output).suffix.lower() in data_pipeline.files.IMAGE_SUFFIXES:
        raise common.UserError(f"--output {args.output}: give a folder; predict writes "
                               "<name>_mask.png there for each input image")
    predictor = common.make_predictor(args)
    out = rundir.check_writable(Path(args.output), "--output")
    # A second run into the input folder would predict masks of the first run's masks.
    every = [path for path in data_pipeline.find_images(args.input, skip_bad=args.skip_bad)
             if not is_output(path, out)]
    if not every:
        raise common.UserError(f"--input {' '.join(args.input)} holds only this command's "
                               "own outputs (<name>_mask.png, <name>_viz.png, "
                               "<name>_prob.png); give the folder of images")
    paths = data_pipeline.check_images(every, skip_bad=args.skip_bad)
    probs = probability_names(predictor.config.num_classes) if args.probabilities else ()
    kinds = ("mask", *(("viz",) if args.viz else ()), *probs)
    check_targets(paths, out, kinds)
    written = 0
    results = predictor.predict_files(paths, skip_bad=args.skip_bad, images=args.viz,
                                      logits=args.probabilities)
    for path, image, mask in (progress(results, len(paths)) if len(paths) > 1 else results):
        if args.probabilities:  # logits: the mask is decided from them, as predict does
            for kind, picture in zip(probs, probability_pngs(mask)):
                save_png(picture, out / f"{path.stem}_{kind}.png")
            mask = predictor.to_mask(mask)
        # Binary: 0/255, visible in any viewer. Several classes: the class ids
        # themselves, which is what tools that read label maps expect.
        picture = mask.astype(np.uint8) * 255 if mask.dtype == bool else mask.astype(np.uint8)
        save_png(picture, out / f"{path.stem}_mask.png")
        if args.viz:
            save_viz(image, mask, out / f"{path.stem}_viz.png", predictor.config.num_classes)
        written += 1
    skipped = f"; skipped {len(every) - written} unreadable" if written < len(every) else ""
    figures = f" and {written} figure(s) (<name>_viz.png)" if args.viz else ""
    if args.probabilities:
        names = " to ".join(f"<name>_{kind}.png" for kind in dict.fromkeys(probs[:1] + probs[-1:]))
        figures += f" and {written * len(probs)} probability map(s) ({names})"
    print(f"wrote {written} mask(s){figures} to {out}/{skipped} (checkpoint epoch "
          f"{predictor.epoch} "
          f"of {args.checkpoint}; {predictor.describe()})")
    return 0


def is_output(path: Path, out: Path) -> bool:
    """Whether ``path`` is a file this command writes: ``<name>_mask.png``,
    ``<name>_viz.png``, ``<name>_prob.png`` or ``<name>_prob<c>.png`` in the output
    folder."""
    import re

    return (path.suffix == ".png" and re.search(r"_(mask|viz|prob\d*)$", path.stem) is not None
            and path.parent.resolve() == out.resolve())


def probability_names(num_classes: int) -> tuple[str, ...]:
    """The kinds of probability map --probabilities writes: 'prob' for one class;
    'prob1' ... for several (the background's is one minus their sum)."""
    return ("prob",) if num_classes == 1 else tuple(f"prob{c}" for c in range(1, num_classes))


def probability_pngs(logits) -> list:
    """uint8 (H, W) maps of logits (H, W, C), probability times 255, rounded: a one-class
    run's sigmoid (128 and up where the mask at the default threshold 0.5 is
    foreground); several classes' softmax, each class but the background."""
    import numpy as np

    logits = np.asarray(logits, np.float64)
    if logits.shape[-1] == 1:
        probabilities = 1 / (1 + np.exp(-np.clip(logits, -88, 88)))
    else:
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = (exp / exp.sum(axis=-1, keepdims=True))[..., 1:]
    return [np.rint(probabilities[..., c] * 255).astype(np.uint8)
            for c in range(probabilities.shape[-1])]


# Every PNG this command writes says so in its "Software" text chunk: a second run
# replaces its own files, and never a file of the same name it did not write.
SOFTWARE = "unet-jax predict"


def written_by_predict(path: Path) -> bool:
    """Whether the PNG at ``path`` is one this command wrote (its header says so)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == SOFTWARE
    except (OSError, ValueError):  # unreadable, a folder, not an image: not ours
        return False


def check_targets(paths, out: Path, kinds) -> None:
    """Refuses, before predicting anything, to replace a file in ``out`` that this
    command did not write (``kinds``: 'mask', 'viz', 'prob'): ``<name>_mask.png`` is
    also how many datasets name their ground truth, which an --output of the data
    folder would overwrite."""
    from data_pipeline.files import IMAGE_SUFFIXES

    names = [f"{path.stem}_{kind}.png" for path in paths for kind in kinds]
    foreign = [out / name for name in names
               if (out / name).exists() and not written_by_predict(out / name)]
    # A ground truth in another format, "<name>_mask.tif" of LGG's folders, claims the
    # name as well: beside it, a "<name>_mask.png" leaves the dataset two masks for
    # one image, which training then refuses.
    claimed = {f"{path.stem}_mask" for path in paths} if "mask" in kinds else set()
    if claimed and out.is_dir():
        foreign += sorted(p for p in out.iterdir() if p.stem in claimed
                          and p.suffix.lower() in IMAGE_SUFFIXES and p.name not in names)
    if foreign:
        more = f" ({len(foreign)} such files)" if len(foreign) > 1 else ""
        raise common.UserError(
            f"--output {out}: {foreign[0]} is there and was not written by predict (a "
            f"ground-truth mask?){more}; give another --output folder, or move them")


def save_png(picture, path: Path) -> None:
    """Writes beside, then renames: an interrupted run leaves no half-written mask."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(picture).save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# A fixed colour per class for figures (class 0, the background, stays uncoloured);
# beyond these six, matplotlib's tab20 colours in turn.
CLASS_COLOURS = [(0.90, 0.10, 0.10), (0.10, 0.55, 0.95), (0.10, 0.80, 0.25),
                 (0.95, 0.75, 0.05), (0.70, 0.20, 0.85), (0.05, 0.85, 0.85)]


def class_colours(num_classes: int) -> list[tuple[float, float, float]]:
    """RGB colours of classes 1..num_classes-1 (one, for a binary model's foreground),
    the same for every image, so a class keeps its colour across a folder's figures."""
    import matplotlib

    palette = CLASS_COLOURS + [tuple(c[:3]) for c in matplotlib.colormaps["tab20"].colors]
    return [palette[i % len(palette)] for i in range(max(num_classes - 1, 1))]


def save_viz(image, mask, path, num_classes: int = 1) -> None:
    """The guide's figure (input and predicted mask side by side) plus an overlay.

    Several classes: the mask panel and the overlay colour each class alike, and the
    overlay's legend names the classes the image holds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    shown = image[..., 0] if image.shape[-1] == 1 else image
    overlay = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image.copy()
    ids = mask.astype(np.int32)
    colours = class_colours(num_classes)
    for c, colour in enumerate(colours, start=1):
        overlay[ids == c] = 0.5 * overlay[ids == c] + 0.5 * np.array(colour)
    if num_classes > 1:
        mask_style = dict(cmap=ListedColormap([(0.0, 0.0, 0.0), *colours]), vmin=0,
                          vmax=num_classes - 1)
    else:
        mask_style = dict(cmap="gray", vmin=0, vmax=1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    # The input as the model sees it, not stretched to its own range.
    panels = ((shown, "input", dict(cmap="gray", vmin=0, vmax=1)), (ids, "predicted mask",
                                                                     mask_style),
              (overlay, "overlay", {}))
    for ax, (picture, title, style) in zip(axes, panels):
        ax.imshow(picture, interpolation="nearest", **style)
        ax.set_title(title)
        ax.axis("off")
    present = [c for c in range(1, num_classes) if (ids == c).any()]
    if num_classes > 1 and present:
        axes[2].legend(handles=[Patch(color=colours[c - 1], label=f"class {c}")
                                for c in present], loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png", metadata={"Software": SOFTWARE})
    plt.close(fig)


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.predict")
