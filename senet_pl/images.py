"""Your own images, made to look like the training data: ``predict --data.predict_dir DIR``.

MNIST digits are light strokes on a black background, size-normalized into a 20x20 box and
centered by their center of mass in a 28x28 image; Fashion-MNIST and KMNIST fill the 28x28
frame. A photo or scan of a digit is usually the opposite (dark ink on light paper), larger,
in colour and off-center, so each file is converted the same way the datasets were made:
grayscale, inverted if its background is light, cropped to the ink, scaled to the box,
centered. Every other folder entry (unreadable or too large files, subfolders, broken links,
FIFOs) is reported with the reason and skipped; one file costs at most about 400 MB of memory.

numpy and Pillow only, no torch: ``python -m senet_pl.infer`` runs this same code where torch is not
installed (the data module turns the arrays into tensors).
"""

import errno
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Invert = Literal["auto", "yes", "no"]

# Side of the box the content is scaled into, inside the 28x28 frame. MNIST: "size normalized
# to fit in a 20x20 pixel box ... centered in a 28x28 image" (LeCun et al.'s description of the
# dataset); Fashion-MNIST's products and KMNIST's characters fill the frame.
INK_BOX = {"mnist": 20, "fashion_mnist": 28, "kmnist": 28}
SIZE = 28

# The most pixels one file may decode to, checked from the header before decoding. Pillow holds a
# decoded image in up to 4 bytes a pixel (RGB, RGBA, 32-bit) and shrinking an RGBA image copies it
# once more, so this bounds one file to about 400 MB (measured: 40-megapixel RGBA and transparent
# paletted PNGs, 370-410 MB; a 12000x12000 paletted PNG took 2.6 GB before there was a limit).
# Pillow's own limits only warn from 89 and refuse from 179 megapixels. A JPEG counts at the reduced
# scale it is decoded at (see MAX_SIDE).
MAX_PIXELS = 40_000_000
# Larger images are shrunk to this longer side (Lanczos) before the float work, which costs up to
# some 35 bytes a pixel (150 MB at this size). The content ends up in a 20x20 or 28x28 box, so the
# result changes by a few grey levels at most, unless the ink is tiny: a stroke 1.4% the width of
# the image still gets 28 pixels. JPEGs are decoded at 1/2, 1/4 or 1/8 scale where that leaves at
# least this size (Pillow's draft): an 8000x6000 photo decodes to 12 megapixels (80 MB, 730 before).
MAX_SIDE = 2048


@dataclass
class ImageFolder:
    """The readable images of a folder as a uint8 batch (N, 1, 28, 28), and the files that were skipped."""

    images: np.ndarray
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)


class _Skipped(Exception):
    """A folder entry that is not converted; the message says why."""


def _grayscale(image: Image.Image) -> np.ndarray:
    """Any PIL image as float grayscale in [0, 255]; transparency is laid over white paper."""
    image = ImageOps.exif_transpose(image)  # phone photos are stored sideways with a rotation tag
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit, 32-bit or float: scale to 8 bits ourselves
        # Their scale is unknown (floats in 0..1 or a little beyond, 12 or 16 bits, signed values): the darkest
        # pixel becomes 0 and the lightest 255, as the contrast stretch below would do anyway.
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise _Skipped("it holds NaN or infinite pixel values")
        low, high = array.min(), array.max()
        return ((array - low) * (255 / (high - low)) if high > low else np.zeros_like(array)).astype(np.float32)
    return np.asarray(image.convert("L"), dtype=np.float32)


