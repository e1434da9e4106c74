"""What a command did, in a few lines at its end: where the results are and what to run next."""

import shlex
import time
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from senet_pl.compat import batches_done


class RunSummary(Callback):
    """Counts the training images and the wall time of ``fit``; ``fit_lines`` and ``eval_line`` describe the run."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.seconds = 0.0  # fit's wall time
        self.train_seconds = 0.0  # in training steps (forward, backward, optimizer): no validation, no startup
        self.images = 0
        self.start_step: int | None = None  # None: training never started (a resumed run with nothing left to train)
        self._batch_started = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started, self.images, self.start_step = time.perf_counter(), 0, None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step  # after a resume: the checkpoint's

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.train_seconds += time.perf_counter() - self._batch_started
        self.images += len(batch[0]) * trainer.world_size

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.started

    def fit_lines(self, trainer: L.Trainer, log_dir: str | None, last: Path | None,
                  typed: list[str] | None = None) -> list[str]:
        """The end of ``fit``: the best and last checkpoints, epochs, steps, time, speed and the next command.
        (``log_dir``: ``trainer.log_dir``, which every process must ask for under DDP: it is a collective.
        ``typed``: fit's command line, for the next command of a run without a config.yaml to point at.)"""
        log_dir = log_dir if trainer.logger is not None else None  # without a logger: the working directory, no run's
        config = Path(log_dir) / "config.yaml" if log_dir else None
        steps = trainer.global_step - self.start_step if self.start_step is not None else 0
        speed = f", {self.images / self.train_seconds:,.0f} training images/s" if self.train_seconds and self.images else ""
        # (Not the epochs of a resume with nothing left to train: Lightning's counters then depend on what ended the run.)
        epochs = f"{self.epochs(trainer)}, " if steps > 0 or trainer.global_step == 0 else ""
        lines = [f"fit done: {epochs}step {trainer.global_step} ({steps} in this run) in {self.seconds:.1f} s{speed}."]
        if steps == 0 and trainer.global_step > 0:  # resumed at (or past) the end it was given
            lines.append("nothing left to train: the checkpoint had reached this run's end; give a larger "
                         "--trainer.max_epochs or --trainer.max_steps to train on.")
        best = next((c for c in trainer.checkpoint_callbacks if type(c) is ModelCheckpoint), None)
        if best is not None and best.best_model_path:
            score = f" ({best.monitor} {best.best_model_score:.4f})" if best.best_model_score is not None else ""
            lines.append(f"best checkpoint{score}: {best.best_model_path}")
        if last is not None:
            lines.append(f"last checkpoint: {last}")
        tested = best.best_model_path if best is not None and best.best_model_path else last  # no validation: last
        if tested:
            # the run's config.yaml; without one (no logger), fit's own command line, whose options test takes too
            if config is not None and config.is_file():
                words = ["test", "--config", str(config)]
            else:
                words = as_test(typed or ["fit"])
            # quoted for the shell, so that it can be pasted as it is (a folder name with a space ...)
            lines.append(f"next: python -m senet_pl {shlex.join([*words, '--ckpt_path', str(tested)])}")
        if log_dir and isinstance(trainer.logger, TensorBoardLogger):
            lines.append(f"curves: tensorboard --logdir {shlex.quote(str(Path(log_dir).parent))}")
        return lines

    @staticmethod
    def epochs(trainer: L.Trainer) -> str:
        """The epochs trained, and how far the last one got where it was cut short (max_steps, max_time)."""
        done, total = batches_done(trainer), trainer.num_training_batches
        if 0 < done < total:  # Lightning counts the cut epoch as one
            return f"{max(trainer.current_epoch - 1, 0)} epoch(s) and {done} of {total} batches"
        return f"{trainer.current_epoch} epoch(s)"

    @staticmethod
    def eval_line(trainer: L.Trainer, subcommand: str, ckpt_path: str | None, log_dir: str | None) -> str:
        """The end of test, validate and analyze: what was evaluated and where it was logged (predict's end is
        ``PredictionWriter.report``: the images and the CSV)."""
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.endswith("/acc")}
        shown = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(metrics.items()))
        where = f"; logged to {log_dir}" if log_dir and trainer.logger is not None else ""
        model = f" of {ckpt_path}" if ckpt_path else ""
        return f"{subcommand} done{model}" + (f": {shown}" if shown and subcommand in ("test", "validate") else "") + where


def as_test(typed: list[str]) -> list[str]:
    """fit's command line as typed (options may come before the subcommand) made a ``test`` of the same settings:
    ``fit`` becomes ``test``, and ``--ckpt_path X`` / ``--ckpt_path=X`` are left out (the next one is added)."""
    words, skip = [], False
    for word in typed:
        if skip:
            skip = False
        elif word == "--ckpt_path":
            skip = True
        elif not word.startswith("--ckpt_path="):
            words.append(word)
    at = words.index("fit") if "fit" in words else None
    return words[:at] + ["test"] + words[at + 1:] if at is not None else ["test", *words]
