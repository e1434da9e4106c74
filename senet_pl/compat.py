"""Every private Lightning name this project uses, in one place: a Lightning upgrade breaks here, visibly.

``tests/test_compat.py`` has a test per name.
"""

import logging
import warnings
from typing import Any

import lightning.pytorch as L
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import callbacks
from lightning.pytorch.cli import LightningCLI

PATH = _PATH  # str | os.PathLike, Lightning's type for file arguments


def batches_done(trainer: L.Trainer) -> int:
    """Training batches processed so far in the current epoch (the fit loop's progress)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def at_last_batch(trainer: L.Trainer) -> bool:
    """Whether the fit loop is at the last training batch of its epoch."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def stepped(trainer: L.Trainer) -> bool:
    """In ``on_train_batch_end``: whether this batch ended with an optimizer step (with
    ``--trainer.accumulate_grad_batches N``, N - 1 of every N batches only add to the gradients)."""
    return not trainer.fit_loop.epoch_loop._should_accumulate()


def hold_sigterm(trainer: L.Trainer, held: bool) -> None:
    """Hide a received SIGTERM from the training loop, which stops at the end of a batch that has it (``held``), or
    show it again."""
    trainer._signal_connector.received_sigterm = not held


def logged_step(trainer: L.Trainer) -> int:
    """The step at which Lightning logs metrics now (in a validation of fit: the last training batch's, one less than
    ``global_step``): figures logged at it line up with the scalars."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_at(trainer: L.Trainer, step: int, epoch: int) -> None:
    """Make validate and test log at ``step`` and ``epoch``, those of the checkpoint they evaluate. Lightning restores
    only the weights for them and logged at step 0 and epoch 0: in the trained run's folder the curves jumped back."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step
    trainer.fit_loop.epoch_progress.current.completed = epoch


def handle_sigterm_with(trainer: L.Trainer, handler: Any, requeue_handler: Any) -> None:
    """Make ``handler(signum, frame)`` the SIGTERM handler that ``trainer`` registers when it starts its loops, in
    place of Lightning's ``_sigterm_notifier_fn`` (other handlers, SLURM's and the process's earlier one, stay), and
    ``requeue_handler`` the handler of SLURM's auto-requeue signal (Lightning's ``_slurm_sigusr_handler_fn``), which
    the Trainer registers on SLURM with ``SLURMEnvironment(auto_requeue=True)``, the default."""
    trainer._signal_connector._sigterm_notifier_fn = handler
    trainer._signal_connector._slurm_sigusr_handler_fn = requeue_handler


def averaged_module(callback: callbacks.WeightAveraging) -> L.LightningModule | None:
    """The module that holds a WeightAveraging callback's average (its AveragedModel's copy), None outside fit."""
    average = callback._average_model
    return average.module if average is not None else None


class LearningRateMonitor(callbacks.LearningRateMonitor):
    """Lightning's monitor, with the rate of a lone optimizer without a scheduler (``seed_224.yaml``: no schedule,
    no warm-up) logged as ``train/lr``, the key of every scheduled run, instead of ``lr-SGD`` (Lightning names it
    in ``_find_names_from_optimizers``), once per logged step. Scheduled rates keep the name their scheduler config
    gives."""

    def _find_names_from_optimizers(self, optimizers: list[Any], seen_optimizers: list, seen_optimizer_types: Any):
        lone = len(optimizers) == 1 and not seen_optimizers  # before super(), which adds to seen_optimizers
        names, without_scheduler = super()._find_names_from_optimizers(optimizers, seen_optimizers, seen_optimizer_types)
        if lone and names == [[f"lr-{type(without_scheduler[0]).__name__}"]]:
            names = [["train/lr"]]
        return names, without_scheduler

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        # With accumulate_grad_batches N the N batches of one optimizer step share its step number: Lightning logged
        # the (same) rate at each of them. Once per step, at its first batch.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step != getattr(self, "_logged_step", None):
            super().on_train_batch_start(trainer, *args, **kwargs)
            self._logged_step = step

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        # Here Lightning logs the rates of epoch-interval schedules, and those of optimizers without a schedule,
        # which it also logs at the epoch's first batch when that batch's step is logged: two points at one step.
        if trainer.lr_scheduler_configs or self.logging_interval == "epoch" or not logs_this_step(trainer):
            super().on_train_epoch_start(trainer, *args, **kwargs)


