"""MNIST-type data (MNIST, Fashion-MNIST, KMNIST) as a LightningDataModule.

The datasets are 55 MB of uint8 pixels (training and test split), so they are kept decoded
in memory as uint8 tensors (in GPU memory when training on a GPU) and indexed a whole batch
at a time; a batch is converted to float, augmented, resized and normalized on the training
device in ``on_after_batch_transfer`` (no per-sample PIL work).

Training order and augmentation are functions of (seed, epoch, batch) only, never of the
RNG state a run happens to be in, and the training loader's position is saved in every
checkpoint: a resumed run sees exactly the batches, in the order and with the shifts, that
an uninterrupted run would have seen.
"""

import functools
import gzip
import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Literal

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset, DistributedSampler, random_split
from torchvision.datasets import KMNIST, MNIST, FashionMNIST

from senet_pl.files import give_default_mode
from senet_pl.images import INK_BOX, SIZE, Invert, read_folder

DatasetName = Literal["mnist", "fashion_mnist", "kmnist"]

# name -> (torchvision class, mean, std of the training split's pixels in [0, 1]).
# MNIST and Fashion-MNIST were measured on the official 60,000-image training files;
# KMNIST's are the values published with it (no copy of KMNIST could be measured here).
DATASETS: dict[str, tuple[type[MNIST], float, float]] = {
    "mnist": (MNIST, 0.1307, 0.3081),
    "fashion_mnist": (FashionMNIST, 0.2860, 0.3530),
    "kmnist": (KMNIST, 0.1918, 0.3483),
}

# The dtype a batch is delivered in, by Trainer precision: what autocast would cast it to.
_INPUT_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}

# IDX magic numbers (unsigned byte data): 0x00000801 for 1-d label files, 0x00000803 for 3-d images.
_IDX_MAGIC = {1: 0x0801, 3: 0x0803}


class DataError(Exception):
    """A dataset that cannot be used as it is; the message says what to do."""


def _check_idx(path: Path, ndim: int, name: str | None = None) -> tuple[int, ...]:
    """Check an IDX file's magic number and that its size matches its header; return its dims.

    ``name`` is what the messages call the file (default: its path)."""
    name = name or str(path)
    header_size = 4 + 4 * ndim
    with open(path, "rb") as f:
        header = f.read(header_size)
    if len(header) < header_size:
        raise DataError(f"{name} is truncated: it has {len(header)} bytes, fewer than an IDX header.")
    magic, *dims = struct.unpack(f">{ndim + 1}I", header)
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(
            f"{name} is not an IDX {'image' if ndim == 3 else 'label'} file: magic number "
            f"{magic:#010x}, expected {_IDX_MAGIC[ndim]:#010x}."
        )
    expected = header_size + torch.Size(dims).numel()
    actual = path.stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise DataError(f"{name} is {what}: {actual} bytes, its header {tuple(dims)} needs {expected}.")
    return tuple(dims)


def _needs_decompressing(path: Path, gz: Path, ndim: int) -> bool:
    """Whether ``path`` is to be (re)made from ``gz``: it is missing, invalid, or older than the .gz.

    A decompressed file is otherwise used as it is, so a broken one (say, left by an older version
    from an empty .gz) or an old one would shadow the good .gz the user has since put there."""
    if not path.exists() or gz.stat().st_mtime_ns > path.stat().st_mtime_ns:
        return True
    try:
        _check_idx(path, ndim)
    except DataError:
        return True
    return False


def _decompress(gz: Path, target: Path, ndim: int) -> None:
    """Decompress ``gz`` to ``target`` atomically, so a failure never leaves half a file or an invalid one."""
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    except OSError as err:
        raise DataError(
            f"cannot decompress {gz.name} in {target.parent} ({err.strerror}): copy the .gz files into "
            f"<folder>/{target.parent.parent.name}/raw/ of a writable folder and pass it as --data.data_dir."
        ) from None
    try:
        with os.fdopen(fd, "wb") as dst, gzip.open(gz, "rb") as src:  # fdopen first: it closes fd whatever fails
            shutil.copyfileobj(src, dst)
        give_default_mode(tmp)
        # Check what came out before it takes the file's name: an empty .gz decompresses without an error
        # into an empty file, and gzip of the wrong data into a wrong file.
        _check_idx(Path(tmp), ndim, name="its content")
        os.replace(tmp, target)
    except (OSError, EOFError, zlib.error, DataError) as err:  # zlib.error: a damaged deflate stream
        Path(tmp).unlink(missing_ok=True)
        detail = str(err) if isinstance(err, DataError) else f"{err}."
        raise DataError(f"could not decompress {gz}: {detail} Replace it with a complete copy.") from None


