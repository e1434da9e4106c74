"""Figures for TensorBoard and files: confusion matrix, misclassified images, SE gates, excitation.

``TensorBoardFigures`` is on by default in the CLI (``--trainer.callbacks``); at the end of every
validation (not the sanity check) and of ``test`` it logs a confusion-matrix figure, a grid of
misclassified images with true and predicted labels and, per ResNet stage, a histogram of the SE
gate values. At the end of ``fit`` and ``test`` it writes the hyperparameters with the final
metrics to TensorBoard's HParams view. Figures use matplotlib's object API (no pyplot state).
"""

import math

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch.utils.tensorboard.summary import hparams
from torchmetrics.classification import MulticlassConfusionMatrix

from senet_pl.excitation import paper_name, recording_gates, se_blocks, spread


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
    n = max(len(images), 1)
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    figure = Figure(figsize=(1.5 * cols, 1.7 * rows), layout="constrained")
    for i in range(n):
        ax = figure.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i < len(images):
            ax.imshow(images[i, 0].float().cpu().numpy(), cmap="gray")
            ax.set_title(f"{true[i]} -> {predicted[i]}", fontsize=8)
    if not len(images):
        figure.suptitle("no misclassified images")
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


class TensorBoardFigures(L.Callback):
    """Confusion matrix, misclassified images and SE gate histograms after validation and test;
    hyperparameters with the final metrics in the HParams view after fit and test."""

    def __init__(self, max_images: int = 32, bins: int = 50) -> None:
        """
        Args:
            max_images: misclassified images shown per figure (the first ones met).
            bins: histogram bins over the gate range 0..1.
        """
        self.max_images, self.bins = max_images, bins

    def _active(self, trainer: L.Trainer) -> bool:
        # Decided by the logger's type, the same on every process (the collectives below need all of them).
        return not trainer.sanity_checking and isinstance(trainer.logger, TensorBoardLogger)

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer):
            return
        device = pl_module.device
        self.confusion = MulticlassConfusionMatrix(pl_module.hparams.num_classes).to(device)
        self.wrong: list[tuple[torch.Tensor, int, int]] = []
        # Per stage: bin counts, plus the count/sum/sum of squares/min/max that TensorBoard's histograms show.
        self.gates: dict[str, torch.Tensor] = {}
        self._logits = None
        # On the plain model, not the LightningModule: under DDP, Lightning routes validation_step itself
        # through the LightningModule's __call__, whose hooks would then also see its output (None).
        self._hook = pl_module.model.register_forward_hook(lambda m, i, out: setattr(self, "_logits", out.detach()))
        self._recording = recording_gates(se_blocks(pl_module.model), self._record_gates)
        self._recording.__enter__()

    def _record_gates(self, block: str, gates: torch.Tensor) -> None:
        stage = block.split(".")[0]
        g = gates.float()
        stats = torch.stack([g.new_tensor(g.numel()), g.sum(), (g * g).sum(), g.min(), g.max()])
        counts = torch.histc(g, bins=self.bins, min=0, max=1)
        if stage in self.gates:
            old = self.gates[stage]
            stats = torch.stack([old[0] + stats[0], old[1] + stats[1], old[2] + stats[2],
                                 torch.minimum(old[3], stats[3]), torch.maximum(old[4], stats[4])])
            counts = old[5:] + counts
        self.gates[stage] = torch.cat([stats, counts])

    def _batch(self, batch: list[torch.Tensor]) -> None:
        if self._logits is None:
            return
        x, y = batch
        predicted = self._logits.argmax(dim=1)
        self.confusion.update(predicted, y)
        for i in (predicted != y).nonzero().flatten().tolist()[: self.max_images - len(self.wrong)]:
            self.wrong.append((x[i].float().cpu(), y[i].item(), predicted[i].item()))
        self._logits = None

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._active(trainer):
            return
        self._recording.__exit__(None, None, None)
        self._hook.remove()
        matrix = self.confusion.compute()  # on every process: it gathers the counts of all of them
        gates = {s: trainer.strategy.reduce(g, reduce_op="sum") for s, g in self.gates.items()}  # (min/max: see below)
        if not trainer.is_global_zero:
            return
        writer, step = trainer.logger.experiment, trainer.global_step
        names = getattr(getattr(trainer.datamodule, "dataset_cls", None), "classes", None)
        names = [n.split(" - ")[0] for n in names] if names else None  # MNIST's "7 - seven" -> "7"
        writer.add_figure(f"{stage}/confusion_matrix", confusion_matrix_figure(matrix, names), step)
        label = (lambda k: names[k]) if names else str
        if self.wrong:
            images = torch.stack([w[0] for w in self.wrong])
            figure = misclassified_figure(images, [label(w[1]) for w in self.wrong], [label(w[2]) for w in self.wrong])
        else:
            figure = misclassified_figure(torch.empty(0, 1, 1, 1), [], [])
        writer.add_figure(f"{stage}/misclassified", figure, step)
        edges = torch.linspace(0, 1, self.bins + 1)[1:].tolist()
        for s, g in gates.items():
            # Summed over processes: count, sum and sum of squares are exact; min and max are the local
            # ones' sums under DDP, so they are taken from the bins instead.
            counts = g[5:].cpu()
            filled = counts.nonzero().flatten()
            low, high = (filled[0].item() / self.bins, (filled[-1].item() + 1) / self.bins) if len(filled) else (0, 1)
            if trainer.world_size == 1:
                low, high = g[3].item(), g[4].item()
            writer.add_histogram_raw(
                f"{stage}/se_gates/{s}", low, high, g[0].item(), g[1].item(), g[2].item(), edges, counts.tolist(), step
            )

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active(trainer):
            self._batch(batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._end(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active(trainer):
            self._batch(batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._end(trainer, pl_module, "test")
        self._log_hparams(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._log_hparams(trainer, pl_module)

    def _log_hparams(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Model, data and optimizer settings with the run's metrics, for TensorBoard's HParams view.

        The metrics are named by their scalar tags (``val/acc``...), whose last values TensorBoard
        shows in the table; nothing is logged twice.
        """
        if not trainer.is_global_zero or not isinstance(trainer.logger, TensorBoardLogger):
            return
        params = {f"model/{k}": v for k, v in pl_module.hparams.items()}
        if trainer.datamodule is not None:
            params |= {f"data/{k}": v for k, v in trainer.datamodule.hparams.items()}
        if trainer.optimizers:
            optimizer = trainer.optimizers[0]
            params["optimizer"] = type(optimizer).__name__
            params |= {f"optimizer/{k}": v for k, v in optimizer.defaults.items()}
        params = {k: v for k, v in params.items() if isinstance(v, (bool, int, float, str))}
        metrics = {k: 0.0 for k in trainer.callback_metrics if k.split("/")[0] in ("train", "val", "test")}
        if not metrics:
            return
        writer = trainer.logger.experiment._get_file_writer()
        for summary in hparams(params, metrics):
            writer.add_summary(summary)
        writer.flush()
