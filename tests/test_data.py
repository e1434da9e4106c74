import gzip
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from conftest import N_TEST, N_TRAIN, make_dataset, synthetic_split, write_idx

from senet_pl.data import DATASETS, DataError, MNISTDataModule
from senet_pl.data import idx as idx_module
from senet_pl.data.memory import data_device
from senet_pl.data.sampler import EpochBatchSampler, shard
from senet_pl.data.transforms import Erasing, random_erasing, random_hflip, random_translate, resize_bilinear, transform_batch


def _module(root: Path, **kwargs) -> MNISTDataModule:
    kwargs = {"data_dir": str(root), "val_size": 16, "batch_size": 8, "download": False, **kwargs}
    return MNISTDataModule(**kwargs)


def _transform(
    dm: MNISTDataModule, training: bool, precision: str = "32-true"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dm.trainer = SimpleNamespace(training=training, world_size=1, global_rank=0, precision=precision)
    x, y, seed = next(iter(dm.train_dataloader()))
    out, y2 = dm.on_after_batch_transfer([x.clone(), y, seed], 0)
    return x, out, y2


def test_batches_are_uint8_then_normalized_on_the_device_side(data_root: Path) -> None:
    dm = _module(data_root, translate=0)
    dm.prepare_data()
    dm.setup("fit")
    x, out, _ = _transform(dm, training=True)
    assert x.dtype == torch.uint8 and x.shape == (8, 1, 28, 28)
    assert out.dtype == torch.float32 and out.shape == (8, 1, 28, 28)
    torch.testing.assert_close(out, (x.float() / 255 - 0.1307) / 0.3081)


@pytest.mark.parametrize("size", [32, 64])
def test_resize_to_image_size(data_root: Path, size: int) -> None:
    dm = _module(data_root, image_size=size, translate=0)
    dm.prepare_data()
    dm.setup("fit")
    x, out, _ = _transform(dm, training=False)
    assert out.shape == (8, 1, size, size)
    # bilinear resize keeps the image's mean brightness (up to border effects)
    torch.testing.assert_close(out.mean(), ((x.float() / 255 - 0.1307) / 0.3081).mean(), atol=0.05, rtol=0)


@pytest.mark.parametrize(("precision", "dtype"), [
    ("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16),  # autocast's dtype
    ("bf16-true", torch.bfloat16), ("16-true", torch.float16), ("64-true", torch.float64),  # the weights' dtype
])
def test_batches_arrive_in_the_dtype_the_first_layer_computes_in(data_root: Path, precision: str, dtype) -> None:
    dm = _module(data_root, image_size=64, translate=0)
    dm.setup("fit")
    _, full, _ = _transform(dm, training=False)
    _, half, _ = _transform(dm, training=False, precision=precision)
    assert full.dtype == torch.float32 and half.dtype == dtype
    torch.testing.assert_close(half.float(), full, atol=0.03, rtol=0.01)  # the same images, rounded


def test_translation_only_in_training_and_per_sample(data_root: Path) -> None:
    dm = _module(data_root, translate=3)
    dm.prepare_data()
    dm.setup("fit")
    x, evaluated, _ = _transform(dm, training=False)
    torch.testing.assert_close(evaluated, (x.float() / 255 - 0.1307) / 0.3081)  # no augmentation in eval
    torch.manual_seed(0)
    _, trained, _ = _transform(dm, training=True)
    assert not torch.equal(trained, evaluated)


def test_random_translate_moves_each_image_by_its_own_whole_pixel_shift() -> None:
    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 14, 14] = 1.0
    torch.manual_seed(0)
    out = random_translate(x, 2)
    positions = [tuple(p) for p in (out[:, 0] == 1).nonzero()[:, 1:].tolist()]
    assert len(positions) == 64 and out.sum() == 64  # every pixel moved whole, none lost or blurred
    assert all(abs(r - 14) <= 2 and abs(c - 14) <= 2 for r, c in positions)
    assert len(set(positions)) > 10  # independent draws per image
    torch.manual_seed(0)
    assert torch.equal(random_translate(x, 2), out)  # reproducible with the seed


def test_random_translate_shifts_all_channels_alike_and_fills_with_zeros() -> None:
    x = torch.ones(64, 2, 28, 28)
    x[:, 0] = 0.0
    x[:, 0, 14, 14] = 1.0  # channel 0 shows where the image went
    out = random_translate(x, 3)
    assert out.shape == x.shape
    for image in out:
        r, c = (image[0] == 1).nonzero()[0].tolist()
        dy, dx = r - 14, c - 14
        # channel 1 moved by the same shift: what came in from outside is zero, nothing wrapped around
        expected = torch.zeros(28, 28)
        expected[max(dy, 0) : 28 + min(dy, 0), max(dx, 0) : 28 + min(dx, 0)] = 1.0
        assert torch.equal(image[1], expected), (dy, dx)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - 0.1307) / 0.3081


