"""``python -m senet_pl {fit,validate,test,predict,analyze,export}``: LightningCLI with this project's defaults.

What it adds to LightningCLI:
- ``num_classes``/``in_channels`` linked from the data module to the model;
- configurable ``checkpoint:`` (best by ``val/acc``) and ``last_checkpoint:`` (``last.ckpt``, after
  every validation, on SIGTERM/Ctrl-C, optionally every N steps) groups; checkpoints written
  atomically and loaded with ``weights_only=True`` (see ``checkpoints.py``),
  a learning-rate monitor, a TensorBoard logger in ``lightning_logs/`` with figures and the HParams
  view (``figures.py``), and a predictions CSV (test split or ``--data.predict_dir``);
- the ``analyze`` (per-class SE excitation, ``excitation.py``) and ``export`` (ONNX/.pt2, ``export.py``) subcommands;
- ``--ckpt_path last|best|auto`` that finds the newest run of the configured logger (Lightning
  alone would look in the new run's empty folder), and resuming ``fit`` into that run's own
  folder so that its TensorBoard curves continue;
- ``bf16-mixed`` falling back to what the hardware can do (fp16 on GPUs without native bf16, fp32 on CPUs without);
- checkpoints checked and reconciled with the command line before anything reads them
  (``resume.py``): nothing a checkpoint names is imported, and nothing typed is silently ignored;
- short error messages for bad data, checkpoints, exports and non-finite losses instead of a traceback; exit
  status 130 after Ctrl-C and 143 after SIGTERM, with a message built from what was written; a command that
  fails before its first training step leaves no run folder behind.
"""

import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from senet_pl.callbacks.figures import TensorBoardFigures
from senet_pl.callbacks.last import EarlySignals, GracefulStop, Interrupted, LatestCheckpoint
from senet_pl.callbacks.predictions import PredictionWriter
from senet_pl.callbacks.summary import RunSummary
from senet_pl.checkpoints import AtomicCheckpointIO, CheckpointError, as_lightning_checkpoint
from senet_pl.export import ExportError
from senet_pl.compat import LearningRateMonitor, LightningCLIHooks, is_setting_error, log_at, quiet
from senet_pl.data import DataError, MNISTDataModule
from senet_pl.module import NonFiniteLossError, SEResNetClassifier, SettingError
from senet_pl.options import ShortErrorParser, check_clipping, check_options, check_seed
from senet_pl.precision import ALIASES, fallback_message, resolve_precision
from senet_pl.resume import keep_checkpoint_folders, not_resumable, reconcile, training_conflicts, weight_mismatch
from senet_pl.runs import (CLIError, FolderSnapshot, NewRunFolders, check_ckpt_spelling, check_writable,
                           expand_logger_paths, find_checkpoint, fixed_checkpoint_folder, logger_root, name_run,
                           named_run_folder, refuse_replacing, run_folder)
from senet_pl.schedule import ScheduleError
from senet_pl.trainer import Trainer, close_process_group
from senet_pl.untrusted import CheckpointInfo, read_checkpoint


