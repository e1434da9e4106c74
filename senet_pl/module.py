"""The training system: an SEResNet trained with cross-entropy, as a LightningModule."""

import inspect
import math
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, OpenUnitInterval, PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim.lr_scheduler import ChainedScheduler, ReduceLROnPlateau
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from senet_pl.compat import estimated_steps
from senet_pl.ema import EMA, EMA_INITIAL_SHARE
from senet_pl.model import MIN_IMAGE_SIZE, Depth, SEResNet, Stem
from senet_pl.schedule import ScheduleError, build_schedule, check_warmup, plateau_settings, ramp, resize, warmup

T = TypeVar("T")


class NonFiniteLossError(ArithmeticError):
    """The training loss became NaN or infinite."""


class SettingError(ValueError):
    """An optimizer or learning-rate schedule setting that torch refuses, or that cannot train."""


def built(option: str, build: Callable[[], T]) -> T:
    """``build()``, with torch's refusal of a setting (``Invalid learning rate: -1.0``) as a SettingError that names
    the option; the schedule's own errors (ScheduleError) pass as they are."""
    try:
        return build()
    except ScheduleError:
        raise
    except ZeroDivisionError as err:  # torch checks few settings: StepLR step_size 0 fails at its first step
        raise SettingError(f"--model.{option}: one of its settings divides by zero ({err}): a step size, length or "
                           "factor of 0?") from None
    except (ValueError, TypeError) as err:
        raise SettingError(f"--model.{option}: {err}") from None


