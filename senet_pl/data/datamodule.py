"""``MNISTDataModule``: MNIST, Fashion-MNIST or KMNIST from IDX files, kept in memory, batches transformed on the device."""

import math
import os
import sys
from pathlib import Path
from typing import Literal

import lightning.pytorch as L
import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveFloat, PositiveInt
from torch.utils.data import DataLoader, random_split
from torchvision.datasets import KMNIST, MNIST, FashionMNIST

from senet_pl.data.idx import DataError, check_idx, decompress, download, needs_decompressing
from senet_pl.data.memory import InMemoryImages, data_device
from senet_pl.data.sampler import EpochBatchSampler, ResumableLoader, shard
from senet_pl.data.transforms import Erasing, transform_batch
from senet_pl.images import INK_BOX, SIZE, Invert, read_folder
from senet_pl.precision import input_dtype

DatasetName = Literal["mnist", "fashion_mnist", "kmnist"]

# name -> (torchvision class, mean, std of the training split's pixels in [0, 1]).
# MNIST and Fashion-MNIST were measured on the official 60,000-image training files;
# KMNIST's are the values published with it (no copy of KMNIST could be measured here).
DATASETS: dict[str, tuple[type[MNIST], float, float]] = {
    "mnist": (MNIST, 0.1307, 0.3081),
    "fashion_mnist": (FashionMNIST, 0.2860, 0.3530),
    "kmnist": (KMNIST, 0.1918, 0.3483),
}


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
        hflip: bool = False,
        erasing: ClosedUnitInterval = 0.0,
        erasing_scale: tuple[ClosedUnitInterval, ClosedUnitInterval] = (0.02, 0.33),
        erasing_ratio: tuple[PositiveFloat, PositiveFloat] = (0.3, 3.3),
        erasing_value: float = 0.0,
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
                is only used by ``test``, ``predict``, ``analyze`` and ``export``, never in ``fit``.
            split_seed: seed of the train/validation split, fixed so that every run holds out the same images.
            translate: training-time augmentation: shift each image by up to this many pixels (of the 28x28
                original) in x and y, independently per image; 0 turns it off. Never applied to val/test.
            hflip: training-time augmentation: mirror each image left to right with probability 1/2. Off by
                default and in configs/mnist.yaml (a mirrored digit is not the same digit); Fashion-MNIST may use it.
            erasing: training-time augmentation: the probability that an image gets a rectangle erased
                (torchvision's RandomErasing, drawn per image, after normalization); 0 turns it off.
            erasing_scale: erasing: the range of the erased area, as a fraction of the image (min, max).
            erasing_ratio: erasing: the range of the rectangle's aspect ratio, height/width (min, max).
            erasing_value: erasing: the value erased pixels get, in normalized units (0: the dataset's mean pixel).
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
        if not 0 <= split_seed < 2**63:  # torch.Generator's range
            raise DataError(f"--data.split_seed {split_seed} is out of range: use a seed from 0 to {2**63 - 1}.")
        for name, (low, high) in (("erasing_scale", erasing_scale), ("erasing_ratio", erasing_ratio)):
            # YAML's .inf: no rectangle of that shape fits, so nothing was ever erased; .nan passed every comparison
            if not (math.isfinite(low) and math.isfinite(high)):
                raise DataError(f"--data.{name} [{low}, {high}]: give a finite range [min, max].")
            if low > high:
                raise DataError(f"--data.{name} [{low}, {high}]: give the range as [min, max].")
        if erasing > 0 and erasing_scale[1] * SIZE**2 < 1:  # erased at the native size, before any resize
            raise DataError(f"--data.erasing_scale [{erasing_scale[0]}, {erasing_scale[1]}] erases less than a pixel of "
                            f"a {SIZE}x{SIZE} image, so --data.erasing {erasing} would erase nothing: give a larger "
                            "maximum, or --data.erasing 0.")
        if translate >= SIZE:  # shifted out of the frame: a blank image, for most of the batch
            raise DataError(f"--data.translate {translate}: a shift of {SIZE} pixels or more moves a whole {SIZE}x{SIZE} "
                            f"image out of its frame; give at most {SIZE - 1} (the recipes shift by up to 2).")
        if not math.isfinite(erasing_value):  # YAML's .nan/.inf: the loss went non-finite at the first erased image
            raise DataError(f"--data.erasing_value {erasing_value}: give a finite value (in normalized units; 0 is the "
                            "dataset's mean pixel).")
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
    def class_names(self) -> list[str]:
        """The dataset's class names as torchvision gives them (MNIST: "0 - zero" ...)."""
        return list(self.dataset_cls.classes)

    @property
    def short_class_names(self) -> list[str]:
        """Class names for figure labels: MNIST's "7 - seven" as "7"; the others' names as they are."""
        return [name.split(" - ")[0] for name in self.dataset_cls.classes]

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
            if gz.exists() and needs_decompressing(path, gz, ndim):
                decompress(gz, path, ndim)
            if not path.exists():
                missing.append(path)
        if missing and self.hparams.download:
            failed = download(self.dataset_cls, self.hparams.data_dir, self.raw_folder)
            missing = missing if failed else [p for p in missing if not p.exists()]
            reason = failed or "download did not produce them"
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
            (n_images, *size), n_labels = check_idx(images, 3), check_idx(labels, 1)[0]
            if n_images != n_labels:
                raise DataError(f"{images} has {n_images} images but {labels} has {n_labels} labels.")
            if n_images == 0:  # torchvision's reader fails on it with a traceback
                raise DataError(f"{images} holds no images: replace it with the official file.")
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
        # The device the model runs on (this process's GPU under DDP); the host outside a Trainer.
        self.place_datasets(self.trainer.strategy.root_device if self.trainer is not None else None)

    def place_datasets(self, model_device: torch.device | None) -> None:
        """Move the datasets to the model's GPU, or back to host memory, as ``data_device`` decides."""
        datasets = [d for d in (self.train_set, self.val_set, self.test_set, self.predict_set) if d is not None]
        device = torch.device("cpu")
        if self.hparams.on_device and model_device is not None:
            device = data_device(model_device, sum(d.nbytes for d in datasets), self.hparams.num_workers)
        for dataset in datasets:
            dataset.to(device)

    def _read_predict_dir(self) -> InMemoryImages:
        folder = Path(self.hparams.predict_dir)
        if not folder.is_dir():
            raise DataError(f"--data.predict_dir {folder} is not a folder: give the folder that holds your images.")
        try:
            found = read_folder(folder, INK_BOX[self.hparams.dataset], self.hparams.invert)
        except OSError as err:
            raise DataError(f"cannot read --data.predict_dir {folder}: {err.strerror or err}.") from None
        for name, reason in found.skipped:
            print(f"skipped {folder / name}: {reason}", file=sys.stderr)
        if not found.files:
            raise DataError(f"no readable image in {folder} ({len(found.skipped)} files skipped): nothing to predict.")
        self.predict_files, self.predict_skipped = found.files, found.skipped
        return InMemoryImages(torch.from_numpy(found.images), torch.full((len(found.files),), -1))

    def _loader(self, dataset: InMemoryImages, shuffle: bool = False) -> DataLoader:
        workers = {"num_workers": self.hparams.num_workers, "persistent_workers": self.hparams.num_workers > 0}
        # The global seed set by seed_everything (LightningCLI's seed_everything), as Lightning's own
        # DistributedSampler uses it.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        shards = self._shards()
        try:
            sampler = EpochBatchSampler(len(dataset), self.hparams.batch_size, shuffle, seed, **shards)
        except ValueError as err:  # too few images to give every process the same number of batches
            split = {id(self.train_set): "training", id(self.val_set): "validation"}.get(id(dataset), "evaluated")
            fix = "--data.batch_size 2 or more" if self.hparams.batch_size == 1 else "fewer processes"
            if split == "validation" and self.hparams.batch_size > 1:
                fix = f"--data.val_size {shards['num_replicas']} or more, or fewer processes"
            raise DataError(f"the {split} split cannot be sharded: {err}; use {fix}.") from None
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

    def predict_indices(self) -> list[int]:
        """Sample indices of this process's predictions, in the order they are made (its shard of the split)."""
        return [i for _, batch in self.predict_dataloader().sampler for i in batch]

    def on_after_batch_transfer(self, batch: list | torch.Tensor, dataloader_idx: int) -> list[torch.Tensor] | torch.Tensor:
        """uint8 (N, 1, 28, 28) -> normalized (N, 1, S, S), on the device the batch is on.

        The result is float32, or bf16/fp16 under bf16-mixed/16-mixed precision. A bare tensor (the model's
        ``example_input_array``, which the model summary sends through this hook) gets the evaluation transform."""
        training = self.trainer is not None and self.trainer.training
        dtype = input_dtype(self.trainer.precision) if self.trainer is not None else torch.float32
        if isinstance(batch, torch.Tensor):
            return self.transform_batch(batch, False, dtype)
        x, y, seed = batch
        return [self.transform_batch(x, training, dtype, seed), y]

    def training_batch_sizes(self) -> list[int]:
        """The sizes of this process's training batches in an epoch (after setup("fit")); [] if the split cannot be
        sharded (the training loader says why)."""
        shards = self._shards()
        try:
            return [stop - start for _, start, stop in shard(len(self.train_set), self.hparams.batch_size,
                                                             shards.get("num_replicas", 1), shards.get("rank", 0))]
        except ValueError:
            return []

    def _shards(self) -> dict[str, int]:
        """This process's share of a split: the processes and its rank (none without a Trainer)."""
        return {"num_replicas": self.trainer.world_size, "rank": self.trainer.global_rank} if self.trainer else {}

    def first_training_images(self, count: int) -> list[torch.Tensor]:
        """The first ``count`` images of the training split (after setup("fit")) as uint8 batches of batch_size, in a
        fixed order and the same on every process: what the weight average's batch-norm statistics are measured on
        (``ema.py``; this module's ``on_after_batch_transfer`` gives them the evaluation transform). A last batch of
        one image joins the one before: batch norm in training mode cannot take one image at a 1x1 map."""
        batches = list(self.train_set.images[:count].split(self.hparams.batch_size))
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2:] = [torch.cat(batches[-2:])]
        return batches

    def example_batch(self) -> torch.Tensor:
        """One blank image as this data module delivers images before ``on_after_batch_transfer``: uint8 at the
        native size (the model summary's example input)."""
        return torch.zeros(1, self.in_channels, SIZE, SIZE, dtype=torch.uint8)

    def transform_batch(self, x: torch.Tensor, training: bool, dtype: torch.dtype = torch.float32,
                        seed: int | None = None) -> torch.Tensor:
        """This dataset's transform of a uint8 batch (see ``transforms.transform_batch``); augmentation only in training."""
        if not training:
            return transform_batch(x, self.mean, self.std, self.hparams.image_size, dtype)
        hp = self.hparams
        erasing = Erasing(hp.erasing, tuple(hp.erasing_scale), tuple(hp.erasing_ratio), hp.erasing_value)
        return transform_batch(x, self.mean, self.std, hp.image_size, dtype, hp.translate, seed, hp.hflip, erasing)
