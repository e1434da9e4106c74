"""``last.ckpt`` kept current, and stopping cleanly on SIGTERM or Ctrl-C.

- ``LatestCheckpoint`` rewrites ``last.ckpt`` after every validation (and, if asked, every N
  steps), and on SIGTERM or Ctrl-C, which ``GracefulStop`` turns into a stop at the next
  batch boundary.
"""

import os
import signal
import sys
from typing import Any

import lightning.pytorch as L
import torch
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from senet_pl.checkpoints import BETWEEN_STEPS, follow_run_folder
from senet_pl.compat import (at_last_batch, handle_sigterm_with, hold_sigterm, keep_epoch_open, rerun_cut_validation,
                              stepped)
from senet_pl.slurm import requeue as requeue_job


class LatestCheckpoint(Checkpoint):
    """Keeps ``last.ckpt`` current: every epoch and validation, every N training steps if asked, and on SIGTERM/Ctrl-C.

    Lightning's ``ModelCheckpoint(save_last=True)`` (since 2.6) rewrites ``last.ckpt`` only when a
    top-k checkpoint is saved at the same step; with ``save_top_k=1`` it is then a copy of the
    best one and a resume repeats every epoch since. And a ModelCheckpoint cannot save both every
    N steps and every epoch. This callback does both, whatever the metrics do. It never saves on
    other exceptions (a NaN loss, a crash), so a good ``last.ckpt`` is not replaced by the state
    that failed.

    It saves at the end of each training epoch (after the epoch's validation) and after
    validations in the middle of an epoch. Being a ``Checkpoint``, Lightning runs it after the
    other callbacks and after the ModelCheckpoint listed before it, so ``last.ckpt`` records the
    best checkpoint as of this very step (``--ckpt_path best`` reads it there, and a resumed run
    deletes the right old best).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: NonNegativeInt = 0) -> None:
        """
        Args:
            dirpath: folder of ``last.ckpt``; by default the best-checkpoint callback's (the run's ``checkpoints/``).
            every_n_train_steps: also rewrite it every this many optimizer steps (mid-epoch checkpoints); 0: only
                after validation.
        """
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.saved: tuple[str, int] | None = None  # (path, global step) of the last file this process wrote
        self._cut_validation = False  # a signal stopped fit in a validation: its checkpoint reruns that validation
        self._cut_epoch = False  # max_steps or max_time ended the epoch early: its checkpoint resumes inside it
        self._stop_held = False  # a stop held until the optimizer step that ends the accumulated batches

    def _save(self, trainer: L.Trainer, again: bool = False) -> None:
        already = self.saved is not None and self.saved[1] == trainer.global_step and not again
        if already or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        best = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        dirpath = self.dirpath or (best[0].dirpath if best else None)
        dirpath = dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        path = os.path.join(dirpath, "last.ckpt")
        trainer.save_checkpoint(path, weights_only=False)
        self.saved = (path, trainer.global_step)

    # With --trainer.accumulate_grad_batches N, a checkpoint is written only after an optimizer step: one written
    # between the batches of a step would count them as done without their gradients (stepped).

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # A stop asked for between the batches of a step (max_time: its Timer runs before this Checkpoint callback)
        # waits for the step.
        if trainer.should_stop and not stepped(trainer):
            trainer.should_stop, self._stop_held = False, True
        elif self._stop_held and stepped(trainer):
            trainer.should_stop, self._stop_held = True, False
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0 and stepped(trainer):
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.should_stop and not stepped(trainer):  # an early stop between the batches of a step: wait for it
            trainer.should_stop, self._stop_held = False, True
        # Only validations in the middle of an epoch: at an epoch's end ModelCheckpoint saves the best in
        # on_train_epoch_end, which comes after the validation, and last.ckpt must record that best.
        # Again if every_n_train_steps wrote this step before the validation: last.ckpt records the best as of now.
        if not at_last_batch(trainer) and stepped(trainer):
            self._save(trainer, again=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not stepped(trainer):  # an epoch cut between accumulated batches (a stop set in a validation among them)
            return
        self._cut_epoch = not at_last_batch(trainer)  # stopped by max_steps or max_time in the middle of the epoch
        try:
            self._save(trainer, again=True)  # (after this epoch's validation and best checkpoint, whatever came before)
        finally:
            self._cut_epoch = False

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning calls every callback's on_load_checkpoint before it restores their states: the best-checkpoint
        # records are made to name the files where they are now (checkpoints.follow_run_folder).
        states = checkpoint.get("callbacks")
        if trainer.state.fn == "fit" and trainer.ckpt_path and isinstance(states, dict):
            best = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
            for note in follow_run_folder(best, states, trainer.ckpt_path):
                if trainer.is_global_zero:
                    print(note, file=sys.stderr)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Called for every checkpoint of fit, the best ones too: one that ModelCheckpoint writes in a validation between
        # accumulated batches is marked, and fit refuses to resume it (resume.not_resumable).
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not stepped(trainer):
            checkpoint[BETWEEN_STEPS] = True
        if self._cut_validation:
            rerun_cut_validation(checkpoint)
        if self._cut_epoch:
            keep_epoch_open(checkpoint)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Training or validating inside fit (not the sanity check, which comes before any step of this
        # process): the state after the last optimizer step. A validation cut short runs again on resume, whole
        # (its metrics of the batches done are not in the checkpoint): saved again even if a file of this step
        # was written before the validation, which would count it as done.
        if isinstance(exception, SIGTERMException):
            self._cut_validation = trainer.validating and not trainer.sanity_checking
            if trainer.state.fn == "fit" and not trainer.sanity_checking and not stepped(trainer):
                return  # between the accumulated batches of a step (in a validation there, or just after the hold)
            try:
                self._save(trainer, again=self._cut_validation)
            finally:
                self._cut_validation = False


class Interrupted(BaseException):
    """SIGTERM or Ctrl-C before a Trainer handles them (parsing, data loading, setup): stop at once.

    A BaseException, not a KeyboardInterrupt, so that Lightning passes it on instead of exiting with status 1."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class EarlySignals:
    """The process's SIGINT and SIGTERM handler until a Trainer takes over: raises ``Interrupted``.

    Lightning's SIGTERM handler calls the handler it replaced after setting its own flag, so once it is
    installed this one does nothing (the loops then stop at a batch boundary); GracefulStop replaces it
    for SIGINT during a command and puts it back afterwards."""

    def __call__(self, signum: int, frame: Any) -> None:
        if signal.getsignal(signum) is self:  # still the installed handler: no Trainer is handling signals
            raise Interrupted(signum)

    def install(self) -> dict[int, Any]:
        """Install for SIGINT and SIGTERM, unless the process ignores them (as Python itself leaves an ignored SIGINT:
        a job that a shell script starts in the background ignores the Ctrl-C meant for the script); returns the
        handlers it replaced."""
        return {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN}


