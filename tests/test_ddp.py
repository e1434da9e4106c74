"""Lightning's own DDP on 2 CPU processes (gloo), through the real CLI."""

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import FULL_EPOCHS, N_TRAIN, make_dataset, run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from senet_pl.checkpoints import load_checkpoint

VAL_SIZE = 16  # FULL_EPOCHS holds out 16 images: 80 train in 10 batches of 8


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP on CPU is exercised on Linux")
def test_ddp_two_processes_shard_reduce_and_checkpoint_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset(tmp_path / "data")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    args = [
        *FULL_EPOCHS,
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.max_epochs=2",
        "--trainer.limit_val_batches=1.0",  # the whole validation split, sharded between the ranks
        "--trainer.callbacks+=ddp_probe.ShardRecorder",
        f"--trainer.callbacks.out_dir={tmp_path / 'shards'}",
    ]
    result = run(tmp_path, "fit", *args)
    assert result.returncode == 0, result.stderr[-3000:]

    # disjoint shards that together cover the training split, the same number of steps on each rank
    for epoch in (0, 1):
        records = [json.loads((tmp_path / "shards" / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert all(r["world_size"] == 2 for r in records)
        assert records[0]["steps"] == records[1]["steps"] == 5
        seen = [set(i for batch in r["batches"] for i in batch) for r in records]
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(range(N_TRAIN - VAL_SIZE))

    # one set of checkpoints, written once (no per-rank copies)
    folder = tmp_path / "lightning_logs/mnist/version_0/checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and names[1] == "last.ckpt" and names[0].startswith("best-epoch")
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == 10  # 2 epochs x 5 steps per rank

    # the logged val/acc, reduced over both ranks, equals a single-process evaluation of the same weights
    events = EventAccumulator(str(folder.parent))
    events.Reload()
    logged = events.Scalars("val/acc")[-1].value
    single = run(tmp_path, "validate", *FULL_EPOCHS, "--trainer.limit_val_batches=1.0", f"--ckpt_path={folder / 'last.ckpt'}")
    assert single.returncode == 0, single.stderr[-3000:]
    line = next(line for line in single.stdout.splitlines() if "val/acc" in line)
    assert float(line.split()[-1]) == pytest.approx(logged, abs=1e-6)