def test_shifts_alone_draw_what_they_drew_before_flips_and_erasing_existed() -> None:
    """Runs without the new switches stay bitwise the same (their checkpoints resume exactly)."""
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = transform_batch(x, 0.1307, 0.3081, 28, translate=2, seed=11, hflip=False, erasing=Erasing(p=0.0))
    shifted = random_translate(x.float() / 255, 2, torch.Generator().manual_seed(11))
    assert torch.equal(out, (shifted - 0.1307) / 0.3081)


def test_flips_mirror_whole_images_about_half_of_them_and_leave_the_shifts_alone() -> None:
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shifted = transform_batch(x, 0.1307, 0.3081, 28, translate=2, seed=5)
    flipped = transform_batch(x, 0.1307, 0.3081, 28, translate=2, seed=5, hflip=True)
    mirrored = [bool(torch.equal(f, s.flip(-1))) for f, s in zip(flipped, shifted)]
    kept = [bool(torch.equal(f, s)) for f, s in zip(flipped, shifted)]
    assert all(m or k for m, k in zip(mirrored, kept))  # each image is its shifted self or its mirror image
    assert 16 <= sum(mirrored) <= 48  # p = 1/2, per image
    assert torch.equal(random_hflip(x, torch.Generator().manual_seed(1)), random_hflip(x, torch.Generator().manual_seed(1)))