class GracefulStop(Callback):
    """Makes the first Ctrl-C stop any command like SIGTERM does: at the next batch boundary (in fit, with a checkpoint).

    A KeyboardInterrupt can land anywhere, even half-way through an optimizer step, and a
    checkpoint of that state would not resume exactly; Lightning's SIGTERM handling only sets
    a flag that the loops check between batches. A second Ctrl-C interrupts at once.

    Under DDP the processes must stop at the same batch: one that stops while another waits for it in a gradient
    all-reduce hangs the job. Lightning 2.6 broadcasts from inside its SIGTERM handler, wherever the signal lands
    (it met another process's all-reduce and hung), and its loops stop on each process's own flag. Here the
    handler only notes the signal (and passes it on to the processes Lightning started); in fit, validate and test
    the processes agree at each batch end, in a collective of their own, and stop together.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.running = False  # the Trainer has set up (after the data module's setup)
        self.start_step: int | None = None  # the global step when training started (after a resume's restore)
        self._held = False  # a SIGTERM held until the optimizer step that ends the accumulated batches
        self._pending = False  # a SIGTERM received; under DDP, not yet agreed by all processes (_agree)
        self.requeue_signal: int | None = None  # SLURM's auto-requeue signal, received (slurm.py)
        self._trainer: L.Trainer | None = None
        self._previous: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # From the start of every command (fit with its sanity check, validate, test, predict), not only training.
        self.signal, self.running, self.start_step = None, True, None
        self._pending, self._trainer, self.requeue_signal = False, trainer, None
        handle_sigterm_with(trainer, self._on_sigterm, self._on_requeue_signal)  # registered after this hook
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # an ignored Ctrl-C stays ignored (EarlySignals)
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        if not self._pending and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # the processes Lightning started get it too (as Lightning does)
        self._pending = True
        if trainer.world_size == 1:  # the loops see it at once, as Lightning's handler does
            hold_sigterm(trainer, False)

    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        # SLURM's time limit is near: stop as on SIGTERM, then requeue the job (requeue()), in place of Lightning's
        # handler, which saved from inside the signal handler (slurm.py).
        self.requeue_signal = signum
        self._on_sigterm(signum, frame)

    def requeue(self, trainer: L.Trainer) -> str:
        """After a stop by SLURM's auto-requeue signal: requeue the job (process 0), and say so (" ..."); else ""."""
        if self.requeue_signal is None or not trainer.is_global_zero:
            return ""
        return " " + requeue_job(resumes=trainer.state.fn == "fit")

    def _agree(self, trainer: L.Trainer, ready: bool) -> None:
        """Under DDP, at a batch end that every process reaches (every process has as many batches): whether any of
        them got a SIGTERM, a Ctrl-C or SLURM's requeue signal. If so, every process's loops see it now (``ready``) and
        stop at this boundary together, or, between the accumulated batches of an optimizer step, all hold it until
        the step; and every process reports (and process 0 requeues) as the one that got it would."""
        got = [self._pending, self.signal == signal.SIGINT, self.requeue_signal or 0]
        got = trainer.strategy.reduce(torch.tensor(got, dtype=torch.float64, device=trainer.strategy.root_device),
                                      reduce_op="max").tolist()
        if not got[0]:
            return
        self._pending = True
        self.signal = signal.SIGINT if got[1] else self.signal
        self.requeue_signal = int(got[2]) or None
        if ready:
            hold_sigterm(trainer, False)
            self._held = False
        else:
            self._hold(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step
        self._held = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # With --trainer.accumulate_grad_batches N, a stop between the batches of one optimizer step would checkpoint
        # them as done without their gradients: the stop waits for the step (at most N - 1 more batches).
        if trainer.world_size > 1:
            self._agree(trainer, ready=stepped(trainer))
        elif trainer.received_sigterm and not stepped(trainer):
            self._hold(trainer)
        elif self._held and stepped(trainer):
            hold_sigterm(trainer, False)
            self._held = False

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # A validation between the batches of a step (val_check_interval): it ends whole, the stop waits for the step.
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if trainer.world_size > 1:
            self._agree(trainer, ready=not fitting or stepped(trainer))
        elif fitting and trainer.received_sigterm and not stepped(trainer):
            self._hold(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.world_size > 1:
            self._agree(trainer, ready=True)

    on_predict_batch_end = on_test_batch_end  # (the prediction writer stops on the flag this shows, everywhere alike)

    def _hold(self, trainer: L.Trainer) -> None:
        if not self._held and trainer.is_global_zero:
            print(f"finishing this optimizer step first (--trainer.accumulate_grad_batches "
                  f"{trainer.accumulate_grad_batches})", file=sys.stderr, flush=True)
        hold_sigterm(trainer, True)
        self._held = True

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._previous is None:  # the command has ended (Lightning's teardown may reinstall this handler)
            raise KeyboardInterrupt
        self.signal = signal.SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C raises KeyboardInterrupt
        if self._trainer is None or self._trainer.is_global_zero:  # once (a terminal's Ctrl-C reaches every process)
            print("\nCtrl-C: stopping after this batch (Ctrl-C again to abort at once)", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler sets the flag its loops check

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def message(self, trainer: L.Trainer, subcommand: str, removed: list, signum: int,
                resumed: tuple[str, int] | None, aborted: bool = False) -> str:
        """What a command stopped by ``signum`` wrote and did not write (``removed``: the new run folders it removed;
        ``resumed``: the checkpoint a fit resumed from and its step; ``aborted``: a second Ctrl-C, at once)."""
        name = "Ctrl-C twice" if aborted else "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        stopped = "aborted at once" if aborted else "stopped"
        step = trainer.global_step
        gone = f" (the new run folder {removed[0]} was removed)" if removed else ""
        if subcommand == "export":  # no Trainer loop: stopped while exporting or checking, the file not yet in place
            return f"{name}: export {stopped}; no file was written."
        if not self.running:  # in data loading or setup, before the Trainer's loops
            return f"{name}: {subcommand} {stopped} before it started; nothing was written{gone}."
        if subcommand != "fit":
            return f"{name}: {subcommand} {stopped} before the end; it wrote no results (and changes no model or checkpoint)."
        latest = [c for c in trainer.checkpoint_callbacks if isinstance(c, LatestCheckpoint)]
        saved = latest[0].saved if latest else None
        if saved is not None and saved[1] == step:
            return f"{name}: training {stopped} at step {step}; {saved[0]} holds every step done. Resume with --ckpt_path last."
        if resumed is not None and resumed[1] == step:
            return (f"{name}: training {stopped} before its first step after resuming; {resumed[0]} (step {step}) "
                    "still holds every step done. Resume with --ckpt_path last.")
        if step == 0:
            return f"{name}: training {stopped} before its first step: nothing to save{gone}."
        kept = saved or resumed
        held = f"; {kept[0]} holds step {kept[1]}: resume with --ckpt_path last" if kept else ""
        return f"{name}: training {stopped} at step {step}, and no checkpoint of that step was written{held}."
