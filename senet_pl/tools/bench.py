"""Benchmarks, side by side on whatever device is present: ``python -m senet_pl.tools.bench --data_dir DIR``.

1. data path: images/s delivered by the tutorial-style pipeline (per-sample PIL ``Resize``,
   ``ToTensor``, ``Normalize`` in a DataLoader, batch 32) and by this project's (uint8 tensors in
   memory, one indexing per batch, conversion/shift/resize/normalization on the device), at 28 and 224;
2. training: images/s of the tutorial-style loop (fp32, NCHW, tutorial data pipeline, plain PyTorch)
   and of this project's ``fit`` (Lightning Trainer with the default recipe's settings), same model;
3. Lightning overhead: ``fit`` against a plain PyTorch loop doing the same work (same data path,
   precision, memory format, optimizer, metric);
4. peak memory of each case: CPU max RSS, and ``torch.cuda.max_memory_allocated`` on a GPU;
5. with ``--compile``: ``fit`` with and without ``torch.compile``;
6. with ``--inference true``: CPU inference, PyTorch eager vs ONNX Runtime (``latency.py``);
   ``--training false`` leaves out 1-5.

Every case runs in its own process, so that its peak memory is its own. Timings skip warm-up steps.
Each pair runs ``--repeats`` times, left and right alternately; the table gives medians.
"""

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from senet_pl.precision import input_dtype, resolve_precision
from senet_pl.tools import run_as_cli
from senet_pl.tools.process import run_process


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _datamodule(args: SimpleNamespace, size: int, batch: int, place: bool = True):
    """The training data as ``fit`` sets it up for one process; with ``place``, kept where fit keeps it
    for a model on this device (GPU memory on a CUDA GPU)."""
    from senet_pl.data import MNISTDataModule

    dm = MNISTDataModule(
        data_dir=args.data_dir, image_size=size, batch_size=batch, val_size=args.val_size, download=False
    )
    dm.prepare_data()
    dm.setup("fit")
    if place:
        dm.place_datasets(_device())
    return dm


def _transformed(dm, b: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch as fit delivers it to the model: on the device, transformed, in the recipe's dtype."""
    dtype = input_dtype(_precision(device))
    return dm.transform_batch(b[0].to(device), training=True, dtype=dtype, seed=b[2]), b[1].to(device)


def _tutorial_loader(args: SimpleNamespace, size: int, batch: int):
    """The original tutorial's input pipeline: per-sample PIL transforms in a DataLoader."""
    from torch.utils.data import DataLoader
    from torchvision import transforms
    from torchvision.datasets import MNIST

    steps = [transforms.Resize(size)] if size != 28 else []
    transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = MNIST(args.data_dir, train=True, transform=transform, download=False)
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=args.workers)


def _timed(batches, steps: int, warmup: int, step, device: torch.device) -> float:
    """Images per second of ``step(batch)`` over ``steps`` batches after ``warmup`` batches."""
    iterator = iter(batches)
    for _ in range(warmup):
        step(next(iterator))
    _sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += step(next(iterator))
    _sync(device)
    return images / (time.perf_counter() - start)


def _endless(loader):
    while True:
        yield from loader


def case_data(args: SimpleNamespace, kind: str, size: int, batch: int) -> float:
    device = _device()
    if kind == "tutorial":
        loader = _tutorial_loader(args, size, batch)

        def step(b):
            b[0].to(device)
            return len(b[1].to(device))
    else:
        dm = _datamodule(args, size, batch)
        loader = dm.train_dataloader()

        def step(b):
            return len(_transformed(dm, b, device)[1])

    return _timed(_endless(loader), args.data_steps, 2, step, device)


def _model(channels_last: bool):
    from senet_pl.model import SEResNet

    model = SEResNet(depth=18, stem="cifar", in_channels=1, num_classes=10).to(_device())
    return model.to(memory_format=torch.channels_last) if channels_last else model


