"""What the SE gates do: ``python -m senet_pl analyze --ckpt_path X`` (Sec. 7.2 and Fig. 6 of the paper).

``ExcitationAnalysis`` averages, during a test run, the gates of each stage's last SE block per class
(``gates.py`` has the statistics) and writes the figure, a CSV and a summary to the run folder.
"""

import csv
from pathlib import Path

import lightning.pytorch as L
import torch

from senet_pl.callbacks.output import run_folder
from senet_pl.compat import logged_step
from senet_pl.gates import class_means, describe, paper_name, recording_gates, se_blocks
from senet_pl.plots import excitation_figure


class ExcitationAnalysis(L.Callback):
    """During ``test``: the mean excitation per class and channel of each stage's last SE block.

    At the end it writes ``excitation.csv`` (block, class, channel, mean excitation; class "all" is
    every image), ``excitation.png`` (the paper's Fig. 6: a panel per block, a line per class) and
    ``excitation.txt`` (which blocks are class-agnostic and which class-specific) to the run folder,
    logs the figure to TensorBoard, and keeps the summary in ``report`` (printed once the progress bar has closed).
    """

    def __init__(self, class_names: list[str] | None = None) -> None:
        self.class_names = class_names
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: torch.Tensor | None = None
        self._gates: dict[str, torch.Tensor] = {}
        self._recording = None
        self.report: list[str] = []

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        blocks = se_blocks(pl_module.model, last_per_stage=True)
        if not blocks:
            raise ValueError("the model has no SE blocks (se: false): there is no excitation to analyze.")
        self.sums, self.counts, self.report = {}, None, []
        self._recording = recording_gates(blocks, self._gates.__setitem__)
        self._recording.__enter__()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        labels = batch[1]
        classes = pl_module.hparams.num_classes
        if self.counts is None:
            self.counts = torch.zeros(classes, dtype=torch.float64, device=labels.device)
        self.counts += torch.bincount(labels, minlength=classes)
        for name, gates in self._gates.items():
            total = self.sums.setdefault(name, torch.zeros(classes, gates.shape[1], dtype=torch.float64, device=gates.device))
            total.index_add_(0, labels, gates.double())
        self._gates.clear()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._recording.__exit__(None, None, None)
        # Sum over processes (every rank saw its own shard of the test split).
        counts = trainer.strategy.reduce(self.counts, reduce_op="sum")
        sums = {name: trainer.strategy.reduce(s, reduce_op="sum") for name, s in self.sums.items()}
        if not trainer.is_global_zero:
            return
        means = {name: class_means(s, counts) for name, s in sums.items()}
        names = self.class_names or [str(k) for k in range(len(counts))]
        folder = run_folder(trainer)
        write_csv(folder / "excitation.csv", means, names)
        summary = describe(means, names)
        (folder / "excitation.txt").write_text(summary + "\n")
        figure = excitation_figure(means, names)
        figure.savefig(folder / "excitation.png", dpi=120)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("excitation/per_class", figure, logged_step(trainer))  # the checkpoint's, as test
        self.report = [summary, f"excitation analysis written to {folder}/excitation.{{png,csv,txt}}"]


def write_csv(path: Path, means: dict[str, torch.Tensor], class_names: list[str]) -> None:
    """One row per (block, class, channel); class "all" is the mean over every image."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["block", "paper_name", "class", "channel", "mean_excitation"])
        for name, m in means.items():
            for k, label in enumerate([*class_names, "all"]):
                for c, value in enumerate(m[k].tolist()):
                    writer.writerow([name, paper_name(name), label, c, f"{value:.6f}"])
