"""A callback for tests/test_ddp.py, loaded by the CLI subprocess through PYTHONPATH: records, per rank
and epoch, which training samples the rank's sampler fed it, and the rank's world size."""

import json
from pathlib import Path

import lightning.pytorch as L


class ShardRecorder(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = trainer.train_dataloader.sampler
        batches = [indices for _, indices in sampler]  # the same order the running epoch uses
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"world_size": trainer.world_size, "batches": batches, "steps": trainer.num_training_batches}
        (self.out_dir / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json").write_text(json.dumps(record))
