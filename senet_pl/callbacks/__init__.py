"""Callbacks: ``last.ckpt`` and clean stops (``last.py``), TensorBoard figures (``figures.py``), the excitation
analysis (``excitation.py``) and the predictions CSV (``predictions.py``)."""

from senet_pl.callbacks.excitation import ExcitationAnalysis
from senet_pl.callbacks.figures import TensorBoardFigures
from senet_pl.callbacks.last import EarlySignals, GracefulStop, Interrupted, LatestCheckpoint
from senet_pl.callbacks.predictions import PredictionWriter

__all__ = ["EarlySignals", "ExcitationAnalysis", "GracefulStop", "Interrupted", "LatestCheckpoint", "PredictionWriter", "TensorBoardFigures"]
