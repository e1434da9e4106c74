"""Squeeze-and-Excitation ResNets trained with PyTorch Lightning."""

from senet_pl.data import MNISTDataModule
from senet_pl.model import SEBlock, SEResNet
from senet_pl.module import SEResNetClassifier

__all__ = ["MNISTDataModule", "SEBlock", "SEResNet", "SEResNetClassifier"]