def case_train(args: SimpleNamespace, kind: str, size: int, batch: int) -> float:
    device = _device()
    steps, warmup = (args.steps, 2) if size <= 64 else (args.steps_224, 1)
    if kind in ("fit", "fit_compiled"):
        return _fit(args, size, batch, steps, warmup, compile=kind == "fit_compiled")
    torch.manual_seed(0)
    if kind == "tutorial":  # fp32, NCHW, SGD as in the tutorial, its data pipeline
        model, loader = _model(channels_last=False), _endless(_tutorial_loader(args, size, batch))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)

        def step(b):
            x, y = b[0].to(device), b[1].to(device)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return len(y)

        return _timed(loader, steps, warmup, step, device)

    # "plain": exactly the work of this project's fit, in a plain loop
    from torchmetrics.classification import MulticlassAccuracy

    from senet_pl.module import default_optimizer

    dm = _datamodule(args, size, batch)
    model = _model(channels_last=True)
    optimizer = default_optimizer(model.parameters())
    accuracy = MulticlassAccuracy(10, average="micro").to(device)
    dtype = input_dtype(_precision(device))
    mixed = dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(b):
        x, y = _transformed(dm, b, device)
        with torch.autocast(device.type, dtype=dtype, enabled=mixed):
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = torch.nn.functional.cross_entropy(logits, y)
        accuracy(logits, y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return len(y)

    return _timed(_endless(dm.train_dataloader()), steps, warmup, step, device)


def _precision(device: torch.device) -> str:
    """What the default recipe's ``bf16-mixed`` becomes on this hardware."""
    if device.type == "cuda":
        return resolve_precision("bf16-mixed", "gpu", [device.index or 0])
    return resolve_precision("bf16-mixed", "cpu")


def _fit(args: SimpleNamespace, size: int, batch: int, steps: int, warmup: int, compile: bool = False) -> float:
    """This project's fit path: the default recipe's settings, timed by a callback between batches."""
    import lightning.pytorch as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from senet_pl.module import SEResNetClassifier
    from senet_pl.tools.clock import TrainingClock

    dm = _datamodule(args, size, batch, place=False)  # the Trainer places it, on its device
    model = SEResNetClassifier(depth=18, stem="cifar", compile=compile)  # the recipes' optimizer is its default
    clock = TrainingClock(warmup)
    device = _device()
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            max_steps=warmup + steps,
            limit_val_batches=0,
            precision=_precision(device),
            logger=TensorBoardLogger(logs, name="bench"),
            enable_checkpointing=False,
            enable_model_summary=False,
            benchmark=args.cudnn_benchmark,
            callbacks=[clock],
        )
        trainer.fit(model, datamodule=dm)
    return clock.images_per_s


def _run_case(name: str, argv: list[str], timeout: float | None = None) -> dict:
    """One case in a fresh process; returns its images/s and peak memory (and the process's wall time)."""
    result = run_process(["python", "-m", "senet_pl.tools.bench", "--case", name, *argv], timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.timed_out:
        raise SystemExit(f"benchmark case {name} did not finish within {timeout:.0f} s")
    if result.returncode or not lines:
        raise SystemExit(f"benchmark case {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1]) | {"seconds": result.seconds}


def _one_case(args: SimpleNamespace) -> None:
    section, kind, size, batch = args.case.split(":")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    function = case_data if section == "data" else case_train
    images_per_s = function(args, kind, int(size), int(batch))
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"images_per_s": images_per_s, "rss_mb": rss, "gpu_mb": gpu}))


