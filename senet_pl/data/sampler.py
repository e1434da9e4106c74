"""Training order as a function of (seed, epoch, batch) only, sharded for DDP, and a loader whose position
Lightning saves in every checkpoint: a resumed run sees exactly the batches an uninterrupted one would."""

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from senet_pl.compat import batches_done


def _mix(*values: int) -> int:
    """One 63-bit seed from several integers (deterministic: Python hashes int tuples without salt)."""
    return hash(values) & (2**63 - 1)


class EpochBatchSampler(DistributedSampler):
    """Yields ``(seed, indices)`` per batch; order and seed depend only on (seed, epoch, batch number).

    With ``shuffle`` each epoch is a fresh permutation drawn from a generator seeded with
    (seed, epoch), so it never depends on what ran before; the batch seed drives the batch's
    augmentation. ``resume`` starts the next iteration part-way into an epoch.

    Under DDP each of the ``num_replicas`` processes takes every num_replicas-th batch of the
    same order, so the shards are disjoint and cover the split. For training (``shuffle``) the order
    is padded with its first batches so that every process takes the same number of steps;
    evaluation is not padded, so that metrics count every image once. Being a DistributedSampler,
    Lightning uses it as it is instead of wrapping it.
    """

    def __init__(
        self, length: int, batch_size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.length, self.batch_size = length, batch_size
        self.n_batches = -(-length // batch_size)  # the last one may be short
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every training epoch."""
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        self.epoch, self._skip = epoch, batches_done

    def _batches(self) -> range:
        total = self.n_batches
        if self.shuffle:  # training: padded to the same number on every process
            total = -(-total // self.num_replicas) * self.num_replicas
        return range(self.rank, total, self.num_replicas)

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch)))
        else:
            order = torch.arange(self.length)
        skip, self._skip = self._skip, 0
        for b in self._batches()[skip:]:
            start = (b % self.n_batches) * self.batch_size  # padding batches wrap around to the start
            yield _mix(self.seed, self.epoch, b), order[start : start + self.batch_size].tolist()


class ResumableLoader(DataLoader):
    """The training DataLoader; Lightning saves its ``state_dict`` in checkpoints and restores it on resume.

    The state is where the fit loop is, read from the trainer when the checkpoint is written
    (the sampler itself runs ahead: Lightning prefetches a batch).
    """

    def __init__(self, dataset: Dataset, sampler: EpochBatchSampler, datamodule: L.LightningDataModule, **kwargs) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=None, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict[str, int]:
        trainer = self.datamodule.trainer
        epoch, done = trainer.current_epoch, batches_done(trainer)
        if done >= trainer.num_training_batches:  # the epoch is over: resume at the start of the next
            epoch, done = epoch + 1, 0
        # What the position means: batches of this size, in this seed's order, on this many processes
        # (the CLI refuses a mid-epoch resume that changes them).
        sampler = self.sampler
        return {"epoch": epoch, "batches_done": done, "batch_size": sampler.batch_size,
                "world_size": sampler.num_replicas, "seed": sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches_done"])
