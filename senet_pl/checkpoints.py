"""Checkpoint files: atomic writes and safe loads.

``AtomicCheckpointIO`` writes each checkpoint to a hidden temporary file beside its target,
fsyncs it and renames it into place, so a kill -9, a full disk or a failing write never leaves a
broken file under a checkpoint's name; and it loads with ``weights_only=True`` only, so a
checkpoint carrying pickled code is refused before anything in it runs. (When they are written:
``callbacks/last.py``. What the CLI may read from them: ``resume.py``.)
"""

import os
import pickle
import re
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from senet_pl.compat import PATH
from senet_pl.files import give_default_mode

TEMP_PREFIX = ".partial-"  # temporary files: hidden, and not ending in .ckpt, so never taken for checkpoints
# Set (True) in a checkpoint written between the accumulated batches of one optimizer step (a best checkpoint of a
# validation there): it counts those batches as done without their gradients, so fit cannot resume it exactly.
BETWEEN_STEPS = "senet_pl_between_accumulated_batches"


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


def load_checkpoint(path: PATH, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors that name the file.

    ``mmap=True`` checks and reads the structure without reading the tensors' bytes.
    """
    try:
        _check_file(path)
        _check_contents(path)  # also before a structure-only read: damaged bytes never reach the unpickler
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
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
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a checkpoint ({first}).") from None


def _check_file(path: PATH) -> None:
    """A checkpoint is a regular file in torch.save's zip format. Anything else is refused before it is read: a
    device such as /dev/zero or a huge file of zeros would be read by torch's legacy loader until memory ran out,
    and a FIFO would block."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # follows links; FileNotFoundError for a missing file
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a regular file (a folder, device or FIFO).")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a checkpoint (not a zip archive, "
                              "the format torch.save and Lightning write).")


def _check_contents(path: PATH) -> None:
    """A checkpoint is a zip archive whose every entry carries a CRC-32; torch.load does not check them, so bytes
    damaged inside a tensor (a disk or copy fault) loaded as wrong weights, and a test reported NaN or a wrong
    accuracy without a word. Reading the archive once more costs a fraction of a second."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a checkpoint ({err}).") from None
    if bad is not None:
        raise CheckpointError(f"cannot read checkpoint {path}: it is damaged (its entry {bad} fails the archive's "
                              "checksum or header check). Use another copy, or an earlier checkpoint of the run.")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint I/O that never leaves a partial file under a checkpoint's name, and loads safely."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PATH, storage_options: Any = None) -> None:
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

    def load_checkpoint(self, path: PATH, map_location: Any = None, weights_only: bool | None = None) -> dict:
        checkpoint = load_checkpoint(path, map_location=map_location or "cpu")
        return as_lightning_checkpoint(checkpoint) if is_state_dict(checkpoint) else checkpoint


def follow_run_folder(callbacks: list, states: dict[str, Any], resumed: PATH) -> list[str]:
    """Resuming from ``resumed``: make the records of the best-checkpoint ``callbacks`` in ``states`` (the
    checkpoint's ``callbacks``, before Lightning restores them) name their files where they are now.

    Lightning restores a ModelCheckpoint's best only when its folder is the very string it recorded, and then as
    recorded, relative to where training ran. So a run whose logs were moved, or given by another ``save_dir``,
    lost its best (the next validation, however worse, became it), and a run resumed from another working directory
    could restore names of files that are not there. Now:

    - a callback saving beside ``resumed`` or into the folder it recorded (the same run): its records are the files
      of that folder with the recorded names (those that still exist), so the best so far stays the best;
    - a callback saving elsewhere (a new run folder): it starts afresh, its best chosen among its own validations;
      the other folder's files are left alone. Returns one note per such callback that had a best.
    """
    folder = Path(resumed).resolve().parent
    notes = []
    for callback in callbacks:
        state = states.get(callback.state_key)
        if not isinstance(state, dict) or not isinstance(callback.dirpath, str):
            continue
        recorded, best = state.get("dirpath"), state.get("best_model_path")
        here = Path(callback.dirpath).resolve()
        # The same run: saving beside the checkpoint, or into the folder it recorded and that holds its best
        # (--checkpoint.dirpath apart from --last_checkpoint.dirpath; not the same relative name elsewhere).
        holds_best = isinstance(best, str) and bool(best) and (here / Path(best).name).is_file()
        if here == folder or holds_best and isinstance(recorded, str) and here == Path(recorded).resolve():
            _name_files_in(state, callback.dirpath)
            continue
        states[callback.state_key] = callback.state_dict()  # as new: nothing of the other folder's record
        if best:
            notes.append(f"resuming from {resumed} into a new folder, {callback.dirpath}: this run's best checkpoint "
                         f"is chosen among its own validations (the best so far, {Path(str(best)).name}, "
                         f"stays beside {Path(resumed).name}).")
    return notes


def _name_files_in(state: dict[str, Any], dirpath: str) -> None:
    """``state``'s files as the files of the same names in ``dirpath``; those that are not there are forgotten."""

    def here(path: Any) -> str:
        found = os.path.join(dirpath, Path(path).name) if isinstance(path, str) and path else ""
        return found if found and os.path.isfile(found) else ""

    best_k = state.get("best_k_models") or {}
    state["best_k_models"] = {here(path): score for path, score in best_k.items() if here(path)}
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        state[key] = here(state.get(key))
    if not state["best_model_path"]:
        state["best_model_score"] = None
    state["dirpath"] = dirpath
