"""``predictions.csv`` (and ``skipped.csv``) in the run folder, written by ``predict``."""

import re

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException

from senet_pl.callbacks.output import run_folder
from senet_pl.infer import PREDICTIONS_HEADER, prediction_rows, write_predictions


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` to the run folder: per image its predicted class, probability and top 3.

    Images are named by their index in the test split, or by file name with ``--data.predict_dir``
    (files that could not be read are listed in ``skipped.csv``).
    """

    def __init__(self, top: int = 3) -> None:
        super().__init__(write_interval="epoch")
        self.top = top
        self.report: list[str] = []  # what was written, printed by the CLI once the progress bar has closed

    def on_predict_start(self, trainer, pl_module) -> None:
        self.report = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # Lightning's training and evaluation loops stop at a batch boundary after SIGTERM; its predict loop does not.
        if trainer.received_sigterm:
            raise SIGTERMException

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        probs = torch.cat(predictions)
        dm = trainer.datamodule
        # The data module's loader yields whole batches, so Lightning cannot see the sample indices;
        # the data module lists them, for this process, in the order the predictions were made.
        indices = dm.predict_indices() if hasattr(dm, "predict_indices") else list(range(len(probs)))
        files = getattr(dm, "predict_files", None)
        classes = getattr(dm, "class_names", None)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        top = min(self.top, probs.shape[1])
        names = [files[i] for i in indices] if files else indices
        # Only the first process lists the skipped files (every process read the folder), or removes an earlier list.
        skipped = (getattr(dm, "predict_skipped", None) if files else None) or []
        # The same rows as python -m senet_pl.infer writes (torch-free, so they are built in infer.py).
        folder = run_folder(trainer)  # on every process: under DDP the run folder is a broadcast
        if trainer.is_global_zero:  # an earlier predict's files for another number of processes: not mixed with these
            for old in folder.glob("predictions*.csv"):
                if re.fullmatch(r"predictions(_rank\d+)?\.csv", old.name) and not _ours(old.name, trainer.world_size) \
                        and (old.is_file() or old.is_symlink()):  # (a folder of that name is someone's)
                    old.unlink(missing_ok=True)
        self.report += write_predictions(folder, f"predictions{suffix}.csv",
                                         ["file" if files else "index", *PREDICTIONS_HEADER, f"top{top}"],
                                         prediction_rows(names, probs.float().cpu().numpy(), classes, top),
                                         skipped if trainer.is_global_zero else None)


def _ours(name: str, world_size: int) -> bool:
    """Whether ``name`` is one of the prediction files that a predict with ``world_size`` processes writes."""
    return name in ([f"predictions_rank{r}.csv" for r in range(world_size)] if world_size > 1 else ["predictions.csv"])
