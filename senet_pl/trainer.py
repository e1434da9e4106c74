"""The Trainer of ``python -m senet_pl``: Lightning's, with the ``analyze`` and ``export`` subcommands and batch
limits that read an integer as a number of batches."""

from typing import Any

import lightning.pytorch as L

from senet_pl.callbacks.excitation import ExcitationAnalysis
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
        super().__init__(*args, limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
                         limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches, **kwargs)

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
        self.callbacks.append(ExcitationAnalysis(datamodule.short_class_names))
        self.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)

    def export(self, model: SEResNetClassifier, datamodule: MNISTDataModule, ckpt_path: str | None = None,
               format: Format = "onnx", out: str | None = None) -> None:
        """The model with its preprocessing as ONNX or .pt2, checked against PyTorch first (``export.py``).

        Args:
            ckpt_path: the trained model: a checkpoint path, or "best"/"last" for the newest run's.
            format: "onnx" (torch.onnx's dynamo exporter) or "pt2" (torch.export.save).
            out: the file to write (default: the checkpoint's path with the format's suffix).
        """
        export_checkpoint(model, datamodule, ckpt_path, format, out)
