"""The SE gates of a model (plain PyTorch): finding the SE blocks, recording their gate values, the paper's
block names, and the statistics of the excitation analysis (Sec. 7.2 and Fig. 6 of the paper).

The excitation of an SE block is its gate vector s = sigma(W_2 delta(W_1 z)), one value in (0, 1)
per channel (``SEBlock.scale_activation``'s output). The paper averages it per class over the
ImageNet validation set for the last block of several stages and finds early blocks class-agnostic
(every class excites the channels alike) and later ones increasingly class-specific, with the
very last ones close to saturation.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
    first = next(iter(means.values()), None)
    unseen = [n for k, n in enumerate(class_names) if first is not None and first[k].isnan().any()]
    missing = f"; {len(unseen)} without images, left out: {', '.join(unseen)}" if unseen else ""
    lines = [
        f"Excitation of the last SE block of each stage, averaged per class ({len(class_names)} classes{missing}).",
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
