"""Your own images, made to look like the training data: ``predict --data.predict_dir DIR``.

MNIST digits are light strokes on a black background, size-normalized into a 20x20 box and
centered by their center of mass in a 28x28 image; Fashion-MNIST and KMNIST fill the 28x28
frame. A photo or scan of a digit is usually the opposite (dark ink on light paper), larger,
in colour and off-center, so each file is converted the same way the datasets were made:
grayscale, inverted if its background is light, cropped to the ink, scaled to the box,
centered. Files that cannot be read are reported with the reason and skipped.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

Invert = Literal["auto", "yes", "no"]

# Side of the box the content is scaled into, inside the 28x28 frame. MNIST: "size normalized
# to fit in a 20x20 pixel box ... centered in a 28x28 image" (LeCun et al.'s description of the
# dataset); Fashion-MNIST's products and KMNIST's characters fill the frame.
INK_BOX = {"mnist": 20, "fashion_mnist": 28, "kmnist": 28}
SIZE = 28


@dataclass
class ImageFolder:
    """The readable images of a folder as a uint8 batch (N, 1, 28, 28), and the files that were skipped."""

    images: torch.Tensor
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)


def _grayscale(image: Image.Image) -> np.ndarray:
    """Any PIL image as float grayscale in [0, 255]; transparency is laid over white paper."""
    image = ImageOps.exif_transpose(image)  # phone photos are stored sideways with a rotation tag
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float: scale to 8 bits ourselves
        array = np.asarray(image, dtype=np.float32)
        top = array.max()
        return array * (255 / top) if top > 255 else array
    return np.asarray(image.convert("L"), dtype=np.float32)


def to_training_style(image: Image.Image, box: int = 20, invert: Invert = "auto") -> torch.Tensor:
    """One image of any size and mode as a uint8 (1, 28, 28) tensor that looks like the training data."""
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
        dy, dx = np.clip(np.round((SIZE - 1) / 2 - offset - com), -offset, SIZE - box - offset).astype(int)
    else:
        dy = dx = 0
    frame[offset + dy : offset + dy + box, offset + dx : offset + dx + box] = content
    return torch.from_numpy(frame).unsqueeze(0)


def read_folder(folder: str | Path, box: int = 20, invert: Invert = "auto") -> ImageFolder:
    """Every file directly in ``folder`` that Pillow can decode (PNG, JPEG, BMP, ...), in name order."""
    images, files, skipped = [], [], []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        try:
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file fails here, not later
                images.append(to_training_style(image, box, invert))
        except UnidentifiedImageError:
            skipped.append((path.name, "not an image Pillow can read"))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            skipped.append((path.name, f"cannot decode: {err}"))
        except Exception as err:  # e.g. malformed metadata: one odd file must not stop the others
            skipped.append((path.name, f"cannot convert: {type(err).__name__}: {err}"))
        else:
            files.append(path.name)
    stack = torch.stack(images) if images else torch.empty(0, 1, SIZE, SIZE, dtype=torch.uint8)
    return ImageFolder(stack, files, skipped)
