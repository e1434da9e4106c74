"""The training system: an SEResNet trained with cross-entropy, as a LightningModule."""

import inspect
from collections.abc import Iterable

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.optim.lr_scheduler import LinearLR
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from senet_pl.model import Depth, SEResNet, Stem


class NonFiniteLossError(ArithmeticError):
    """The training loss became NaN or infinite."""


def start_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give a fused SGD with momentum its momentum buffers up front, as zeros.

    Fused SGD creates them with ``torch.empty_like`` in its first step, and when a gradient scaler
    skips that step (an fp16 overflow, common in the first steps of 16-mixed) its kernel leaves them
    uninitialized, and every later step adds their garbage to the weights. Zeros are what the first
    step computes anyway without dampening (the buffer becomes the gradient), so nothing else changes.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group.get("fused") and group["momentum"] and not group["dampening"]:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def default_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The module's default optimizer (the recipes' SGD) on ``params``, its momentum started (``start_momentum``)."""
    optimizer = inspect.signature(SEResNetClassifier.__init__).parameters["optimizer"].default(params)
    start_momentum(optimizer)
    return optimizer


class SEResNetClassifier(L.LightningModule):
    """Image classification with an SE-ResNet: cross-entropy loss, accuracy, SGD by default."""

    def __init__(
        self,
        depth: Depth = 18,
        stem: Stem = "cifar",
        se: bool = True,
        reduction: PositiveInt = 16,
        num_classes: PositiveInt = 10,
        in_channels: PositiveInt = 1,
        channels_last: bool = True,
        compile: bool = False,
        # The recipes' optimizer (configs/*.yaml spell it out; the benchmark takes it from here). A lambda,
        # not a function, so that --print_config shows SGD and its arguments.
        optimizer: OptimizerCallable = lambda p: torch.optim.SGD(
            p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True
        ),
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: NonNegativeInt = 0,
    ) -> None:
        """
        Args:
            depth: ResNet depth: 18, 34 (BasicBlock), 50, 101 or 152 (Bottleneck).
            stem: "cifar" (3x3 stride-1 conv, no max-pool; for 28x28 inputs) or "imagenet" (7x7 stride-2
                conv and max-pool; for 224x224 inputs).
            se: use Squeeze-and-Excitation blocks; False trains the plain ResNet of the same structure.
            reduction: the SE reduction ratio r (the excitation's hidden width is C/r).
            num_classes: number of classes; the CLI links it from the data module.
            in_channels: image channels; the CLI links it from the data module.
            channels_last: keep weights and activations in NHWC, which is faster with mixed precision
                on recent GPUs and on CPUs with oneDNN.
            compile: compile the model with torch.compile (in place, so checkpoints stay interchangeable);
                the first steps are slow while it compiles. Off by default: see the README's benchmark.
            optimizer: the optimizer, built from the model's parameters (default: the recipes' SGD, lr 0.1,
                Nesterov momentum 0.9, weight decay 5e-4, fused: one kernel for the whole update).
            lr_scheduler: optional learning-rate schedule, stepped once per epoch.
            warmup_steps: raise the learning rate linearly from 1% to its full value over this many
                optimizer steps first (torch's LinearLR, stepped every batch; lr_scheduler's factor
                applies on top of it).
        """
        super().__init__()
        # The optimizer and schedule are callables, not plain values: they are kept out of the
        # checkpoint's hyperparameters (the run's config.yaml records them).
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.model = SEResNet(depth, stem, in_channels, num_classes, se, reduction)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        if compile:
            self.model.compile()
        # Plain (micro) accuracy; one metric object per stage, so that their states never mix.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # The evaluation loss as a metric too, a mean weighted by batch size over all processes: Lightning's
        # sync_dist mean divides the summed batch sizes by the number of processes in integers (lightning
        # 2.6: 32 images on 3 processes count as 30), and under DDP the batches differ in size.
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_loss = MeanMetric(nan_strategy="disable")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=self.memory_format))

    def _step(self, batch: list[torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = getattr(self, f"{stage}_acc")
        acc(logits, y)
        # Training loss per step (its epoch mean would be renamed train/loss_epoch); the rest per epoch.
        if stage == "train":
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        else:
            mean = getattr(self, f"{stage}_loss")
            mean.update(loss.detach(), weight=len(y))
            self.log(f"{stage}/loss", mean, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        # Stop before a non-finite loss reaches the weights: nothing after this point (optimizer
        # step, validation, checkpoints) ever sees the broken state.
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); training stopped before the optimizer step. Checkpoints from before are "
                "intact: lower the learning rate or use fp32 precision, and resume with --ckpt_path last."
            )
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Class probabilities, (N, num_classes)."""
        return self(batch[0]).float().softmax(dim=1)

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        start_momentum(optimizer)
        schedulers = []
        if self.hparams.warmup_steps:
            warmup = LinearLR(optimizer, start_factor=0.01, total_iters=self.hparams.warmup_steps)
            schedulers.append({"scheduler": warmup, "interval": "step", "name": "lr-warmup"})
        if self.lr_scheduler is not None:
            # PyTorch's schedulers are chainable: each multiplies the learning rate by its own factor.
            schedulers.append({"scheduler": self.lr_scheduler(optimizer), "interval": "epoch"})
        return ([optimizer], schedulers) if schedulers else optimizer
