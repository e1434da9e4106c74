"""A checkpoint read as untrusted data: what the CLI may take from it, checked before anything reads it.

``torch.load(weights_only=True)`` stops pickled objects, but LightningCLI would also merge a checkpoint's
``hyper_parameters`` into the parser, and jsonargparse imports whatever module a ``class_path`` string
names. So every key is checked against the signature of this project's model and data module: only
their own settings, as plain values of the declared types. The parts Lightning restores (loop,
optimizer and scheduler states, the best-checkpoint tracker) must have the types fit writes, and the
tracker's files must lie in its own folder. Class paths are never taken from a checkpoint.
"""

import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import torch

from senet_pl.checkpoints import BETWEEN_STEPS, CheckpointError, is_state_dict, load_checkpoint

LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"  # what LightningCLI stores; never imported here


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
    between_steps: bool = False  # written between the accumulated batches of one optimizer step (BETWEEN_STEPS)

    @property
    def mid_epoch(self) -> bool:
        return self.position.get("batches_done", 0) > 0


def settings(cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """``__init__`` argument name -> annotation: what a checkpoint of ``cls`` may hold."""
    hints = typing.get_type_hints(cls.__init__)
    names = [n for n in inspect.signature(cls.__init__).parameters if n != "self" and n not in exclude]
    return {n: hints.get(n, Any) for n in names}


def fits(value: Any, annotation: Any) -> bool:
    """Whether a plain value is of the annotated type (Literal, Optional/Union, bool, int and float with
    jsonargparse's restrictions such as PositiveInt or ClosedUnitInterval, str, fixed-length tuples of these).
    Anything else, including Any, is not accepted."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in typing.get_args(annotation))
    if origin is tuple:
        items = typing.get_args(annotation)
        return (type(value) in (tuple, list) and len(value) == len(items) and Ellipsis not in items
                and all(fits(v, a) for v, a in zip(value, items)))
    if annotation is type(None):
        return value is None
    if annotation is bool or annotation is str:
        return type(value) is annotation
    numbers = {int: (int,), float: (int, float)}
    for kind, accepted in numbers.items():
        if isinstance(annotation, type) and issubclass(annotation, kind):
            if type(value) not in accepted:
                return False
            try:
                annotation(value)  # PositiveInt, ClosedUnitInterval ...: raise outside their range
            except ValueError:
                return False
            return True
    return False


def short(value: Any) -> str:
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
                f"refused {path}: {where}.{short(key).strip(chr(39))} is not a setting of this project's "
                f"{cls.__name__} (a checkpoint of another model, or a crafted one). Nothing was imported."
            )
        if not fits(value, expected[key]):
            raise CheckpointError(
                f"refused {path}: {where}.{key} is {short(value)}, which is not a valid value of that setting. "
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
    return CheckpointInfo(str(path), "lightning", model, data, step if type(step) is int else 0, _loader_state(ckpt), ckpt,
                          between_steps=ckpt.get(BETWEEN_STEPS) is True)


# What Lightning reads from a checkpoint besides the settings, and the type each must have.
STRUCTURE = {"epoch": int, "global_step": int, "pytorch-lightning_version": str, "state_dict": dict, "loops": dict,
             "callbacks": dict, "optimizer_states": list, "lr_schedulers": list,
             # with --model.ema_decay (EMAWeightAveraging): the training weights and the average's step count
             "current_model_state": dict, "averaging_state": dict, BETWEEN_STEPS: bool}
# ModelCheckpoint's state: files it may delete when it saves a better one. They must lie in its own folder.
CHECKPOINT_FILES = ("best_model_path", "kth_best_model_path", "last_model_path")


def check_structure(path: str, ckpt: dict) -> None:
    """The parts of a checkpoint Lightning restores have the types fit writes, and the best-checkpoint tracker's
    files lie in its own folder (else a crafted one could make a resumed run delete any file)."""
    from packaging.version import InvalidVersion, Version

    for key, kind in STRUCTURE.items():
        if key in ckpt and not isinstance(ckpt[key], kind) or (kind is int and type(ckpt.get(key, 0)) is not int):
            raise CheckpointError(f"refused {path}: its {key} is a {type(ckpt[key]).__name__}, not what fit writes.")
    for key in ("state_dict", "current_model_state"):  # weights: names to tensors, as a module's state_dict
        weights = ckpt.get(key, {})
        bad = next((k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise CheckpointError(f"refused {path}: its {key} holds {short(str(bad))} of type "
                                  f"{type(weights[bad]).__name__}, not a tensor.")
    try:
        Version(ckpt["pytorch-lightning_version"])
    except InvalidVersion:
        raise CheckpointError(f"refused {path}: its pytorch-lightning_version is not a version number.") from None
    for name, loop in ckpt.get("loops", {}).items():
        if not isinstance(loop, dict) or not all(isinstance(v, dict) for v in loop.values()):
            raise CheckpointError(f"refused {path}: its loops.{short(name)} is not what fit writes.")
    if not all(isinstance(v, dict) for v in ckpt.get("optimizer_states", []) + ckpt.get("lr_schedulers", [])):
        raise CheckpointError(f"refused {path}: its optimizer or scheduler states are not what fit writes.")
    for name, state in ckpt.get("callbacks", {}).items():
        if not isinstance(state, dict):
            raise CheckpointError(f"refused {path}: its callbacks state {short(name)} is not a dict.")
        folder, best_k = state.get("dirpath"), state.get("best_k_models") or {}
        if not isinstance(best_k, dict):
            raise CheckpointError(f"refused {path}: its callbacks state {short(name)} is not what fit writes.")
        files = [state.get(key) for key in CHECKPOINT_FILES] + list(best_k)
        for file in (f for f in files if f):
            if not isinstance(file, str) or not isinstance(folder, str) or not _inside(file, folder):
                raise CheckpointError(
                    f"refused {path}: its callbacks state names the file {short(file)}, which is not in the "
                    "checkpoints folder it records (a resumed run could delete it). Nothing was run."
                )


def _inside(file: str, folder: str) -> bool:
    return Path(file).resolve().parent == Path(folder).resolve()
