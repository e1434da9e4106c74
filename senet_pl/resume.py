"""What may differ between a checkpoint and the command line when it is resumed or evaluated.

(What may be read from it at all: ``untrusted.py``.)

- settings that fix the model's shape or the meaning of its input (``MODEL_SHAPE``, ``DATA_MEANING``)
  must agree with the checkpoint for every subcommand; a value the user gave (on the command line
  or in a ``--config`` file) that disagrees is refused, one line per conflict, and a value left at
  its default takes the checkpoint's, so that the run's ``config.yaml`` records what ran;
- ``validate`` must keep the validation split (another split would hold images the model trained on);
- a resumed ``fit`` must also keep the validation split and the schedule (``FIT_FIXED``, the
  optimizer and lr_scheduler), and may change the batch size, the seed and the number of processes
  only at an epoch boundary (mid-epoch, the position in the epoch would mean other samples);
- everything else may change (``max_epochs``, ``precision``, ``channels_last``, ...).
"""

import inspect
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import ChainedScheduler

from senet_pl.schedule import LENGTHS
from senet_pl.untrusted import CheckpointInfo, short

MODEL_SHAPE = ("depth", "stem", "se", "reduction")
DATA_MEANING = ("dataset", "image_size")
FIT_FIXED = {"model": ("warmup_steps", "lr_interval", "ema_decay"), "data": ("val_size", "split_seed")}
# Optimizer settings that change what training does (implementation switches such as fused may change).
OPTIMIZER_SETTINGS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "betas", "eps", "alpha",
                      "amsgrad", "maximize", "centered", "lr_decay", "rho", "lambd", "decoupled_weight_decay")


def not_resumable(info: CheckpointInfo) -> str | None:
    """Why fit cannot resume ``info`` (the evaluations can use it), or None."""
    if info.kind == "state_dict":
        return (f"{info.path} holds only weights (a plain state dict): fit resumes this project's checkpoints, which "
                "also hold the optimizer and the position in the run. test, validate, predict and analyze accept it, "
                "with the architecture from the config.")
    if info.between_steps:
        return (f"{info.path} was written by a validation between the accumulated batches of one optimizer step "
                "(--trainer.accumulate_grad_batches), without the gradients of the batches before it: fit would not "
                "resume the run exactly. Resume from its last.ckpt (--ckpt_path last), which is written only after a "
                "step; test, validate, predict and analyze accept this file.")
    return None


def _get(namespace: Any, key: str) -> Any:
    return namespace.get(key) if namespace is not None and hasattr(namespace, "get") else None


def reconcile(info: CheckpointInfo, cfg: Any, explicit: Any, subcommand: str,
              data_shape: Callable[[str], tuple[int, int]]) -> list[str]:
    """Compare the checkpoint with the parsed config ``cfg`` (of one subcommand) and adopt its values where the
    user gave none (``explicit`` holds only what was given). ``data_shape(dataset)`` is (classes, channels).
    Returns one line per conflict."""
    lines: list[str] = []
    fit = subcommand == "fit"

    def align(group: str, key: str, source: dict) -> None:
        if key not in source:
            return
        options = _get(explicit, group)  # a key given as null is in it, with the value None
        want, given = source[key], _get(options, key)
        if options is not None and key in options and given != want:
            lines.append(f"--{group}.{key} {'null' if given is None else given}, but the checkpoint has {want}")
        else:
            cfg[f"{group}.{key}"] = want

    for key in MODEL_SHAPE:
        align("model", key, info.model)
    for key in DATA_MEANING:
        align("data", key, info.data)
    for group, keys in FIT_FIXED.items():
        source = info.model if group == "model" else info.data
        for key in keys:
            # validate: on the split the model was validated on; another one would hold images it trained on
            if fit or (subcommand == "validate" and group == "data"):
                align(group, key, source)
            elif key in source and _get(_get(explicit, group), key) is None:
                cfg[f"{group}.{key}"] = source[key]
    for key, has in zip(("num_classes", "in_channels"), data_shape(cfg.data.dataset)):
        if key in info.model and info.model[key] != has:
            lines.append(f"the checkpoint has {key} {info.model[key]}, but --data.dataset {cfg.data.dataset} has {has}")

    # The position in the epoch counts batches of the checkpoint's size, in the order its seed drew.
    trained = {"batch_size": info.data.get("batch_size"), "seed": info.position.get("seed")}
    if trained["batch_size"] is not None and _get(_get(explicit, "data"), "batch_size") is None:
        cfg.data.batch_size = trained["batch_size"]  # left out: the checkpoint's (a default is no choice)
    if fit and info.mid_epoch:
        batch_size, seed = cfg.data.batch_size, _seed(cfg)
        if trained["batch_size"] is not None and batch_size != trained["batch_size"]:
            lines.append(f"--data.batch_size {batch_size}, but the checkpoint stopped mid-epoch with batch size "
                         f"{trained['batch_size']} (change it at an epoch boundary only)")
        if trained["seed"] is not None and seed is not None and seed != trained["seed"]:
            lines.append(f"--seed_everything {seed}, but the checkpoint stopped mid-epoch in the order of seed "
                         f"{trained['seed']} (change it at an epoch boundary only)")
    return lines


