"""Does SE help, and at what cost? ``python -m senet_pl.tools.study --data_dir DIR [--dataset ...]``.

Trains the plain ResNet and SE-ResNets with reduction ratios r (the paper's Table 7 varies it)
for several seeds with one recipe, tests each run's final weights on the official test split,
and writes a Markdown table: test accuracy mean +/- standard deviation over the seeds,
parameters, forward FLOPs per image (``torch.utils.flop_counter``), training images/s.
Every run goes through the project's CLI (``fit`` then ``test``) and logs to TensorBoard as
``lightning_logs/study_<dataset>/<variant>_seed<N>`` (the plain ResNet's in ``study_<dataset>_no_se``).
"""

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from jsonargparse.typing import PositiveInt
from torch.utils.flop_counter import FlopCounterMode

from senet_pl.data import DatasetName
from senet_pl.tools import run_as_cli
from senet_pl.tools.clock import TrainingClock

REPO = Path(__file__).resolve().parents[2]


def forward_flops(model: torch.nn.Module, in_channels: int, image_size: int) -> int:
    """FLOPs of one image's forward pass as torch.utils.flop_counter counts them (a multiply-add is 2;
    convolutions and matrix products only: the SE scaling, BatchNorm, ReLU and pooling are not counted)."""
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with counter, torch.no_grad():
        model(torch.zeros(1, in_channels, image_size, image_size))
    model.train(was_training)
    return counter.get_total_flops()


def _run(args: list[str]) -> dict:
    """fit then test one configuration through the CLI, in this process."""
    from senet_pl.cli import SENetCLI

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args and sys.argv
    try:
        cli = SENetCLI(args=args, run=False)
    finally:
        sys.argv = argv
    clock = TrainingClock()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)  # the final weights
    model = cli.model.model
    return {
        "acc": metrics["test/acc"],
        "params": sum(p.numel() for p in model.parameters()),
        "flops": forward_flops(model.cpu(), cli.datamodule.in_channels, cli.datamodule.hparams.image_size),
        "images_per_s": clock.images_per_s,
    }


def study(
    data_dir: str = "data",
    dataset: DatasetName = "mnist",
    config: str = str(REPO / "configs" / "mnist.yaml"),
    seeds: PositiveInt = 2,
    epochs: PositiveInt = 1,
    reductions: list[PositiveInt] = [4, 8, 16, 32],
    train_batches: PositiveInt | None = None,
    val_size: PositiveInt = 5000,
    out: str | None = None,
    args: list[str] = [],
) -> str:
    """Train ResNet and SE-ResNets (one per reduction ratio) for several seeds; write a Markdown table.

    Args:
        data_dir: torchvision root of the dataset (as --data.data_dir).
        dataset: mnist, fashion_mnist or kmnist.
        config: the recipe every run starts from; the options below override it.
        seeds: runs per model, with seeds 0..seeds-1 (the seed sets initialization, order and shifts).
        epochs: training epochs per run; the recipe's cosine schedule is stretched to match.
        reductions: SE reduction ratios r to compare with the plain ResNet.
        train_batches: training batches per epoch (default: the whole training split).
        val_size: images held out of the training split for validation.
        out: Markdown file to write (default: study_<dataset>.md).
        args: further CLI options for every run, e.g. ["--data.batch_size=64"].
    """
    variants = [("ResNet", ["--model.se=false"])]
    variants += [(f"SE-ResNet r={r}", ["--model.se=true", f"--model.reduction={r}"]) for r in reductions]
    common = [
        f"--config={config}",
        f"--data.dataset={dataset}",
        f"--data.data_dir={data_dir}",
        f"--data.val_size={val_size}",
        "--data.download=false",
        f"--trainer.max_epochs={epochs}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--checkpoint.save_top_k=0",  # only last.ckpt: a study writes many runs
        *([f"--trainer.limit_train_batches={train_batches}"] if train_batches else []),
        *args,
    ]
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    for name, options in variants:
        for seed in range(seeds):
            tag = name.replace("SE-ResNet r=", "se_r").lower()
            logger = [f"--trainer.logger.init_args.name=study_{dataset}", f"--trainer.logger.init_args.version={tag}_seed{seed}"]
            result = _run([*common, *options, f"--seed_everything={seed}", *logger])
            results.setdefault(name, []).append(result)
            print(f"{name}, seed {seed}: test/acc {result['acc']:.4f}, {result['images_per_s']:.1f} img/s",
                  file=sys.stderr, flush=True)
    minutes = (time.perf_counter() - started) / 60
    table = _table(results, dataset, seeds, epochs, train_batches, minutes, sys.argv[1:])
    path = Path(out or f"study_{dataset}.md")
    path.write_text(table)
    print(table)
    print(f"written to {path}", file=sys.stderr)
    return table


def _table(results: dict[str, list[dict]], dataset: str, seeds: int, epochs: int, train_batches: int | None,
           minutes: float, argv: list[str]) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{_cpu_name()}, {os.cpu_count()} cores"
    lines = [
        f"**{dataset}**: {epochs} epoch(s), {seeds} seed(s) per model"
        + (f", {train_batches} training batches per epoch" if train_batches else "")
        + f"; {minutes:.0f} min on {device}, torch {torch.__version__}.",
        f"Command: `python -m senet_pl.tools.study {' '.join(argv)}`",
        "",
        "| model | parameters | forward GFLOPs/image | test accuracy (%) | per seed (%) | training images/s |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, runs in results.items():
        accs = [100 * r["acc"] for r in runs]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        speed = statistics.mean(r["images_per_s"] for r in runs)
        lines.append(
            f"| {name} | {runs[0]['params']:,} | {runs[0]['flops'] / 1e9:.4f} | {statistics.mean(accs):.2f}{spread} "
            f"| {', '.join(f'{a:.2f}' for a in accs)} | {speed:.1f} |"
        )
    lines.append("")
    lines.append("Accuracy: the final weights on the official test split; ± is the sample standard deviation "
                 "over seeds. FLOPs: convolutions and matrix products of one forward pass (a multiply-add is 2).")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    run_as_cli(study)
