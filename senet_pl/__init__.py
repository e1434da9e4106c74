"""Squeeze-and-Excitation ResNets trained with PyTorch Lightning.

The names below are imported on first use (a module ``__getattr__``), not with the package: importing
``senet_pl`` must not import torch, so that ``python -m senet_pl.infer`` (numpy, Pillow, onnxruntime)
runs where torch is not installed.
"""

import importlib
from typing import Any

_WHERE = {
    "MNISTDataModule": "senet_pl.data",
    "SEBlock": "senet_pl.model",
    "SEResNet": "senet_pl.model",
    "SEResNetClassifier": "senet_pl.module",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'senet_pl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once imported, found without this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
