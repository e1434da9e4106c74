"""Training order as a function of (seed, epoch, batch) only, sharded for DDP, and a loader whose position
Lightning saves in every checkpoint: a resumed run sees exactly the batches an uninterrupted one would."""

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from senet_pl.compat import batches_done


def _mix(*values: int) -> int:
    """One 63-bit seed from several integers (deterministic: Python hashes int tuples without salt)."""
    return hash(values) & (2**63 - 1)


def shard(length: int, batch_size: int, replicas: int = 1, rank: int = 0) -> list[tuple[int, int, int]]:
    """Process ``rank``'s batches of an epoch order of ``length`` samples: ``(batch number, start, stop)`` into it.

    Step s takes the next ``replicas x batch_size`` samples of the order, process r the r-th ``batch_size``
    of them (batch number s * replicas + r). The samples left for the last step are divided among the
    processes as evenly as possible (when there are fewer of them than processes, the last two steps'
    are), so that every process takes the same number of batches, none empty, and every sample is taken
    exactly once: nothing is dropped or repeated. One process: batches of ``batch_size``, the last shorter.
    Raises ValueError (a short reason) when that is impossible: fewer samples than processes, or batches
    of 1 whose count does not divide by the number of processes.
    """
    if length < replicas:
        raise ValueError(f"{length} image(s) for {replicas} processes: each process needs at least one")
    per_step = replicas * batch_size
    steps = -(-length // per_step)
    tail_steps = 1 if length - (steps - 1) * per_step >= replicas else 2
    if tail_steps == 2 and batch_size == 1:
        raise ValueError(f"{length} images in batches of 1 do not divide evenly among {replicas} processes")
    first = (steps - tail_steps) * per_step  # where the evenly divided tail starts
    batches = [(s * replicas + rank, s * per_step + rank * batch_size, s * per_step + (rank + 1) * batch_size)
               for s in range(steps - tail_steps)]
    base, extra = divmod(length - first, tail_steps * replicas)
    start = first
    for j in range(tail_steps * replicas):  # tail batch j: step steps - tail_steps + j // replicas, process j % replicas
        stop = start + base + (j < extra)
        if j % replicas == rank:
            batches.append(((steps - tail_steps) * replicas + j, start, stop))
        start = stop
    return batches


class EpochBatchSampler(DistributedSampler):
    """Yields ``(seed, indices)`` per batch; order and seed depend only on (seed, epoch, batch number).

    With ``shuffle`` each epoch is a fresh permutation drawn from a generator seeded with
    (seed, epoch), so it never depends on what ran before; the batch seed drives the batch's
    augmentation. ``resume`` starts the next iteration part-way into an epoch.

    Under DDP the order is divided among the ``num_replicas`` processes by ``shard``: disjoint shards
    that cover the split, the same number of batches on every process (for training and evaluation
    alike, so that no process waits in a collective for one that has run out of batches), and every
    sample counted once in the metrics. Being a DistributedSampler, Lightning uses it as it is instead
    of wrapping it.
    """

    def __init__(
        self, length: int, batch_size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.length, self.batch_size = length, batch_size
        self.batches = shard(length, batch_size, num_replicas, rank)  # ValueError: see shard
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every training epoch."""
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        self.epoch, self._skip = epoch, batches_done

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch)))
        else:
            order = torch.arange(self.length)
        skip, self._skip = self._skip, 0
        for b, start, stop in self.batches[skip:]:
            yield _mix(self.seed, self.epoch, b), order[start:stop].tolist()


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
