import functools
import math
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch

from senet_pl.data import MNISTDataModule
from senet_pl import schedule
from senet_pl.module import SEResNetClassifier


class LearningRates(L.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(module: SEResNetClassifier, data_root: Path, tmp_path: Path, callbacks: list, **limits) -> L.Trainer:
    limits = {"max_epochs": 3, "limit_train_batches": 3} | limits
    trainer = L.Trainer(accelerator="cpu", limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=tmp_path, **limits)
    trainer.fit(module, datamodule=MNISTDataModule(data_dir=str(data_root), batch_size=8, val_size=16, download=False))
    return trainer


@pytest.mark.parametrize("warmup", [0, 4])
@pytest.mark.parametrize(
    ("limits", "steps"),
    [({"max_epochs": 2}, 6), ({"max_epochs": 3}, 9), ({"max_epochs": -1, "max_steps": 5}, 5),
     ({"max_epochs": 3, "max_steps": 7}, 7), ({"max_epochs": 2, "limit_train_batches": 4}, 8)],
)
def test_the_schedule_takes_its_length_from_the_trainer(data_root: Path, tmp_path: Path, warmup: int,
                                                         limits: dict, steps: int) -> None:
    # T_max left out: the cosine spans the run as the trainer counts it, stepped per optimizer step.
    module = SEResNetClassifier(depth=18, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                                lr_scheduler=schedule.CosineAnnealingLR, warmup_steps=warmup)
    lrs = LearningRates()
    _fit(module, data_root, tmp_path, [lrs], **limits)

    def expected(step: int) -> float:
        ramp = 0.01 + 0.99 * min(step, warmup) / warmup if warmup else 1.0  # LinearLR from 1%
        return 0.1 * ramp * (1 + math.cos(math.pi * step / (steps - 1))) / 2

    assert len(lrs.seen) == steps
    assert lrs.seen == pytest.approx([expected(step) for step in range(steps)], rel=1e-6, abs=1e-12)
    assert lrs.seen[-1] == pytest.approx(0.0, abs=1e-12)  # the last step trains at the schedule's end value


def test_a_schedule_with_its_own_length_and_per_epoch_stepping_keep_working(data_root: Path, tmp_path: Path) -> None:
    # StepLR needs no length; with lr_interval "epoch" its step_size counts epochs.
    module = SEResNetClassifier(depth=18, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), lr_interval="epoch",
                                lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    lrs = LearningRates()
    _fit(module, data_root, tmp_path, [lrs])
    assert lrs.seen == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3)
    # OneCycleLR's total_steps left out: the run's 9 steps (it would raise on a 10th).
    module = SEResNetClassifier(depth=18, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                                lr_scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1))
    lrs = LearningRates()
    _fit(module, data_root, tmp_path, [lrs])
    assert module.length_from_run.total_steps == 9
    assert lrs.seen[-1] == pytest.approx(0.1 / 25 / 1e4)  # its end value: initial_lr / final_div_factor


def test_a_schedule_needing_a_length_refuses_a_run_without_an_end(data_root: Path, tmp_path: Path) -> None:
    module = SEResNetClassifier(depth=18, lr_scheduler=schedule.CosineAnnealingLR)
    with pytest.raises(schedule.ScheduleError, match="give --trainer.max_epochs or --trainer.max_steps"):
        _fit(module, data_root, tmp_path, [], max_epochs=-1)


def test_only_a_cosine_is_resized_to_a_resumed_runs_length() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=5)
    assert schedule.resize(one_cycle, 5) is None  # same length: nothing to do
    with pytest.raises(schedule.ScheduleError, match="OneCycleLR.*spans a run of 5 steps and cannot be resized to this run's 9"):
        schedule.resize(one_cycle, 9)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cosine = schedule.CosineAnnealingLR(optimizer, T_max=4)
    for _ in range(4):
        optimizer.step()
        cosine.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # finished
    assert schedule.resize(cosine, 9) == 5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * (1 + math.cos(math.pi * 4 / 8)) / 2)
    for _ in range(4):
        optimizer.step()
        cosine.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # at the new end
