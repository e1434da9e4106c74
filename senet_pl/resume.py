"""What a checkpoint may tell the CLI, and what may differ from it when it is resumed or evaluated.

A checkpoint is data, never code. ``torch.load(weights_only=True)`` stops pickled objects, but
LightningCLI would also merge a checkpoint's ``hyper_parameters`` into the parser, and jsonargparse
imports whatever module a ``class_path`` string names. So before anything reads them, every key is
checked against the signature of this project's model and data module: only their own settings, as
plain values of the declared types. Class paths (optimizer, schedule) are never taken from a
checkpoint: they come from the config, and are compared with the optimizer and schedule states the
checkpoint holds.

Then the checkpoint is compared with the command line (``reconcile``):

- settings that fix the model's shape or the meaning of its input (``MODEL_SHAPE``, ``DATA_MEANING``)
  must agree with the checkpoint for every subcommand; a value the user gave (on the command line
  or in a ``--config`` file) that disagrees is refused, one line per conflict, and a value left at
  its default takes the checkpoint's, so that the run's ``config.yaml`` records what ran;
- a resumed ``fit`` must also keep the validation split and the schedule (``FIT_FIXED``, the
  optimizer and lr_scheduler), and may change the batch size, the seed and the number of processes
  only at an epoch boundary (mid-epoch, the position in the epoch would mean other samples);
- everything else may change (``max_epochs``, ``precision``, ``channels_last``, ...).
"""

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch

from senet_pl.checkpoints import CheckpointError, is_state_dict, load_checkpoint

LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"  # what LightningCLI stores; never imported here
MODEL_SHAPE = ("depth", "stem", "se", "reduction")
DATA_MEANING = ("dataset", "image_size")
FIT_FIXED = {"model": ("warmup_steps",), "data": ("val_size", "split_seed")}
# Optimizer settings that change what training does (implementation switches such as fused may change).
OPTIMIZER_SETTINGS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "betas", "eps", "alpha",
                      "amsgrad", "maximize", "centered", "lr_decay", "rho", "lambd", "decoupled_weight_decay")


@dataclass
class CheckpointInfo:
    """What the CLI reads from a checkpoint, checked: plain values only."""

    path: str
    kind: Literal["lightning", "state_dict"]
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    global_step: int = 0
    position: dict[str, int] = field(default_factory=dict)  # the training loader's state: epoch, batches_done, ...
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def mid_epoch(self) -> bool:
        return self.position.get("batches_done", 0) > 0


