"""Predict masks for new images with a trained run (the guide's single_image_inference).

Restores the parameters alone (the best checkpoint by validation Dice, unless
``--epoch`` says otherwise), predicts at the size the run was trained at, and writes,
for each input image, a binary PNG mask (0/255) at the image's own size. ``--viz`` adds
the guide's side-by-side figure (input, predicted mask) and an overlay.
"""

from __future__ import annotations

from pathlib import Path

from experiments import common

EXAMPLES = """
python -m experiments.predict --checkpoint runs/unet-20261124-120000 --input car.jpg --output out/
python -m experiments.predict --checkpoint RUN_DIR --input test_images/ --output masks/ --viz
"""


def parse_args(argv=None):
    p = common.make_parser("experiments.predict", __doc__.split("\n\n")[0], EXAMPLES)
    common.add_checkpoint_flags(p)
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="folder for <name>_mask.png files")
    p.add_argument("--viz", action="store_true", help="also write <name>_viz.png: input, "
                   "predicted mask, overlay")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.start_platform(args.platform)
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    import data_pipeline
    from experiments import inference

    predictor = inference.Predictor(args.checkpoint, args.epoch, args.batch_size)
    paths = data_pipeline.find_images(args.input)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for path, image, mask in tqdm(predictor.predict_files(paths), total=len(paths),
                                  unit="image", disable=len(paths) < 2):
        if mask.dtype == bool:
            picture = mask.astype(np.uint8) * 255
        else:  # several classes: class ids, spread over the grey levels to be visible
            picture = (mask * (255 // max(int(predictor.config.num_classes) - 1, 1))).astype(np.uint8)
        Image.fromarray(picture).save(out / f"{path.stem}_mask.png")
        if args.viz:
            save_viz(image, mask, out / f"{path.stem}_viz.png")
    print(f"wrote {len(paths)} mask(s) to {out}/ (checkpoint epoch {predictor.epoch} of "
          f"{args.checkpoint}, model input {predictor.config.image_size[0]}x"
          f"{predictor.config.image_size[1]})")
    return 0


def save_viz(image, mask, path) -> None:
    """The guide's figure (input and predicted mask side by side) plus an overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = image[..., 0] if image.shape[-1] == 1 else image
    overlay = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image.copy()
    overlay[mask > 0] = 0.5 * overlay[mask > 0] + 0.5 * np.array([1.0, 0.1, 0.1])
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, picture, title in zip(axes, (shown, mask, overlay), ("input", "predicted mask", "overlay")):
        ax.imshow(picture, cmap="gray")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.predict")