class InMemoryImages(Dataset):
    """uint8 images (N, 1, H, W) and labels in memory, indexed by a whole batch ``(seed, indices)`` at once.

    The tensors may live in GPU memory (see ``data_device``): a batch is then cut out on the GPU and
    only its indices cross over from the host."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, batch: tuple[int, list[int]]) -> list:
        seed, indices = batch
        # index_select: half the time of images[index] for a batch of 32 on CPU
        index = torch.as_tensor(indices, device=self.images.device)
        return [self.images.index_select(0, index), self.labels.index_select(0, index), seed]

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes

    def to(self, device: torch.device) -> "InMemoryImages":
        """Move the tensors to ``device``, in place (like ``nn.Module.to``)."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self


def data_device(device: torch.device, nbytes: int, num_workers: int) -> torch.device:
    """Where datasets of ``nbytes`` are kept when the model runs on ``device``.

    In the GPU's memory when that is a CUDA device, the batches are drawn in the main process
    (CUDA tensors cannot be shared with forked DataLoader workers) and the data take at most a
    tenth of the GPU's free memory, so that training keeps the rest; in host memory otherwise.
    An MNIST-type dataset is 55 MB, so it goes to any GPU with more than about 0.6 GB free.
    """
    if device.type != "cuda" or num_workers > 0:
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= free // 10 else torch.device("cpu")


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
        epoch, done = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:  # the epoch is over: resume at the start of the next
            epoch, done = epoch + 1, 0
        # What the position means: batches of this size, in this seed's order, on this many processes
        # (the CLI refuses a mid-epoch resume that changes them).
        sampler = self.sampler
        return {"epoch": epoch, "batches_done": done, "batch_size": sampler.batch_size,
                "world_size": sampler.num_replicas, "seed": sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches_done"])


class MNISTDataModule(L.LightningDataModule):
    """MNIST, Fashion-MNIST or KMNIST: 28x28 grayscale, 10 classes, IDX files as torchvision reads them."""

    def __init__(
        self,
        dataset: DatasetName = "mnist",
        data_dir: str = "data",
        image_size: PositiveInt = 28,
        batch_size: PositiveInt = 128,
        val_size: PositiveInt = 5000,
        split_seed: int = 42,
        translate: NonNegativeInt = 2,
        num_workers: NonNegativeInt = 0,
        on_device: bool = True,
        download: bool = True,
        predict_dir: str | None = None,
        invert: Invert = "auto",
    ) -> None:
        """
        Args:
            dataset: which dataset: mnist, fashion_mnist or kmnist.
            data_dir: torchvision root: the files are looked for in DATA_DIR/<MNIST|FashionMNIST|KMNIST>/raw/,
                decompressed or as the .gz files of the official download.
            image_size: side of the square images fed to the model; 28 keeps the native size, larger
                values are resized (bilinear) on the training device.
            batch_size: images per batch (per process under DDP).
            val_size: images held out from the training split for validation; the official test split
                is only used by ``test`` and ``predict``.
            split_seed: seed of the train/validation split, fixed so that every run holds out the same images.
            translate: training-time augmentation: shift each image by up to this many pixels (of the 28x28
                original) in x and y, independently per image; 0 turns it off. Never applied to val/test.
            num_workers: DataLoader worker processes; 0 is fastest for in-memory tensors.
            on_device: when training on a CUDA GPU, keep the uint8 datasets in its memory (if they take at
                most a tenth of the free memory and num_workers is 0), so that batches are cut out there and
                only their indices are copied from the host; False keeps them in host memory.
            download: download missing files with torchvision; with False, missing files are an error.
            predict_dir: ``predict`` classifies the image files in this folder (PNG, JPEG, BMP, ... of any
                size, colour or grayscale) instead of the test split; they are converted to look like the
                training data (see ``images.py``) and the dataset files are not needed.
            invert: for predict_dir: "auto" inverts images whose background is light (dark ink on paper),
                since the datasets are light on black; "yes"/"no" force it.
        """
        super().__init__()
        self.save_hyperparameters()
        if dataset not in DATASETS:
            raise DataError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}.")
        self.dataset_cls, mean, std = DATASETS[dataset]
        self.mean, self.std = mean, std
        self.num_classes, self.in_channels = self.data_shape(dataset)
        self.train_set: InMemoryImages | None = None
        self.val_set: InMemoryImages | None = None
        self.test_set: InMemoryImages | None = None
        self.predict_set: InMemoryImages | None = None
        self.predict_files: list[str] | None = None  # names of the predict_dir files, in predict order
        self.predict_skipped: list[tuple[str, str]] = []  # (file name, reason)

    @staticmethod
    def data_shape(dataset: str) -> tuple[int, int]:
        """(classes, image channels) of a dataset: what the model's num_classes and in_channels must be."""
        return len(DATASETS[dataset][0].classes), 1  # all of them are grayscale

    @property
    def raw_folder(self) -> Path:
        return Path(self.hparams.data_dir) / self.dataset_cls.__name__ / "raw"

    def _files(self, train: bool) -> tuple[Path, Path]:
        prefix = "train" if train else "t10k"
        return self.raw_folder / f"{prefix}-images-idx3-ubyte", self.raw_folder / f"{prefix}-labels-idx1-ubyte"

    def _predicting_folder(self) -> bool:
        return self.hparams.predict_dir is not None and self.trainer is not None and self.trainer.predicting

    def prepare_data(self) -> None:
        """Decompress .gz files that are present, download what is missing, check every file's header."""
        if self._predicting_folder():
            return  # predicting on one's own images needs no dataset files
        missing = []
        for path, ndim in zip((*self._files(train=True), *self._files(train=False)), (3, 1, 3, 1)):
            gz = path.with_name(path.name + ".gz")
            if gz.exists() and _needs_decompressing(path, gz, ndim):
                _decompress(gz, path, ndim)
            if not path.exists():
                missing.append(path)
        if missing and self.hparams.download:
            try:
                for train in (True, False):
                    self.dataset_cls(self.hparams.data_dir, train=train, download=True)
            except Exception as err:  # torchvision raises RuntimeError/URLError/OSError, depending on the failure
                reason = f"download failed ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
            else:
                missing = [p for p in missing if not p.exists()]
                reason = "download did not produce them"
        else:
            reason = "download is off"
        if missing:
            names = ", ".join(p.name + "[.gz]" for p in (*self._files(True), *self._files(False)))
            raise DataError(
                f"{self.hparams.dataset}: {len(missing)} of 4 files missing in {self.raw_folder} and {reason}. "
                f"Put {names} there, or point --data.data_dir at the folder that holds "
                f"{self.dataset_cls.__name__}/raw/."
            )
        for train in (True, False):
            images, labels = self._files(train)
            (n_images, *size), n_labels = _check_idx(images, 3), _check_idx(labels, 1)[0]
            if n_images != n_labels:
                raise DataError(f"{images} has {n_images} images but {labels} has {n_labels} labels.")
            # Every split at the native size (SIZE, 28 for all three datasets): another size would be
            # resized silently and differ between splits.
            if size != [SIZE, SIZE]:
                raise DataError(
                    f"{images} holds {size[0]}x{size[1]} images, but {self.hparams.dataset} images are "
                    f"{SIZE}x{SIZE}: replace it with the official file (--data.image_size resizes them for the model)."
                )

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self.dataset_cls(self.hparams.data_dir, train=train, download=False)
        labels = ds.targets
        # A label that is no class would otherwise stop training deep inside the loss (IndexError).
        bad = ((labels < 0) | (labels >= self.num_classes)).nonzero()
        if len(bad):
            index = int(bad[0, 0])
            raise DataError(
                f"{self._files(train)[1]} holds label {int(labels[index])} at index {index} (counting from 0), but "
                f"{self.hparams.dataset} labels are 0..{self.num_classes - 1}: replace it with the official file."
            )
        return ds.data.unsqueeze(1), labels

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.train_set is None:
            images, labels = self._load(train=True)
            n, val_size = len(labels), self.hparams.val_size
            if not 0 < val_size < n:
                raise DataError(
                    f"--data.val_size {val_size} must be between 1 and {n - 1} (the training split has {n} images)."
                )
            generator = torch.Generator().manual_seed(self.hparams.split_seed)
            train, val = (torch.tensor(s.indices) for s in random_split(range(n), [n - val_size, val_size], generator))
            self.train_set = InMemoryImages(images[train], labels[train])
            self.val_set = InMemoryImages(images[val], labels[val])
        if stage == "predict" and self._predicting_folder():
            self.predict_set = self._read_predict_dir()
        elif stage in ("test", "predict") and self.test_set is None:
            self.test_set = InMemoryImages(*self._load(train=False))
        self._place_datasets()

    def _place_datasets(self) -> None:
        """Move the datasets to the training GPU, or back to host memory, as ``data_device`` decides."""
        datasets = [d for d in (self.train_set, self.val_set, self.test_set, self.predict_set) if d is not None]
        # The device the model runs on (this process's GPU under DDP); absent outside a Trainer.
        root = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        device = torch.device("cpu")
        if self.hparams.on_device and root is not None:
            device = data_device(root, sum(d.nbytes for d in datasets), self.hparams.num_workers)
        for dataset in datasets:
            dataset.to(device)

    def _read_predict_dir(self) -> InMemoryImages:
        folder = Path(self.hparams.predict_dir)
        if not folder.is_dir():
            raise DataError(f"--data.predict_dir {folder} is not a folder: give the folder that holds your images.")
        found = read_folder(folder, INK_BOX[self.hparams.dataset], self.hparams.invert)
        for name, reason in found.skipped:
            print(f"skipped {folder / name}: {reason}", file=sys.stderr)
        if not found.files:
            raise DataError(f"no readable image in {folder} ({len(found.skipped)} files skipped): nothing to predict.")
        self.predict_files, self.predict_skipped = found.files, found.skipped
        return InMemoryImages(found.images, torch.full((len(found.files),), -1))

    def _loader(self, dataset: InMemoryImages, shuffle: bool = False) -> DataLoader:
        workers = {"num_workers": self.hparams.num_workers, "persistent_workers": self.hparams.num_workers > 0}
        # The global seed set by seed_everything (LightningCLI's seed_everything), as Lightning's own
        # DistributedSampler uses it.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        shards = {"num_replicas": self.trainer.world_size, "rank": self.trainer.global_rank} if self.trainer else {}
        sampler = EpochBatchSampler(len(dataset), self.hparams.batch_size, shuffle, seed, **shards)
        if shuffle:
            return ResumableLoader(dataset, sampler, self, **workers)
        return DataLoader(dataset, sampler=sampler, batch_size=None, **workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set if self._predicting_folder() else self.test_set)

    def on_after_batch_transfer(self, batch: list, dataloader_idx: int) -> list[torch.Tensor]:
        """uint8 (N, 1, 28, 28) -> normalized (N, 1, S, S), on the device the batch is on.

        The result is float32, or bf16/fp16 under bf16-mixed/16-mixed precision."""
        x, y, seed = batch
        x = x.float().div_(255)
        if self.hparams.translate and self.trainer is not None and self.trainer.training:
            # before normalizing: the zeros shifted in are black only in [0, 1]
            x = random_translate(x, self.hparams.translate, torch.Generator(x.device).manual_seed(seed))
        # Normalizing commutes with bilinear resizing (its weights sum to 1), so it is done at the
        # native size and the resize is the only pass over the large image.
        x = x.sub_(self.mean).div_(self.std)
        # Under mixed precision the model's first layer computes in bf16/fp16 anyway: converting
        # before the resize halves the bytes written at the large size.
        x = x.to(_INPUT_DTYPES.get(str(getattr(self.trainer, "precision", "")), torch.float32))
        if x.shape[-1] != self.hparams.image_size:
            x = resize_bilinear(x, self.hparams.image_size)
        return [x, y]


