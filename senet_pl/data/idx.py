"""IDX files (the format of MNIST and its siblings): header checks and safe decompression of the .gz downloads."""

import contextlib
import gzip
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import torch

from senet_pl.files import give_default_mode

# IDX magic numbers (unsigned byte data): 0x00000801 for 1-d label files, 0x00000803 for 3-d images.
_IDX_MAGIC = {1: 0x0801, 3: 0x0803}


class DataError(Exception):
    """A dataset that cannot be used as it is; the message says what to do."""


def check_idx(path: Path, ndim: int, name: str | None = None) -> tuple[int, ...]:
    """Check an IDX file's magic number and that its size matches its header; return its dims.

    ``name`` is what the messages call the file (default: its path)."""
    name = name or str(path)
    header_size = 4 + 4 * ndim
    try:
        with open(path, "rb") as f:
            header = f.read(header_size)
    except OSError as err:  # a folder of that name, no permission ...
        raise DataError(f"cannot read {name}: {err.strerror or err}. Replace it with the official file.") from None
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


def needs_decompressing(path: Path, gz: Path, ndim: int) -> bool:
    """Whether ``path`` is to be (re)made from ``gz``: it is missing, invalid, or older than the .gz.

    A decompressed file is otherwise used as it is, so a broken one (say, left by an older version
    from an empty .gz) or an old one would shadow the good .gz the user has since put there."""
    if not path.exists() or gz.stat().st_mtime_ns > path.stat().st_mtime_ns:
        return True
    try:
        check_idx(path, ndim)
    except DataError:
        return True
    return False


def decompress(gz: Path, target: Path, ndim: int) -> None:
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
        check_idx(Path(tmp), ndim, name="its content")
        os.replace(tmp, target)
    except BaseException as err:  # a signal too: no partial file is left behind
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(err, (OSError, EOFError, zlib.error, DataError)):  # zlib.error: a damaged deflate stream
            raise
        detail = str(err) if isinstance(err, DataError) else f"{err}."
        raise DataError(f"could not decompress {gz}: {detail} Replace it with a complete copy.") from None


def download(dataset_cls: type, root: str, raw: Path) -> str | None:
    """Download both splits of ``dataset_cls`` into ``root`` with torchvision; why it failed, or None. The folders it
    made and left empty (``root``, ``MNIST/``, ``MNIST/raw/``) are removed after a failure."""
    made = [folder for folder in (raw, raw.parent, raw.parent.parent) if not folder.exists()]
    try:
        for train in (True, False):
            dataset_cls(root, train=train, download=True)
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError, depending on the failure
        for folder in made:  # innermost first; rmdir removes only an empty folder
            with contextlib.suppress(OSError):
                folder.rmdir()
        return f"download failed ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None
