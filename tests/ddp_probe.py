"""A callback for tests/test_ddp.py, loaded by the CLI subprocess through PYTHONPATH: records, per rank
and epoch, which training and validation samples the rank's samplers fed it, its world size and its
process group's backend."""

import json
from pathlib import Path

import lightning.pytorch as L
import torch.distributed as dist


class ShardRecorder(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def _write(self, trainer: L.Trainer, name: str, batches: list[list[int]], steps: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
        record = {"world_size": trainer.world_size, "batches": batches, "steps": steps, "backend": backend}
        (self.out_dir / f"rank{trainer.global_rank}_{name}{trainer.current_epoch}.json").write_text(json.dumps(record))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = trainer.train_dataloader.sampler
        batches = [indices for _, indices in sampler]  # the same order the running epoch uses
        self._write(trainer, "epoch", batches, trainer.num_training_batches)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            batches = [indices for _, indices in trainer.val_dataloaders.sampler]
            self._write(trainer, "val", batches, int(trainer.num_val_batches[0]))
