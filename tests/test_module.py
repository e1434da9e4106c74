import functools
import math
import re
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_split
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ReduceLROnPlateau

from senet_pl.data import MNISTDataModule
from senet_pl import schedule
from senet_pl.module import SEResNetClassifier


class LearningRates(L.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(module: SEResNetClassifier, data_root: Path, tmp_path: Path, callbacks: list, **limits) -> L.Trainer:
    limits = {"max_epochs": 3, "limit_train_batches": 3, "limit_val_batches": 0} | limits
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
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


@pytest.mark.parametrize(
    ("factory", "monitor"),
    [(functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0), "val/loss"),
     (functools.partial(ReduceLROnPlateau, monitor="val/acc", mode="max"), "val/acc")],  # Lightning's, with a monitor
)
def test_a_plateau_schedule_steps_after_each_validation(data_root: Path, tmp_path: Path, factory, monitor: str) -> None:
    # Validation every 2nd epoch: Lightning would step the schedule after epoch 1 too, and stop the run there with
    # "ReduceLROnPlateau conditioned on metric val/loss which is not available".
    module = SEResNetClassifier(depth=18, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), lr_scheduler=factory)
    trainer = _fit(module, data_root, tmp_path, [], max_epochs=5, limit_train_batches=2, limit_val_batches=1,
                   check_val_every_n_epoch=2)
    config = trainer.lr_scheduler_configs[0]
    assert config.monitor == monitor
    assert config.scheduler.last_epoch == 2  # stepped after the validations of epochs 2 and 4 only


@pytest.mark.parametrize(
    ("scheduler", "rhythm", "message"),
    [(ReduceLROnPlateau(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), monitor="val/accuracy"), (1, True),
      "watches 'val/accuracy', which is not logged once per epoch"),
     (ReduceLROnPlateau(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), monitor="val/acc"), (1, True),
      "in mode 'min', but val/acc improves as it rises: give --model.lr_scheduler.mode max"),
     (torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([torch.zeros(1, requires_grad=True)])), (1, False),
      "this run never validates (--trainer.limit_val_batches 0)"),
     (torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([torch.zeros(1, requires_grad=True)])), (None, True),
      "validates every --trainer.val_check_interval batches")],
)
def test_a_plateau_schedule_that_could_never_step_is_refused(scheduler, rhythm: tuple, message: str) -> None:
    with pytest.raises(schedule.ScheduleError, match=re.escape(message)):
        schedule.plateau_settings(scheduler, *rhythm)
    # what it watches once per epoch without a validation: every epoch
    train = ReduceLROnPlateau(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), monitor="train/acc", mode="max")
    assert schedule.plateau_settings(train, None, False) == {"monitor": "train/acc", "frequency": 1}


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


def _batch() -> list[torch.Tensor]:
    """8 synthetic images, normalized as the data module does, and their labels."""
    images, labels = synthetic_split(8, seed=3)
    return [(torch.from_numpy(images).float().unsqueeze(1) / 255 - 0.1307) / 0.3081, torch.from_numpy(labels).long()]


def _logged(module: SEResNetClassifier) -> dict:
    """What the module's steps log (name -> value), without a Trainer."""
    logged = {}

    def log(name, value, **kwargs) -> None:  # a metric object (val/test loss, a weighted mean) gives its value
        logged[name] = value.compute() if hasattr(value, "compute") else value

    module.log = log
    return logged


def test_label_smoothing_changes_the_training_loss_by_the_analytic_amount_and_nothing_else() -> None:
    torch.manual_seed(0)
    eps = 0.1
    module = SEResNetClassifier(label_smoothing=eps).eval()  # eval: every step sees the same logits
    logged = _logged(module)
    x, y = _batch()
    with torch.no_grad():
        module.model.fc.bias.copy_(torch.linspace(-3, 3, 10))  # far from uniform, as an untrained model's are not
        log_p = module(x).log_softmax(dim=1)
        nll = -log_p.gather(1, y[:, None]).mean()  # the plain cross-entropy
        uniform = -log_p.mean(dim=1).mean()  # the cross-entropy against the uniform distribution
        module.training_step([x, y], 0)
        module.validation_step([x, y], 0)
        module.test_step([x, y], 0)
    assert abs(uniform - nll) > 0.5  # so that smoothing makes a visible difference
    # (1 - eps) of the true class's target plus eps spread over all classes (F.cross_entropy's label_smoothing)
    assert logged["train/loss"].item() == pytest.approx(((1 - eps) * nll + eps * uniform).item(), rel=1e-5)
    assert logged["val/loss"].item() == pytest.approx(nll.item(), rel=1e-5)  # evaluation: the plain loss
    assert logged["test/loss"].item() == pytest.approx(nll.item(), rel=1e-5)


