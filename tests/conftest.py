"""Synthetic MNIST-format data: tiny IDX files built per test, so the suite never needs the network."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

N_TRAIN, N_TEST = 96, 40


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` (uint8) as an IDX file: magic 0x08 (unsigned byte) + ndim, big-endian dims, data."""
    data = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is visible (a bright bar whose row depends on the label) plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for image, label in zip(images, labels):
        image[2 + 2 * label : 4 + 2 * label, 4:24] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


def make_dataset(root: Path, folder: str = "MNIST", compress: bool = False) -> Path:
    """A torchvision root with ROOT/FOLDER/raw/ holding the four IDX files; returns the raw folder."""
    raw = root / folder / "raw"
    for prefix, n, seed in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        images, labels = synthetic_split(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return raw


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A torchvision root with synthetic, decompressed MNIST files."""
    make_dataset(tmp_path / "data")
    return tmp_path / "data"
