"""Does SE help, and at what cost? ``python -m senet_pl.tools.study --data_dir DIR [--dataset ...]``.

Trains the plain ResNet and SE-ResNets with reduction ratios r (the paper's Table 7 varies it)
for several seeds with one recipe, tests each run's final weights on the official test split,
and writes a Markdown table: test accuracy mean +/- standard deviation over the seeds,
parameters, forward FLOPs per image (``torch.utils.flop_counter``), training images/s.
The runs go seed by seed (every model with seed 0, then seed 1 ...), so that a study cut short by
``--budget_s`` (the GPU campaign's) still compares every model; ``--json`` keeps every run as it ends.
Every run goes through the project's CLI (``fit`` then ``test``) and logs to TensorBoard as
``lightning_logs/study_<dataset>/<variant>_seed<N>`` (the plain ResNet's in ``study_<dataset>_no_se``).
"""

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from torch.utils.flop_counter import FlopCounterMode

from senet_pl.data import DatasetName
from senet_pl.runs import CLIError
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
    folder = Path(cli.trainer.log_dir)
    if any(folder.glob("checkpoints/*.ckpt")):  # the runs' folders are named by model and seed, not numbered
        study = folder.parent.name.removesuffix("_no_se")  # the SE-ResNets' runs; the plain ResNet's: _no_se
        raise CLIError(f"{folder} holds a run of an earlier study, which this one would replace: move {study} and "
                       f"{study}_no_se out of {folder.parent.parent}, or run the study in another folder.")
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
    json_out: str | None = None,
    budget_s: PositiveFloat | None = None,
    args: list[str] = [],
) -> str:
    """Train ResNet and SE-ResNets (one per reduction ratio) for several seeds; write a Markdown table.

    Args:
        data_dir: torchvision root of the dataset (as --data.data_dir).
        dataset: mnist, fashion_mnist or kmnist.
        config: the recipe every run starts from; the options below override it.
        seeds: runs per model, with seeds 0..seeds-1 (the seed sets initialization, order and shifts).
        epochs: training epochs per run; the recipe's cosine spans the run (its length comes from the trainer).
        reductions: SE reduction ratios r to compare with the plain ResNet.
        train_batches: training batches per epoch (default: the whole training split).
        val_size: images held out of the training split for validation.
        out: Markdown file to write (default: study_<dataset>.md).
        json_out: JSON file rewritten after every run: the settings, every run so far, and the table.
        budget_s: start no run that would end after this many seconds from the start (a run is assumed to
            take as long as the longest so far); the table says how many of the planned runs ran.
        args: further CLI options for every run, e.g. ["--data.batch_size=64"].
    """
    twice = sorted({r for r in reductions if reductions.count(r) > 1})
    if twice:  # its second run would find the first one's folder, after both had trained
        raise CLIError(f"--reductions lists {', '.join(map(str, twice))} more than once: give each ratio once.")
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
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    runs: list[dict] = []
    planned = len(variants) * seeds
    started = time.perf_counter()
    stopped = None
    for seed in range(seeds):  # seed by seed: a study cut short still has every model
        for name, options in variants:
            elapsed = time.perf_counter() - started
            longest = max((r["seconds"] for r in runs), default=0.0)
            if budget_s is not None and runs and elapsed + longest > budget_s:
                stopped = f"budget: {len(runs)} of {planned} runs in {elapsed:.0f} s of {budget_s:.0f} s"
                break
            tag = name.replace("SE-ResNet r=", "se_r").lower()
            logger = [f"--trainer.logger.init_args.name=study_{dataset}", f"--trainer.logger.init_args.version={tag}_seed{seed}"]
            begun = time.perf_counter()
            result = _run([*common, *options, f"--seed_everything={seed}", *logger])
            result |= {"model": name, "seed": seed, "seconds": time.perf_counter() - begun}
            results[name].append(result)
            runs.append(result)
            print(f"{name}, seed {seed}: test/acc {result['acc']:.4f}, {result['images_per_s']:.1f} img/s",
                  file=sys.stderr, flush=True)
            if json_out:
                _write_json(json_out, runs, planned, None, None)
        if stopped:
            print(f"stopped by the {stopped}", file=sys.stderr, flush=True)
            break
    minutes = (time.perf_counter() - started) / 60
    results = {name: r for name, r in results.items() if r}
    table = _table(results, dataset, seeds, epochs, train_batches, minutes, sys.argv[1:], stopped)
    path = Path(out or f"study_{dataset}.md")
    path.write_text(table)
    if json_out:
        _write_json(json_out, runs, planned, stopped, table)
    print(table)
    print(f"written to {path}", file=sys.stderr)
    return table


def _write_json(path: str, runs: list[dict], planned: int, stopped: str | None, table: str | None) -> None:
    """The runs so far (and, at the end, the table), replaced whole so that a reader never sees half a file."""
    data = {"planned_runs": planned, "completed_runs": len(runs), "stopped": stopped, "finished": table is not None,
            "command": ["python", "-m", "senet_pl.tools.study", *sys.argv[1:]], "runs": runs, "table": table}
    partial = Path(f"{path}.partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    partial.replace(path)


def _table(results: dict[str, list[dict]], dataset: str, seeds: int, epochs: int, train_batches: int | None,
           minutes: float, argv: list[str], stopped: str | None = None) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{_cpu_name()}, {os.cpu_count()} cores"
    lines = [
        f"**{dataset}**: {epochs} epoch(s), {seeds} seed(s) per model"
        + (f", {train_batches} training batches per epoch" if train_batches else "")
        + f"; {minutes:.0f} min on {device}, torch {torch.__version__}."
        + (f" Stopped by the {stopped}." if stopped else ""),
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
