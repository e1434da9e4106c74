"""The run folders of a logger (``save_dir/name/version_N``): which checkpoint ``--ckpt_path last|best|auto``
means, and removing the folders a command made before it failed."""

import difflib
import os
import shutil
import sys
from pathlib import Path, PurePath
from typing import Any, get_args

from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from senet_pl.checkpoints import load_checkpoint
from senet_pl.data import DatasetName

RUN_LOGGERS = ("TensorBoardLogger", "CSVLogger")  # the loggers whose save_dir/name/version_N folders hold runs


class CLIError(Exception):
    """A command line that cannot be carried out; the message says what to do."""


def check_ckpt_spelling(ckpt_path: str | None) -> None:
    """An empty ``--ckpt_path`` (an unset shell variable) or a missing file named like ``best``/``last``/``auto``
    (``bestt``, ``Last``) is a typo: say so in one line, rather than start afresh or report a missing file."""
    if ckpt_path == "":
        raise CLIError("--ckpt_path is empty (an unset variable?): leave it out to start a new run, or give best, "
                       "last, auto or a checkpoint's path.")
    if ckpt_path and not os.path.lexists(ckpt_path):
        close = difflib.get_close_matches(ckpt_path.lower(), ["best", "last", "auto"], n=1, cutoff=0.6)
        if close:
            raise CLIError(f"--ckpt_path {ckpt_path}: no such file. Did you mean --ckpt_path {close[0]}?")


def check_writable(run: Path, ckpt_path: str, subcommand: str) -> None:
    """The run folder of the checkpoint, which the command logs into, can be written (a shared, read-only run
    failed with a traceback once TensorBoard's logger tried)."""
    if not os.access(run, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write into {run}, the run of {ckpt_path}, where {subcommand} logs: make it writable, "
                       "or log elsewhere with --trainer.logger.save_dir DIR (and the checkpoint's path) or "
                       "--trainer.logger false.")


def fixed_checkpoint_folder(cfg: Any) -> Path | None:
    """The folder of last.ckpt when it is not a new run folder's: a ``--last_checkpoint.dirpath`` or
    ``--checkpoint.dirpath`` given, or ``checkpoints/`` in the working directory (``default_root_dir``) without a
    logger. Every fit writes there, so a new run would replace the last one's checkpoints."""
    given = cfg.get("last_checkpoint", {}).get("dirpath") or cfg.get("checkpoint", {}).get("dirpath")
    if given:
        return Path(str(given))  # (~ and $VARS expanded by expand_logger_paths, for the writers too)
    if logger_root(cfg.trainer.logger) is None:
        return Path(cfg.trainer.get("default_root_dir") or ".") / "checkpoints"
    return None


def named_run_folder(root: Path | None, version: Any) -> Path | None:
    """The run folder a logger's ``version`` names (``version_N`` for an int), under ``root``; None without one."""
    if root is None or version is None:
        return None
    return root / (f"version_{version}" if isinstance(version, int) else str(version))


def refuse_replacing(folder: Path | None, checkpointing: bool = True) -> None:
    """fit without --ckpt_path into a checkpoint folder that holds another run's last.ckpt: refused (unless the run
    writes no checkpoints)."""
    if checkpointing and folder is not None and (folder / "last.ckpt").exists():
        raise CLIError(f"{folder} already holds the last.ckpt of a run, which a new run would replace: resume it with "
                       "--ckpt_path last, or give another --checkpoint.dirpath (or move the folder away).")


def find_checkpoint(root: Path | None, name: str, subcommand: str, fixed: Path | None = None,
                    best_dir: Path | None = None) -> str | None:
    """The file that ``--ckpt_path last|best|auto`` means: from the newest run of the configured logger, or the
    ``fixed`` checkpoint folder (``fixed_checkpoint_folder``) where there is one; ``best`` in ``best_dir`` (a
    ``--checkpoint.dirpath`` given) or beside last.ckpt.

    ``auto`` (for job scripts that are rerun, e.g. requeued on SLURM) is ``last`` when a run exists
    and None (a new run) otherwise; ``last`` with nothing to resume is an error, never a silent fresh start.
    """
    if fixed is not None:  # a given checkpoint folder, or a named version's (not the newest run of another name)
        runs = [fixed / "last.ckpt"] if (fixed / "last.ckpt").is_file() else []
    else:
        runs = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime) if root else []
    if not runs:
        if name == "auto" and subcommand == "fit":
            print("--ckpt_path auto: no run to resume, starting a new one", file=sys.stderr)
            return None
        where = f"{fixed} holds no last.ckpt" if fixed is not None else f"no run under {root}/ has a checkpoints/last.ckpt"
        fix = ("leave --ckpt_path out to start a new run, or use --ckpt_path auto to resume if there is a run and "
               "start one otherwise." if subcommand == "fit" else "or train one first with fit.")
        raise CLIError(f"--ckpt_path {name}: {where}. Give the path of a checkpoint, {fix}")
    path = runs[-1]
    if name == "best":  # the best-checkpoint callback's record, kept in every checkpoint
        last = load_checkpoint(path, mmap=True)
        callbacks = last.get("callbacks", {}) if isinstance(last, dict) else {}
        callbacks = callbacks if isinstance(callbacks, dict) else {}
        best = [s.get("best_model_path") for s in callbacks.values() if isinstance(s, dict) and s.get("monitor")]
        # Only a file beside last.ckpt, in the same run's checkpoints folder (or the --checkpoint.dirpath given),
        # found by its name: the path recorded is relative to where training ran (and to where the run folder was).
        folder = best_dir or path.parent
        best = [folder / PurePath(b).name for b in best if isinstance(b, str) and PurePath(b).name]
        # (and not a link to a file elsewhere)
        if not best or not best[0].is_file() or best[0].resolve().parent != folder.resolve():
            raise CLIError(f"--ckpt_path best: {path} records no best checkpoint that still exists in {folder} (a run "
                           "without validation has none): use --ckpt_path last, or give a checkpoint's path.")
        path = best[0]
    print(f"--ckpt_path {name} resolved to {path}", file=sys.stderr)
    return str(path)


