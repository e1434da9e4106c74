import errno
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import mixed_folder, stroke

from senet_pl.images import MAX_PIXELS, MAX_SIDE, read_folder, to_training_style


def test_read_folder_converts_good_files_and_lists_the_rest(tmp_path: Path) -> None:
    good = mixed_folder(tmp_path / "mine")
    found = read_folder(tmp_path / "mine")
    assert found.files == good
    assert found.images.shape == (5, 1, 28, 28) and found.images.dtype == np.uint8
    assert [name for name, _ in found.skipped] == ["f_truncated.png", "notes.txt", "subfolder"]
    assert "truncated" in found.skipped[0][1] and "not an image" in found.skipped[1][1]
    assert found.skipped[2][1] == "a folder, not an image file (subfolders are not read)"
    for name, image in zip(good, found.images):  # small images: exactly what converting the whole file gives
        with Image.open(tmp_path / "mine" / name) as full:
            assert np.array_equal(image, to_training_style(full)), name
    for image in found.images:  # every one became a light stroke on black, like MNIST
        assert image[0, 0].max() == 0 and image.max() == 255


def test_light_and_dark_backgrounds_give_the_same_digit() -> None:
    dark_ink = to_training_style(stroke((120, 90)))
    light_ink = to_training_style(stroke((120, 90), dark_on_light=False))
    assert np.array_equal(dark_ink, light_ink)
    kept = to_training_style(stroke((120, 90)), invert="no")  # forced: the paper stays white
    assert kept[0, 0, 0] == 0 and kept.mean() > dark_ink.mean()


def test_mnist_style_box_and_center_of_mass() -> None:
    # a small stroke in the top-left corner of a large photo
    image = stroke((400, 300), box=(0.05, 0.05, 0.1, 0.3))
    digit = torch.from_numpy(to_training_style(image, box=20)[0]).double()
    rows, cols = (digit > 0).nonzero(as_tuple=True)
    assert rows.max() - rows.min() + 1 == 20  # the longer side scaled to the 20-pixel box
    com = [(torch.arange(28.0)[:, None] * digit).sum() / digit.sum(), (torch.arange(28.0) * digit).sum() / digit.sum()]
    assert all(abs(c - 14) <= 0.5 + 1e-9 for c in com)  # centered by its center of mass, at MNIST's (14, 14)
    frame = torch.from_numpy(to_training_style(image, box=28)[0])  # Fashion-MNIST/KMNIST: the content fills the frame
    assert (frame > 0).nonzero()[:, 0].max() - (frame > 0).nonzero()[:, 0].min() + 1 == 28


def test_centers_of_mass_land_where_mnists_do() -> None:
    """MNIST's digits have their center of mass at pixel (14, 14) (rows, columns from 0): the mean over the first 2,000
    test digits is (13.99, 14.00), with the spread of whole-pixel shifts (0.29). Ours were at (13.5, 13.5)."""
    rng = np.random.default_rng(0)
    centers = []
    for _ in range(60):  # random quadrilaterals: asymmetric shapes, so the whole-pixel shift's rounding varies
        image = Image.new("L", (90, 90), 255)
        ImageDraw.Draw(image).polygon([tuple(p) for p in rng.uniform(5, 85, (4, 2))], fill=0)
        digit = to_training_style(image, box=20)[0].astype(np.float64)
        rows, cols = np.indices(digit.shape)
        centers.append([(rows * digit).sum() / digit.sum(), (cols * digit).sum() / digit.sum()])
    mean = np.mean(centers, axis=0)
    assert np.all(np.abs(mean - 14) < 0.15), mean


@pytest.mark.parametrize("mode", ["RGB", "P", "I;16", "LA"])
def test_any_mode_converts(mode: str) -> None:
    image = stroke((60, 40))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
    else:
        image = image.convert(mode)
    assert np.array_equal(to_training_style(image), to_training_style(stroke((60, 40))))


