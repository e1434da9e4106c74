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
    # Fixed margins, not layout="constrained": for 32 images that took 1.5 s of a validation on a 2-core CPU,
    # these 0.7 s. Each cell is 1.5 x 1.7 in: the image and, in the top 0.3 in, its title.
    figure = Figure(figsize=(1.5 * cols, 1.7 * rows))
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / (1.7 * rows), wspace=0.1, hspace=0.3)
    for i in range(n):
        ax = figure.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        ax.imshow(images[i, 0].float().cpu().numpy(), cmap="gray")
        ax.set_title(f"{true[i]} -> {predicted[i]}", fontsize=8)
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
