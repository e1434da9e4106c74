"""Training throughput, timed between batches by a callback (the benchmark's fit rows and the study)."""

import time

import lightning.pytorch as L
import torch


class TrainingClock(L.Callback):
    """Training images per second, from the end of the ``warmup``-th step to the end of the last one.

    Validation is left out: the clock is paused from the end of each training epoch to the first
    step of the next.
    """

    def __init__(self, warmup: int = 3) -> None:
        self.warmup, self.images, self.seconds, self._last = warmup, 0, 0.0, None

    def on_train_start(self, trainer, pl_module) -> None:
        # short runs (tests) keep at least one timed step
        self.warmup = min(self.warmup, max(int(trainer.estimated_stepping_batches) - 1, 0))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter() if trainer.global_step >= self.warmup else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.images += len(batch[1])
            self.seconds += now - self._last
        self._last = now if trainer.global_step >= self.warmup else None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")
