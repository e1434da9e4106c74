"""``python -m senet_pl {fit,validate,test,predict,analyze}``: LightningCLI with this project's defaults.

What it adds to LightningCLI:
- ``num_classes``/``in_channels`` linked from the data module to the model;
- configurable ``checkpoint:`` (best by ``val/acc``) and ``last_checkpoint:`` (``last.ckpt``, after
  every validation, on SIGTERM/Ctrl-C, optionally every N steps) groups; checkpoints written
  atomically and loaded with ``weights_only=True`` (see ``checkpoints.py``),
  a learning-rate monitor, a TensorBoard logger in ``lightning_logs/`` with figures and the HParams
  view (``figures.py``), and a predictions CSV (test split or ``--data.predict_dir``);
- the ``analyze`` subcommand: per-class SE excitation over the test split (``excitation.py``);
- ``--ckpt_path last|best|auto`` that finds the newest run of the configured logger (Lightning
  alone would look in the new run's empty folder), and resuming ``fit`` into that run's own
  folder so that its TensorBoard curves continue;
- ``bf16-mixed`` falling back to what the hardware can do (fp16 on GPUs without bf16,
  fp32 on CPUs without bf16 instructions);
- short error messages for bad data, checkpoints and non-finite losses, instead of a traceback;
  exit status 130 after Ctrl-C and 143 after SIGTERM, once ``last.ckpt`` is written.
"""

import csv
import signal
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from senet_pl.checkpoints import AtomicCheckpointIO, CheckpointError, GracefulStop, LatestCheckpoint, load_checkpoint
from senet_pl.data import DataError, EpochBatchSampler, MNISTDataModule
from senet_pl.excitation import ExcitationAnalysis, se_blocks
from senet_pl.figures import TensorBoardFigures
from senet_pl.model import MIN_IMAGE_SIZE
from senet_pl.module import NonFiniteLossError, SEResNetClassifier


class CLIError(Exception):
    """A command line that cannot be carried out; the message says what to do."""