def _seed(cfg: Any) -> int | None:
    seed = cfg.get("seed_everything")
    return seed if type(seed) is int else None


def keep_checkpoint_folders(best_checkpoints: list, info: CheckpointInfo, log_dir: str | None) -> None:
    """Resuming ``info``: each ModelCheckpoint without a folder of its own saves into the one it saved into before,
    named as it recorded it, so that the best so far stays the best (``saved_checkpoint_folder``). ``log_dir`` is
    the logger's run folder, whose checkpoints/ Lightning uses otherwise."""
    for callback in best_checkpoints:
        if callback.dirpath is None:
            callback.dirpath = saved_checkpoint_folder(info, callback.state_key)
            folder = callback.dirpath or (os.path.join(log_dir, "checkpoints") if log_dir else None)
            if folder is not None and Path(folder).resolve() == Path(info.path).resolve().parent:
                # resuming into it: Lightning's warning is about a stranger's files
                warnings.filterwarnings("ignore", re.escape(f"Checkpoint directory {folder} exists"))


def saved_checkpoint_folder(info: CheckpointInfo, state_key: str) -> str | None:
    """The folder a best-checkpoint callback (``state_key``) of the resumed run saved into, as it recorded it, if
    that is the folder ``info``'s checkpoint is in. Lightning's ModelCheckpoint restores its best score and files
    only when its folder is that string: a run resumed into a new version_N (CSVLogger) took the first validation
    after the resume as the best, and a folder given by its real path (not the relative one recorded) did the same."""
    callbacks = info.raw.get("callbacks")
    state = callbacks.get(state_key) if isinstance(callbacks, dict) else None
    saved = state.get("dirpath") if isinstance(state, dict) else None
    if not isinstance(saved, str) or not saved:
        return None
    try:
        same = Path(saved).resolve() == Path(info.path).resolve().parent
    except (OSError, RuntimeError, ValueError):
        return None
    return saved if same else None


