"""MNIST-type data (MNIST, Fashion-MNIST, KMNIST) as a LightningDataModule (``MNISTDataModule``).

``idx.py`` reads and checks the files, ``memory.py`` keeps the images, ``sampler.py`` orders the
batches and resumes them, ``transforms.py`` turns a uint8 batch into model input, and
``datamodule.py`` puts these together.

The datasets are 55 MB of uint8 pixels (training and test split), so they are kept decoded
in memory as uint8 tensors (in GPU memory when training on a GPU) and indexed a whole batch
at a time; a batch is converted to float, augmented, resized and normalized on the training
device in ``on_after_batch_transfer`` (no per-sample PIL work).

Training order and augmentation are functions of (seed, epoch, batch) only, never of the
RNG state a run happens to be in, and the training loader's position is saved in every
checkpoint: a resumed run sees exactly the batches, in the order and with the shifts, that
an uninterrupted run would have seen.
"""

from senet_pl.data.datamodule import DATASETS, DatasetName, MNISTDataModule
from senet_pl.data.idx import DataError

__all__ = ["DATASETS", "DataError", "DatasetName", "MNISTDataModule"]
