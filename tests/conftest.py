"""Synthetic MNIST-format data and image folders, built per test, so the suite never needs the network."""

import contextlib
import gzip
import io
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

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


REPO = Path(__file__).resolve().parents[1]

# configs/mnist.yaml on the synthetic data, shrunk to seconds on a CPU: batches of 8, 16 images
# held out (80 left for training: 10 batches an epoch), 3 training and 2 validation batches.
# Images resized to 8x8 (SMALL) keep the recipe's SE-ResNet-18, every block and all 11M weights, with 12x fewer
# multiply-adds per image than 28x28 (forward and backward of a batch of 8: 0.18 s instead of 0.48 s on one AVX2 core);
# test_gpu.py drops SMALL to test the kernels of the native size.
# Tests that need whole epochs drop the first limit with FULL_EPOCHS.
SMALL = "--data.image_size=8"
TINY = [
    f"--config={REPO / 'configs' / 'mnist.yaml'}",
    SMALL,
    "--data.data_dir=data",
    "--data.download=false",
    "--data.batch_size=8",
    "--data.val_size=16",
    "--trainer.accelerator=cpu",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
FULL_EPOCHS = [a for a in TINY if not a.startswith("--trainer.limit_train_batches")]


# Tests that use these fixtures, or live in these modules, train models or run the CLI: marked slow.
SLOW_FIXTURES = {"trained", "one_epoch", "run_copy", "uninterrupted", "uninterrupted_short"}
SLOW_MODULES = {"test_checkpoints", "test_ddp", "test_bench", "test_study", "test_cli", "test_resume", "test_export",
                "test_gpu"}
# The tools' end-to-end runs (bench, campaign, study: each case or run in its own process) are also marked
# tools: about 5 minutes of CPU on 2 cores, which CI (the README's test command) leaves out to stay in its
# 15 minutes; their unit tests stay in. `pytest -m tools` runs them.
TOOLS = {"test_bench_prints_every_row", "test_bench_inference_rows", "test_the_whole_campaign_writes_measured_results",
         "test_budgets_failures_and_no_time_left", "test_sigterm_stops_the_running_part_and_writes_what_was_measured",
         "test_a_test_that_fails_after_fit_keeps_the_training_record",
         "test_study_runs_every_model_and_seed_and_writes_the_table"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if item.originalname in TOOLS:
            item.add_marker(pytest.mark.tools)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores (pytest -n): one thread each, for them and the CLI processes
    # they start, instead of every process running a thread per core.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own empty folder (in-process CLI calls write lightning_logs/ there),
    with no pytest arguments in sys.argv."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["senet_pl"])


@pytest.fixture(autouse=True)
def ctrl_c_is_delivered() -> None:
    """Ctrl-C as in a terminal. pytest started as a shell script's background job (CI) ignores SIGINT, and the CLI
    leaves an ignored Ctrl-C ignored; the tests that send one need it delivered (subprocesses too: they inherit
    an ignored signal, not a handler)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def cli(*args: str) -> str | None:
    """``python -m senet_pl ARGS`` in this process; the error message, or None on success."""
    from senet_pl.cli import main

    try:
        main(list(args))
    except SystemExit as exit_:
        return str(exit_.code) if exit_.code else None
    return None


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars of a run folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m senet_pl ARGS`` in CWD, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "senet_pl", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def run_here(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``run`` in this process: the same exit code, stdout and the messages the CLI prints to stderr, without the
    seconds of starting Python and importing torch and Lightning for each command (about 8 s on a 2-core AVX2 CPU).
    Not what Python's warnings and Lightning's log lines print (pytest records those): tests of them, of signals,
    and of what a real process does use ``run``."""
    from senet_pl.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
    except SystemExit as exit_:  # as Python's own exit: a message goes to stderr and exits with 1
        code = exit_.code if isinstance(exit_.code, int) else 1 if exit_.code else 0
        if isinstance(exit_.code, str):
            err.write(exit_.code + "\n")
    finally:
        os.chdir(previous)
    command = ["python", "-m", "senet_pl", *args]
    return subprocess.CompletedProcess(command, code, out.getvalue(), err.getvalue())


# -- image files, for predict_dir ------------------------------------------------------------------


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