def training_conflicts(info: CheckpointInfo, optimizers: list[torch.optim.Optimizer], schedulers: list,
                       world_size: int, defaults: dict[str, bool] | None = None,
                       length_from_run: object = None) -> list[str]:
    """For a resumed fit: the configured optimizer and schedule against the states in the checkpoint (which
    Lightning restores over them), and the number of processes against a mid-epoch position. ``defaults`` says
    which of "optimizer" and "lr_scheduler" the user did not give (the lines then say so)."""
    lines = []
    note = {part: " (not given: the default)" if (defaults or {}).get(part) else "" for part in ("optimizer", "lr_scheduler")}
    saved_optimizers = info.raw.get("optimizer_states") or []
    for optimizer, saved in zip(optimizers, saved_optimizers):
        try:
            saved_group = saved["param_groups"][0]
        except (KeyError, IndexError, TypeError):
            continue
        group = optimizer.param_groups[0]
        name = type(optimizer).__name__
        if set(saved_group) - {"initial_lr"} != set(group) - {"initial_lr"}:
            lines.append(f"--model.optimizer {name}{note['optimizer']}, but the checkpoint's optimizer has other settings "
                         f"({', '.join(sorted(set(saved_group) - {'params', 'initial_lr'}))})")
            continue
        # Momentum that a schedule cycles (OneCycleLR, CyclicLR: base_momentum in the group) is its state, not a setting.
        cycled = {"momentum", "betas"} if "base_momentum" in group or "base_momentum" in saved_group else set()
        for key in OPTIMIZER_SETTINGS:
            if key in group and key not in cycled:
                mine = group.get("initial_lr", group[key]) if key == "lr" else group[key]
                theirs = saved_group.get("initial_lr", saved_group[key]) if key == "lr" else saved_group[key]
                if _differ(mine, theirs):
                    lines.append(f"--model.optimizer.init_args.{key} {mine}{note['optimizer']}, but the checkpoint's "
                                 f"{name} has {theirs}")
    # A chained schedule (warm-up and cosine) is compared part by part.
    schedulers = [part for s in schedulers for part in (s._schedulers if isinstance(s, ChainedScheduler) else [s])]
    saved_schedulers = [part for s in info.raw.get("lr_schedulers") or []
                        for part in (s.get("_schedulers") if isinstance(s, dict) and isinstance(s.get("_schedulers"), list) else [s])]
    if len(schedulers) != len(saved_schedulers):
        names = ", ".join(type(s).__name__ for s in schedulers) or "none"
        lines.append(f"the config's schedule has {len(schedulers)} scheduler(s) ({names}; --model.warmup_steps and "
                     f"--model.lr_scheduler{note['lr_scheduler']}), but the checkpoint has {len(saved_schedulers)}")
    else:
        for scheduler, saved in zip(schedulers, saved_schedulers):
            mine = scheduler.state_dict()
            if not isinstance(saved, dict) or set(mine) != set(saved):
                lines.append(f"--model.lr_scheduler {type(scheduler).__name__}{note['lr_scheduler']}, but the checkpoint's "
                             "scheduler is of another kind")
                continue
            arguments = set(inspect.signature(type(scheduler).__init__).parameters) - {"self", "optimizer", "last_epoch", "verbose"}
            if scheduler is length_from_run:
                arguments -= set(LENGTHS)  # the run's length, which may change on resume (schedule.resize)
            for key in sorted(arguments & set(mine)):
                if _differ(mine[key], saved[key]):
                    lines.append(f"{type(scheduler).__name__} {key} {mine[key]}{note['lr_scheduler']}, but the checkpoint's "
                                 f"has {saved[key]}")
    saved_world = info.position.get("world_size")
    if info.mid_epoch and saved_world is not None and saved_world != world_size:
        lines.append(f"{world_size} process(es), but the checkpoint stopped mid-epoch with {saved_world} "
                     "(change the number of processes at an epoch boundary only)")
    return lines


def _differ(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) > 1e-12 * max(abs(a), abs(b), 1)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) != len(b) or any(_differ(x, y) for x, y in zip(a, b))
    return a != b


def weight_mismatch(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> str | None:
    """Why ``state_dict`` cannot be loaded into ``module`` (missing, unexpected or reshaped tensors), or None."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if not (missing or unexpected or reshaped):
        return None
    parts = []
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} tensor(s) of another shape (e.g. {k}: {tuple(state_dict[k].shape)} in the file, "
                     f"{tuple(own[k].shape)} in the model)")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {short(unexpected[0])})")
    return "; ".join(parts)
