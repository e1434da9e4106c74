"""The exponential moving average of the weights (``--model.ema_decay``): Lightning's ``EMAWeightAveraging``,
kept safe for this project's checkpoints and commands.

The module adds it in ``configure_callbacks`` (so it lives on the module's floor, not in ``callbacks/``), in
every command: outside fit it does nothing, and there it keeps Lightning from warning that a checkpoint's
EMA state has no callback.
What Lightning's callback does, and this one keeps: after every optimizer step the average of the weights is updated;
fit's validation swaps it in (so ``val/acc`` and the best checkpoint are the average's); every checkpoint
holds the average as ``state_dict`` (what test, predict, analyze and export load) and the training weights
as ``current_model_state``, with the average's step count in ``averaging_state``; resuming fit restores both,
so a resumed run continues the average exactly.

What it changes: batch norm's statistics (running mean and variance) are not averaged but measured for the averaged
weights, on the first ``NORM_IMAGES`` training images, before each of fit's validations, before a checkpoint is
written at a step no validation measured, and at fit's end (between those, torch keeps the average's statistics
equal to the training weights', which is all training needs of them). Averaged statistics belong to the past
training weights, not to their average: with the recipes' lr 0.1 the weights move so far within the average's
horizon that the average normalized with them was near chance (val/acc 0.16 after 10 epochs of full
Fashion-MNIST, 0.999), and 0.934 with statistics measured for it (training weights: 0.913).
"""

from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import update_bn

from senet_pl.compat import averaged_module


# The average starts as a copy of the weights after the first optimizer step, with no warm-up: a run in which
# more than this share of them is left in the average at its end is warned about (module.py). On a 1,065-step
# run, 0.995 kept 0.5% and its val/acc still lagged the training weights' for the first five epochs (README:
# "Regularization switches").
EMA_INITIAL_SHARE = 0.05
# Training images that batch norm's statistics of the average are measured on (2% of an epoch of Fashion-MNIST).
NORM_IMAGES = 4096


class EMA(EMAWeightAveraging):
    """``EMAWeightAveraging`` that acts in ``fit`` only, and swaps back when a validation is cut short.

    - Outside fit (``validate``, ``test``, ``predict``) Lightning's warns that it cannot restore its state
      from the checkpoint, and, on a Trainer that ran ``fit`` with it before, swaps in the stale average of
      that fit or loads the checkpoint's training weights over its average. Here only fit's validation
      swaps, and a checkpoint loaded outside fit keeps its ``state_dict`` (the average).
    - SIGTERM or Ctrl-C stops fit at a batch boundary, also in the middle of a validation, while the average
      is swapped in. ``on_exception`` swaps back first (Lightning runs it before ``LatestCheckpoint``'s,
      a checkpoint callback), so that ``last.ckpt`` then holds the same as at any other moment.
    """

    def __init__(self, decay: float = 0.999, measure_norms: bool = True) -> None:
        """
        Args:
            decay: the weight of the old average at each optimizer step (0.999: about the last 1000 steps).
            measure_norms: measure batch norm's statistics for the average (the data module must have
                ``first_training_images``); False: average the training weights' statistics, as Lightning does.
        """
        super().__init__(decay=decay, use_buffers=not measure_norms)
        self.measure_norms = measure_norms
        self.swapped = False  # the average is in the module (a validation inside fit is running)
        self.measured_at: int | None = None  # the optimizer step at which the average's statistics were measured

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            super().on_validation_epoch_start(trainer, pl_module)
            self.swapped = True
            if not trainer.sanity_checking:  # the sanity check's average is the initial weights: not worth measuring
                self.measure_norm_statistics(trainer, pl_module)  # the average's, swapped in; swapped out with it

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        average = averaged_module(self)
        if average is not None and not self.swapped and self.measured_at != trainer.global_step:
            self.measure_norm_statistics(trainer, average)  # last.ckpt every N steps, on SIGTERM, with no validation
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        average = averaged_module(self)
        if average is not None and self.measured_at != trainer.global_step:
            self.measure_norm_statistics(trainer, average)  # a last step that no validation followed
        super().on_train_end(trainer, pl_module)  # the module becomes the average

    def measure_norm_statistics(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Batch norm's running statistics of ``module``'s weights, measured on the first NORM_IMAGES training
        images (torch's ``update_bn``: a cumulative average over those batches, evaluation transform, no gradients)."""
        data = trainer.datamodule
        if not self.measure_norms or not hasattr(data, "first_training_images"):
            return
        # One batch at a time (at 224x224 in fp32 all of them would be 822 MB).
        batches = (data.on_after_batch_transfer(x.to(module.device), 0) for x in data.first_training_images(NORM_IMAGES))
        with trainer.precision_plugin.forward_context():
            update_bn(batches, module)
        self.measured_at = trainer.global_step

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_back(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._swap_back(trainer, pl_module)

    def _swap_back(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.swapped:
            super().on_validation_epoch_end(trainer, pl_module)  # swaps the training weights back in
            self.swapped = False

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