def random_translate(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift every image of a batch by its own random whole-pixel offset in [-max_shift, max_shift], zero-filled."""
    n, _, h, w = x.shape
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), device=x.device, generator=generator)
    # Every h x w window of the zero-padded batch, at every offset, as a view (n, c, 2m+1, 2m+1, h, w);
    # one indexing operation copies out each image's own window. Content moves by +shift, so the
    # window starts m - shift into the padding. (2x faster on CPU than gathering pixel by pixel,
    # 3x faster than affine_grid + grid_sample, with the same result.)
    m = max_shift
    windows = F.pad(x, (m, m, m, m)).unfold(2, h, 1).unfold(3, w, 1)
    start = m - shift
    return windows[torch.arange(n, device=x.device), :, start[:, 1], start[:, 0]]


def resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` as two matrix products.

    Bilinear resizing is linear and separable: every output row is a fixed mix of input rows,
    and likewise for columns, so the resized image is ``R @ x @ C.T``. The matrices are the
    1-d linear interpolation of the identity, which makes the weights exactly F.interpolate's.
    For 1-channel images this runs as BLAS matrix products, 1.5-2x faster on CPU than
    F.interpolate's per-pixel kernel (28 -> 224, batch 32); the results agree to float rounding (tested).
    """
    h, w = x.shape[-2:]
    return _resize_weights(h, size, x.device, x.dtype) @ x @ _resize_weights(w, size, x.device, x.dtype).T


@functools.lru_cache(maxsize=16)
def _resize_weights(n: int, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size, n): row i holds the weights of the n inputs in output i (computed in fp32, then cast)."""
    eye = torch.eye(n, device=device).unsqueeze(0)
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[0].T.to(dtype).contiguous()