class Stopped(Exception):
    """A command stopped by SIGTERM or Ctrl-C; the message says what was and was not written."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@rank_zero_only  # once, not by every process of a DDP run (their ranks are in the environment already)
def say(message: str) -> None:
    print(message, file=sys.stderr)


class SENetCLI(LightningCLIHooks):
    def __init__(self, graceful_stop: GracefulStop | None = None, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # resuming writes into the same run folder
        # The optimizer is a model argument (--model.optimizer); no second, top-level group.
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", ShortErrorParser)
        self.graceful_stop = graceful_stop or GracefulStop()
        self.ckpt_info: CheckpointInfo | None = None  # the checked --ckpt_path, once resolved
        self.conflicts: list[str] = []  # between it and the command line
        self.evaluated_run: Path | None = None  # the trained run's folder that test/validate/... log into
        self.summary = RunSummary()
        self.predictions = PredictionWriter()
        callbacks = [self.predictions, TensorBoardFigures(), self.graceful_stop, self.summary]
        kwargs.setdefault("trainer_defaults", {"callbacks": callbacks})
        kwargs.setdefault("trainer_class", Trainer)
        super().__init__(SEResNetClassifier, MNISTDataModule, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLIHooks.subcommands(), "analyze": {"model", "datamodule"}, "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LatestCheckpoint, "last_checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": False,  # last.ckpt comes from last_checkpoint (LatestCheckpoint)
            "checkpoint.filename": "best-epoch{epoch:02d}-acc{val/acc:.4f}",
            "checkpoint.auto_insert_metric_name": False,
            "trainer.log_every_n_steps": 10,  # train/loss and train/lr: Lightning's 50 shows a 100-step warm-up as 2 points
            "trainer.logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                # No placeholder "hp_metric": TensorBoardFigures writes the HParams view with the real metrics.
                "init_args": {"save_dir": "lightning_logs", "name": "senet", "default_hp_metric": False},
            },
        })

    def trainer_callbacks(self, config: dict[str, Any], callbacks: list[L.Callback]) -> list[L.Callback]:
        # --trainer.enable_checkpointing false: no checkpoint files (Lightning refuses it beside checkpoint callbacks).
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
        # train/lr, unless --trainer.logger false leaves nothing to log it to (LearningRateMonitor would refuse to start).
        if config.get("logger") is not False and config.get("logger") != []:
            callbacks = [*callbacks, LearningRateMonitor()]
        return callbacks

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # The command line as typed, for a next command when there is no run folder's config.yaml to point at
        self.typed = sys.argv[1:] if args is None else list(args) if isinstance(args, (list, tuple)) else None
        # The same arguments without defaults: what the user gave, on the command line or in --config files
        # (a checkpoint's settings may fill in the rest, never override these).
        parse = parser.parse_object if isinstance(args, (dict, Namespace)) else parser.parse_args
        self.explicit = parse(args, defaults=False)
        subcommand = self.config.get("subcommand")
        expand_logger_paths(self.config[subcommand] if subcommand else self.config)
        name_run(self.config[subcommand] if subcommand else self.config)
        check_seed(self.config[subcommand].get("seed_everything") if subcommand else self.config.get("seed_everything"))

    def _logger_root(self) -> Path | None:
        return logger_root(self.config[self.config.subcommand].trainer.logger)

    def reconcile_checkpoint(self) -> None:
        """Resolve ``--ckpt_path last|best|auto``, check the checkpoint, and reconcile it with the config.

        Replaces LightningCLI's own merge, which hands the checkpoint's hyperparameters to the parser
        unchecked (and jsonargparse imports the class paths it finds there): see ``resume.py``.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        if cfg.get("ckpt_path") == "auto" and subcommand != "fit":
            raise CLIError(f"--ckpt_path auto resumes a run or starts one (fit only): {subcommand} takes best, last or "
                           "a checkpoint's path.")
        fixed = fixed_checkpoint_folder(cfg)
        if cfg.get("ckpt_path") in ("last", "best", "auto"):
            named = named_run_folder(self._logger_root(), cfg.trainer.logger.init_args.get("version")
                                     if self._logger_root() is not None else None)  # a run named: that run's
            look = fixed or (named / "checkpoints" if named is not None else None)
            best_dir = Path(cfg.checkpoint.dirpath) if cfg.get("checkpoint", {}).get("dirpath") else None
            cfg.ckpt_path = find_checkpoint(self._logger_root(), cfg.ckpt_path, subcommand, look, best_dir)
        check_ckpt_spelling(cfg.get("ckpt_path"))
        if not cfg.ckpt_path:
            if subcommand != "fit":  # Lightning would score the model's random initial weights, without a word
                raise CLIError(f"{subcommand} needs a trained model: add --ckpt_path best, last or a checkpoint's path.")
            refuse_replacing(fixed, cfg.trainer.get("enable_checkpointing") is not False)
            return
        info = read_checkpoint(cfg.ckpt_path, SEResNetClassifier, MNISTDataModule)
        if subcommand == "fit" and (reason := not_resumable(info)):
            raise CLIError(reason)
        # Reported once the model exists, together with the optimizer's and schedule's (before_fit).
        self.conflicts = reconcile(info, cfg, self.explicit.get(subcommand), subcommand, MNISTDataModule.data_shape)
        self.ckpt_info = info
        name_run(cfg)  # again: se may have come from the checkpoint
        # A checkpoint of a run of this logger: log into that run's folder. Resuming, its TensorBoard curves
        # continue; evaluating, its test/val metrics join its training curves (one HParams row per model).
        root = self._logger_root()
        # (Not a CSV logger's: Lightning's deletes the metrics.csv of a folder it logs into.)
        tensorboard = root is not None and cfg.trainer.logger.class_path.endswith("TensorBoardLogger")
        if tensorboard and cfg.trainer.logger.init_args.version is None:
            ckpt = Path(cfg.ckpt_path).resolve()
            if ckpt.parent.name == "checkpoints" and ckpt.parent.parent.parent == root.resolve():
                cfg.trainer.logger.init_args.version = ckpt.parent.parent.name
                check_writable(ckpt.parent.parent, cfg.ckpt_path, subcommand)
        if subcommand != "fit":  # a run's config.yaml records its training; this command's goes beside it
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config_{subcommand}.yaml"}
            version = cfg.trainer.logger.init_args.get("version") if root is not None else None  # given, or the above
            folder = named_run_folder(root, version)
            self.evaluated_run = folder if folder is not None and folder.is_dir() else None

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config  # run=False has no subcommand
        check_options(cfg, self.subcommand, self._logger_root() if self.subcommand else None)
        if cfg.trainer.get("val_check_interval") == 1 and type(cfg.trainer.val_check_interval) is int:
            # Validation after every batch: Lightning's ModelCheckpoint takes the integer 1 for 1.0 (once an epoch) and
            # would choose the best among the epochs' last validations only.
            if cfg.checkpoint.get("save_on_train_epoch_end") is None:
                cfg.checkpoint.save_on_train_epoch_end = False
        if cfg.trainer.logger is False:
            # No run folder: Lightning would write config.yaml into the working directory, over any file of that name.
            self.save_config_callback = None
        asked = ALIASES.get(str(cfg.trainer.precision), cfg.trainer.precision)
        cfg.trainer.precision = resolve_precision(asked, cfg.trainer.accelerator, cfg.trainer.devices)
        if cfg.trainer.precision != asked:
            say(fallback_message(asked, cfg.trainer.precision))

    def after_instantiate_classes(self) -> None:
        if self.trainer is not None and type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        # One image as the data delivers it: the model summary then shows input/output shapes and FLOPs.
        self.model.example_input_array = self.datamodule.example_batch()

    def _refuse_conflicts(self) -> None:
        if self.conflicts:
            config = Path(self.ckpt_info.path).parent.parent / "config.yaml"
            own = f" (--config {config})" if config.is_file() else ""
            raise CLIError(
                f"{self.ckpt_info.path} does not match the command line:\n  " + "\n  ".join(self.conflicts) + "\n"
                f"Leave these options out or use the run's own settings{own}; to train another model, start a new "
                "run without --ckpt_path."
            )

    def _check_weights(self) -> None:
        """The checkpoint's tensors fit the model the config builds (a plain state dict's architecture comes from it)."""
        info = self.ckpt_info
        if info is None:
            return
        self._refuse_conflicts()
        weights = info.raw["state_dict"] if info.kind == "lightning" else as_lightning_checkpoint(info.raw)["state_dict"]
        if not isinstance(weights, dict):
            raise CheckpointError(f"refused {info.path}: its state_dict is not a dict of tensors.")
        if info.kind == "lightning" and self.subcommand != "fit":  # where a validation of fit at its step logged
            log_at(self.trainer, max(info.global_step - 1, 0), info.raw.get("epoch", 0))
        mismatch = weight_mismatch(self.model, weights)
        if mismatch:
            m = self.config[self.subcommand].model
            raise CLIError(
                f"{info.path} does not fit the model (--model.depth {m.depth} --model.stem {m.stem} --model.se "
                f"{str(m.se).lower()} --model.reduction {m.reduction}): {mismatch}."
            )

    def before_fit(self) -> None:
        check_clipping(self.trainer, self.model.check_optimization())
        info = self.ckpt_info
        if info is None:
            return
        keep_checkpoint_folders([c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)], info,
                                self.trainer.log_dir)
        # Lightning restores the checkpoint's optimizer, schedule and position over the configured ones.
        configured = self.model.configure_optimizers()  # the same objects fit builds, on the model's parameters
        optimizers, schedulers = configured if isinstance(configured, tuple) else ([configured], [])
        given = self.explicit.get("fit")
        defaults = {part: given is None or given.get(f"model.{part}") is None for part in ("optimizer", "lr_scheduler")}
        self.conflicts += training_conflicts(info, optimizers, [s["scheduler"] for s in schedulers],
                                             self.trainer.world_size, defaults, self.model.length_from_run)
        self._check_weights()

    before_validate = before_test = before_predict = before_analyze = before_export = _check_weights

    def after_fit(self) -> None:
        log_dir = self.trainer.log_dir  # on every process: under DDP it is a broadcast
        if self.trainer.is_global_zero:
            keeps = [c.saved for c in self.trainer.checkpoint_callbacks if isinstance(c, LatestCheckpoint)]
            last = Path(keeps[0][0]) if keeps and keeps[0] else None
            if keeps and last is None and self.ckpt_info and self.ckpt_info.global_step == self.trainer.global_step:
                last = Path(self.ckpt_info.path)  # nothing trained after the resume: the checkpoint it resumed from
            print("\n".join(self.summary.fit_lines(self.trainer, log_dir, last, self.typed)))

    def _after_evaluation(self) -> None:
        log_dir = self.trainer.log_dir
        if self.trainer.is_global_zero:
            ckpt_path = self.config[self.subcommand].get("ckpt_path")
            print(self.summary.eval_line(self.trainer, self.subcommand, ckpt_path, log_dir))

    after_validate = after_test = after_analyze = _after_evaluation

    def after_predict(self) -> None:
        print("\n".join(self.predictions.report))  # after the progress bar, not on its line

    def run_subcommand(self, subcommand: str) -> None:
        """Run it; on a failure before any training step, remove the run folders it created (no empty
        version_N is left behind), and turn SIGTERM/Ctrl-C into a message built from what was written."""
        new_folders = NewRunFolders(self._logger_root())
        evaluated = FolderSnapshot(self.evaluated_run) if self.evaluated_run is not None else None
        try:
            super().run_subcommand(subcommand)
        except BaseException as err:
            start = self.graceful_stop.start_step  # None: training never started
            no_step = subcommand != "fit" or start is None or self.trainer.global_step == start  # only fit trains
            first = self.trainer.is_global_zero
            removed = new_folders.remove(run_folder(self.trainer.logger)) if no_step and first else []
            if evaluated is not None and first:  # the trained run's folder, as it was
                evaluated.restore()
            # A second Ctrl-C: a KeyboardInterrupt, which Lightning's own handling turns into exit status 1.
            # (A SIGTERMException, the first Ctrl-C's or a SIGTERM's, is a SystemExit too.)
            aborted = isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and not isinstance(err, SIGTERMException)
                                                             and self.graceful_stop.signal == signal.SIGINT)
            if isinstance(err, (SIGTERMException, Interrupted)) or aborted:
                stop = self.graceful_stop
                signum = signal.SIGINT if aborted else stop.signal or stop.requeue_signal or getattr(err, "signum", signal.SIGTERM)
                resumed = (self.ckpt_info.path, self.ckpt_info.global_step) if self.ckpt_info else None
                raise Stopped(stop.message(self.trainer, subcommand, removed, signum, resumed, aborted)
                              + stop.requeue(self.trainer), signum) from None
            raise


