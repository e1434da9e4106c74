"""Learning-rate schedules whose length is the run's: a warm-up, then any torch scheduler.

A scheduler that needs a length takes it from the run when its length argument is left out (None), so that
``--trainer.max_epochs``, ``max_steps`` and ``limit_train_batches`` all count and no YAML file repeats them:

- ``T_max`` (CosineAnnealingLR, this module's version in which it may be left out) and ``total_iters`` are the
  index of the last scheduler step: the last step of the run trains at the schedule's end value;
- ``total_steps`` (OneCycleLR) is the number of scheduler steps, which by its own definition ends the same way.

A resumed run of another length (a larger ``--trainer.max_epochs``) follows, from its current step on, the
cosine of a run of the new length (``resize``): the curve it would have had if planned that long. Decided so
because a finished cosine is at 0, and scaling the current rate to a new end would train on at 0. The rate
jumps up to that curve (for a finished run: a warm restart). OneCycleLR fixes its phases when built: refused.
"""

import inspect
import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import (CosineAnnealingWarmRestarts, CyclicLR, LambdaLR, LinearLR, LRScheduler, OneCycleLR,
                                      ReduceLROnPlateau, StepLR)

# A length argument, and what is added to the run's number of scheduler steps to get its value.
LENGTHS = {"T_max": -1, "total_iters": -1, "total_steps": 0}
WARMUP_START = 0.01  # the warm-up's first factor
# Schedulers that compute the rate from scratch at every step instead of scaling the present one: chained after
# the warm-up they would overwrite its factor.
OUTRIGHT = (OneCycleLR, CyclicLR, CosineAnnealingWarmRestarts, LambdaLR)
# What a ReduceLROnPlateau can watch: the metrics module.py logs once per epoch, each with the mode in which it improves.
EPOCH_METRICS = {"val/loss": "min", "val/acc": "max", "train/acc": "max"}


class ScheduleError(ValueError):
    """The run's length does not fit its schedule."""


class CosineAnnealingLR(torch.optim.lr_scheduler.CosineAnnealingLR):
    """torch's CosineAnnealingLR whose ``T_max`` may be left out: the run's length, filled in by ``build_schedule``.

    Args:
        optimizer: the optimizer whose learning rate it sets.
        T_max: the scheduler step at which the rate reaches ``eta_min`` (None: the last step of the run).
        eta_min: the final learning rate.
        last_epoch: the index of the last step (-1: a new schedule).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, T_max: int | None = None, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        if T_max is None:
            raise ScheduleError("CosineAnnealingLR needs T_max (SEResNetClassifier fills in the run's length).")
        if T_max < 1:
            raise ScheduleError(f"CosineAnnealingLR T_max {T_max}: give a positive number of scheduler steps, or leave "
                                "T_max out for the run's length.")
        super().__init__(optimizer, T_max, eta_min, last_epoch)


def length_argument(factory: Callable) -> str | None:
    """The length argument that ``factory`` (a scheduler class, or one with arguments bound by jsonargparse or
    functools.partial) leaves to the run, i.e. leaves at None; or None."""
    values = dict(getattr(factory, "keywords", None) or {})
    try:  # a class or a functools.partial of one: its unbound arguments' defaults
        values |= {n: p.default for n, p in inspect.signature(factory).parameters.items() if n not in values}
    except (TypeError, ValueError):
        pass
    for name in LENGTHS:
        if name in values and values[name] is None:
            # OneCycleLR also accepts its length as epochs x steps_per_epoch
            if name == "total_steps" and values.get("epochs") is not None:
                return None
            return name
    return None


def warmup(optimizer: torch.optim.Optimizer, steps: int) -> LinearLR | None:
    """A linear ramp of the learning rate from 1% to its full value over ``steps`` optimizer steps (None: no warm-up)."""
    return LinearLR(optimizer, start_factor=WARMUP_START, total_iters=steps) if steps else None


def check_warmup(scheduler: LRScheduler | None, warmup_steps: int) -> None:
    """Refuse a warm-up with a scheduler that would overwrite it (OUTRIGHT)."""
    if warmup_steps and isinstance(scheduler, OUTRIGHT):
        raise ScheduleError(
            f"--model.lr_scheduler {type(scheduler).__name__} sets the learning rate outright at every step, so it would "
            f"undo the warm-up of --model.warmup_steps {warmup_steps}: give --model.warmup_steps 0 (OneCycleLR and "
            "CyclicLR ramp the rate up themselves)."
        )


def plateau_settings(scheduler: ReduceLROnPlateau, validate_every: int | None, validates: bool) -> dict[str, object]:
    """Lightning's settings for ``scheduler``: the metric it watches (val/loss, or the ``monitor`` of Lightning's
    subclass) and how often it steps: after each validation (every ``validate_every`` epochs, that of
    --trainer.check_val_every_n_epoch; ``validates``: whether fit validates at all). Without them Lightning would stop
    the run at the end of the first epoch that has no validation, with an error. Settings that cannot work raise
    ScheduleError."""
    monitor = getattr(scheduler, "monitor", None) or "val/loss"
    head = f"--model.lr_scheduler {type(scheduler).__name__} watches {monitor!r}"
    if monitor not in EPOCH_METRICS:
        raise ScheduleError(f"{head}, which is not logged once per epoch: give --model.lr_scheduler.monitor one of "
                            f"{', '.join(EPOCH_METRICS)}.")
    if scheduler.mode != EPOCH_METRICS[monitor]:
        better = "falls" if EPOCH_METRICS[monitor] == "min" else "rises"
        raise ScheduleError(f"{head} in mode {scheduler.mode!r}, but {monitor} improves as it {better}: give "
                            f"--model.lr_scheduler.mode {EPOCH_METRICS[monitor]}.")
    if not monitor.startswith("val/"):
        return {"monitor": monitor, "frequency": 1}
    if not validates or validate_every is None:
        why = "never validates (--trainer.limit_val_batches 0)" if not validates else \
              "validates every --trainer.val_check_interval batches, not after each epoch"
        raise ScheduleError(f"{head} after validations, but this run {why}: give --trainer.check_val_every_n_epoch "
                            "and --trainer.limit_val_batches of at least 1, or another --model.lr_scheduler.")
    return {"monitor": monitor, "frequency": validate_every}


def ramp(step: int, warmup_steps: int) -> float:
    """The warm-up's factor at optimizer step ``step``."""
    return WARMUP_START + (1 - WARMUP_START) * min(step, warmup_steps) / warmup_steps if warmup_steps else 1.0


