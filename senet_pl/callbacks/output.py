"""Where callbacks write their files: the run's folder."""

from pathlib import Path

import lightning.pytorch as L


def run_folder(trainer: L.Trainer) -> Path:
    """The run's log folder (``lightning_logs/<name>/version_N``; the working directory without a logger), created."""
    folder = Path(trainer.log_dir or ".")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
