"""What a run shows: the guide's loss plot, a grid of predictions, TensorBoard events."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    """matplotlib's pyplot, drawing to files only (servers have no display). Imported
    on first use, so that ``import unet_jax`` works where matplotlib is not installed
    (many GPU images): only the figures of a training run need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: list[dict], path: Path) -> None:
    """Training and validation loss per epoch, as the guide's ``plot_loss`` draws it."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig = plt.figure(figsize=(10, 6))
    plt.plot(epochs, [r["train_loss"] for r in history], label="Training Loss", marker="o")
    plt.plot(epochs, [r["val_loss"] for r in history], label="Validation Loss", marker="o")
    plt.xlabel("Epochs")
    plt.ylabel("Loss")
    plt.title("Training and Validation Loss Over Epochs")
    plt.legend()
    plt.grid()
    _save(fig, path)


def plot_predictions(images, masks, logits, path: Path, rows: int = 4,
                     ignore_index: int | None = None) -> None:
    """A grid: one row per validation image with the image, true mask, predicted mask.

    ``images``, ``masks`` and ``logits`` are batches or lists of (H, W, ...) arrays
    (whole images of a crop-trained run differ in size). The true mask's
    ``ignore_index`` pixels are red: no class, and not scored."""
    plt = _pyplot()
    labels = plt.get_cmap("gray").with_extremes(bad="tab:red")
    keep = range(min(len(images), rows))
    fig, axes = plt.subplots(len(keep), 3, figsize=(9, 2.6 * len(keep)), squeeze=False,
                             subplot_kw={"xticks": [], "yticks": []})
    for row, i in enumerate(keep):
        logit = np.asarray(logits[i])
        predicted = (logit[..., 0] > 0) if logit.shape[-1] == 1 else logit.argmax(-1)
        # Fixed ranges: stretched to each picture's own, a nearly black image would look
        # normal and an all-foreground mask black.
        top = max(1, logit.shape[-1] - 1)
        truth = np.asarray(masks[i])[..., 0]
        if ignore_index is not None:
            truth = np.ma.masked_equal(truth, ignore_index)
        panels = [(np.squeeze(images[i]), "image", 1), (truth, "true mask", top),
                  (predicted, "predicted mask", top)]
        for ax, (picture, title, vmax) in zip(axes[row], panels):
            ax.imshow(picture, cmap=labels, interpolation="nearest", vmin=0, vmax=vmax)
            ax.set_title(title)
            ax.axis("off")
    # Fixed margins: tight_layout measured every tick label and title of the grid, and
    # took most of the figure's second or so, drawn after every epoch.
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.3 / (2.6 * len(keep)),
                        wspace=0.05, hspace=0.3)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    # Write beside, then rename: a viewer never sees a half-written PNG.
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    _pyplot().close(fig)
    tmp.replace(path)


class SummaryWriter:
    """Scalars as TensorBoard event files (``tensorboard --logdir RUN_DIR``)."""

    def __init__(self, logdir):
        from data_pipeline.tf_setup import tensorflow

        self._tf = tensorflow()
        self._writer = self._tf.summary.create_file_writer(str(logdir))

    def scalars(self, step: int, values: dict) -> None:
        with self._writer.as_default():
            for name, value in values.items():
                self._tf.summary.scalar(name, float(value), step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
