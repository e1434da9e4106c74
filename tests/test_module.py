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


def test_fused_sgd_momentum_survives_a_skipped_first_step() -> None:
    """The recipes' fused SGD under a gradient scaler whose first step overflows: the step is skipped and the
    next ones update the weights exactly as the plain (per-parameter) SGD does, not with uninitialized momentum."""
    torch.manual_seed(0)
    fused = SEResNetClassifier(depth=18)
    plain = SEResNetClassifier(depth=18, optimizer=lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=False))
    plain.load_state_dict(fused.state_dict())
    optimizers = [fused.configure_optimizers(), plain.configure_optimizers()]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in optimizers]
    for scaler in scalers:
        scaler.scale(torch.zeros(()))  # as a loss would be (the gradients below stand for its scaled ones)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in fused.parameters()]
        if step == 0:
            grads[0][0] = float("inf")  # an fp16 overflow
        for module, optimizer, scaler in zip((fused, plain), optimizers, scalers):
            for p, g in zip(module.parameters(), grads):
                p.grad = g.clone().contiguous(memory_format=torch.channels_last) if p.dim() == 4 else g.clone()
            scaler.step(optimizer)
            scaler.update()
        if step == 0:
            assert all(torch.equal(a, b) for a, b in zip(fused.parameters(), plain.parameters()))  # skipped
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**7
    for a, b in zip(fused.parameters(), plain.parameters()):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
