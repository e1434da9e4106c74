"""A callback for tests/test_checkpoints.py, loaded by the CLI subprocess through PYTHONPATH: sends this
process a signal once, at a chosen moment of a run, as a user's Ctrl-C or a scheduler's SIGTERM would."""

import os
from pathlib import Path

import lightning.pytorch as L


class SendSignal(L.Callback):
    def __init__(self, phase: str, signum: int, step: int = 3, twice: bool = False,
                 neighbour: str | None = None, batch: int | None = None, rank: int | None = None) -> None:
        """
        Args:
            phase: "sanity" (the sanity check's first batch), "training" (after optimizer step ``step``),
                "validation" (the first batch of the first validation after the sanity check), "checkpoint"
                (while the first checkpoint is being saved), "test" or "predict" (their first batch).
            signum: the signal, e.g. 15 (SIGTERM) or 2 (SIGINT).
            step: for "training".
            twice: send it a second time at once (a user who presses Ctrl-C again).
            neighbour: a run folder to make first, with a file in it: another command's run, started beside this one.
            batch: for "training": at the start of this training batch of the first epoch instead (the signal arrives
                while the batch is computed); for "validation": the validation after this training batch of the
                first epoch; for "stop": no signal, ``trainer.should_stop`` set at the end of this training batch of
                the first epoch (as max_time's Timer would); for "stop in validation": set at the end of the validation
                after it (as an early stop would).
            rank: under DDP, only the process of this global rank gets it (as from ``kill <pid>``); None: every one.
        """
        self.phase, self.signum, self.step, self.twice, self.sent = phase, signum, step, twice, False
        self.neighbour, self.batch, self.rank = neighbour, batch, rank

    def setup(self, trainer, pl_module, stage) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            self.sent = True  # another process's signal

    def _send(self, now: bool) -> None:
        if now and not self.sent:
            self.sent = True
            if self.neighbour:
                Path(self.neighbour).mkdir(parents=True)
                (Path(self.neighbour) / "events.out.tfevents.0").write_text("another run's")
            os.kill(os.getpid(), self.signum)
            if self.twice:
                os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        phase = "sanity" if trainer.sanity_checking else "validation"
        after = self.batch is None or (trainer.current_epoch == 0
                                       and trainer.fit_loop.epoch_loop.batch_idx == self.batch)
        self._send(self.phase == phase and batch_idx == 0 and after)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._send(self.phase == "training" and self.batch == batch_idx and trainer.current_epoch == 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._send(self.phase == "training" and self.batch is None and trainer.global_step == self.step)
        if self.phase == "stop" and trainer.current_epoch == 0 and batch_idx == self.batch:
            trainer.should_stop = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._send(self.phase == "checkpoint")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._send(self.phase == "test")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._send(self.phase == "predict")

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.phase == "stop in validation" and not trainer.sanity_checking and trainer.current_epoch == 0 \
                and trainer.fit_loop.epoch_loop.batch_idx == self.batch:
            trainer.should_stop = True