class ShortErrorParser(LightningArgumentParser):
    """Bad options get the error and a pointer to --help, not the usage line of every option (a page)."""

    def print_usage(self, file=None) -> None:
        pass


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` to the run folder: per image its predicted class, probability and top 3.

    Images are named by their index in the test split, or by file name with ``--data.predict_dir``
    (files that could not be read are listed in ``skipped.csv``).
    """

    def __init__(self, top: int = 3) -> None:
        super().__init__(write_interval="epoch")
        self.top = top

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        probs = torch.cat(predictions)
        # The data module's loader yields whole batches, so Lightning cannot see the sample indices;
        # its sampler lists them, for this process, in the order the predictions were made.
        loader = trainer.predict_dataloaders
        sampler = getattr(loader[0] if isinstance(loader, list) else loader, "sampler", None)
        if isinstance(sampler, EpochBatchSampler):
            indices = [i for _, batch in sampler for i in batch]
        else:
            indices = list(range(len(probs)))
        dm = trainer.datamodule
        files = getattr(dm, "predict_files", None)
        classes = getattr(getattr(dm, "dataset_cls", None), "classes", None)
        top_p, top_k = probs.topk(min(self.top, probs.shape[1]), dim=1)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        folder = Path(trainer.log_dir or ".")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"predictions{suffix}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file" if files else "index", "prediction", "class", "confidence", f"top{self.top}"])
            for i, ks, ps in zip(indices, top_k.tolist(), top_p.tolist()):
                name = classes[ks[0]] if classes else ks[0]
                top = " ".join(f"{k}:{p:.4f}" for k, p in zip(ks, ps))
                writer.writerow([files[i] if files else i, ks[0], name, f"{ps[0]:.6f}", top])
        print(f"predictions for {len(probs)} images written to {path}")
        skipped = getattr(dm, "predict_skipped", None) if files else None
        if skipped and trainer.is_global_zero:
            with open(folder / "skipped.csv", "w", newline="") as f:
                csv.writer(f).writerows([("file", "reason"), *skipped])
            print(f"{len(skipped)} unreadable files listed in {folder / 'skipped.csv'}")


class Trainer(L.Trainer):
    """Lightning's Trainer plus the ``analyze`` subcommand."""

    def analyze(self, model: SEResNetClassifier, datamodule: MNISTDataModule, ckpt_path: str | None = None) -> None:
        """Excitation analysis (paper Sec. 7.2, Fig. 6): mean SE gates per class over the test split.

        Args:
            ckpt_path: the trained model: a checkpoint path, or "best"/"last" for the newest run's.
        """
        if not ckpt_path:
            raise CLIError("analyze needs a trained model: add --ckpt_path PATH (or best / last).")
        if not se_blocks(model.model):
            raise CLIError(f"{ckpt_path} is a plain ResNet (se: false): it has no SE gates to analyze.")
        classes = [name.split(" - ")[0] for name in datamodule.dataset_cls.classes]
        self.callbacks.append(ExcitationAnalysis(classes))
        self.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)


def _cpu_has_bf16() -> bool:
    # torch has no public query for this; its private checks may be missing in other versions
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str | int | None, accelerator: str) -> str | int | None:
    """Keep ``bf16-mixed`` where the hardware runs bf16, else the best mixed precision it has."""
    if precision != "bf16-mixed":
        return precision
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return precision if torch.cuda.is_bf16_supported() else "16-mixed"
    return precision if _cpu_has_bf16() else "32-true"


class SENetCLI(LightningCLI):
    def __init__(self, graceful_stop: GracefulStop | None = None, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # resuming writes into the same run folder
        # The optimizer is a model argument (--model.optimizer); no second, top-level group.
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", ShortErrorParser)
        callbacks = [LearningRateMonitor(), PredictionWriter(), TensorBoardFigures(), graceful_stop or GracefulStop()]
        kwargs.setdefault("trainer_defaults", {"callbacks": callbacks})
        kwargs.setdefault("trainer_class", Trainer)
        super().__init__(SEResNetClassifier, MNISTDataModule, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "analyze": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LatestCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,  # last.ckpt comes from last_checkpoint (LatestCheckpoint)
                "checkpoint.filename": "best-epoch{epoch:02d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    # No placeholder "hp_metric": TensorBoardFigures writes the HParams view with the real metrics.
                    "init_args": {"save_dir": "lightning_logs", "name": "senet", "default_hp_metric": False},
                },
            }
        )

    def _logger_root(self) -> Path | None:
        """save_dir/name of the TensorBoard logger, where the runs' version_N folders are."""
        logger = self.config[self.config.subcommand].trainer.logger
        if isinstance(logger, Namespace) and logger.class_path.endswith("TensorBoardLogger"):
            return Path(logger.init_args.save_dir) / (logger.init_args.name or "")
        return None

    def _resolve_named_checkpoint(self, name: str, subcommand: str) -> str | None:
        """The file that ``--ckpt_path last|best|auto`` means: from the newest run of the configured logger.

        ``auto`` (for job scripts that are rerun, e.g. requeued on SLURM) is ``last`` when a run exists
        and None (a new run) otherwise; ``last`` with nothing to resume is an error, never a silent fresh start.
        """
        root = self._logger_root()
        runs = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime) if root else []
        if not runs:
            if name == "auto" and subcommand == "fit":
                print("--ckpt_path auto: no run to resume, starting a new one", file=sys.stderr)
                return None
            where = f"under {root}/" if root else "(no TensorBoard logger is configured)"
            raise CLIError(
                f"--ckpt_path {name}: no run {where} has a checkpoints/last.ckpt. Give the path of a "
                "checkpoint, leave --ckpt_path out to start a new run, or use --ckpt_path auto (fit only) to "
                "resume if there is a run and start one otherwise."
            )
        path = runs[-1]
        if name == "best":  # the best-checkpoint callback's record, kept in every checkpoint
            callbacks = load_checkpoint(path, mmap=True).get("callbacks", {})
            best = [s["best_model_path"] for s in callbacks.values() if s.get("monitor") and s.get("best_model_path")]
            if not best or not Path(best[0]).is_file():
                raise CLIError(f"--ckpt_path best: {path} records no best checkpoint that still exists.")
            path = Path(best[0])
        print(f"--ckpt_path {name} resolved to {path}", file=sys.stderr)
        return str(path)

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last|best|auto``, check the file loads safely, then let Lightning read it."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        if cfg.get("ckpt_path") in ("last", "best", "auto"):
            cfg.ckpt_path = self._resolve_named_checkpoint(cfg.ckpt_path, subcommand)
        if cfg.ckpt_path:
            ckpt = load_checkpoint(cfg.ckpt_path, mmap=True)  # refuses unsafe or unreadable files before Lightning
            # The model's settings come from the checkpoint (LightningCLI), the data's from the command line.
            trained_on = (ckpt.get("datamodule_hyper_parameters") or {}).get("dataset")
            if trained_on and trained_on != cfg.data.dataset and rank_zero_only.rank == 0:  # once, not per process
                print(
                    f"warning: {cfg.ckpt_path} was trained on {trained_on} but --data.dataset is {cfg.data.dataset}: "
                    f"add --data.dataset {trained_on} (or its recipe's --config) unless that is what you want.",
                    file=sys.stderr,
                )
        # Resuming a run: log into its own version folder, so its TensorBoard curves continue.
        root = self._logger_root()
        if subcommand == "fit" and cfg.ckpt_path and root and cfg.trainer.logger.init_args.version is None:
            ckpt = Path(cfg.ckpt_path).resolve()
            if ckpt.parent.name == "checkpoints" and ckpt.parent.parent.parent == root.resolve():
                cfg.trainer.logger.init_args.version = ckpt.parent.parent.name
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config  # run=False has no subcommand
        smallest = MIN_IMAGE_SIZE[cfg.model.stem]
        if cfg.data.image_size < smallest:
            raise CLIError(
                f"--data.image_size {cfg.data.image_size} is too small for --model.stem {cfg.model.stem}, which "
                f"downsamples by {smallest}: use an image_size of at least {smallest}"
                + (", or --model.stem cifar." if cfg.model.stem == "imagenet" else ".")
            )
        cfg.trainer.precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)

    def after_instantiate_classes(self) -> None:
        if self.trainer is not None and type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def main(args: list[str] | None = None) -> None:
    if sys.argv[0].endswith("__main__.py"):
        sys.argv[0] = "python -m senet_pl"  # so that messages name the command that was typed
    stop = GracefulStop()
    try:
        SENetCLI(graceful_stop=stop, args=args)
    except (CLIError, DataError, CheckpointError, NonFiniteLossError) as err:
        sys.exit(f"error: {err}")
    except SIGTERMException:
        name = "Ctrl-C" if stop.signal == signal.SIGINT else "SIGTERM"
        print(f"{name}: training stopped, last.ckpt written; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(128 + (stop.signal or signal.SIGTERM))
