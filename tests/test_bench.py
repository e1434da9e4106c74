"""The benchmark script runs end to end and prints its table (timings are its output, not asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_dataset


def test_bench_prints_every_row(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", compress=True)
    args = ["--data_dir=data", "--val_size=16", "--batch_28=8", "--steps=1", "--data_steps=2",
            "--skip_224_training=true", "--repeats=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, not whichever one is installed
    result = subprocess.run([sys.executable, "-m", "senet_pl.tools.bench", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "img/s" not in line]
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == [
        "data path, 28x28, batch 32",
        "data path, 224x224, batch 32",
        "training, 28x28, batch 8: tutorial loop vs fit",
        "Lightning overhead, 28x28, batch 8: plain loop vs fit",
    ]
    assert "2 run(s) of each pair" in result.stdout
    assert result.stderr.count("Lightning overhead, 28x28, batch 8:") == 2  # each run of the pair reported
    for row in rows:
        cells = row.split("|")
        left, right, ratio = (float(cell.strip().rstrip("x")) for cell in cells[2:5])
        low, high = (float(r) for r in cells[5].strip().rstrip("x").split("-"))
        # the median of two ratios is their mean; it lies in their range
        assert left > 0 and right > 0 and low - 0.01 <= ratio <= high + 0.01 and low <= high
        assert "MB" in cells[6] and "MB" in cells[7]


def test_bench_inference_rows(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    args = ["--training=false", "--inference=true", "--latency_runs=3", "--inference_batch=4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, not whichever one is installed
    result = subprocess.run([sys.executable, "-m", "senet_pl.tools.bench", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "p50" not in line]
    assert [r[0].strip() for r in rows] == ["PyTorch eager, fp32", "ONNX Runtime, fp32"]  # and no training rows
    for row in rows:
        p50, p99, throughput = (float(c) for c in row[1:4])
        assert 0 < p50 <= p99 and throughput > 0 and "MiB" in row[4]
    assert "exported models checked on 256 random images" in result.stdout
