"""What the SE gates do: ``python -m senet_pl analyze --ckpt_path X`` (Sec. 7.2 and Fig. 6 of the paper).

The excitation of an SE block is its gate vector s = sigma(W_2 delta(W_1 z)), one value in (0, 1)
per channel (``SEBlock.scale_activation``'s output). The paper averages it per class over the
ImageNet validation set for the last block of several stages and finds early blocks class-agnostic
(every class excites the channels alike) and later ones increasingly class-specific, with the
very last ones close to saturation. ``ExcitationAnalysis`` measures the same on a test run.
"""

import csv
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as L
import torch

from senet_pl.model import SEBlock, SEResNet

# A block is called class-specific when its class-mean excitations differ by at least this much
# (mean over channels of the standard deviation across classes, in gate units of 0..1).
SPECIFIC_SPREAD = 0.05


def paper_name(block: str) -> str:
    """``layer3.1`` -> ``SE_4_2``: the paper counts stages as conv2_x..conv5_x and blocks from 1."""
    layer, index = block.split(".")[:2]
    return f"SE_{int(layer.removeprefix('layer')) + 1}_{int(index) + 1}"


def se_blocks(model: SEResNet, last_per_stage: bool = False) -> dict[str, SEBlock]:
    """The model's SE blocks by residual-block name (``layer1.0``), optionally only each stage's last."""
    blocks = {name.removesuffix(".se"): m for name, m in model.named_modules() if isinstance(m, SEBlock)}
    if last_per_stage:
        last = {name.split(".")[0]: name for name in blocks}  # dicts keep order: the last one wins
        blocks = {name: blocks[name] for name in last.values()}
    return blocks


@contextmanager
def recording_gates(blocks: dict[str, SEBlock], record: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``record(name, gates)`` with each block's (N, C) gate values on every forward pass."""

    def hook(name: str):
        return lambda module, inputs, output: record(name, output.detach().flatten(1))

    handles = [block.scale_activation.register_forward_hook(hook(name)) for name, block in blocks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ExcitationAnalysis(L.Callback):
    """During ``test``: the mean excitation per class and channel of each stage's last SE block.

    At the end it writes ``excitation.csv`` (block, class, channel, mean excitation; class "all" is
    every image), ``excitation.png`` (the paper's Fig. 6: a panel per block, a line per class) and
    ``excitation.txt`` (which blocks are class-agnostic and which class-specific) to the run folder,
    logs the figure to TensorBoard, and prints the summary.
    """

    def __init__(self, class_names: list[str] | None = None) -> None:
        self.class_names = class_names
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: torch.Tensor | None = None
        self._gates: dict[str, torch.Tensor] = {}
        self._recording = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        blocks = se_blocks(pl_module.model, last_per_stage=True)
        if not blocks:
            raise ValueError("the model has no SE blocks (se: false): there is no excitation to analyze.")
        self.sums, self.counts = {}, None
        self._recording = recording_gates(blocks, self._gates.__setitem__)
        self._recording.__enter__()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        labels = batch[1]
        classes = pl_module.hparams.num_classes
        if self.counts is None:
            self.counts = torch.zeros(classes, dtype=torch.float64, device=labels.device)
        self.counts += torch.bincount(labels, minlength=classes)
        for name, gates in self._gates.items():
            total = self.sums.setdefault(name, torch.zeros(classes, gates.shape[1], dtype=torch.float64, device=gates.device))
            total.index_add_(0, labels, gates.double())
        self._gates.clear()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._recording.__exit__(None, None, None)
        # Sum over processes (every rank saw its own shard of the test split).
        counts = trainer.strategy.reduce(self.counts, reduce_op="sum")
        sums = {name: trainer.strategy.reduce(s, reduce_op="sum") for name, s in self.sums.items()}
        if not trainer.is_global_zero:
            return
        means = {name: self.class_means(s, counts) for name, s in sums.items()}
        names = self.class_names or [str(k) for k in range(len(counts))]
        folder = Path(trainer.log_dir or ".")
        folder.mkdir(parents=True, exist_ok=True)
        write_csv(folder / "excitation.csv", means, names)
        summary = describe(means, names)
        (folder / "excitation.txt").write_text(summary + "\n")
        from senet_pl.figures import excitation_figure  # matplotlib only when a figure is drawn

        figure = excitation_figure(means, names)
        figure.savefig(folder / "excitation.png", dpi=120)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("excitation/per_class", figure, trainer.global_step)
        print(summary)
        print(f"excitation analysis written to {folder}/excitation.{{png,csv,txt}}", file=sys.stderr)

    @staticmethod
    def class_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(classes + 1, C): the mean gate per class (classes without images: NaN), then over all images."""
        per_class = sums / counts[:, None]
        overall = sums.sum(0, keepdim=True) / counts.sum()
        return torch.cat([per_class, overall]).float().cpu()


def spread(means: torch.Tensor) -> float:
    """Mean over channels of the standard deviation across classes of the class-mean excitation."""
    per_class = means[:-1]
    per_class = per_class[~per_class.isnan().any(dim=1)]
    return per_class.std(dim=0, unbiased=False).mean().item() if len(per_class) > 1 else 0.0


def describe(means: dict[str, torch.Tensor], class_names: list[str]) -> str:
    """In words: per block, the mean gate, the spread across classes and what it means."""
    lines = [
        f"Excitation of the last SE block of each stage, averaged per class ({len(class_names)} classes).",
        "spread = mean over channels of the standard deviation across classes of the class-mean excitation;",
        f"a block is called class-specific at spread >= {SPECIFIC_SPREAD}, class-agnostic below.",
    ]
    for name, m in means.items():
        s, overall = spread(m), m[-1]
        kind = "class-specific" if s >= SPECIFIC_SPREAD else "class-agnostic"
        near_one = (overall > 0.9).float().mean().item()
        lines.append(
            f"  {paper_name(name)} ({name}, {m.shape[1]} channels): mean gate {overall.mean():.3f}, "
            f"spread {s:.3f} -> {kind}; {near_one:.0%} of channels average above 0.9"
        )
    return "\n".join(lines)


def write_csv(path: Path, means: dict[str, torch.Tensor], class_names: list[str]) -> None:
    """One row per (block, class, channel); class "all" is the mean over every image."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["block", "paper_name", "class", "channel", "mean_excitation"])
        for name, m in means.items():
            for k, label in enumerate([*class_names, "all"]):
                for c, value in enumerate(m[k].tolist()):
                    writer.writerow([name, paper_name(name), label, c, f"{value:.6f}"])