def test_the_evaluation_loss_is_the_mean_over_images_whatever_the_batch_sizes() -> None:
    """torchmetrics 1.9's MeanMetric(nan_strategy="disable") dropped the batch sizes: val/loss and test/loss were the
    plain mean of the batch means, off whenever the last batch (or a process's share under DDP) is smaller."""
    torch.manual_seed(0)
    module = SEResNetClassifier().eval()
    logged = _logged(module)
    x, y = _batch()
    with torch.no_grad():
        module.model.fc.bias.copy_(torch.linspace(-3, 3, 10))
        losses = F.cross_entropy(module(x), y, reduction="none")
        for stage in ("validation", "test"):
            getattr(module, f"{stage}_step")([x[:6], y[:6]], 0)
            getattr(module, f"{stage}_step")([x[6:], y[6:]], 1)
    assert abs(losses[:6].mean() - losses[6:].mean()) > 0.1  # so that the weighting shows
    for key in ("val/loss", "test/loss"):
        assert logged[key].item() == pytest.approx(losses.mean().item(), rel=1e-5), key
    module.val_loss.update(torch.tensor(float("nan")), weight=4)  # a diverged model's loss stays visible
    assert module.val_loss.compute().isnan()


def test_flip_tta_scores_the_mean_of_the_plain_and_mirrored_logits_in_test_only() -> None:
    torch.manual_seed(0)
    module = SEResNetClassifier(test_hflip=True).eval()
    logged = _logged(module)
    x, y = _batch()
    with torch.no_grad():
        plain, mirrored = module(x), module(x.flip(-1))
        torch.testing.assert_close(module.test_logits(x), (plain + mirrored) / 2)
        module.test_step([x, y], 0)
        module.validation_step([x, y], 0)
        probabilities = module.predict_step([x, y], 0)
    assert not torch.allclose(plain, mirrored)  # the mirror images do get other logits
    assert logged["test/loss"].item() == pytest.approx(F.cross_entropy((plain + mirrored) / 2, y).item(), rel=1e-5)
    assert module.test_acc.compute() == ((plain + mirrored).argmax(dim=1) == y).float().mean()
    assert logged["val/loss"].item() == pytest.approx(F.cross_entropy(plain, y).item(), rel=1e-5)  # val: plain
    torch.testing.assert_close(probabilities, plain.softmax(dim=1))  # predict: plain


class Weights(L.Callback):
    """The classifier layer's weights when each training step ends, and as validation and test see them."""

    def __init__(self) -> None:
        self.trained, self.validated, self.tested = [], [], []

    @staticmethod
    def _fc(pl_module: L.LightningModule) -> torch.Tensor:
        return pl_module.model.fc.weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.trained.append(self._fc(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, *args) -> None:
        self.validated.append(self._fc(pl_module))

    def on_test_batch_start(self, trainer, pl_module, *args) -> None:
        self.tested.append(self._fc(pl_module))


@pytest.mark.slow
def test_ema_weights_are_what_validation_checkpoints_and_test_use(data_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SEResNetClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), ema_decay=0.5)
    seen = Weights()
    limits = {"accelerator": "cpu", "limit_train_batches": 3, "limit_val_batches": 1, "limit_test_batches": 1,
              "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
              "default_root_dir": tmp_path}
    trainer = L.Trainer(max_epochs=1, callbacks=[seen, ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="end")], **limits)
    dm = MNISTDataModule(data_dir=str(data_root), batch_size=8, val_size=16, download=False)
    trainer.fit(module, datamodule=dm)
    ckpt = torch.load(tmp_path / "ckpt" / "end.ckpt", weights_only=True)
    average, raw = ckpt["state_dict"]["model.fc.weight"], ckpt["current_model_state"]["model.fc.weight"]
    w1, w2, w3 = seen.trained
    assert torch.equal(raw, w3)  # the training weights, kept for resuming
    torch.testing.assert_close(average, 0.5 * (0.5 * w1 + 0.5 * w2) + 0.5 * w3)  # the EMA of the 3 steps
    assert not torch.equal(average, raw)
    assert torch.equal(seen.validated[-1], average)  # val/acc (and so the best checkpoint) is the average's
    trainer.test(module, datamodule=dm, ckpt_path=tmp_path / "ckpt" / "end.ckpt")  # the Trainer that ran fit
    assert torch.equal(seen.tested[-1], average)
    L.Trainer(callbacks=[seen], **limits).test(SEResNetClassifier(ema_decay=0.5), datamodule=dm,
                                               ckpt_path=tmp_path / "ckpt" / "end.ckpt")
    assert torch.equal(seen.tested[-1], average)


