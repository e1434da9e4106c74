"""The study script runs end to end with tiny settings and writes its table."""

import subprocess
import sys
from pathlib import Path

from conftest import make_dataset

from senet_pl.model import SEResNet
from senet_pl.tools.study import forward_flops


def test_flops_count_exactly_what_se_and_the_classifier_add() -> None:
    plain = forward_flops(SEResNet(depth=18, se=False), 1, 28)
    # SE adds two 1x1 convolutions on the pooled vector per block: C -> C/r -> C, 2 FLOPs per multiply-add
    se = forward_flops(SEResNet(depth=18, se=True, reduction=16), 1, 28)
    assert se - plain == sum(2 * 2 * c * (c // 16) for c in (64, 64, 128, 128, 256, 256, 512, 512))
    # ten more classes: 512 x 10 more multiply-adds in the classifier
    assert forward_flops(SEResNet(depth=18, se=False, num_classes=20), 1, 28) - plain == 2 * 512 * 10


def test_study_runs_every_model_and_seed_and_writes_the_table(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data")
    args = ["--data_dir=data", "--seeds=2", "--reductions=[4]", "--train_batches=2", "--val_size=16",
            "--out=table.md", "--args=[--data.batch_size=8,--trainer.limit_val_batches=1,--trainer.limit_test_batches=2]"]
    result = subprocess.run([sys.executable, "-m", "senet_pl.tools.study", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert table in result.stdout
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "parameters" not in line]
    assert [r[0].strip() for r in rows] == ["ResNet", "SE-ResNet r=4"]
    params = [int(r[1].replace(",", "")) for r in rows]
    assert params == [sum(p.numel() for p in SEResNet(depth=18, se=se, reduction=4).parameters()) for se in (False, True)]
    for r in rows:
        mean, std = (float(v) for v in r[3].split("±"))
        per_seed = [float(v) for v in r[4].split(",")]
        assert len(per_seed) == 2 and all(0 <= a <= 100 for a in per_seed)
        assert abs(mean - sum(per_seed) / 2) < 0.01 and std >= 0
        assert float(r[5]) > 0
    runs = sorted(p.name for p in (tmp_path / "lightning_logs" / "study_mnist").iterdir())
    assert runs == ["resnet_seed0", "resnet_seed1", "se_r4_seed0", "se_r4_seed1"]