def clips_in_the_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` unscales its gradients in its own step (a fused SGD or Adam): Lightning's mixed
    precision cannot clip them before that step, and refuses at the first one."""
    return _optimizer_handles_unscaling(optimizer)


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether the Trainer logs the training metrics of the current step (every log_every_n_steps)."""
    return trainer._logger_connector.should_update_logs


class LightningCLIHooks(LightningCLI):
    """LightningCLI with public names for the private steps that this project replaces or wraps:
    ``reconcile_checkpoint`` (Lightning: ``_parse_ckpt_path``, which merges a checkpoint's hyperparameters
    into the config), ``run_subcommand`` (``_run_subcommand``) and ``trainer_callbacks`` (the callback list
    that ``_instantiate_trainer`` hands to the Trainer)."""

    def _parse_ckpt_path(self) -> None:
        self.reconcile_checkpoint()

    def reconcile_checkpoint(self) -> None:
        LightningCLI._parse_ckpt_path(self)

    def _run_subcommand(self, subcommand: str) -> None:
        self.run_subcommand(subcommand)

    def run_subcommand(self, subcommand: str) -> None:
        LightningCLI._run_subcommand(self, subcommand)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[L.Callback]) -> L.Trainer:
        return LightningCLI._instantiate_trainer(self, config, self.trainer_callbacks(config, callbacks))

    def trainer_callbacks(self, config: dict[str, Any], callbacks: list[L.Callback]) -> list[L.Callback]:
        """The callbacks of the parser's callback groups (``--checkpoint`` ...) that a Trainer of ``config`` gets."""
        return callbacks


# ValueErrors that Lightning raises for a setting only once the data is known (their text is the whole message).
SETTING_ERRORS = ("`val_check_interval` (",)  # an int above the number of training batches


def is_setting_error(err: BaseException) -> bool:
    """Whether ``err`` is Lightning's complaint about a setting (a one-line message for the user), not a fault."""
    return isinstance(err, ValueError) and str(err).strip().startswith(SETTING_ERRORS)


# Lightning messages a user of this CLI cannot act on (each was seen in a run of Lightning 2.6):
UNACTIONABLE_INFO = (
    "💡 Tip:",  # an advertisement for another logger
    "Loading `train_dataloader` to estimate number of stepping batches.",  # the schedule's length (schedule.py)
    # "[rank: 0] Received SIGTERM: 15", also after a Ctrl-C (GracefulStop relays it as SIGTERM): the CLI's own
    # message names the signal and says what was saved
    "Received SIGTERM: ",
    # after a second Ctrl-C, which aborts at once: the CLI's own message says so and what is kept
    "Detected KeyboardInterrupt, attempting graceful shutdown",
)
UNACTIONABLE_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning's own _pytree, on torch 2.14
    r"Precision .* is not supported by the model summary",  # the summary's size estimate; the run is unaffected
    r"Couldn't infer the batch indices",  # the prediction writer gets them from the data module
)


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(message in str(record.msg) for message in UNACTIONABLE_INFO)


def quiet() -> None:
    """Silence the Lightning messages above; every other message and warning is kept, a warning as one line (its
    category and text: the file and source line that Python adds by default tell a user nothing)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.signal_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropInfo) for f in logger.filters):
            logger.addFilter(_DropInfo())
    for message in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}")
    warnings.formatwarning = lambda message, category, *_, **__: f"{category.__name__}: {message}\n"


def estimated_steps(trainer: L.Trainer) -> int | float:
    """``trainer.estimated_stepping_batches``, safe to ask from ``configure_optimizers``.

    Asked there, Lightning sets up the training data early, before the checkpoint's loop state is restored;
    fit's own ``setup_data`` then returns early and never loads the loader's saved position, so a resumed
    run would replay or skip batches. The early loader is dropped, and fit sets it up again with the state.
    """
    early = trainer.train_dataloader is None
    steps = trainer.estimated_stepping_batches
    if early:
        trainer.fit_loop._combined_loader = None
    return steps


def rerun_cut_validation(checkpoint: dict[str, Any]) -> None:
    """Make ``checkpoint``, saved when a signal cut fit's validation short, resume by running that validation again
    from its first batch. Lightning saves the validation's progress after its last finished batch, and on resume
    counts such a validation as done (its metrics are never computed, the best checkpoint is chosen without it);
    written as if saved inside the first batch, it is "restarted mid-evaluation", and Lightning goes back into the
    validation, from the batches completed: none."""
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
    total, current = progress["total"], progress["current"]
    # The batches of earlier validations; set whole, not shifted: a checkpoint of a validation that was itself
    # a rerun (stopped twice) holds totals that do not add up, and Lightning reads the restart from the totals.
    before = max(total["completed"] - current["completed"], 0)
    total.update(ready=before + 1, started=before + 1, processed=before, completed=before)
    current.update(ready=1, started=1, processed=0, completed=0)
    progress["is_last_batch"] = False


def keep_epoch_open(checkpoint: dict[str, Any]) -> None:
    """Make ``checkpoint``, saved at the end of an epoch that ``max_steps`` or ``max_time`` cut short, resume inside
    that epoch, as from a checkpoint saved after its last batch done. Lightning counts the cut epoch as processed,
    and a resume with a larger max_epochs or max_steps went on with the next epoch: the rest of the cut one was
    never trained. (The data loader's position in the epoch is in the checkpoint either way.)"""
    progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
    for counts in (progress["total"], progress["current"]):
        counts["processed"] = counts["completed"] = counts["started"] - 1
