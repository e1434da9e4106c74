from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from senet_pl.images import read_folder, to_training_style


def stroke(size: tuple[int, int], dark_on_light: bool = True, box: tuple[float, float, float, float] = (0.4, 0.2, 0.6, 0.8)):
    """A grayscale image with one filled rectangle (a '1'), at BOX given as fractions of the size."""
    ink, paper = (0, 255) if dark_on_light else (255, 0)
    image = Image.new("L", size, paper)
    w, h = size
    ImageDraw.Draw(image).rectangle([box[0] * w, box[1] * h, box[2] * w, box[3] * h], fill=ink)
    return image


def mixed_folder(folder: Path) -> list[str]:
    """Good images of several sizes and modes, a truncated PNG and a text file; returns the good names."""
    folder.mkdir()
    stroke((300, 200)).convert("RGB").save(folder / "a_rgb.png")
    stroke((64, 64)).save(folder / "b_gray.jpg", quality=95)
    stroke((28, 28), dark_on_light=False).save(folder / "c_light_on_dark.bmp")
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))  # black ink on a transparent background
    ImageDraw.Draw(rgba).rectangle([40, 20, 60, 80], fill=(0, 0, 0, 255))
    rgba.save(folder / "d_rgba.png")
    Image.fromarray(np.asarray(stroke((50, 50)), dtype=np.uint16) * 257).save(folder / "e_16bit.png")
    data = (folder / "a_rgb.png").read_bytes()
    (folder / "f_truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "subfolder").mkdir()
    return ["a_rgb.png", "b_gray.jpg", "c_light_on_dark.bmp", "d_rgba.png", "e_16bit.png"]


def test_read_folder_converts_good_files_and_lists_the_rest(tmp_path: Path) -> None:
    good = mixed_folder(tmp_path / "mine")
    found = read_folder(tmp_path / "mine")
    assert found.files == good
    assert found.images.shape == (5, 1, 28, 28) and found.images.dtype == torch.uint8
    assert [name for name, _ in found.skipped] == ["f_truncated.png", "notes.txt"]
    assert "truncated" in found.skipped[0][1] and "not an image" in found.skipped[1][1]
    for image in found.images:  # every one became a light stroke on black, like MNIST
        assert image[0, 0].max() == 0 and image.max() == 255


def test_light_and_dark_backgrounds_give_the_same_digit() -> None:
    dark_ink = to_training_style(stroke((120, 90)))
    light_ink = to_training_style(stroke((120, 90), dark_on_light=False))
    assert torch.equal(dark_ink, light_ink)
    kept = to_training_style(stroke((120, 90)), invert="no")  # forced: the paper stays white
    assert kept[0, 0, 0] == 0 and kept.float().mean() > dark_ink.float().mean()


def test_mnist_style_box_and_center_of_mass() -> None:
    # a small stroke in the top-left corner of a large photo
    image = stroke((400, 300), box=(0.05, 0.05, 0.1, 0.3))
    digit = to_training_style(image, box=20)[0].double()
    rows, cols = (digit > 0).nonzero(as_tuple=True)
    assert rows.max() - rows.min() + 1 == 20  # the longer side scaled to the 20-pixel box
    com = [(torch.arange(28.0)[:, None] * digit).sum() / digit.sum(), (torch.arange(28.0) * digit).sum() / digit.sum()]
    assert all(abs(c - 13.5) <= 0.5 for c in com)  # centered by its center of mass
    frame = to_training_style(image, box=28)[0]  # Fashion-MNIST/KMNIST: the content fills the frame
    assert (frame > 0).nonzero()[:, 0].max() - (frame > 0).nonzero()[:, 0].min() + 1 == 28


@pytest.mark.parametrize("mode", ["RGB", "P", "I;16", "LA"])
def test_any_mode_converts(mode: str) -> None:
    image = stroke((60, 40))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
    else:
        image = image.convert(mode)
    assert torch.equal(to_training_style(image), to_training_style(stroke((60, 40))))