def to_training_style(image: Image.Image, box: int = 20, invert: Invert = "auto") -> np.ndarray:
    """One image of any size and mode as a uint8 (1, 28, 28) array that looks like the training data."""
    gray = _grayscale(image)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    # "auto": the background is what the border mostly shows; light background = dark ink = invert.
    if invert == "yes" or (invert == "auto" and np.median(border) > 127):
        gray, border = 255 - gray, 255 - border
    # A dark background to black, the strongest ink to white (paper is rarely 0, photos rarely 255).
    # (A light background is only left when inversion was turned off: then it stays as it is.)
    background = np.median(border)
    if background <= 127:
        gray = np.clip(gray - background, 0, None)
    if gray.max() > 0:
        gray = gray * (255 / gray.max())  # not in place: the array may be a read-only view of the image
    ink = np.argwhere(gray > 0.25 * 255)
    if len(ink):
        (top, left), (bottom, right) = ink.min(axis=0), ink.max(axis=0) + 1
        gray = gray[top:bottom, left:right]
    # Pad to a square (so scaling keeps the aspect ratio), scale it into the box.
    h, w = gray.shape
    side = max(h, w)
    square = np.zeros((side, side), np.float32)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = gray
    content = np.asarray(Image.fromarray(square.astype(np.uint8)).resize((box, box), Image.Resampling.LANCZOS))
    frame = np.zeros((SIZE, SIZE), np.uint8)
    offset = (SIZE - box) // 2
    if box < SIZE and content.any():  # MNIST-style: move the center of mass to the frame's center
        rows, cols = np.indices(content.shape)
        mass = content.astype(np.float64)
        com = np.array([(rows * mass).sum(), (cols * mass).sum()]) / mass.sum()
        # MNIST's centers of mass lie at pixel (14, 14), not at the middle of the 28 pixels (13.5): the mean over the
        # first 2,000 test digits is (13.99, 14.00), spread as whole-pixel shifts are (0.29).
        dy, dx = np.clip(np.round(SIZE / 2 - offset - com), -offset, SIZE - box - offset).astype(int)
    else:
        dy = dx = 0
    frame[offset + dy : offset + dy + box, offset + dx : offset + dx + box] = content
    return frame[np.newaxis]


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` is no file to read (following symbolic links), or None for a regular file.

    Found out with stat only: opening a FIFO would block, and opening a device may do anything."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop"
        if err.errno == errno.ENOENT and path.is_symlink():
            return "a broken symbolic link: its target does not exist"
        return f"cannot open: {err.strerror}"
    if stat.S_ISDIR(mode):
        return "a folder, not an image file (subfolders are not read)"
    if not stat.S_ISREG(mode):
        return "not a regular file (a FIFO, socket or device): not opened"
    return None


def _load_bounded(image: Image.Image) -> Image.Image:
    """An opened, not yet decoded image file, decoded at most MAX_SIDE pixels on its longer side.

    Image.open reads only the header, so a file of more than MAX_PIXELS is refused before it is decoded."""
    width, height = image.size
    if max(width, height) > MAX_SIDE:  # JPEG: decode at reduced scale (no-op for other formats)
        scale = MAX_SIDE / max(width, height)
        image.draft(None, (max(1, int(width * scale)), max(1, int(height * scale))))
    if image.width * image.height > MAX_PIXELS:
        raise _Skipped(f"too large: {width}x{height} pixels, more than {MAX_PIXELS // 10**6} megapixels")
    image.load()  # decode now: a truncated file fails here, not later
    if max(image.size) > MAX_SIDE:
        if image.mode in ("1", "P", "PA"):  # Pillow resizes these by picking pixels, not averaging them
            alpha = image.mode == "PA" or (image.mode == "P" and "transparency" in image.info)
            image = image.convert("RGBA" if alpha else "L")  # as _grayscale would
        # In place: a JPEG or TIFF keeps its EXIF orientation for exif_transpose.
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def _read_file(path: Path, box: int, invert: Invert) -> np.ndarray:
    """One regular file as a uint8 (1, 28, 28) array; raises _Skipped, or Pillow's errors."""
    try:
        file = open(path, "rb")  # opened here, not by Pillow, to tell "cannot open" from "cannot decode"
    except OSError as err:
        raise _Skipped(f"cannot open: {err.strerror}") from None
    with file, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is the tighter limit
        with Image.open(file) as image:  # (an animation or a multi-page file: its first frame)
            digit = to_training_style(_load_bounded(image), box, invert)
    if not digit.any():  # no ink once the background is black: an empty page, a 1x1 image, all transparent
        raise _Skipped("blank: one colour, nothing to classify")
    return digit


def shown(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (Python keeps them as lone surrogates, which no UTF-8 file can
    hold) are written as escapes (``bad\\xffname.png``); every other name is unchanged."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def read_folder(folder: str | Path, box: int = 20, invert: Invert = "auto") -> ImageFolder:
    """Every file directly in ``folder`` that Pillow can decode (PNG, JPEG, BMP, ...), in name order.

    Every other entry is listed in ``skipped`` with the reason: files that cannot be opened or decoded,
    files above MAX_PIXELS, subfolders, broken symbolic links, FIFOs, sockets and devices."""
    images, files, skipped = [], [], []
    for path in sorted(Path(folder).iterdir()):  # an unreadable folder: OSError, for the caller to word
        name = shown(path.name)
        try:
            reason = _not_a_file(path)
            if reason is not None:
                raise _Skipped(reason)
            images.append(_read_file(path, box, invert))
        except _Skipped as err:
            skipped.append((name, str(err)))
        except UnidentifiedImageError:
            skipped.append((name, "not an image Pillow can read"))
        except Image.DecompressionBombError as err:
            skipped.append((name, f"too large: {err}"))
        except (OSError, ValueError) as err:
            skipped.append((name, f"cannot decode: {err}"))
        except Exception as err:  # e.g. malformed metadata: one odd file must not stop the others
            skipped.append((name, f"cannot convert: {type(err).__name__}: {err}"))
        else:
            files.append(name)
    stack = np.stack(images) if images else np.empty((0, 1, SIZE, SIZE), np.uint8)
    return ImageFolder(stack, files, skipped)
