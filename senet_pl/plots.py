"""The project's figures, drawn with matplotlib's object API (no pyplot state): confusion matrix,
misclassified images, and the paper's Fig. 6 (per-class excitation)."""

import math

import torch
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassConfusionMatrix

from senet_pl.gates import paper_name, spread


def confusion_matrix_figure(matrix: torch.Tensor, class_names: list[str] | None = None) -> Figure:
    """A (classes, classes) confusion matrix drawn by torchmetrics: rows true class, columns predicted."""
    n = len(matrix)
    figure = Figure(figsize=(1 + 0.6 * n, 1 + 0.6 * n), layout="constrained")
    ax = figure.add_subplot()
    MulticlassConfusionMatrix(n).plot(val=matrix.cpu(), ax=ax, labels=class_names)
    ax.set_title(f"confusion matrix ({int(matrix.sum())} images)")
    return figure


def misclassified_figure(images: torch.Tensor, true: list[str], predicted: list[str]) -> Figure:
    """A grid of images (N, 1, H, W) titled 'true -> predicted'; pixel values are rescaled per image."""
    n = len(images)
    if not n:  # wide enough for the sentence (a 1.5 in cell cut it off)
        figure = Figure(figsize=(3, 0.5))
        figure.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        return figure
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    # One axes for the whole grid, each image placed by its extent and titled by a text: an axes per image
    # (a subplot grid) drew 32 images in 0.6 s on a 2-core CPU, at every validation; this takes a third of that.
    # In axes units an image is 1 wide; a cell adds 0.1 between columns and 0.25 for the title above the image,
    # and 1.35 in per unit makes a cell 1.5 x 1.7 in, wide enough for "T-shirt/top -> Ankle boot" at 8 pt.
    width, gap, band, inch = 1.0, 0.1, 0.25, 1.35
    height = width * images.shape[-2] / images.shape[-1]
    figure = Figure(figsize=(inch * cols * (width + gap), inch * rows * (height + band)))
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    for i in range(n):
        x, y = (i % cols) * (width + gap) + gap / 2, (i // cols) * (height + band) + band
        # imshow scales each image to its own minimum and maximum, as a subplot of its own did
        ax.imshow(images[i, 0].float().cpu().numpy(), cmap="gray", extent=(x, x + width, y + height, y))
        ax.text(x + width / 2, y - band / 8, f"{true[i]} -> {predicted[i]}", ha="center", va="bottom", fontsize=8)
    ax.set_xlim(0, cols * (width + gap))
    ax.set_ylim(rows * (height + band), 0)
    ax.set_aspect("auto")
    return figure


def excitation_figure(means: dict[str, torch.Tensor], class_names: list[str]) -> Figure:
    """The paper's Fig. 6: a panel per SE block, a line per class (and the mean over all images, dashed)."""
    cols = min(len(means), 2)
    rows = math.ceil(len(means) / cols)
    figure = Figure(figsize=(6.5 * cols, 3.2 * rows), layout="constrained")
    colours = [f"C{k % 10}" for k in range(len(class_names))]
    for i, (name, m) in enumerate(means.items()):
        ax = figure.add_subplot(rows, cols, i + 1)
        channels = torch.arange(m.shape[1]).numpy()
        for k, label in enumerate(class_names):
            ax.plot(channels, m[k].numpy(), color=colours[k], linewidth=0.8, label=label)
        ax.plot(channels, m[-1].numpy(), "k--", linewidth=0.8, label="all")
        ax.set_title(f"{paper_name(name)} ({name}): spread {spread(m):.3f}", fontsize=10)
        ax.set_xlabel("channel index")
        ax.set_ylabel("activation")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(0, m.shape[1] - 1)
    figure.legend(*ax.get_legend_handles_labels(), loc="outside right", fontsize=8)
    return figure
