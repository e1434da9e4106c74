"""``python -m senet_pl {fit,validate,test,predict}``: LightningCLI with this project's defaults.

What it adds to LightningCLI:
- ``num_classes``/``in_channels`` linked from the data module to the model;
- a configurable ``checkpoint:`` group (ModelCheckpoint, best by ``val/acc``) and a ``last.ckpt``
  rewritten after every validation,
  a learning-rate monitor, a TensorBoard logger in ``lightning_logs/`` and a predictions CSV;
- ``--ckpt_path last|best`` that finds the newest run of the configured logger (Lightning
  alone would look in the new run's empty folder), and resuming ``fit`` into that run's own
  folder so that its TensorBoard curves continue;
- ``bf16-mixed`` falling back to what the hardware can do (fp16 on GPUs without bf16,
  fp32 on CPUs without bf16 instructions);
- short error messages for bad data and checkpoints, instead of a traceback.
"""

import sys
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from senet_pl.data import DataError, MNISTDataModule
from senet_pl.module import SEResNetClassifier


class CLIError(Exception):
    """A command line that cannot be carried out; the message says what to do."""


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` (index in the predict set, predicted class, its probability) to the run folder."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        probs = torch.cat(predictions)
        indices = [i for batch in batch_indices[0] for i in batch] if batch_indices else range(len(probs))
        confidence, label = probs.max(dim=1)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = Path(trainer.log_dir or ".") / f"predictions{suffix}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["index,prediction,confidence"]
        lines += [f"{i},{c},{p:.6f}" for i, c, p in zip(indices, label.tolist(), confidence.tolist())]
        path.write_text("\n".join(lines) + "\n")
        print(f"predictions for {len(probs)} images written to {path}")


def latest_checkpoint() -> ModelCheckpoint:
    """Rewrites ``last.ckpt`` at every checkpoint opportunity, whatever the metrics did.

    Since Lightning 2.6, ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only when a top-k
    checkpoint is saved at the same step, so with ``save_top_k=1`` it is a copy of the best one and
    resuming from it would repeat every epoch since. A second, unmonitored callback keeps it current.
    """
    return ModelCheckpoint(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)


def _cpu_has_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(precision: str | int | None, accelerator: str) -> str | int | None:
    """Keep ``bf16-mixed`` where the hardware runs bf16, else the best mixed precision it has."""
    if precision != "bf16-mixed":
        return precision
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return precision if torch.cuda.is_bf16_supported() else "16-mixed"
    return precision if _cpu_has_bf16() else "32-true"


def _last_checkpoint_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CLIError(f"cannot read checkpoint {ckpt}: {str(err).splitlines()[0]}") from None


class SENetCLI(LightningCLI):
    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # resuming writes into the same run folder
        # The optimizer is a model argument (--model.optimizer); no second, top-level group.
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("trainer_defaults", {"callbacks": [latest_checkpoint(), LearningRateMonitor(), PredictionWriter()]})
        super().__init__(SEResNetClassifier, MNISTDataModule, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,  # last.ckpt comes from latest_checkpoint()
                "checkpoint.filename": "best-epoch{epoch:02d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs", "name": "senet"},
                },
            }
        )

    def _logger_root(self) -> Path | None:
        """save_dir/name of the TensorBoard logger, where the runs' version_N folders are."""
        logger = self.config[self.config.subcommand].trainer.logger
        if isinstance(logger, Namespace) and logger.class_path.endswith("TensorBoardLogger"):
            return Path(logger.init_args.save_dir) / (logger.init_args.name or "")
        return None

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last|best`` against the newest run on disk, then let Lightning read it."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        ckpt = cfg.get("ckpt_path")
        root = self._logger_root()
        if ckpt in ("last", "best"):
            runs = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime) if root else []
            if not runs:
                where = f"under {root}/" if root else "(no TensorBoard logger is configured)"
                raise CLIError(
                    f"--ckpt_path {ckpt}: no run {where} has a checkpoints/last.ckpt. Give the path of a "
                    "checkpoint, or leave --ckpt_path out to start a new run."
                )
            resolved = runs[-1]
            if ckpt == "best":
                callbacks = _last_checkpoint_state(resolved).get("callbacks", {})
                best = [s["best_model_path"] for s in callbacks.values() if s.get("monitor") and s.get("best_model_path")]
                if not best or not Path(best[0]).is_file():
                    raise CLIError(f"--ckpt_path best: {resolved} records no best checkpoint that still exists.")
                resolved = Path(best[0])
            cfg.ckpt_path = ckpt = str(resolved)
            print(f"--ckpt_path resolved to {ckpt}", file=sys.stderr)
        if ckpt and not Path(ckpt).is_file():
            raise CLIError(f"--ckpt_path {ckpt}: no such file.")
        if ckpt:
            _last_checkpoint_state(Path(ckpt))  # a clear error for unreadable files, before Lightning reads it
        # Resuming a run: log into its own version folder, so its TensorBoard curves continue.
        if subcommand == "fit" and ckpt and root and cfg.trainer.logger.init_args.version is None:
            run_dir = Path(ckpt).resolve().parent.parent
            if Path(ckpt).resolve().parent.name == "checkpoints" and run_dir.parent == root.resolve():
                cfg.trainer.logger.init_args.version = run_dir.name
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        trainer = self.config[self.subcommand].trainer
        trainer.precision = resolve_precision(trainer.precision, trainer.accelerator)


def main(args: list[str] | None = None) -> None:
    try:
        SENetCLI(args=args)
    except (CLIError, DataError) as err:
        sys.exit(f"error: {err}")