def _rectangle(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of the True pixels of a 2-d mask if they fill a rectangle, else None."""
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    if not len(rows):
        return None
    top, left, h, w = int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    assert mask.sum() == h * w and mask[top : top + h, left : left + w].all(), "not one filled rectangle"
    return top, left, h, w


@pytest.mark.parametrize("scale", [(0.02, 0.33), (0.3, 0.6)])  # torchvision's default; one where many draws do not fit
def test_random_erasing_draws_rectangles_as_torchvision_does(scale: tuple[float, float]) -> None:
    n, erasing = 2000, Erasing(p=1.0, scale=scale, ratio=(0.3, 3.3), value=-5.0)
    x = torch.ones(n, 1, 28, 28)
    out = random_erasing(x, erasing, torch.Generator().manual_seed(0))
    boxes = [_rectangle(image[0] == -5.0) for image in out]
    assert torch.equal(out[out != -5.0], torch.ones(int((out != -5.0).sum())))  # the rest is untouched
    ours = torch.tensor([h * w / 784 for _, _, h, w in boxes if h])
    assert len(ours) > 0.97 * n  # p = 1: every image, but where no attempt fits (rare at these settings)
    assert ours.min() >= scale[0] * 0.8 and ours.max() <= scale[1] * 1.2  # the scale range, up to rounding the sides
    torch.manual_seed(0)
    reference = v2.RandomErasing(p=1.0, scale=erasing.scale, ratio=erasing.ratio, value=-5.0)
    theirs = torch.tensor([p["h"] * p["w"] / 784 for p in (reference.make_params([x[0]]) for _ in range(n))
                           if p["v"] is not None])
    assert ours.mean().item() == pytest.approx(theirs.mean().item(), rel=0.02)  # the same distribution of areas
    assert max(max(h, w) for _, _, h, w in boxes) < 28  # a rectangle that does not fit is drawn again, never cut
    centres = torch.tensor([(t + h / 2, l + w / 2) for t, l, h, w in boxes if h])
    assert centres.mean(0).tolist() == pytest.approx([14.0, 14.0], abs=0.5)  # placed uniformly
    half = random_erasing(x, Erasing(p=0.5), torch.Generator().manual_seed(1))
    assert 0.45 * n <= (half == 0.0).flatten(1).any(1).sum() <= 0.55 * n


def test_flips_and_erasing_follow_the_batch_seed_and_spare_evaluation(data_root: Path) -> None:
    dm = _module(data_root, translate=0, hflip=True, erasing=0.5)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=True, world_size=1, global_rank=0, precision="32-true")
    (x, _, seed), (_, _, other) = list(dm.train_dataloader())[:2]
    first = dm.transform_batch(x, training=True, seed=seed)
    assert torch.equal(dm.transform_batch(x, training=True, seed=seed), first)  # the same seed: the same batch
    assert not torch.equal(dm.transform_batch(x, training=True, seed=other), first)  # the next batch's seed: other draws
    assert not torch.equal(first, _normalized(x))
    assert torch.equal(dm.transform_batch(x, training=False, seed=seed), _normalized(x))  # val/test: untouched


def test_erasing_ranges_must_be_min_max(data_root: Path) -> None:
    with pytest.raises(DataError, match=r"--data.erasing_scale \[0.3, 0.1\]"):
        _module(data_root, erasing_scale=(0.3, 0.1))


def test_shifts_that_leave_no_image_are_refused(data_root: Path) -> None:
    with pytest.raises(DataError, match=r"^--data.translate 28: a shift of 28 pixels or more moves a whole 28x28 image"):
        MNISTDataModule(data_dir=str(data_root), translate=28)
    assert MNISTDataModule(data_dir=str(data_root), translate=27).hparams.translate == 27


def test_erasing_that_could_erase_no_pixel_is_refused(data_root: Path) -> None:
    with pytest.raises(DataError, match=r"--data.erasing_scale \[0.0, 0.0\] erases less than a pixel of a 28x28 image"):
        _module(data_root, erasing=0.5, erasing_scale=(0.0, 0.0))
    with pytest.raises(DataError, match="--data.erasing 1.0 would erase nothing"):
        _module(data_root, erasing=1.0, erasing_scale=(0.0, 0.001))  # 0.78 of a pixel at most
    _module(data_root, erasing=1.0, erasing_scale=(0.0, 0.002))  # 1.6 pixels: some rectangle fits
    _module(data_root, erasing=0.0, erasing_scale=(0.0, 0.0))  # off: the range does not matter


@pytest.mark.parametrize(("setting", "message"), [
    ({"erasing_value": float("nan")}, "--data.erasing_value nan: give a finite value"),
    ({"erasing_value": float("inf")}, "--data.erasing_value inf: give a finite value"),
    ({"erasing_value": -float("inf")}, "--data.erasing_value -inf: give a finite value"),
    ({"erasing_ratio": (float("inf"), float("inf"))}, r"--data.erasing_ratio \[inf, inf\]: give a finite range"),
    ({"erasing_ratio": (0.3, float("inf"))}, r"--data.erasing_ratio \[0.3, inf\]: give a finite range"),
    ({"erasing_ratio": (float("inf"), 3.3)}, r"--data.erasing_ratio \[inf, 3.3\]: give a finite range"),
    ({"erasing_scale": (float("nan"), 0.3)}, r"--data.erasing_scale \[nan, 0.3\]: give a finite range"),
])
def test_erasing_settings_must_be_finite(data_root: Path, setting: dict, message: str) -> None:
    """YAML's .nan and .inf: an infinite value made the loss non-finite at the first erased image (whose message
    blamed the learning rate); an infinite aspect ratio never found a rectangle, so nothing was erased, silently."""
    with pytest.raises(DataError, match=message):
        _module(data_root, erasing=0.5, **setting)


@pytest.mark.parametrize("size", [224, 64, 29, 16])
def test_resize_bilinear_matches_interpolate(size: int) -> None:
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(size))
    expected = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_bilinear(x, size), expected, atol=1e-6, rtol=0)


def _rows(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


def test_split_sizes_disjoint_and_fixed(data_root: Path) -> None:
    dm = _module(data_root, val_size=20)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == N_TRAIN - 20 and len(dm.val_set) == 20
    train, val = _rows(dm.train_set.images[:, 0]), _rows(dm.val_set.images[:, 0])
    everything = _rows(torch.from_numpy(synthetic_split(N_TRAIN, seed=0)[0]))
    assert len(everything) == N_TRAIN  # the synthetic images are all different
    assert not train & val and train | val == everything
    again = _module(data_root, val_size=20)
    again.setup("fit")
    assert _rows(again.val_set.images[:, 0]) == val  # the same images held out in every run
    other = _module(data_root, val_size=20, split_seed=1)
    other.setup("fit")
    assert _rows(other.val_set.images[:, 0]) != val
    dm.setup("test")
    images, labels = synthetic_split(N_TEST, seed=1)
    assert torch.equal(dm.test_set.labels, torch.from_numpy(labels).long())  # the official test split, in order
    assert torch.equal(dm.test_set.images[:, 0], torch.from_numpy(images))


def test_loaders_index_whole_batches(data_root: Path) -> None:
    dm = _module(data_root, val_size=16, batch_size=10)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(b[1]) for b in batches] == [10] * 8  # 80 training images
    labels = torch.cat([b[1] for b in batches])
    assert sorted(labels.tolist()) == sorted(dm.train_set.labels.tolist())  # each image once per epoch
    val = list(dm.val_dataloader())
    assert torch.equal(torch.cat([b[1] for b in val]), dm.val_set.labels)  # evaluation in order


def test_datasets_go_to_a_cuda_gpu_when_they_fit_and_no_workers_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return 1000, 4000  # free, total bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    gpu, cpu = torch.device("cuda", 1), torch.device("cpu")
    assert data_device(gpu, 100, num_workers=0) == gpu  # a tenth of the free memory
    assert asked == [gpu]  # the free memory of the training GPU, not of GPU 0
    assert data_device(gpu, 101, num_workers=0) == cpu
    assert data_device(gpu, 100, num_workers=2) == cpu  # forked workers cannot share CUDA tensors
    assert data_device(cpu, 100, num_workers=0) == cpu
    assert data_device(torch.device("mps"), 100, num_workers=0) == cpu


@pytest.mark.parametrize("on_device", [True, False])
def test_setup_keeps_every_split_where_data_device_says(
    data_root: Path, monkeypatch: pytest.MonkeyPatch, on_device: bool
) -> None:
    # The "meta" device stands in for a GPU: tensors there have shapes but no storage.
    calls = []

    def fake_data_device(device: torch.device, nbytes: int, num_workers: int) -> torch.device:
        calls.append((device, nbytes, num_workers))
        return torch.device("meta")

    monkeypatch.setattr("senet_pl.data.datamodule.data_device", fake_data_device)
    gpu = torch.device("cuda", 0)
    dm = _module(data_root, on_device=on_device)
    dm.trainer = SimpleNamespace(
        training=True, world_size=1, global_rank=0, precision="32-true", strategy=SimpleNamespace(root_device=gpu)
    )
    dm.setup("fit")
    dm.setup("test")
    where = "meta" if on_device else "cpu"
    for split in (dm.train_set, dm.val_set, dm.test_set):
        assert split.images.device.type == where and split.labels.device.type == where
    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.device.type == y.device.type == where  # batches are cut out where the data are
    if on_device:  # asked about the training GPU and all the data it would hold, the test split too
        assert calls[-1] == (gpu, (N_TRAIN + N_TEST) * (28 * 28 + 8), 0)  # uint8 pixels, int64 labels
    else:
        assert calls == []


def _epoch(sampler: EpochBatchSampler, epoch: int) -> list[tuple[int, list[int]]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_order_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochBatchSampler(50, 8, shuffle=True, seed=3), EpochBatchSampler(50, 8, shuffle=True, seed=3)
    epochs_a = [_epoch(a, e) for e in range(3)]
    assert _epoch(b, 2) == epochs_a[2]  # epoch 2 without running epochs 0 and 1 first
    assert epochs_a[0] != epochs_a[1]  # a new permutation every epoch
    for batches in epochs_a:
        assert sorted(i for _, idx in batches for i in idx) == list(range(50))
        assert len({seed for seed, _ in batches}) == len(batches) == 7  # one augmentation seed per batch
    assert _epoch(EpochBatchSampler(50, 8, shuffle=True, seed=4), 0) != epochs_a[0]


def test_sampler_resumes_part_way_into_an_epoch() -> None:
    full = _epoch(EpochBatchSampler(50, 8, shuffle=True, seed=3), 4)
    resumed = EpochBatchSampler(50, 8, shuffle=True, seed=3)
    resumed.resume(epoch=4, batches_done=3)
    assert list(resumed) == full[3:]  # neither replays nor skips a batch
    assert list(resumed) == full  # the skip applies to one iteration only
    resumed.resume(epoch=4, batches_done=3)
    assert _epoch(resumed, 5) == _epoch(EpochBatchSampler(50, 8, shuffle=True, seed=3), 5)  # nor to another epoch


def test_val_size_must_leave_training_images(data_root: Path) -> None:
    dm = _module(data_root, val_size=N_TRAIN)
    with pytest.raises(DataError, match="val_size"):
        dm.setup("fit")


def test_gz_files_are_decompressed(tmp_path: Path) -> None:
    raw = make_dataset(tmp_path, compress=True)
    dm = _module(tmp_path)
    dm.prepare_data()
    assert sorted(p.name for p in raw.iterdir() if not p.name.endswith(".gz")) == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]  # no temporary files left beside them
    dm.setup("test")
    images, _ = synthetic_split(N_TEST, seed=1)
    assert torch.equal(dm.test_set.images[:, 0], torch.from_numpy(images))


def test_read_only_gz_folder_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset(tmp_path, compress=True)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("senet_pl.data.idx.tempfile.mkstemp", read_only)  # the tests run as root: chmod would not stop them
    with pytest.raises(DataError, match=r"cannot decompress .*\(Permission denied\): copy the .gz files into "
                                        r"<folder>/MNIST/raw/ of a writable folder and pass it as --data.data_dir"):
        _module(tmp_path).prepare_data()


@pytest.mark.parametrize(("name", "folder"), [("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_siblings_use_their_folder_and_statistics(tmp_path: Path, name: str, folder: str) -> None:
    make_dataset(tmp_path, folder=folder)
    dm = _module(tmp_path, dataset=name, translate=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.in_channels == 1
    x, out, _ = _transform(dm, training=False)
    _, mean, std = DATASETS[name]
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)


def test_missing_files_without_download_name_what_to_do(tmp_path: Path) -> None:
    dm = _module(tmp_path / "nowhere")
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    message = str(err.value)
    for part in ("mnist", str(tmp_path / "nowhere" / "MNIST" / "raw"), "train-images-idx3-ubyte",
                 "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "--data.data_dir"):
        assert part in message
    assert "download is off" in message


def test_failed_download_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self):
        os.makedirs(self.raw_folder, exist_ok=True)  # as torchvision's does, before it downloads
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr("torchvision.datasets.MNIST.download", offline)
    dm = _module(tmp_path / "data", download=True)
    with pytest.raises(DataError, match="download failed.*Error downloading"):
        dm.prepare_data()
    assert not (tmp_path / "data").exists()  # the empty data/MNIST/raw/ it made was left behind


def _break(raw: Path, case: str) -> str:
    images = raw / "train-images-idx3-ubyte"
    if case == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
        return "truncated"
    if case == "header only":
        images.write_bytes(images.read_bytes()[:10])
        return "truncated"
    if case == "magic":
        write_idx(raw / "train-labels-idx1-ubyte", np.zeros((N_TRAIN, 28, 28), np.uint8))  # images where labels go
        return "magic number"
    if case == "count":
        write_idx(raw / "train-labels-idx1-ubyte", np.zeros(N_TRAIN - 1, np.uint8))
        return f"{N_TRAIN} images but .* {N_TRAIN - 1} labels"
    if case == "no images":  # a valid header of 0 images, and 0 labels: torchvision's reader failed on it
        write_idx(images, np.zeros((0, 28, 28), np.uint8))
        write_idx(raw / "train-labels-idx1-ubyte", np.zeros(0, np.uint8))
        return "train-images-idx3-ubyte holds no images"
    if case == "folder":
        images.unlink()
        images.mkdir()
        return "cannot read .*train-images-idx3-ubyte: Is a directory"
    if case == "corrupt gz":
        packed = gzip.compress(images.read_bytes())
        images.unlink()
        images.with_name(images.name + ".gz").write_bytes(packed[: len(packed) // 2])  # an interrupted download
        return "could not decompress"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated", "header only", "magic", "count", "no images", "folder", "corrupt gz"])
def test_bad_files_give_a_clear_error(data_root: Path, case: str) -> None:
    expected = _break(data_root / "MNIST" / "raw", case)
    with pytest.raises(DataError, match=expected) as err:
        _module(data_root).prepare_data()
    assert "MNIST/raw/train-" in str(err.value)  # names the file
    assert not [p for p in (data_root / "MNIST" / "raw").iterdir() if p.name.startswith(".")]  # no temporary files


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        MNISTDataModule(dataset="cifar")  # type: ignore[arg-type]


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("shuffle", [True, False], ids=["training", "evaluation"])
def test_sampler_shards_are_disjoint_and_cover_the_split(replicas: int, shuffle: bool) -> None:
    samplers = [EpochBatchSampler(50, 8, shuffle, seed=3, num_replicas=replicas, rank=r) for r in range(replicas)]
    shards = [_epoch(s, 1) for s in samplers]
    assert len({len(s) for s in shards}) == 1  # every process takes the same number of batches
    assert all(0 < len(idx) <= 8 for shard in shards for _, idx in shard)  # none empty, none too large
    samples = [i for shard in shards for _, idx in shard for i in idx]
    assert sorted(samples) == list(range(50))  # every image exactly once: nothing repeated, nothing dropped
    single = [i for _, idx in _epoch(EpochBatchSampler(50, 8, shuffle, seed=3), 1) for i in idx]
    first_step = [i for shard in shards for i in shard[0][1]]
    assert first_step == single[: replicas * 8]  # the first step: the single-process order, dealt out
    seeds = [seed for shard in shards for seed, _ in shard]
    assert len(set(seeds)) == len(seeds)  # every batch gets its own augmentation seed


@pytest.mark.parametrize(("length", "batch_size", "replicas"), [(80, 16, 3), (32, 16, 3), (50, 8, 3), (9, 2, 4), (7, 5, 7)])
def test_shards_take_the_same_number_of_steps_as_before_and_keep_one_process_unchanged(
    length: int, batch_size: int, replicas: int
) -> None:
    parts = [shard(length, batch_size, replicas, r) for r in range(replicas)]
    assert {len(p) for p in parts} == {-(-length // (replicas * batch_size))}
    assert sorted(i for p in parts for _, a, b in p for i in range(a, b)) == list(range(length))
    alone = shard(length, batch_size)
    assert [(a, b) for _, a, b in alone] == [(a, min(a + batch_size, length)) for a in range(0, length, batch_size)]


@pytest.mark.parametrize(("val_size", "batch_size", "message"), [
    (2, 8, "the validation split cannot be sharded: 2 image(s) for 3 processes: each process needs at least one; "
           "use --data.val_size 3 or more, or fewer processes."),
    (16, 1, "the validation split cannot be sharded: 16 images in batches of 1 do not divide evenly among 3 "
            "processes; use --data.batch_size 2 or more."),
])
def test_a_split_too_small_to_shard_is_one_line(data_root: Path, val_size: int, batch_size: int, message: str) -> None:
    dm = _module(data_root, val_size=val_size, batch_size=batch_size)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=False, world_size=3, global_rank=0, precision="32-true")
    with pytest.raises(DataError) as err:
        dm.val_dataloader()
    assert str(err.value) == message


@pytest.mark.parametrize("prefix", ["train", "t10k"])
def test_labels_out_of_range_name_the_file_index_and_value(data_root: Path, prefix: str) -> None:
    raw = data_root / "MNIST" / "raw"
    labels = synthetic_split(N_TRAIN if prefix == "train" else N_TEST, seed=0 if prefix == "train" else 1)[1]
    labels[[5, 7]] = 12  # a valid header: only the values are wrong
    write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    dm = _module(data_root)
    dm.prepare_data()
    with pytest.raises(DataError) as err:
        dm.setup("fit" if prefix == "train" else "test")  # when the split is loaded, before any training step
    message = str(err.value)
    assert f"MNIST/raw/{prefix}-labels-idx1-ubyte holds label 12 at index 5 " in message  # the first bad one
    assert "0..9" in message and "\n" not in message


@pytest.mark.parametrize("prefix", ["train", "t10k"])
def test_images_of_another_size_are_refused(data_root: Path, prefix: str) -> None:
    raw = data_root / "MNIST" / "raw"
    n = N_TRAIN if prefix == "train" else N_TEST
    write_idx(raw / f"{prefix}-images-idx3-ubyte", np.zeros((n, 32, 32), np.uint8))  # a valid header
    with pytest.raises(DataError, match=rf"MNIST/raw/{prefix}-images-idx3-ubyte holds 32x32 images, but mnist "
                                        r"images are 28x28: replace it"):
        _module(data_root).prepare_data()


def _gz_case(raw: Path, case: str) -> bytes:
    """The bytes of a damaged train-images .gz."""
    data = (raw / "train-images-idx3-ubyte").read_bytes()
    good = gzip.compress(data)
    labels = (raw / "train-labels-idx1-ubyte").read_bytes()
    return {
        "empty": b"",  # decompresses without an error, into nothing
        "truncated": good[: len(good) // 2],
        "not gzip": b"<html>404 Not Found</html>",
        "damaged stream": good[:10] + b"\xff" * 100,  # zlib.error, not an OSError
        "gzip of garbage": gzip.compress(b"garbage" * 1000),
        "wrong magic": gzip.compress(labels),  # a label file where the images go
        "truncated content": gzip.compress(data[:-100]),
    }[case]


@pytest.mark.parametrize("case", ["empty", "truncated", "not gzip", "damaged stream", "gzip of garbage",
                                  "wrong magic", "truncated content"])
def test_damaged_gz_leaves_no_file_and_a_good_copy_then_works(data_root: Path, case: str) -> None:
    raw = data_root / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    gz = images.with_name(images.name + ".gz")
    original = images.read_bytes()
    gz.write_bytes(_gz_case(raw, case))
    images.unlink()
    with pytest.raises(DataError, match=rf"could not decompress \S*/MNIST/raw/train-images-idx3-ubyte.gz: .* "
                                        r"Replace it with a complete copy\.$") as err:
        _module(data_root).prepare_data()
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in raw.iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte",
    ]  # neither a decompressed file nor a temporary one left behind
    gz.write_bytes(gzip.compress(original))  # the user replaces the download
    _module(data_root).prepare_data()
    assert images.read_bytes() == original


def test_a_signal_while_decompressing_leaves_no_partial_file(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM or Ctrl-C in the middle of a .gz left a hidden partial file of a random name in raw/."""
    raw = data_root / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    images.with_name(images.name + ".gz").write_bytes(gzip.compress(images.read_bytes()))
    images.unlink()

    def interrupted(src, dst, *args):
        dst.write(src.read(1000))
        raise KeyboardInterrupt  # as a signal's exception would, half-way

    monkeypatch.setattr(idx_module.shutil, "copyfileobj", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _module(data_root).prepare_data()
    assert not [p.name for p in raw.iterdir() if p.name.startswith(".") or p.name == images.name]


def _age(path: Path, seconds: int) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - seconds * 10**9))