@pytest.fixture
def no_hang():
    """Fail, instead of hanging, a test whose code blocks (say, opening a FIFO nobody writes to)."""

    def timeout(signum, frame):
        raise TimeoutError("blocked for 20 s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_float_and_signed_images_give_the_digit_of_their_8_bit_version(tmp_path: Path) -> None:
    """A float TIFF in 0..1 (dark ink on white) came out blank, and one with negative values as noise."""
    eight_bit = stroke((60, 40))
    unit = np.asarray(eight_bit, dtype=np.float32) / 255
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    Image.fromarray((np.asarray(eight_bit, dtype=np.int32) - 128) * 1000, mode="I").save(tmp_path / "signed.tif")
    Image.fromarray(unit * 1.001 - 0.001, mode="F").save(tmp_path / "undershoot.tif")  # a resampling's overshoots
    Image.fromarray(unit * 1.0001, mode="F").save(tmp_path / "overshoot.tif")
    Image.fromarray(unit * 2, mode="F").save(tmp_path / "white_is_2.tif")
    found = read_folder(tmp_path)
    assert found.files == ["overshoot.tif", "signed.tif", "undershoot.tif", "unit.tif", "white_is_2.tif"]
    assert not found.skipped
    for digit in found.images:
        assert np.abs(digit.astype(int) - to_training_style(eight_bit).astype(int)).max() <= 1


def test_blank_and_nan_images_are_skipped_with_the_reason(tmp_path: Path) -> None:
    """Nothing to classify: they were predicted as some class (and NaN warned without naming the file)."""
    Image.new("L", (50, 50), 255).save(tmp_path / "white.png")
    Image.new("L", (50, 50), 0).save(tmp_path / "black.png")
    Image.new("L", (1, 1), 90).save(tmp_path / "one_pixel.png")
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(tmp_path / "transparent.png")
    nan = np.asarray(stroke((60, 40)), dtype=np.float32) / 255
    nan[0, 0] = np.nan
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    stroke((60, 40)).save(tmp_path / "z_digit.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = read_folder(tmp_path)
    assert found.files == ["z_digit.png"]
    blank = "blank: one colour, nothing to classify"
    assert found.skipped == [("black.png", blank), ("nan.tif", "it holds NaN or infinite pixel values"),
                             ("one_pixel.png", blank), ("transparent.png", blank), ("white.png", blank)]


def test_entries_that_cannot_be_opened_are_listed_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hang: None
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    stroke((64, 64)).save(folder / "a_good.png")
    (folder / "broken.png").symlink_to(folder / "gone.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    os.mkfifo(folder / "pipe.png")  # opening it would block: it must not be opened
    (folder / "link.png").symlink_to(folder / "a_good.png")  # a working link is read
    stroke((64, 64)).save(folder / "locked.png")
    (folder / "locked.png").chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: refuse it as the kernel would refuse anyone else
        real_open = open

        def refusing_open(file, *args, **kwargs):
            if Path(file).name == "locked.png":
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("senet_pl.images.open", refusing_open, raising=False)
    found = read_folder(folder)
    assert found.files == ["a_good.png", "link.png"]
    assert dict(found.skipped) == {
        "broken.png": "a broken symbolic link: its target does not exist",
        "locked.png": "cannot open: Permission denied",
        "loop.png": "a symbolic link loop",
        "pipe.png": "not a regular file (a FIFO, socket or device): not opened",
    }


def _spy_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The sizes of the images read_folder hands to to_training_style."""
    sizes = []

    def spy(image: Image.Image, *args) -> np.ndarray:
        sizes.append(image.size)
        return to_training_style(image, *args)

    monkeypatch.setattr("senet_pl.images.to_training_style", spy)
    return sizes


def test_a_huge_image_is_refused_from_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.new("P", (12000, 12000)).save(folder / "bomb.png")  # 144 megapixels in a few KB
    assert (folder / "bomb.png").stat().st_size < 1_000_000
    stroke((64, 64)).save(folder / "digit.png")
    sizes = _spy_sizes(monkeypatch)
    found = read_folder(folder)
    assert found.files == ["digit.png"] and sizes == [(64, 64)]  # the large one never reached the conversion
    assert found.skipped == [("bomb.png", f"too large: 12000x12000 pixels, more than {MAX_PIXELS // 10**6} megapixels")]


def test_large_images_are_shrunk_before_conversion_with_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    big = stroke((4200, 2800), box=(0.3, 0.2, 0.45, 0.7))  # JPEG: decoded at 1/2 scale
    # A serif: a lone rectangle's center of mass needs a shift of exactly half a pixel to land on (14, 14), a tie
    # that the small differences of shrinking would break either way.
    ImageDraw.Draw(big).rectangle([0.3 * 4200, 0.6 * 2800, 0.52 * 4200, 0.7 * 2800], fill=0)
    big.save(folder / "a_gray.png")
    big.convert("P").save(folder / "b_palette.png")  # paletted: shrunk by averaging, not by picking pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    big.convert("RGB").save(folder / "c_rotated.jpg", quality=95, exif=exif)
    sizes = _spy_sizes(monkeypatch)
    found = read_folder(folder)
    assert found.files == ["a_gray.png", "b_palette.png", "c_rotated.jpg"]
    assert all(max(size) <= MAX_SIDE for size in sizes)
    for name, image in zip(found.files, found.images):
        with Image.open(folder / name) as full:
            expected = to_training_style(full)  # the whole image, converted at full size
        difference = np.abs(image.astype(int) - expected.astype(int))
        assert difference.max() <= 8 and difference.mean() < 0.5, name
    assert not np.array_equal(found.images[2], found.images[0])  # the rotation was applied
