"""The inference rows of ``python -m senet_pl.tools.bench --inference true``: PyTorch eager vs ONNX Runtime on CPU.

Both run the exported model's whole graph (uint8 28x28 in, preprocessing, SE-ResNet-18, logits out) in fp32 with
their default threads: single-image latency (p50 and p99 over ``runs`` calls, after warm-up) and the throughput of
batches of ``batch``; and the sizes of the files (state dict, .pt2, .onnx). The weights are random: the time of a
forward pass does not depend on them.
"""

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from senet_pl.data import MNISTDataModule
from senet_pl.export import WithPreprocessing, export
from senet_pl.infer import load_model
from senet_pl.model import SEResNet


def _latencies(call: Callable[[], object], runs: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _p(times: list[float], q: float) -> float:
    return float(np.percentile(times, q))


def inference_table(runs: int = 200, batches: int = 3, batch: int = 256) -> str:
    """The Markdown table of the inference rows (and the check of the exported file, above it)."""
    torch.manual_seed(0)
    model = SEResNet(18, "cifar", 1, 10).eval()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        dm = MNISTDataModule(data_dir=str(folder / "none"), download=False)  # no data: checked on random images
        sizes, checks = {}, {}
        for fmt in ("onnx", "pt2"):
            checks[fmt] = export(model, {"depth": 18, "stem": "cifar", "se": True}, dm, fmt, folder / f"m.{fmt}", None, "-")
            sizes[fmt] = (folder / f"m.{fmt}").stat().st_size / 2**20
        torch.save(model.state_dict(), folder / "m.pt")
        sizes["pt"] = (folder / "m.pt").stat().st_size / 2**20
        session, _ = load_model(folder / "m.onnx")
        name = session.get_inputs()[0].name
        eager = WithPreprocessing(model, dm.mean, dm.std, 28).eval()
        one = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)
        many = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8)
        rows = []
        with torch.inference_mode():
            for label, call, file in (
                ("PyTorch eager, fp32", eager, f"state dict {sizes['pt']:.1f} MiB, .pt2 {sizes['pt2']:.1f} MiB"),
                ("ONNX Runtime, fp32", lambda x: session.run(None, {name: x.numpy()}), f".onnx {sizes['onnx']:.1f} MiB"),
            ):
                single = _latencies(lambda: call(one), runs)
                whole = _latencies(lambda: call(many), batches, warmup=1)
                rows.append((label, _p(single, 50), _p(single, 99), batch * 1000 / statistics.median(whole), file))
    lines = [
        f"exported models checked on {checks['onnx']['images']} random images: max |logit difference| "
        f"{checks['onnx']['max_abs_diff']:.2g} (ONNX), {checks['pt2']['max_abs_diff']:.2g} (.pt2)",
        "",
        f"| runtime (CPU, {torch.get_num_threads()} threads) | 1 image p50 ms | 1 image p99 ms "
        f"| batch {batch} img/s | file size |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.0f} | {r[4]} |" for r in rows]
    return "\n".join(lines)