# Errors that mean the command's input (options, data, checkpoint) cannot work: one line, no traceback (tools too).
USER_ERRORS = (CLIError, DataError, CheckpointError, ExportError, NonFiniteLossError, ScheduleError, SettingError)


def main(args: list[str] | None = None) -> None:
    if sys.argv[0].endswith("__main__.py"):
        sys.argv[0] = "python -m senet_pl"  # so that messages name the command that was typed
    # Until a Trainer handles them, SIGINT and SIGTERM stop at once with a message, not a traceback or a silent kill.
    previous = EarlySignals().install()
    quiet()
    try:
        SENetCLI(args=args)
        close_process_group()  # a DDP run's, which Lightning leaves open
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    except (MisconfigurationException, ValueError) as err:  # Lightning's own check of a value (limit_val_batches -1 ...)
        if isinstance(err, ValueError) and not is_setting_error(err):
            raise
        sys.exit(f"error: {str(err).strip()}")
    except Stopped as stop:
        say(str(stop))  # once: under DDP every process stopped at the same step, and process 0 wrote the checkpoint
        sys.exit(128 + stop.signum)
    except Interrupted as stop:  # while parsing or building the objects: nothing was started
        print(f"{'Ctrl-C' if stop.signum == signal.SIGINT else 'SIGTERM'}: stopped before any work; nothing was written.",
              file=sys.stderr)
        sys.exit(128 + stop.signum)
    finally:
        # After an interrupted run Lightning's teardown puts back the handlers of when it started, GracefulStop's too.
        for signum, handler in previous.items():
            signal.signal(signum, handler)
