"""Checkpoints that survive interruption: atomic writes, safe loads, a current ``last.ckpt``, graceful signals.

- ``AtomicCheckpointIO`` writes each checkpoint to a hidden temporary file beside its target,
  fsyncs it and renames it into place, so a kill -9, a full disk or a failing write never
  leaves a broken file under a checkpoint's name; and it loads with ``weights_only=True``
  only, so a checkpoint carrying pickled code is refused before anything in it runs.
- ``LatestCheckpoint`` rewrites ``last.ckpt`` after every validation (and, if asked, every N
  steps), and on SIGTERM or Ctrl-C, which ``GracefulStop`` turns into a stop at the next
  batch boundary.
"""

import os
import pickle
import re
import signal
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.fabric.utilities.types import _PATH
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from senet_pl.files import give_default_mode

TEMP_PREFIX = ".partial-"  # temporary files: hidden, and not ending in .ckpt, so never taken for checkpoints


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message names the file."""


def is_state_dict(obj: Any) -> bool:
    """A plain ``module.state_dict()``: names to tensors, nothing else (no optimizer, no loop state)."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def as_lightning_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A plain SEResNet state dict as the checkpoint Lightning restores weights from (test, predict, analyze):
    its keys get the LightningModule's ``model.`` prefix; the architecture comes from the config."""
    weights = {k if k.startswith("model.") else f"model.{k}": v for k, v in state_dict.items()}
    return {"state_dict": weights, "pytorch-lightning_version": L.__version__}


def load_checkpoint(path: _PATH, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors that name the file.

    ``mmap=True`` checks and reads the structure without reading the tensors' bytes.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file.") from None
    except pickle.UnpicklingError as err:
        # torch's safe unpickler names the import it blocked; without one the file is just not a pickle
        blocked = re.search(r"GLOBAL (\S+)", str(err))
        if blocked:
            raise CheckpointError(
                f"refused to load {path}: it asks to import {blocked.group(1)}, i.e. it holds pickled code or "
                "objects, which checkpoints of this project never do. Nothing in it was run."
            ) from None
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a checkpoint.") from None
    except Exception as err:  # truncated zip, random bytes, wrong format: torch raises RuntimeError and others
        if mmap and "mmap can only be used" in str(err):  # not a zip archive: read it the plain way
            return load_checkpoint(path, map_location)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a checkpoint ({first}).") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint I/O that never leaves a partial file under a checkpoint's name, and loads safely."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f"{TEMP_PREFIX}*"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}.")
        try:
            give_default_mode(tmp)
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError):
                kept = f"; the previous {target.name} is intact" if target.exists() else ""
                raise CheckpointError(f"could not write checkpoint {target}: {err.strerror or err}{kept}.") from None
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None) -> dict:
        checkpoint = load_checkpoint(path, map_location=map_location or "cpu")
        return as_lightning_checkpoint(checkpoint) if is_state_dict(checkpoint) else checkpoint


class LatestCheckpoint(Checkpoint):
    """Keeps ``last.ckpt`` current: every epoch and validation, every N training steps if asked, and on SIGTERM/Ctrl-C.

    Lightning's ``ModelCheckpoint(save_last=True)`` (since 2.6) rewrites ``last.ckpt`` only when a
    top-k checkpoint is saved at the same step; with ``save_top_k=1`` it is then a copy of the
    best one and a resume repeats every epoch since. And a ModelCheckpoint cannot save both every
    N steps and every epoch. This callback does both, whatever the metrics do. It never saves on
    other exceptions (a NaN loss, a crash), so a good ``last.ckpt`` is not replaced by the state
    that failed.

    It saves at the end of each training epoch (after the epoch's validation) and after
    validations in the middle of an epoch. Being a ``Checkpoint``, Lightning runs it after the
    other callbacks and after the ModelCheckpoint listed before it, so ``last.ckpt`` records the
    best checkpoint as of this very step (``--ckpt_path best`` reads it there, and a resumed run
    deletes the right old best).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: NonNegativeInt = 0) -> None:
        """
        Args:
            dirpath: folder of ``last.ckpt``; by default the best-checkpoint callback's (the run's ``checkpoints/``).
            every_n_train_steps: also rewrite it every this many optimizer steps (mid-epoch checkpoints); 0: only
                after validation.
        """
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.saved: tuple[str, int] | None = None  # (path, global step) of the last file this process wrote

    def _save(self, trainer: L.Trainer) -> None:
        already = self.saved is not None and self.saved[1] == trainer.global_step
        if already or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        best = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        dirpath = self.dirpath or (best[0].dirpath if best else None)
        dirpath = dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        path = os.path.join(dirpath, "last.ckpt")
        trainer.save_checkpoint(path, weights_only=False)
        self.saved = (path, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only validations in the middle of an epoch: at an epoch's end ModelCheckpoint saves the best in
        # on_train_epoch_end, which comes after the validation, and last.ckpt must record that best.
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Training or validating inside fit (not the sanity check, which comes before any step of this
        # process): the state after the last optimizer step. Lightning restarts a validation cut short.
        if isinstance(exception, SIGTERMException):
            self._save(trainer)


class GracefulStop(Callback):
    """Makes the first Ctrl-C stop any command like SIGTERM does: at the next batch boundary (in fit, with a checkpoint).

    A KeyboardInterrupt can land anywhere, even half-way through an optimizer step, and a
    checkpoint of that state would not resume exactly; Lightning's SIGTERM handling only sets
    a flag that the loops check between batches. A second Ctrl-C interrupts at once.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # From the start of every command (fit with its sanity check, validate, test, predict), not only training.
        self.signal = None
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._previous is None:  # the command has ended (Lightning's teardown may reinstall this handler)
            raise KeyboardInterrupt
        self.signal = signal.SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C raises KeyboardInterrupt
        print("\nCtrl-C: stopping after this batch (Ctrl-C again to abort at once)", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler sets the flag its loops check

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