def settings(cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """``__init__`` argument name -> annotation: what a checkpoint of ``cls`` may hold."""
    hints = typing.get_type_hints(cls.__init__)
    names = [n for n in inspect.signature(cls.__init__).parameters if n != "self" and n not in exclude]
    return {n: hints.get(n, Any) for n in names}


def fits(value: Any, annotation: Any) -> bool:
    """Whether a plain value is of the annotated type (Literal, Optional/Union, bool, int with jsonargparse's
    restrictions such as PositiveInt, float, str). Anything else, including Any, is not accepted."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool or annotation is str:
        return type(value) is annotation
    if annotation is float:
        return type(value) in (int, float)
    if isinstance(annotation, type) and issubclass(annotation, int):
        if type(value) is not int:
            return False
        try:
            annotation(value)  # PositiveInt, NonNegativeInt: raise outside their range
        except ValueError:
            return False
        return True
    return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_hyperparameters(path: str, hparams: Any, cls: type, where: str, exclude: tuple[str, ...] = ()) -> dict:
    """``hparams`` if it holds only ``cls``'s own settings as plain values of their types; else CheckpointError."""
    if hparams is None:
        return {}
    if not isinstance(hparams, dict):
        raise CheckpointError(f"refused {path}: its {where} is a {type(hparams).__name__}, not a dict of settings.")
    expected = settings(cls, exclude)
    checked = {}
    for key, value in hparams.items():
        if key == "_instantiator" and value == LIGHTNING_INSTANTIATOR:
            continue
        if key not in expected:
            raise CheckpointError(
                f"refused {path}: {where}.{_short(key).strip(chr(39))} is not a setting of this project's "
                f"{cls.__name__} (a checkpoint of another model, or a crafted one). Nothing was imported."
            )
        if not fits(value, expected[key]):
            raise CheckpointError(
                f"refused {path}: {where}.{key} is {_short(value)}, which is not a valid value of that setting. "
                "Nothing was imported."
            )
        checked[key] = value
    return checked


def _loader_state(ckpt: dict) -> dict[str, int]:
    """The training loader's position as ``ResumableLoader.state_dict`` wrote it (Lightning keeps it in its loop state)."""
    try:
        state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    except (KeyError, IndexError, TypeError):
        return {}
    if not isinstance(state, dict):
        return {}
    return {k: v for k, v in state.items() if isinstance(k, str) and type(v) is int}


def read_checkpoint(path: str, model_cls: type, data_cls: type) -> CheckpointInfo:
    """Load ``path`` safely and check everything the CLI will read from it."""
    ckpt = load_checkpoint(path, mmap=True)
    if is_state_dict(ckpt):
        return CheckpointInfo(str(path), "state_dict", raw=ckpt)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
        held = f"a dict with keys {', '.join(map(str, list(ckpt)[:6]))}" if isinstance(ckpt, dict) and ckpt else (
            f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else "an empty dict")
        raise CheckpointError(
            f"{path} is not a checkpoint of this project: it holds {held}. Expected a .ckpt written by "
            "`python -m senet_pl fit`, or (for test, validate, predict and analyze) a plain SEResNet state dict."
        )
    check_structure(path, ckpt)
    model = check_hyperparameters(path, ckpt.get("hyper_parameters"), model_cls, "hyper_parameters",
                                  exclude=("optimizer", "lr_scheduler"))
    data = check_hyperparameters(path, ckpt.get("datamodule_hyper_parameters"), data_cls, "datamodule_hyper_parameters")
    step = ckpt.get("global_step", 0)
    return CheckpointInfo(str(path), "lightning", model, data, step if type(step) is int else 0, _loader_state(ckpt), ckpt)


# What Lightning reads from a checkpoint besides the settings, and the type each must have.
STRUCTURE = {"epoch": int, "global_step": int, "pytorch-lightning_version": str, "state_dict": dict, "loops": dict,
             "callbacks": dict, "optimizer_states": list, "lr_schedulers": list}
# ModelCheckpoint's state: files it may delete when it saves a better one. They must lie in its own folder.
CHECKPOINT_FILES = ("best_model_path", "kth_best_model_path", "last_model_path")


def check_structure(path: str, ckpt: dict) -> None:
    """The parts of a checkpoint Lightning restores have the types fit writes, and the best-checkpoint tracker's
    files lie in its own folder (else a crafted one could make a resumed run delete any file)."""
    from packaging.version import InvalidVersion, Version

    for key, kind in STRUCTURE.items():
        if key in ckpt and not isinstance(ckpt[key], kind) or (kind is int and type(ckpt.get(key, 0)) is not int):
            raise CheckpointError(f"refused {path}: its {key} is a {type(ckpt[key]).__name__}, not what fit writes.")
    try:
        Version(ckpt["pytorch-lightning_version"])
    except InvalidVersion:
        raise CheckpointError(f"refused {path}: its pytorch-lightning_version is not a version number.") from None
    for name, loop in ckpt.get("loops", {}).items():
        if not isinstance(loop, dict) or not all(isinstance(v, dict) for v in loop.values()):
            raise CheckpointError(f"refused {path}: its loops.{_short(name)} is not what fit writes.")
    if not all(isinstance(v, dict) for v in ckpt.get("optimizer_states", []) + ckpt.get("lr_schedulers", [])):
        raise CheckpointError(f"refused {path}: its optimizer or scheduler states are not what fit writes.")
    for name, state in ckpt.get("callbacks", {}).items():
        if not isinstance(state, dict):
            raise CheckpointError(f"refused {path}: its callbacks state {_short(name)} is not a dict.")
        folder = state.get("dirpath")
        files = [state.get(key) for key in CHECKPOINT_FILES] + list(state.get("best_k_models") or {})
        for file in (f for f in files if f):
            if not isinstance(file, str) or not isinstance(folder, str) or not _inside(file, folder):
                raise CheckpointError(
                    f"refused {path}: its callbacks state names the file {_short(file)}, which is not in the "
                    "checkpoints folder it records (a resumed run could delete it). Nothing was run."
                )


def _inside(file: str, folder: str) -> bool:
    from pathlib import Path

    return Path(file).resolve().parent == Path(folder).resolve()


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
        want, given = source[key], _get(_get(explicit, group), key)
        if given is not None and given != want:
            lines.append(f"--{group}.{key} {given}, but the checkpoint has {want}")
        else:
            cfg[f"{group}.{key}"] = want

    for key in MODEL_SHAPE:
        align("model", key, info.model)
    for key in DATA_MEANING:
        align("data", key, info.data)
    for group, keys in FIT_FIXED.items():
        source = info.model if group == "model" else info.data
        for key in keys:
            if fit:
                align(group, key, source)
            elif key in source and _get(_get(explicit, group), key) is None:
                cfg[f"{group}.{key}"] = source[key]  # e.g. validate: the split the model was validated on
    for key, has in zip(("num_classes", "in_channels"), data_shape(cfg.data.dataset)):
        if key in info.model and info.model[key] != has:
            lines.append(f"the checkpoint has {key} {info.model[key]}, but --data.dataset {cfg.data.dataset} has {has}")

    # The position in the epoch counts batches of the checkpoint's size, in the order its seed drew.
    trained = {"batch_size": info.data.get("batch_size"), "seed": info.position.get("seed")}
    if fit and info.mid_epoch:
        batch_size, seed = cfg.data.batch_size, _seed(cfg)
        if trained["batch_size"] is not None and batch_size != trained["batch_size"]:
            lines.append(f"--data.batch_size {batch_size}, but the checkpoint stopped mid-epoch with batch size "
                         f"{trained['batch_size']} (change it at an epoch boundary only)")
        if trained["seed"] is not None and seed is not None and seed != trained["seed"]:
            lines.append(f"--seed_everything {seed}, but the checkpoint stopped mid-epoch in the order of seed "
                         f"{trained['seed']} (change it at an epoch boundary only)")
    elif trained["batch_size"] is not None and _get(_get(explicit, "data"), "batch_size") is None:
        cfg.data.batch_size = trained["batch_size"]
    return lines


def _seed(cfg: Any) -> int | None:
    seed = cfg.get("seed_everything")
    return seed if type(seed) is int else None


def training_conflicts(info: CheckpointInfo, optimizers: list[torch.optim.Optimizer], schedulers: list,
                       world_size: int, defaults: dict[str, bool] | None = None) -> list[str]:
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
        for key in OPTIMIZER_SETTINGS:
            if key in group:
                mine = group.get("initial_lr", group[key]) if key == "lr" else group[key]
                theirs = saved_group.get("initial_lr", saved_group[key]) if key == "lr" else saved_group[key]
                if _differ(mine, theirs):
                    lines.append(f"--model.optimizer.init_args.{key} {mine}{note['optimizer']}, but the checkpoint's "
                                 f"{name} has {theirs}")
    saved_schedulers = info.raw.get("lr_schedulers") or []
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
        parts.append(f"{len(unexpected)} unexpected (e.g. {_short(unexpected[0])})")
    return "; ".join(parts)