def check_rates(optimizer: torch.optim.Optimizer, where: str, then: str) -> None:
    """Raise SettingError if a learning rate of ``optimizer`` is negative or NaN: "the learning rate is R WHERE: THEN"."""
    bad = [float(group["lr"]) for group in optimizer.param_groups if not float(group["lr"]) >= 0]
    if bad:
        raise SettingError(f"the learning rate is {bad[0]:g} {where}: {then}")


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
        lr_interval: Literal["step", "epoch"] = "step",
        warmup_steps: NonNegativeInt = 0,
        label_smoothing: ClosedUnitInterval = 0.0,
        ema_decay: OpenUnitInterval | None = None,
        test_hflip: bool = False,
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
            lr_scheduler: optional learning-rate schedule (a torch scheduler, or senet_pl.schedule.CosineAnnealingLR).
                A length argument left out (T_max, total_steps) is the run's, from the trainer: the last step
                trains at the schedule's end value, whatever max_epochs, max_steps or limit_train_batches say.
            lr_interval: step lr_scheduler after every optimizer step ("step": its lengths count steps) or
                after every epoch ("epoch": they count epochs).
            warmup_steps: raise the learning rate linearly from 1% to its full value over this many
                optimizer steps first (torch's LinearLR, chained with lr_scheduler: their factors multiply).
            label_smoothing: smooth the training loss's targets by this much (F.cross_entropy's label_smoothing);
                the val/test loss stays the plain cross-entropy. 0 turns it off.
            ema_decay: keep an exponential moving average of the weights with this decay per optimizer step
                (Lightning's EMAWeightAveraging); validation, the checkpoints' weights and so test, predict,
                analyze and export use the average. None turns it off; fixed for a resumed run.
            test_hflip: test-time augmentation for ``test``: classify each image by the mean of its logits and
                those of its mirror image. Off by default (a mirrored digit is not the same digit).
        """
        super().__init__()
        if label_smoothing >= 1:  # every target the uniform distribution: the loss no longer depends on the label
            raise SettingError(f"--model.label_smoothing {label_smoothing}: the targets would all be uniform, with "
                               "nothing left to learn; give a value below 1 (0.1 is usual, 0 for none).")
        # The optimizer and schedule are callables, not plain values: they are kept out of the
        # checkpoint's hyperparameters (the run's config.yaml records them).
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        # the scheduler whose length is the run's (set by configure_optimizers)
        self.length_from_run: torch.optim.lr_scheduler.LRScheduler | None = None
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
        # A NaN loss is kept (replaced by NaN) so that a diverged model shows it; torchmetrics 1.9's "disable"
        # would also keep it, but then drops the weights: a plain mean of batch means.
        self.val_loss = MeanMetric(nan_strategy=float("nan"))
        self.test_loss = MeanMetric(nan_strategy=float("nan"))
        self.log_evaluation = True  # False: val/test steps log nothing (analyze runs the test loop for the gates)

    def setup(self, stage: str) -> None:
        # Batch norm in training mode needs 2 values per channel: at the smallest image size (8 for the cifar stem,
        # 32 for imagenet) the last stage's map is 1x1, and a batch of one image failed at the end of an epoch's work.
        dm = self.trainer.datamodule
        size = getattr(getattr(dm, "hparams", None), "image_size", None)
        if stage != "fit" or size is None or size > MIN_IMAGE_SIZE[self.hparams.stem] or not hasattr(
                dm, "training_batch_sizes"):
            return
        sizes, limit = dm.training_batch_sizes(), self.trainer.limit_train_batches  # a count, or a fraction of them
        if 1 in (sizes[:limit] if isinstance(limit, int) else sizes[:int(len(sizes) * limit)]):  # the batches taken
            raise SettingError(
                f"--data.image_size {size} leaves the last stage of --model.stem {self.hparams.stem} a 1x1 map, where "
                f"batch norm needs 2 images per batch, but a training batch holds 1 ({len(dm.train_set)} images in "
                f"batches of {dm.hparams.batch_size}): change --data.batch_size or --data.val_size, or use a larger "
                "--data.image_size.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=self.memory_format))

    def test_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits ``test`` scores: with test_hflip, the mean of the images' and their mirror images'."""
        if not self.hparams.test_hflip:
            return self(x)
        return (self(x) + self(x.flip(-1))) / 2

    def _step(self, batch: list[torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.test_logits(x) if stage == "test" else self(x)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        if stage != "train" and not self.log_evaluation:
            return loss
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

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # A NaN rate (.nan in a YAML file), or a schedule that takes the rate below zero (OneCycleLR max_lr -1, late
        # in a run StepLR gamma -1 or a negative eta_min): that step would climb the loss. Stopped before it.
        step = self.global_step
        check_rates(optimizer, f"at step {step}", ("training stopped before its first step" if step == 0 else
                    "training stopped before that step (the checkpoints from before are intact)") + ": start a new run "
                    "with --model.optimizer.init_args.lr and --model.lr_scheduler settings whose rates stay at or above 0.")

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Class probabilities, (N, num_classes)."""
        return self(batch[0]).float().softmax(dim=1)

    def configure_callbacks(self) -> list[Callback]:
        """The weight average (``ema.py``) when ema_decay is set. It acts in fit only, but is there in every command
        so that a checkpoint's EMA state is recognized (test, predict ... load its ``state_dict``: the average)."""
        decay = self.hparams.ema_decay
        if decay is None:
            return []
        # Batch norm's statistics of the average are measured on training images that the data module lists;
        # with other data (plain dataloaders) Lightning's average of the training weights' statistics is kept.
        data = getattr(self.trainer, "datamodule", None)
        return [EMA(decay=decay, measure_norms=hasattr(data, "first_training_images"))]

    def configure_optimizers(self):
        optimizer = built("optimizer", lambda: self.optimizer(self.parameters()))
        start_momentum(optimizer)
        interval = self.hparams.lr_interval
        ramp_up = warmup(optimizer, self.hparams.warmup_steps)
        steps = self.schedule_steps() if self.lr_scheduler is not None else None
        main, self.length_from_run = built("lr_scheduler", lambda: build_schedule(self.lr_scheduler, optimizer, steps))
        check_warmup(main, self.hparams.warmup_steps)
        plateau = plateau_settings(main, *self._validation_rhythm()) if isinstance(main, ReduceLROnPlateau) else None
        if ramp_up is not None and main is not None and interval == "step" and not plateau:
            # One schedule and one logged rate: the warm-up's and the schedule's factors multiply.
            ramp_up, main = None, ChainedScheduler([ramp_up, main], optimizer)
        configs = []
        if ramp_up is not None:
            configs.append({"scheduler": ramp_up, "interval": "step", "name": "train/lr"})
        if main is not None:
            name = "train/lr" if not configs else f"train/lr-{type(main).__name__}"
            configs.append({"scheduler": main, "interval": "epoch" if plateau else interval, "name": name} | (plateau or {}))
        return ([optimizer], configs) if configs else optimizer

    def _validation_rhythm(self) -> tuple[int | None, bool]:
        """(--trainer.check_val_every_n_epoch, whether fit validates at all); (1, True) without a trainer."""
        try:
            trainer = self.trainer
        except RuntimeError:
            return 1, True
        return trainer.check_val_every_n_epoch, trainer.limit_val_batches != 0

    def check_optimization(self) -> torch.optim.Optimizer:
        """Build the optimizer and schedule as fit will and take the schedule's first step, so that a setting torch
        refuses, or one that fails at that step (StepLR step_size 0), stops the run before any data is read. Returns
        the optimizer (fit builds its own). The schedule's length is not known yet (the data decides it), nor so its
        rates: they are checked at every step (``on_before_optimizer_step``)."""
        configured = self.configure_optimizers()
        optimizers, configs = configured if isinstance(configured, tuple) else ([configured], [])
        with warnings.catch_warnings():  # a step of the schedule without one of the optimizer: this one moves nothing
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            for config in configs:
                if not isinstance(config["scheduler"], ReduceLROnPlateau):
                    built("lr_scheduler", config["scheduler"].step)
        return optimizers[0]

    def schedule_steps(self) -> int | float | None:
        """How many times the schedule steps in this run (optimizer steps, or epochs with lr_interval "epoch");
        None without a trainer (a schedule built only to be compared with a checkpoint's)."""
        try:
            trainer = self.trainer
        except RuntimeError:
            return None
        steps = estimated_steps(trainer)
        if self.hparams.lr_interval == "epoch" and steps != float("inf"):
            per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
            return math.ceil(steps / max(per_epoch, 1))
        return steps

    def on_train_start(self) -> None:
        warmup_steps, total = self.hparams.warmup_steps, estimated_steps(self.trainer)
        if warmup_steps and total < warmup_steps and self.global_step < total:
            rank_zero_warn(f"--model.warmup_steps {warmup_steps} is longer than this run's {total} optimizer steps: the "
                           f"learning rate never reaches the optimizer's (at most {ramp(total, warmup_steps):.0%} of it). "
                           "Give a shorter --model.warmup_steps (0: none).")
        # The average starts as a copy of the weights after the first optimizer step (no warm-up): what is left
        # of them after the run's other total - 1 updates.
        decay, updates = self.hparams.ema_decay, max(total - 1, 1)
        if decay is not None and decay**updates > EMA_INITIAL_SHARE and self.global_step < total:
            rank_zero_warn(f"--model.ema_decay {decay} averages about the last {1 / (1 - decay):.0f} optimizer steps, "
                           f"but this run has {total}: the weights of its first step, barely trained, will still be "
                           f"{decay**updates:.1%} of the average that is validated, checkpointed and tested. Give a decay "
                           "of at most "
                           f"{EMA_INITIAL_SHARE ** (1 / updates):.4f} (README: \"Regularization switches\").")
        # A resumed run has the checkpoint's schedule by now: it must span this run (see schedule.py).
        if self.length_from_run is not None:
            steps = self.schedule_steps()
            built = resize(self.length_from_run, steps, ramp(self.global_step, self.hparams.warmup_steps))
            if built is not None:
                unit = "epoch" if self.hparams.lr_interval == "epoch" else "step"
                rank_zero_info(
                    f"The learning-rate schedule was built for {built} {unit}s; from {unit} {self.length_from_run.last_epoch} "
                    f"on it follows the curve of this run's {steps}."
                )