@pytest.mark.parametrize("broken", [b"", b"\x00\x00\x08\x03"], ids=["empty", "header cut"])
def test_valid_gz_replaces_a_broken_decompressed_file_even_if_older(data_root: Path, broken: bytes) -> None:
    images = data_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    original = images.read_bytes()
    gz = images.with_name(images.name + ".gz")
    gz.write_bytes(gzip.compress(original))
    _age(gz, 60)
    images.write_bytes(broken)  # e.g. left by an earlier version from an empty .gz
    _module(data_root).prepare_data()
    assert images.read_bytes() == original


def test_newer_gz_is_decompressed_again_and_an_older_one_is_not(data_root: Path) -> None:
    images = data_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    gz = images.with_name(images.name + ".gz")
    newer = np.full((N_TRAIN, 28, 28), 7, np.uint8)
    write_idx(images, newer, compress=True)
    _age(images, 60)  # the user replaced the download after the file was decompressed
    _module(data_root).prepare_data()
    assert images.read_bytes()[16:] == newer.tobytes()
    decompressed = images.stat().st_mtime_ns
    _age(gz, 60)
    _module(data_root).prepare_data()
    assert images.stat().st_mtime_ns == decompressed  # a valid, newer decompressed file is used as it is


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_decompressed_files_get_the_mode_open_would_give(tmp_path: Path, umask: int) -> None:
    raw = make_dataset(tmp_path, compress=True)
    old = os.umask(umask)
    try:
        _module(tmp_path).prepare_data()
        (tmp_path / "opened").write_bytes(b"")
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "opened").stat().st_mode)
    assert expected == 0o666 & ~umask
    for path in raw.iterdir():
        if not path.name.endswith(".gz"):
            assert stat.S_IMODE(path.stat().st_mode) == expected, path.name


@pytest.mark.parametrize(("val_size", "sizes"), [(16, [8] * 10), (15, [8] * 9 + [9])])
def test_first_training_images_never_end_with_a_batch_of_one(data_root: Path, val_size: int, sizes: list[int]) -> None:
    """The weight average's batch-norm statistics are measured on these batches in training mode, which refuses a
    single image at a 1x1 map (the imagenet stem at 32 px): a last batch of one joins the one before."""
    dm = MNISTDataModule(data_dir=str(data_root), batch_size=8, val_size=val_size, download=False)
    dm.setup("fit")
    batches = dm.first_training_images(4096)
    assert [len(b) for b in batches] == sizes  # 96 - val_size images, in order
    assert torch.equal(torch.cat(batches), dm.train_set.images)
    assert [len(b) for b in dm.first_training_images(17)] == [8, 9]