class NewRunFolders:
    """The run folders a command makes under a logger's ``root`` (save_dir/name), noted before it starts."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.before = set(root.iterdir()) if root is not None and root.is_dir() else set()
        # root and those of its parents that do not exist yet, deepest first: the command makes them
        self.missing = [p for p in (root, *root.parents) if not p.exists()] if root is not None else []

    def remove(self, own: Path | None) -> list[Path]:
        """Remove the command's own run folder ``own`` if it is new and holds no checkpoint (returns it), then the
        folders above it that the command made and left empty (no empty lightning_logs/<name>/ after a refused run).
        Other new folders are left alone: they are other commands' runs, started beside this one (a sweep)."""
        if self.root is None or not self.root.is_dir() or own is None:
            return []
        removed = []
        for folder in sorted(set(self.root.iterdir()) - self.before):
            mine = folder.resolve() in (own.resolve(), *own.resolve().parents)  # own: log_dir, maybe a sub_dir of it
            if folder.is_dir() and mine and not any(folder.rglob("*.ckpt")):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        for folder in self.missing:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break
        return removed


class FolderSnapshot:
    """The top-level files of a trained run's folder, before ``test``/``validate``/``predict``/``analyze`` logs into
    it: if the command fails, ``restore`` removes what it added (an events file of its own, a figure folder) and puts
    back the small files it rewrote (``config_test.yaml``, ``hparams.yaml``). ``checkpoints/`` is never touched."""

    LARGEST = 2**20  # bytes: configs, tables; events files are never rewritten (each command writes a new one)

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        self.contents = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()
                         and p.stat().st_size <= self.LARGEST} if folder.is_dir() else {}

    def restore(self) -> None:
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if path.name in self.names or path.name == "checkpoints":
                continue
            if path.is_dir() and not path.is_symlink():
                if not any(path.rglob("*.ckpt")):
                    shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for name, content in self.contents.items():
            path = self.folder / name
            if path.is_file() and path.read_bytes() != content:
                path.write_bytes(content)


def _run_logger(logger: Any) -> bool:
    return isinstance(logger, Namespace) and logger.class_path.endswith(RUN_LOGGERS)


def name_run(cfg: Namespace) -> None:
    """A run named after a dataset (a recipe's name) but of another dataset is named after its own (mnist.yaml with
    --data.dataset kmnist: kmnist), and plain-ResNet runs get their own name (mnist_no_se): --ckpt_path best of a
    recipe never picks a model of another dataset, nor the other model."""
    logger = cfg.trainer.logger
    if not _run_logger(logger):
        return
    name, dataset = logger.init_args.get("name") or "", cfg.data.get("dataset")
    recipe = name.removesuffix("_no_se")
    if recipe in get_args(DatasetName) and dataset in get_args(DatasetName) and recipe != dataset:
        logger.init_args.name = name = dataset + name[len(recipe):]
    if cfg.model.se is False:
        plain = name == "no_se" or name.endswith("_no_se")  # not casino_se: a name that merely contains it
        logger.init_args.name = name if plain else f"{name}_no_se" if name else "no_se"


def expand_logger_paths(cfg: Namespace) -> None:
    """``~`` and ``$VARS`` in the logger's save_dir and name, and in the checkpoint folders, expanded once for
    everything: TensorBoard's logger expands them in its own folder, Lightning's checkpoint callback does not (a run
    would be split between $HOME/runs/... and a folder named ~ in the working directory), and the CSV logger does not
    either; ``--ckpt_path last`` looks where the checkpoints are written."""
    def path(value: str) -> str:  # in TensorBoard's order: variables, then a leading ~
        return os.path.expanduser(os.path.expandvars(value))

    logger = cfg.trainer.logger
    if _run_logger(logger):
        for key, expand in (("save_dir", path), ("name", os.path.expandvars)):
            value = logger.init_args.get(key)
            if isinstance(value, str):
                logger.init_args[key] = expand(value)
    for group, key in (("checkpoint", "dirpath"), ("last_checkpoint", "dirpath"), ("trainer", "default_root_dir")):
        value = cfg.get(group, {}).get(key) if cfg.get(group) is not None else None
        if isinstance(value, str):
            cfg[group][key] = path(value)


def logger_root(logger: Any) -> Path | None:
    """save_dir/name of the TensorBoard (or CSV) logger's configuration, where the runs' version_N folders are."""
    return Path(logger.init_args.save_dir) / (logger.init_args.name or "") if _run_logger(logger) else None


def run_folder(logger: Any) -> Path | None:
    """A command's run folder (its logger's version_N), asked of the logger itself: trainer.log_dir would be a
    collective under DDP, and this is asked on the first process alone."""
    return Path(logger.log_dir) if isinstance(logger, (TensorBoardLogger, CSVLogger)) else None