def bench(
    data_dir: str = "data",
    val_size: PositiveInt = 1000,
    batch_28: PositiveInt = 128,
    steps: PositiveInt = 8,
    steps_224: PositiveInt = 2,
    data_steps: PositiveInt = 300,
    workers: NonNegativeInt = 0,
    compile: bool = False,
    skip_224_training: bool = False,
    repeats: PositiveInt = 3,
    training: bool = True,
    inference: bool = False,
    latency_runs: PositiveInt = 200,
    inference_batch: PositiveInt = 256,
    cudnn_benchmark: bool = False,
    case: str | None = None,
) -> None:
    """Benchmark the data path, training throughput, Lightning overhead and peak memory, side by side.

    Args:
        data_dir: torchvision root holding MNIST/raw/ (.gz files are decompressed on first use).
        val_size: images held out of the training split, as in training (they are not used here).
        batch_28: batch size of the 28x28 training rows.
        steps: timed training steps at 28x28 (after 2 warm-up steps).
        steps_224: timed training steps at 224x224, batch 32 (after 1 warm-up step).
        data_steps: timed batches of the data-path rows (this project's path delivers 300 batches of 32
            at 224x224 in about a quarter of a second here: fewer make the timing window too short).
        workers: DataLoader worker processes of the tutorial-style pipeline.
        compile: add a row comparing fit with and without torch.compile.
        skip_224_training: leave out the slow 224x224 training rows.
        repeats: run each pair this many times, left and right alternately, and report the medians:
            on a shared or throttling machine one short run can be off by 10%.
        training: the data-path, training and Lightning rows (1-5 above).
        inference: the CPU inference rows: single-image latency p50/p99 and batch throughput, PyTorch eager vs
            ONNX Runtime, fp32, and the files' sizes (needs the export extra).
        latency_runs: single-image calls timed for the latency percentiles.
        inference_batch: the batch of the throughput row.
        cudnn_benchmark: let cuDNN time its convolution algorithms on the first batches and keep the fastest
            (``torch.backends.cudnn.benchmark``; the Trainer's ``benchmark``); GPU only.
        case: internal: run one case in this process and print its result as JSON.
    """
    args = SimpleNamespace(**locals())
    if case:
        return _one_case(args)
    if inference:
        from senet_pl.tools.latency import inference_table

        print(inference_table(latency_runs, batch=inference_batch) + "\n")
    if not training:
        return

    _datamodule(args, 28, batch_28, place=False)  # a clear error before any timing (no files, too large a val_size)
    argv = sys.argv[1:]
    rows = []

    def pair(label: str, left: str, right: str) -> None:
        # Alternating keeps both sides of each repeat close in time, so a slow spell of the machine
        # hits both; each repeat's ratio is taken within the repeat.
        runs = []
        for _ in range(repeats):
            a, c = _run_case(left, argv), _run_case(right, argv)
            runs.append((a, c))
            print(f"  {label}: {a['images_per_s']:.1f} vs {c['images_per_s']:.1f} img/s", file=sys.stderr, flush=True)
        rows.append((label, runs))

    device = _device()
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"{os.cpu_count()} CPU threads, torch {torch.__version__}", file=sys.stderr)
    b = batch_28
    pair("data path, 28x28, batch 32", "data:tutorial:28:32", "data:ours:28:32")
    pair("data path, 224x224, batch 32", "data:tutorial:224:32", "data:ours:224:32")
    pair(f"training, 28x28, batch {b}: tutorial loop vs fit", f"train:tutorial:28:{b}", f"train:fit:28:{b}")
    if not skip_224_training:
        pair("training, 224x224, batch 32: tutorial loop vs fit", "train:tutorial:224:32", "train:fit:224:32")
    pair(f"Lightning overhead, 28x28, batch {b}: plain loop vs fit", f"train:plain:28:{b}", f"train:fit:28:{b}")
    if compile:
        pair(f"torch.compile, 28x28, batch {b}: fit vs compiled fit", f"train:fit:28:{b}", f"train:fit_compiled:28:{b}")

    def memory(m: dict) -> str:
        gpu = f" / GPU {m['gpu_mb']:.0f} MB" if m["gpu_mb"] is not None else ""
        return f"{m['rss_mb']:.0f} MB{gpu}"

    def rate(value: float) -> str:  # 224x224 training on a CPU is below 1 img/s
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"

    def peak(side: list[dict]) -> dict:
        gpu = [m["gpu_mb"] for m in side if m["gpu_mb"] is not None]
        return {"rss_mb": max(m["rss_mb"] for m in side), "gpu_mb": max(gpu) if gpu else None}

    print(f"\n{repeats} run(s) of each pair, left and right alternately: img/s and ratio are medians, "
          "the ratio's range is over the runs, memory is the highest peak.")
    print(f"\n| {'measurement (left vs right)':57s} | left img/s | right img/s | right/left | ratio range "
          "| peak memory left | peak memory right |")
    print(f"|{'-' * 59}|-----------:|------------:|-----------:|---|---|---|")
    for label, runs in rows:
        lefts, rights = [a for a, _ in runs], [c for _, c in runs]
        ratios = [c["images_per_s"] / a["images_per_s"] for a, c in runs]
        left, right = (statistics.median(m["images_per_s"] for m in side) for side in (lefts, rights))
        print(f"| {label:57s} | {rate(left):>10s} | {rate(right):>11s} | {statistics.median(ratios):9.2f}x "
              f"| {min(ratios):.2f}-{max(ratios):.2f}x | {memory(peak(lefts))} | {memory(peak(rights))} |")


if __name__ == "__main__":
    run_as_cli(bench)
