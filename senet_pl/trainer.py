"""The Trainer of ``python -m senet_pl``: Lightning's, with the ``analyze`` and ``export`` subcommands and batch
limits that read an integer as a number of batches."""

import sys
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from senet_pl.callbacks.excitation import ExcitationAnalysis
from senet_pl.callbacks.figures import TensorBoardFigures
from senet_pl.data import MNISTDataModule
from senet_pl.export import Format, export_checkpoint
from senet_pl.gates import se_blocks
from senet_pl.module import SEResNetClassifier
from senet_pl.runs import CLIError


class Trainer(L.Trainer):
    """Lightning's Trainer plus the ``analyze`` and ``export`` subcommands."""

    def __init__(self, *args: Any, limit_train_batches: int | float | None = None,
                 limit_val_batches: int | float | None = None, limit_test_batches: int | float | None = None,
                 limit_predict_batches: int | float | None = None, **kwargs: Any) -> None:
        """The limits are declared int first, so that ``--trainer.limit_val_batches 1`` is one batch (Lightning's
        own signature reads float first: 1.0, every batch). A fraction is written 0.5 or 1.0.

        Args:
            limit_train_batches: training batches per epoch: an int counts batches, a float (0.25, 1.0) is a fraction.
            limit_val_batches: validation batches: an int counts batches, a float (0.25, 1.0) is a fraction.
            limit_test_batches: test batches: an int counts batches, a float (0.25, 1.0) is a fraction.
            limit_predict_batches: prediction batches: an int counts batches, a float (0.25, 1.0) is a fraction.
        """
        try:
            super().__init__(*args, limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
                             limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches,
                             **kwargs)
        except (ValueError, TypeError, MisconfigurationException) as err:  # --trainer.devices x, strategy foo ...
            raise CLIError(f"Trainer: {' '.join(str(err).split())}") from None

    # fit, validate, test and predict as Lightning's, with this project's --ckpt_path in --help (Lightning's
    # speaks of "hpc" and "registry") and without --weights_only: checkpoints are always read weights-only.
    def fit(self, model: SEResNetClassifier, train_dataloaders: Any = None, val_dataloaders: Any = None,
            datamodule: L.LightningDataModule | None = None, ckpt_path: str | None = None) -> None:
        """Train the model, or resume the run that a checkpoint holds.

        Args:
            ckpt_path: resume: "last" (the newest run's last.ckpt), "best", "auto" ("last" if a run exists,
                else a new run; for scripts that are rerun) or a checkpoint path. Left out: a new run.
        """
        return super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path)

    def validate(self, model: SEResNetClassifier | None = None, dataloaders: Any = None, ckpt_path: str | None = None,
                 verbose: bool = True, datamodule: L.LightningDataModule | None = None) -> list:
        """Evaluate a trained model on the validation split.

        Args:
            ckpt_path: the trained model: "best" or "last" (of the newest run of the configured logger), a
                checkpoint path, or a plain state dict (.pt) with the architecture from the config.
            verbose: print the metrics table.
        """
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule)

    def test(self, model: SEResNetClassifier | None = None, dataloaders: Any = None, ckpt_path: str | None = None,
             verbose: bool = True, datamodule: L.LightningDataModule | None = None) -> list:
        """Evaluate a trained model on the test split (once, at the end).

        Args:
            ckpt_path: the trained model: "best" or "last" (of the newest run of the configured logger), a
                checkpoint path, or a plain state dict (.pt) with the architecture from the config.
            verbose: print the metrics table.
        """
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule)

    def predict(self, model: SEResNetClassifier | None = None, dataloaders: Any = None,
                datamodule: L.LightningDataModule | None = None, return_predictions: bool | None = None,
                ckpt_path: str | None = None) -> Any:
        """Classify the test split or the images of --data.predict_dir; writes predictions.csv.

        Args:
            return_predictions: keep the predictions in memory as well (the CSV holds them).
            ckpt_path: the trained model: "best" or "last" (of the newest run of the configured logger), a
                checkpoint path, or a plain state dict (.pt) with the architecture from the config.
        """
        return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path)

    def analyze(self, model: SEResNetClassifier, datamodule: MNISTDataModule, ckpt_path: str | None = None) -> None:
        """Excitation analysis (paper Sec. 7.2, Fig. 6): mean SE gates per class over the test split.

        Args:
            ckpt_path: the trained model: a checkpoint path, or "best"/"last" for the newest run's.
        """
        if not ckpt_path:
            raise CLIError("analyze needs a trained model: add --ckpt_path PATH (or best / last).")
        if not se_blocks(model.model):
            raise CLIError(f"{ckpt_path} is a plain ResNet (se: false): it has no SE gates to analyze.")
        if model.hparams.test_hflip:  # the gates of the mirror images would overwrite those of the images
            raise CLIError("analyze records the gates of each image as it is: leave out --model.test_hflip.")
        analysis = ExcitationAnalysis(datamodule.short_class_names)
        # Only the gates: test/* metrics and figures here would replace those that test logged into the run.
        self.callbacks = [c for c in self.callbacks if not isinstance(c, TensorBoardFigures)] + [analysis]
        model.log_evaluation = False
        self.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        if analysis.report:  # after the progress bar, not on its line (process 0 only: it has the sums)
            print(analysis.report[0])
            print(analysis.report[1], file=sys.stderr)

    def export(self, model: SEResNetClassifier, datamodule: MNISTDataModule, ckpt_path: str | None = None,
               format: Format = "onnx", out: str | None = None) -> None:
        """The model with its preprocessing as ONNX or .pt2, checked against PyTorch first (``export.py``).

        Args:
            ckpt_path: the trained model: a checkpoint path, or "best"/"last" for the newest run's.
            format: "onnx" (torch.onnx's dynamo exporter) or "pt2" (torch.export.save).
            out: the file to write (default: the checkpoint's path with the format's suffix).
        """
        export_checkpoint(model, datamodule, ckpt_path, format, out)


def close_process_group() -> None:
    """Destroy the default process group of a finished DDP run, if there is one. Lightning's teardown leaves it
    open, and a gloo group still alive at interpreter exit can abort the process after a successful run
    ("terminate called without an active exception", exit status -6; pytorch/pytorch#190489). Call it only after a
    run that ended normally: after a failure the other ranks may not get here, and NCCL's teardown is collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
