"""The benchmark script runs end to end and prints its table (timings are its output, not asserted)."""

import subprocess
import sys
from pathlib import Path

from conftest import make_dataset


def test_bench_prints_every_row(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", compress=True)
    args = ["--data_dir=data", "--val_size=16", "--batch_28=8", "--steps=1", "--data_steps=2",
            "--skip_224_training=true"]
    result = subprocess.run([sys.executable, "-m", "senet_pl.bench", *args], cwd=tmp_path,
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
    for row in rows:
        left, right, ratio = (float(cell.strip().rstrip("x")) for cell in row.split("|")[2:5])
        assert left > 0 and right > 0 and abs(ratio - right / left) < 0.01 * ratio + 0.01
        assert "MB" in row.split("|")[5] and "MB" in row.split("|")[6]
