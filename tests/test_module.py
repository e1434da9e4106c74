import math
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch

from senet_pl.data import MNISTDataModule
from senet_pl.module import SEResNetClassifier


class LearningRates(L.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("warmup", [0, 4])
def test_warmup_ramps_per_step_then_the_epoch_schedule_takes_over(data_root: Path, tmp_path: Path, warmup: int) -> None:
    module = SEResNetClassifier(
        depth=18,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3),
        warmup_steps=warmup,
    )
    lrs = LearningRates()
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[lrs], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=MNISTDataModule(data_dir=str(data_root), batch_size=8, val_size=16, download=False))

    def expected(step: int) -> float:
        ramp = 0.01 + 0.99 * min(step, warmup) / warmup if warmup else 1.0  # LinearLR from 1%
        epoch = step // 3
        return 0.1 * ramp * (1 + math.cos(math.pi * epoch / 3)) / 2  # cosine, one value per epoch

    assert lrs.seen == pytest.approx([expected(step) for step in range(9)], rel=1e-6)
