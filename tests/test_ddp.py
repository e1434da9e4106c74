"""Lightning's own DDP on 2 and 3 CPU processes (gloo), through the real CLI."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import FULL_EPOCHS, N_TEST, N_TRAIN, TINY, cli, make_dataset, run, synthetic_split, write_idx
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


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP on CPU is exercised on Linux")
@pytest.mark.parametrize(("rank", "accumulate", "batch", "step", "signum"),
                         [(0, 1, 1, 2, signal.SIGTERM), (1, 2, 0, 1, signal.SIGTERM), (1, 1, 1, 2, signal.SIGINT)])
def test_ddp_sigterm_to_one_process_stops_every_process_at_one_batch(tmp_path: Path, rank: int, accumulate: int,
                                                                     batch: int, step: int, signum: int) -> None:
    """A SIGTERM to one process of a Lightning-launched DDP run, while it computes a training batch: Lightning 2.6
    broadcast from inside its handler while the other process waited in its gradient all-reduce, and the job hung
    (to rank 0: ``kill <pid>``; to rank 1: its own, or a scheduler's to one process). With accumulation, the stop
    also waits for the optimizer step on every process."""
    make_dataset(tmp_path / "data")
    result = run_ddp(tmp_path, "fit", *FULL_EPOCHS, "--trainer.strategy=ddp", "--trainer.devices=2",
                     "--trainer.max_epochs=1", f"--trainer.accumulate_grad_batches={accumulate}",
                     "--trainer.callbacks+=signal_probe.SendSignal", "--trainer.callbacks.phase=training",
                     f"--trainer.callbacks.signum={int(signum)}", f"--trainer.callbacks.batch={batch}",
                     f"--trainer.callbacks.rank={rank}", timeout=180)
    assert result.returncode == 128 + signum, result.stderr[-3000:]
    last = tmp_path / "lightning_logs/mnist/version_0/checkpoints/last.ckpt"
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"  # as the process that got it says, once
    said = f"{name}: training stopped at step {step}; lightning_logs/mnist/version_0/checkpoints/last.ckpt holds"
    assert result.stderr.count(said) == 1, result.stderr[-3000:]
    assert ("finishing this optimizer step first" in result.stderr) is (accumulate > 1)
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == step
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_done"] == batch + 1 + (accumulate > 1)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP on CPU is exercised on Linux")
def test_ddp_predict_writes_a_file_per_process_and_stops_together(tmp_path: Path) -> None:
    """Every DDP predict crashed (process 0 asked for the run folder, a collective, once more than the others), and a
    SIGTERM to process 1 alone stopped it while process 0 went on to wait for it."""
    make_dataset(tmp_path / "data")
    assert run(tmp_path, "fit", *TINY, "--trainer.max_epochs=1").returncode == 0
    folder = tmp_path / "lightning_logs/mnist/version_0"
    (folder / "predictions.csv").write_text("an earlier predict's, with 1 process\n")
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--ckpt_path=last", "--trainer.limit_predict_batches=1.0"]
    result = run_ddp(tmp_path, "predict", *TINY, *ddp, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in folder.glob("predictions*.csv")) == ["predictions_rank0.csv", "predictions_rank1.csv"]
    indices = [int(line.split(",")[0]) for r in (0, 1) for line in
               (folder / f"predictions_rank{r}.csv").read_text().splitlines()[1:]]
    assert sorted(indices) == list(range(N_TEST))
    result = run_ddp(tmp_path, "predict", *TINY, *ddp, "--trainer.callbacks+=signal_probe.SendSignal",
                     "--trainer.callbacks.phase=predict", "--trainer.callbacks.signum=15", "--trainer.callbacks.rank=1",
                     timeout=180)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("SIGTERM: predict stopped before the end") == 1, result.stderr[-3000:]


def test_a_finished_run_closes_the_process_group_and_a_failed_one_leaves_it(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A gloo group still open at interpreter exit can abort a successful DDP run's process (exit status -6);
    after a failure the group is left alone, since the other ranks may never reach their teardown."""
    make_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert "nowhere" in cli("fit", *TINY, "--trainer.max_epochs=1", "--data.data_dir=nowhere")
        assert dist.is_initialized()
        assert cli("fit", *TINY, "--trainer.max_epochs=1") is None
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -- 3 processes: an odd number of training batches, fewer validation batches than processes ------------

N_TRAIN_3, VAL_3, BATCH_3 = 112, 32, 16  # 80 training images: 5 batches of 16; validation: 2 batches of 16


def run_ddp(cwd: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -m senet_pl ARGS`` in its own process group, killed whole (Lightning's other ranks too) if it
    outlasts ``timeout``: a rank waiting in a collective for one that will never come shows up as a timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "senet_pl", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"DDP run still running after {timeout} s (a hang?):\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _records(folder: Path, name: str, world: int) -> list[dict]:
    return [json.loads((folder / f"rank{r}_{name}.json").read_text()) for r in range(world)]


def _samples(records: list[dict]) -> list[int]:
    return [i for record in records for batch in record["batches"] for i in batch]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP on CPU is exercised on Linux")
def test_ddp_three_processes_every_sample_once_then_resume_with_one(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "data" / "MNIST" / "raw"
    for prefix, n, seed in (("train", N_TRAIN_3, 0), ("t10k", N_TEST, 1)):
        images, labels = synthetic_split(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    common = [*FULL_EPOCHS, f"--data.batch_size={BATCH_3}", f"--data.val_size={VAL_3}",
              "--trainer.precision=32-true", "--trainer.limit_val_batches=1.0", "--trainer.num_sanity_val_steps=0",
              "--trainer.max_epochs=2", "--trainer.callbacks+=ddp_probe.ShardRecorder"]
    # 2 steps an epoch per process: stop 1 step into the second epoch, with last.ckpt written every step
    result = run_ddp(tmp_path, "fit", *common, f"--trainer.callbacks.out_dir={tmp_path / 'ddp'}", "--trainer.strategy=ddp",
                     "--trainer.devices=3", "--trainer.max_steps=3", "--last_checkpoint.every_n_train_steps=1", timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]

    # training: disjoint shards covering the split, the same number of steps everywhere, nothing repeated
    for epoch in (0, 1):
        records = _records(tmp_path / "ddp", f"epoch{epoch}", 3)
        assert [r["steps"] for r in records] == [2, 2, 2] and all(r["world_size"] == 3 for r in records)
        assert sorted(_samples(records)) == list(range(N_TRAIN_3 - VAL_3))
    # validation: 2 batches' worth among 3 processes, one batch each, every image counted once
    records = _records(tmp_path / "ddp", "val0", 3)
    assert [r["steps"] for r in records] == [1, 1, 1]
    assert sorted(_samples(records)) == list(range(VAL_3))

    # the metrics reduced over the 3 processes are a single-process evaluation's
    folder = tmp_path / "lightning_logs/mnist/version_0/checkpoints"
    best = next(folder.glob("best-epoch00-*.ckpt"))
    events = EventAccumulator(str(folder.parent))
    events.Reload()
    logged = {tag: events.Scalars(tag)[-1].value for tag in ("val/acc", "val/loss")}
    assert len(events.Scalars("val/acc")) == 1  # the validation of epoch 0, whose weights best-epoch00 holds
    os.chdir(tmp_path)
    capsys.readouterr()
    assert cli("validate", *common[:-1], f"--ckpt_path={best}") is None
    single = {line.split()[0]: float(line.split()[-1]) for line in capsys.readouterr().out.splitlines()
              if line.split()[:1] in (["val/acc"], ["val/loss"])}
    assert single["val/acc"] == pytest.approx(logged["val/acc"], abs=1e-6)
    assert single["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-4)

    # resuming with 1 process: refused mid-epoch (the position counts batches of 3 processes) ...
    position = load_checkpoint(folder / "last.ckpt")["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert position == {"epoch": 1, "batches_done": 1, "batch_size": BATCH_3, "world_size": 3, "seed": 42}
    message = cli("fit", *common, f"--trainer.callbacks.out_dir={tmp_path / 'one'}", "--ckpt_path=last")
    assert message is not None and "1 process(es), but the checkpoint stopped mid-epoch with 3" in message, message
    # ... and at an epoch boundary it goes on at the start of the next epoch, in 1-process batches
    assert load_checkpoint(best)["global_step"] == 2
    assert cli("fit", *common, f"--trainer.callbacks.out_dir={tmp_path / 'one'}", f"--ckpt_path={best}") is None
    record = _records(tmp_path / "one", "epoch1", 1)[0]
    assert record["world_size"] == 1 and record["steps"] == 5
    assert sorted(_samples([record])) == list(range(N_TRAIN_3 - VAL_3))
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == 2 + 5