@pytest.mark.slow
@pytest.mark.parametrize("validated", [True, False])
def test_the_averages_batch_norm_statistics_are_measured_for_its_own_weights(
    data_root: Path, tmp_path: Path, validated: bool
) -> None:
    """With ema_decay, the average's batch-norm statistics are measured for the averaged weights on the training
    images, not averaged from the training weights' (which belong to other weights), also in a checkpoint written
    with no validation before it: checked at the stem's batch norm, whose running mean must be the mean of the
    averaged stem convolution's output over those images."""
    torch.manual_seed(0)
    module = SEResNetClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), ema_decay=0.5)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", limit_train_batches=3, limit_val_batches=int(validated),
                        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="end")])
    dm = MNISTDataModule(data_dir=str(data_root), batch_size=8, val_size=16, download=False)
    trainer.fit(module, datamodule=dm)
    ckpt = torch.load(tmp_path / "ckpt" / "end.ckpt", weights_only=True)
    average = {key.removeprefix("model."): value for key, value in ckpt["state_dict"].items()}
    images = dm.transform_batch(dm.train_set.images, False)  # all 80 training images (10 batches of 8), as evaluated
    stem = F.conv2d(images, average["conv1.weight"], padding=1)
    torch.testing.assert_close(average["bn1.running_mean"], stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ckpt["current_model_state"]["model.bn1.running_mean"], average["bn1.running_mean"])
    # after fit the module is the average, with its statistics measured at fit's end (on_train_end)
    assert torch.equal(module.model.conv1.weight, average["conv1.weight"])
    stem = F.conv2d(images, module.model.conv1.weight.detach(), padding=1)
    torch.testing.assert_close(module.model.bn1.running_mean, stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_after_fit_with_no_validation_or_checkpoint_the_module_has_the_averages_measured_statistics(
    data_root: Path, tmp_path: Path
) -> None:
    """Nothing measured the average during fit (no validation, no checkpoint): its statistics are measured at the
    end, before Lightning copies it into the module, so the module is not left with the training weights'."""
    torch.manual_seed(0)
    module = SEResNetClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), ema_decay=0.5)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", limit_train_batches=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    dm = MNISTDataModule(data_dir=str(data_root), batch_size=8, val_size=16, download=False)
    trainer.fit(module, datamodule=dm)
    stem = F.conv2d(dm.transform_batch(dm.train_set.images, False), module.model.conv1.weight.detach(), padding=1)
    torch.testing.assert_close(module.model.bn1.running_mean, stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_average_with_plain_dataloaders_keeps_lightnings_averaged_statistics(tmp_path: Path) -> None:
    """Without this project's data module there are no listed training images to measure on: the average's
    batch-norm statistics are then Lightning's average of the training weights' (not the initial zeros)."""
    from torch.utils.data import DataLoader, TensorDataset

    from senet_pl.ema import EMA

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 1, 28, 28) + 1, torch.randint(0, 10, (16,))), batch_size=8)
    module = SEResNetClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), ema_decay=0.5)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="end")])
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    assert [c.measure_norms for c in trainer.callbacks if isinstance(c, EMA)] == [False]
    mean = torch.load(tmp_path / "ckpt" / "end.ckpt", weights_only=True)["state_dict"]["model.bn1.running_mean"]
    assert mean.abs().sum() > 0


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