def build_schedule(
    factory: Callable[[torch.optim.Optimizer], LRScheduler] | None,
    optimizer: torch.optim.Optimizer,
    steps: int | float | None,
) -> tuple[LRScheduler | None, LRScheduler | None]:
    """``factory``'s scheduler with a length it leaves out filled in for a run of ``steps`` scheduler steps
    (None: not known yet, as for a schedule that is only compared with a checkpoint's).
    Returns (the scheduler, the same if its length is the run's, else None)."""
    if factory is None:
        return None, None
    name = length_argument(factory)
    if name is None:
        scheduler = factory(optimizer)
        # torch takes a negative step_size and then decays at every step (0 fails at the first).
        if isinstance(scheduler, StepLR) and not scheduler.step_size >= 1:
            raise ScheduleError(f"--model.lr_scheduler StepLR step_size {scheduler.step_size}: give the number of "
                                "scheduler steps between decays (at least 1).")
        # OneCycleLR refuses a step past its length (a traceback mid-run); other schedules go on or cycle.
        if isinstance(scheduler, OneCycleLR) and steps is not None and scheduler.total_steps < steps:
            run = "has no end" if steps == float("inf") else f"takes {steps}"
            raise ScheduleError(f"--model.lr_scheduler OneCycleLR is {scheduler.total_steps} steps long, but this run "
                                f"{run}: leave out its total_steps (or epochs and steps_per_epoch), and it takes the "
                                "run's length.")
        return scheduler, None
    scheduler = factory(optimizer, **{name: run_length(name, steps)})
    return scheduler, scheduler


def run_length(name: str, steps: int | float | None) -> int:
    """The value of the length argument ``name`` for a run of ``steps`` scheduler steps."""
    if steps is None:
        return 1  # a placeholder: this schedule is compared, never stepped
    if steps == float("inf"):
        raise ScheduleError(
            f"the learning-rate schedule takes its length ({name}) from the run, but the run has no end: "
            "give --trainer.max_epochs or --trainer.max_steps."
        )
    return max(1, int(steps) + LENGTHS[name])


def resize(scheduler: LRScheduler, steps: int | float, warmup_factor: float = 1.0) -> int | None:
    """Give ``scheduler`` (restored from a checkpoint; ``warmup_factor``: the warm-up's factor now) the length of
    a run of ``steps`` scheduler steps. Returns the number of steps it was built for if that changed, else None.

    A cosine then follows, from the current step on, the curve of a run of the new length; a schedule that
    fixes its phases when built (OneCycleLR) cannot be resized, and raises ScheduleError."""
    name = next(n for n in LENGTHS if hasattr(scheduler, n))
    built, now = getattr(scheduler, name), run_length(name, steps)
    if built == now:
        return None
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        raise ScheduleError(
            f"the checkpoint's learning-rate schedule ({type(scheduler).__name__}) spans a run of "
            f"{built - LENGTHS[name]} steps and cannot be resized to this run's {steps}: resume with the run's own "
            "--trainer.max_epochs, max_steps, limit_train_batches and batch_size, or start a new run."
        )
    t = scheduler.last_epoch
    cosine = (1 + math.cos(math.pi * min(t, now) / now)) / 2
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = warmup_factor * (scheduler.eta_min + (base - scheduler.eta_min) * cosine)
    scheduler.T_max = now
    return built - LENGTHS[name]
