"""TensorBoard figures, on by default in the CLI (``--trainer.callbacks``).

At the end of every validation (not the sanity check) and of ``test``, ``TensorBoardFigures`` logs
a confusion-matrix figure, a grid of misclassified images with true and predicted labels and, per
ResNet stage, a histogram of the SE gate values. When training starts (and when ``test`` or ``validate`` starts a run
folder of its own) it writes the settings to TensorBoard's HParams view. (The drawing: ``plots.py``.)
"""

from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams
from torch.utils.tensorboard.writer import FileWriter
from torchmetrics.classification import MulticlassConfusionMatrix

from senet_pl.compat import logged_step
from senet_pl.gates import recording_gates, se_blocks
from senet_pl.plots import confusion_matrix_figure, misclassified_figure


HPARAMS_SUFFIX = ".hparams"  # the events file of a run's settings, rewritten whole by every piece of it


class TensorBoardFigures(L.Callback):
    """Confusion matrix, misclassified images and SE gate histograms after validation and test;
    the settings of a run in the HParams view."""

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
        # torch.histc's bins over 0..1, counted with bincount: histc has no deterministic CUDA kernel, and
        # --trainer.deterministic true makes torch refuse it on a GPU.
        counts = torch.bincount((g.flatten() * self.bins).long().clamp_(0, self.bins - 1), minlength=self.bins).float()
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
        writer, step = trainer.logger.experiment, logged_step(trainer)
        names = getattr(trainer.datamodule, "short_class_names", None)  # another data module may have none
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

    def on_train_start(self, trainer, pl_module) -> None:
        self._log_hparams(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._log_hparams(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":  # (not fit's validations)
            self._log_hparams(trainer, pl_module)

    def _log_hparams(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Model, data and optimizer settings, for TensorBoard's HParams view: one row per run folder, whose metric
        columns are its scalars (``val/acc``..., their last values).

        Written when training starts, so that a run stopped before its end has its row too, into an events file of
        its own that each resumed piece rewrites: TensorBoard shows the first settings it finds in a folder, and the
        row shows the latest. No experiment summary: TensorBoard took one run's (the first it met) for the columns of
        all, which then lacked the settings and metrics of the others (``--model.ema_decay``, another optimizer's);
        without one it builds the columns from every run.
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
        folder = Path(trainer.logger.log_dir)  # (trainer.log_dir: a collective)
        if not trainer.optimizers and (folder / "checkpoints").is_dir():
            return  # evaluating in a trained run's folder: its row is fit's, and the test metrics join it
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"events.out.tfevents.*{HPARAMS_SUFFIX}"):
            old.unlink(missing_ok=True)
        _, session_start, _ = hparams(params, {})
        writer = FileWriter(str(folder), filename_suffix=HPARAMS_SUFFIX)
        writer.add_summary(session_start)
        writer.close()
