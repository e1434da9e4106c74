"""Interruption and bad input: exact resume, kill -9, signals, failing writes, NaN, unsafe checkpoints."""

import errno
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FULL_EPOCHS, TINY, cli, make_dataset, mixed_folder, run_here, scalars

from senet_pl import checkpoints
from senet_pl.checkpoints import TEMP_PREFIX, AtomicCheckpointIO, CheckpointError, load_checkpoint
from senet_pl.cli import main

CHECKPOINTS = Path("lightning_logs/mnist/version_0/checkpoints")
STEPS_PER_EPOCH = 10  # 80 synthetic training images in batches of 8


def fit(*args: str) -> None:
    """``python -m senet_pl fit`` in-process (faster than a subprocess when the process itself is not under test)."""
    try:
        main(["fit", *args])
    except SystemExit as exit_:
        if exit_.code:
            raise AssertionError(f"fit failed: {exit_.code}") from None


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different


# -- exact resume ------------------------------------------------------------------------------

EXACT = [*FULL_EPOCHS, "--trainer.deterministic=true", "--trainer.max_epochs=2"]
# A run cut short by max_epochs or max_steps plans a shorter schedule; these give the first part the length
# of the uninterrupted run's (its T_max left out: its last step's index), so that only the resume is tested.
PLANNED = "--model.lr_scheduler.init_args.T_max=19"  # EXACT: 2 epochs of 10 steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of an uninterrupted 2-epoch run (shuffling and random shifts on)."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    make_dataset(cwd / "data")
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        fit(*EXACT)
    finally:
        os.chdir(previous)
    last = cwd / CHECKPOINTS / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 2 * STEPS_PER_EPOCH
    return last


def test_resume_at_epoch_boundary_is_bitwise_exact(tmp_path: Path, uninterrupted: Path) -> None:
    make_dataset(tmp_path / "data")
    fit(*EXACT, "--trainer.max_epochs=1", PLANNED)
    assert load_checkpoint(CHECKPOINTS / "last.ckpt")["global_step"] == STEPS_PER_EPOCH
    fit(*EXACT, "--ckpt_path=last")
    assert load_checkpoint(CHECKPOINTS / "last.ckpt")["global_step"] == 2 * STEPS_PER_EPOCH
    assert_same_weights(CHECKPOINTS / "last.ckpt", uninterrupted)


@pytest.mark.parametrize("every", [2, 0])
def test_resume_mid_epoch_neither_replays_nor_skips(tmp_path: Path, uninterrupted: Path, every: int) -> None:
    """Stopped by max_steps 4 steps into the second epoch, last.ckpt written every 2 steps or (0) only at the stop:
    Lightning then ends the epoch early and counted it as done, so a resume skipped the rest of it."""
    make_dataset(tmp_path / "data")
    fit(*EXACT, "--trainer.max_steps=14", f"--last_checkpoint.every_n_train_steps={every}", PLANNED)
    state = load_checkpoint(CHECKPOINTS / "last.ckpt")
    assert state["global_step"] == 14
    position = {"epoch": 1, "batches_done": 4, "batch_size": 8, "world_size": 1, "seed": 42}
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [position]
    fit(*EXACT, "--ckpt_path=last")
    assert load_checkpoint(CHECKPOINTS / "last.ckpt")["global_step"] == 2 * STEPS_PER_EPOCH  # not off by one
    assert_same_weights(CHECKPOINTS / "last.ckpt", uninterrupted)


def test_changing_the_seed_changes_the_run(tmp_path: Path, uninterrupted: Path) -> None:
    """The exactness tests above could pass if nothing were random; this one shows that something is."""
    make_dataset(tmp_path / "data")
    fit(*EXACT, "--seed_everything=7")
    assert not torch.equal(weights(CHECKPOINTS / "last.ckpt")["model.fc.weight"], weights(uninterrupted)["model.fc.weight"])


# -- faults --------------------------------------------------------------------------------------


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.ckpt"), key=_mtime) if folder.exists() else []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # renamed away while we looked
        return 0.0


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)] if folder.exists() else []


def test_kill_9_during_writes_and_at_random_moments_never_breaks_a_checkpoint(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data")
    # one run folder for every attempt, each resuming whatever the previous one left (or starting)
    args = ["fit", *FULL_EPOCHS, "--trainer.max_epochs=3", "--last_checkpoint.every_n_train_steps=1",
            "--trainer.logger.init_args.version=run", "--ckpt_path=auto"]
    folder = tmp_path / "lightning_logs/mnist/run/checkpoints"
    rng = random.Random(0)
    for attempt in range(4):
        during_write = attempt % 2 == 0  # kills 0 and 2 land inside a checkpoint write, 1 and 3 anywhere
        proc = subprocess.Popen([sys.executable, "-m", "senet_pl", *args], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.time()  # wall clock, as file modification times are
        while time.time() - start < 120 and proc.poll() is None:
            if during_write and any(_mtime(p) > start for p in _partials(folder)):
                break  # a write of this process is in progress
            if not during_write and any(_mtime(p) > start for p in _checkpoint_files(folder)):
                time.sleep(rng.uniform(0.0, 1.5))  # it is writing checkpoints: kill at a random moment
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"attempt {attempt}: the run ended before it was killed"
        if during_write:
            assert _partials(folder), "the kill was meant to land inside a checkpoint write"
        for ckpt in _checkpoint_files(folder):  # the newest, and every other one, loads
            assert load_checkpoint(ckpt)["global_step"] > 0
    result = run_here(tmp_path, *args)  # the kills above need real processes; this resume does not
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == 3 * STEPS_PER_EPOCH
    assert not _partials(folder)  # the interrupted writes' temporary files are gone
    assert [p.name for p in folder.parent.parent.iterdir()] == ["run"]  # every attempt worked in the same run


SIGNALS = [(signal.SIGTERM, 143), (signal.SIGINT, 130)]
SHORT = [*EXACT, "--trainer.limit_train_batches=5"]  # 2 epochs of 5 steps: the signal tests' run


@pytest.fixture(scope="module")
def uninterrupted_short(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of an uninterrupted SHORT run."""
    cwd = tmp_path_factory.mktemp("uninterrupted_short")
    make_dataset(cwd / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        fit(*SHORT)
    return cwd / CHECKPOINTS / "last.ckpt"


PROBE_PATH = str(Path(__file__).parent)  # tests/signal_probe.py, for the CLI's --trainer.callbacks


def _probe(phase: str, signum: int) -> list[str]:
    return ["--trainer.callbacks+=signal_probe.SendSignal", f"--trainer.callbacks.phase={phase}",
            f"--trainer.callbacks.signum={int(signum)}"]


def _signalled(capsys: pytest.CaptureFixture, phase: str, signum: int, *args: str,
               batch: int | None = None) -> tuple[int, str]:
    """``main(ARGS)`` in this process, which sends itself SIGNUM at PHASE (at the start of training batch BATCH):
    exit status and stderr. (Lightning's and GracefulStop's handlers are restored when the command ends.)"""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*args, *_probe(phase, signum), *([f"--trainer.callbacks.batch={batch}"] if batch is not None else [])])
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("signum", "status"), SIGNALS)
@pytest.mark.parametrize(("phase", "step"), [("sanity", 5), ("training", 3), ("validation", 5), ("checkpoint", 5)])
def test_a_signal_in_any_phase_of_fit_keeps_every_step_and_resumes_exactly(
    tmp_path: Path, uninterrupted_short: Path, capsys: pytest.CaptureFixture, phase: str, step: int, signum: int,
    status: int
) -> None:
    make_dataset(tmp_path / "data")
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN in a shell's background job
    resume = []
    if phase == "sanity":  # a resumed run, stopped in the sanity check before its first step
        fit(*SHORT, "--trainer.max_epochs=1", "--model.lr_scheduler.init_args.T_max=9")  # SHORT: 10 steps
        resume = ["--ckpt_path=last"]
    code, stderr = _signalled(capsys, phase, signum, "fit", *SHORT, *resume)
    assert code == status, stderr[-2000:]
    last = CHECKPOINTS / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == step  # every optimizer step done, not an older state
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    if phase == "sanity":
        said = f"{name}: training stopped before its first step after resuming; {last} (step {step}) still holds"
    else:
        said = f"{name}: training stopped at step {step}; {last} holds every step done. Resume with --ckpt_path last."
    assert said in stderr, stderr[-2000:]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    fit(*SHORT, "--ckpt_path=last")
    assert_same_weights(last, uninterrupted_short)
    # every validation of the uninterrupted run ran and was logged, the one a signal cut short included
    logged = scalars(Path("lightning_logs/mnist/version_0"))
    expected = scalars(uninterrupted_short.parents[1])
    assert [s for s, _ in logged["val/acc"]] == [s for s, _ in expected["val/acc"]] == [4, 9]  # (steps as logged)
    assert logged["val/acc"] == expected["val/acc"] and logged["val/loss"] == expected["val/loss"]
    assert sorted(p.name for p in CHECKPOINTS.glob("best-*")) == sorted(
        p.name for p in uninterrupted_short.parent.glob("best-*"))


def test_slurms_requeue_signal_stops_with_last_ckpt_then_requeues_the_job(
        tmp_path: Path, uninterrupted_short: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's SLURM recipe (--signal=SIGUSR1@90): Lightning's handler saved hpc_ckpt_N.ckpt from inside the
    signal handler, half-way through a forward pass, and crashed a 2-process run. It now stops as on SIGTERM, with
    last.ckpt, then requeues the job; the requeued command resumes exactly with --ckpt_path auto."""
    make_dataset(tmp_path / "data")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # records how it was called
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    code, stderr = _signalled(capsys, "training", signal.SIGUSR1, "fit", *SHORT, "--ckpt_path=auto")
    assert code == 128 + signal.SIGUSR1, stderr[-2000:]
    last = CHECKPOINTS / "last.ckpt"
    assert (f"SIGUSR1: training stopped at step 3; {last} holds every step done. Resume with --ckpt_path last. "
            "Job 4242 requeued (scontrol requeue 4242); with --ckpt_path auto it resumes from last.ckpt.") in stderr, stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert load_checkpoint(last)["global_step"] == 3 and not list(tmp_path.glob("hpc_ckpt*"))
    fit(*SHORT, "--ckpt_path=auto")  # the requeued job's command
    assert_same_weights(last, uninterrupted_short)


ACCUMULATED = [*SHORT, "--trainer.accumulate_grad_batches=2"]  # 5 batches an epoch: steps after batches 2, 4 and 5


@pytest.mark.parametrize(("signum", "status"), SIGNALS)
def test_a_signal_between_accumulated_batches_waits_for_their_step(
        tmp_path: Path, capsys: pytest.CaptureFixture, signum: int, status: int) -> None:
    """Stopped after the first of two accumulated batches, the checkpoint counted that batch as done without its
    gradients: the resumed run ended 3.6 away (largest weight difference) from the uninterrupted one."""
    make_dataset(tmp_path / "data")
    fit(*ACCUMULATED, "--trainer.logger.init_args.name=whole")
    code, stderr = _signalled(capsys, "training", signum, "fit", *ACCUMULATED, batch=2)
    assert code == status, stderr[-2000:]
    assert "finishing this optimizer step first (--trainer.accumulate_grad_batches 2)" in stderr, stderr[-2000:]
    last = CHECKPOINTS / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 2  # batches 0-3: the step of batches 2 and 3 was finished
    assert f"training stopped at step 2; {last} holds every step done" in stderr
    fit(*ACCUMULATED, "--ckpt_path=last")
    assert_same_weights(last, Path("lightning_logs/whole/version_0/checkpoints/last.ckpt"))


def test_a_signal_in_a_validation_between_accumulated_batches_resumes_exactly(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Validation after every batch validates between the two batches of a step: its last.ckpt counted the first
    batch as done without its gradients (0.3 off after the resume); a SIGTERM in that validation then wrote none."""
    make_dataset(tmp_path / "data")
    every = [*ACCUMULATED, "--trainer.val_check_interval=1"]
    fit(*every, "--trainer.logger.init_args.name=whole")
    code, stderr = _signalled(capsys, "validation", signal.SIGTERM, "fit", *every, batch=2)  # batches 2, 3: a step
    assert code == 143, stderr[-2000:]
    last = CHECKPOINTS / "last.ckpt"
    assert "finishing this optimizer step first" in stderr and f"training stopped at step 2; {last} holds every" in stderr
    assert load_checkpoint(last)["global_step"] == 2  # the validation ended whole, then batch 3 and its step
    fit(*every, "--ckpt_path=last")
    assert_same_weights(last, Path("lightning_logs/whole/version_0/checkpoints/last.ckpt"))
    shutil.rmtree("lightning_logs/mnist")  # an early stop in that validation: it too waits for the step
    fit(*every, *_probe("stop in validation", signal.SIGTERM), "--trainer.callbacks.batch=2")
    assert load_checkpoint(last)["global_step"] == 2
    fit(*every, "--ckpt_path=last")
    assert_same_weights(last, Path("lightning_logs/whole/version_0/checkpoints/last.ckpt"))


def test_a_best_checkpoint_between_accumulated_batches_is_for_evaluation_not_for_resuming(tmp_path: Path) -> None:
    """A best checkpoint that a validation between the two batches of a step wrote counts the first as done without
    its gradients: fit resumed it silently and inexactly. It is marked, and fit refuses it (test takes it)."""
    from senet_pl.checkpoints import BETWEEN_STEPS

    make_dataset(tmp_path / "data")
    done = {}  # best file -> training batches of its epoch done when it was written (steps after 2, 4 and 5)
    # A best file per validation: after every batch (Lightning's ModelCheckpoint writes once per global step, so the
    # files come from batches 2, 4 and 5), and after batch 3 (between the batches of a step).
    for every in (1, 3):
        name = f"every{every}"
        fit(*ACCUMULATED, f"--trainer.val_check_interval={every}", "--checkpoint.save_top_k=-1",
            f"--trainer.logger.init_args.name={name}")
        folder = Path(f"lightning_logs/{name}/version_0/checkpoints")
        for path in folder.glob("best-*.ckpt"):
            ckpt = load_checkpoint(path)
            done[path] = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
            assert ckpt.get(BETWEEN_STEPS, False) is (done[path] in (1, 3)), (path, done[path])
        assert BETWEEN_STEPS not in load_checkpoint(folder / "last.ckpt")
    assert sorted(done.values()) == [2, 2, 3, 3, 4, 4, 5, 5], done  # 2 epochs each
    between = next(path for path, n in done.items() if n == 3)
    message = cli("fit", *ACCUMULATED, f"--ckpt_path={between}", "--trainer.max_epochs=3")
    assert message is not None and message.splitlines() == [
        f"error: {between} was written by a validation between the accumulated batches of one optimizer step "
        "(--trainer.accumulate_grad_batches), without the gradients of the batches before it: fit would not resume "
        "the run exactly. Resume from its last.ckpt (--ckpt_path last), which is written only after a step; test, "
        "validate, predict and analyze accept this file."], message
    assert cli("test", *ACCUMULATED, f"--ckpt_path={between}") is None
    fit(*ACCUMULATED, f"--ckpt_path={next(path for path, n in done.items() if n == 2)}", "--trainer.max_epochs=3")


def test_a_stop_asked_for_between_accumulated_batches_waits_for_their_step(tmp_path: Path) -> None:
    """max_time's Timer (or an early stop) ended the run after the first of two accumulated batches: the checkpoint
    counted it without its gradients (0.2 off after the resume)."""
    make_dataset(tmp_path / "data")
    fit(*ACCUMULATED, "--trainer.logger.init_args.name=whole")
    fit(*ACCUMULATED, *_probe("stop", signal.SIGTERM), "--trainer.callbacks.batch=2")  # batches 2, 3: a step
    last = CHECKPOINTS / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 2  # stopped after batch 3, the step
    fit(*ACCUMULATED, "--ckpt_path=last")
    assert_same_weights(last, Path("lightning_logs/whole/version_0/checkpoints/last.ckpt"))


def test_checkpoints_every_n_steps_are_written_after_a_step_not_between_accumulated_batches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--last_checkpoint.every_n_train_steps wrote at step 0 after the first of the accumulated batches (0 % N is 0)."""
    from senet_pl.callbacks.last import LatestCheckpoint
    from senet_pl.compat import batches_done

    make_dataset(tmp_path / "data")
    written, save = [], LatestCheckpoint._save

    def spy(self, trainer, again=False):
        if not trainer.sanity_checking:  # (where _save writes nothing)
            written.append((trainer.current_epoch, batches_done(trainer), trainer.global_step))
        save(self, trainer, again)

    monkeypatch.setattr(LatestCheckpoint, "_save", spy)
    fit(*ACCUMULATED, "--last_checkpoint.every_n_train_steps=1")
    steps = {(epoch, done, step) for epoch, done, step in written}
    assert steps == {(e, done, 3 * e + k) for e in (0, 1) for done, k in ((2, 1), (4, 2), (5, 3))}, written


def test_a_validation_stopped_again_in_its_rerun_runs_a_third_time(
        tmp_path: Path, uninterrupted_short: Path, capsys: pytest.CaptureFixture) -> None:
    """Stopped in the validation, resumed, stopped again in the rerun of that validation, resumed: it still runs.
    (A rerun's checkpoint holds validation totals that do not add up; Lightning counted it as done.)"""
    make_dataset(tmp_path / "data")
    assert _signalled(capsys, "validation", signal.SIGTERM, "fit", *SHORT)[0] == 143
    code, stderr = _signalled(capsys, "validation", signal.SIGINT, "fit", *SHORT, "--ckpt_path=last")
    assert code == 130 and "training stopped at step 5" in stderr, stderr[-2000:]
    fit(*SHORT, "--ckpt_path=last")
    assert_same_weights(CHECKPOINTS / "last.ckpt", uninterrupted_short)
    assert scalars(CHECKPOINTS.parent)["val/acc"] == scalars(uninterrupted_short.parents[1])["val/acc"]

def test_a_validation_cut_short_after_a_checkpoint_of_its_step_runs_again(
        tmp_path: Path, uninterrupted_short: Path, capsys: pytest.CaptureFixture) -> None:
    """last.ckpt was written at the step before the validation began (every 5 steps, the epoch's end): the signal in
    the validation writes it again, so that the resume runs the validation instead of counting it as done."""
    make_dataset(tmp_path / "data")
    code, stderr = _signalled(capsys, "validation", signal.SIGTERM, "fit", *SHORT,
                              "--last_checkpoint.every_n_train_steps=5")
    assert code == 143, stderr[-2000:]
    fit(*SHORT, "--ckpt_path=last", "--last_checkpoint.every_n_train_steps=5")
    assert_same_weights(CHECKPOINTS / "last.ckpt", uninterrupted_short)
    assert scalars(CHECKPOINTS.parent)["val/acc"] == scalars(uninterrupted_short.parents[1])["val/acc"]


def test_ctrl_c_while_python_imports_torch_is_one_line(tmp_path: Path) -> None:
    """The first seconds of ``python -m senet_pl`` import torch and Lightning, before main() handles signals."""
    process = subprocess.Popen([sys.executable, "-m", "senet_pl", "fit", *TINY], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline and "libtorch" not in maps.read_text():
        time.sleep(0.01)  # until torch's libraries are being loaded
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Ctrl-C: stopped before any work; nothing was written." in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_a_second_ctrl_c_during_test_aborts_and_leaves_the_run_as_it_was(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    make_dataset(tmp_path / "data")
    fit(*TINY, "--trainer.max_epochs=1")
    run_dir = Path("lightning_logs/mnist/version_0")
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["test", *TINY, "--ckpt_path=last", *_probe("test", signal.SIGINT), "--trainer.callbacks.twice=true"])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 130, stderr[-2000:]
    assert "Ctrl-C twice: test aborted at once before the end; it wrote no results" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr and "Detected KeyboardInterrupt" not in stderr
    assert {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_an_ignored_ctrl_c_stays_ignored(tmp_path: Path) -> None:
    """A job that a shell script starts in the background ignores SIGINT (the Ctrl-C meant for the script); Python
    leaves it so, and so does the CLI: the run goes on to its end. (SIGTERM still stops it.)"""
    make_dataset(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PROBE_PATH, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "senet_pl", "fit", *TINY, "--trainer.max_epochs=1",
                             *_probe("training", signal.SIGINT)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Ctrl-C" not in result.stderr and "fit done: 1 epoch(s), step 3" in result.stdout


@pytest.mark.parametrize("step", [3, 7])  # before and after the first checkpoint (the end of epoch 0, step 5)
def test_a_second_ctrl_c_aborts_at_once_and_says_what_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              step: int) -> None:
    """The second Ctrl-C is a KeyboardInterrupt, which Lightning turned into exit status 1 without a word."""
    make_dataset(tmp_path / "data")
    before = signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *SHORT, *_probe("training", signal.SIGINT), f"--trainer.callbacks.step={step}",
              "--trainer.callbacks.twice=true"])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 130, stderr[-2000:]
    said = f"Ctrl-C twice: training aborted at once at step {step}, and no checkpoint of that step was written"
    last = CHECKPOINTS / "last.ckpt"
    if step == 7:
        said += f"; {last} holds step 5: resume with --ckpt_path last."
        assert load_checkpoint(last)["global_step"] == 5
    else:
        assert not last.exists()
    assert said in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize(("signum", "status"), SIGNALS)
def test_a_signal_before_the_first_step_saves_nothing_and_leaves_no_run(tmp_path: Path, signum: int, status: int) -> None:
    """In the real process (``python -m senet_pl``): its exit status and message."""
    make_dataset(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PROBE_PATH, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "senet_pl", "fit", *TINY, *_probe("sanity", signum)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == status, result.stderr[-2000:]
    assert "training stopped before its first step: nothing to save (the new run folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Received SIGTERM" not in result.stderr  # Lightning's log line: wrong after a Ctrl-C, and said again below
    assert not Path("lightning_logs").exists()  # no empty version_0 for --ckpt_path last to trip on, nor empty folders


def test_a_run_stopped_before_its_first_step_removes_its_own_folder_only(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """Two fits started together (a sweep): the one stopped before its first step removes its own new run folder,
    not the other's, which appeared meanwhile and holds no checkpoint yet either."""
    make_dataset(tmp_path / "data")
    other = Path("lightning_logs/mnist/version_1")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, *_probe("sanity", signal.SIGTERM), f"--trainer.callbacks.neighbour={other}"])
    code, stderr = exit_.value.code, capsys.readouterr().err
    assert code == 143 and "the new run folder lightning_logs/mnist/version_0 was removed" in stderr, stderr[-2000:]
    assert not Path("lightning_logs/mnist/version_0").exists()
    assert (other / "events.out.tfevents.0").read_text() == "another run's"


def test_a_run_stopped_before_its_first_step_removes_its_folder_with_a_sub_dir(capsys: pytest.CaptureFixture,
                                                                             tmp_path: Path) -> None:
    """TensorBoard's sub_dir puts the logs in version_N/SUB: the folder removed is still version_N."""
    make_dataset(tmp_path / "data")
    code, stderr = _signalled(capsys, "sanity", signal.SIGTERM, "fit", *TINY, "--trainer.logger.init_args.sub_dir=sub")
    assert code == 143 and "the new run folder lightning_logs/mnist/version_0 was removed" in stderr, stderr[-2000:]
    assert not Path("lightning_logs").exists()


@pytest.mark.parametrize(("signum", "status"), SIGNALS)
@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_a_signal_stops_test_and_predict_and_says_nothing_was_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, subcommand: str, signum: int, status: int
) -> None:
    make_dataset(tmp_path / "data")
    fit(*TINY, "--trainer.max_epochs=1")
    run_dir = Path("lightning_logs/mnist/version_0")
    (run_dir / f"config_{subcommand}.yaml").write_text("# an earlier, finished command's settings\n")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, stderr = _signalled(capsys, subcommand, signum, subcommand, *TINY, "--ckpt_path=last")
    assert code == status, stderr[-2000:]
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert f"{name}: {subcommand} stopped before the end; it wrote no results" in stderr, stderr[-2000:]
    assert sorted(p.name for p in Path("lightning_logs/mnist").iterdir()) == ["version_0"]  # the test run left nothing
    # ... in the trained run's folder either: no events file of its own, the earlier config_<command>.yaml kept
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    assert not list(Path("lightning_logs").rglob("predictions.csv"))


def test_a_failure_in_the_middle_of_test_leaves_the_trained_run_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a signal: an error at the second test batch (after the first one's metrics were logged)."""
    from senet_pl.module import SEResNetClassifier

    make_dataset(tmp_path / "data")
    fit(*TINY, "--trainer.max_epochs=1")
    run_dir = Path("lightning_logs/mnist/version_0")
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    test_step = SEResNetClassifier.test_step

    def failing(self, batch, batch_idx, *args, **kwargs):
        if batch_idx == 1:
            raise RuntimeError("a failure half-way")
        return test_step(self, batch, batch_idx, *args, **kwargs)

    monkeypatch.setattr(SEResNetClassifier, "test_step", failing)
    with pytest.raises(RuntimeError, match="a failure half-way"):
        main(["test", *TINY, "--ckpt_path=last"])
    assert {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in Path("lightning_logs/mnist").iterdir()) == ["version_0"]


def _fail_after(calls: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CALLS-th checkpoint write, and every one after it, writes some bytes and hits a full disk."""
    real_save = torch.save
    count = {"n": 0}

    def save(obj, f, *args, **kwargs):
        count["n"] += 1
        if count["n"] >= calls:
            f.write(b"partial data")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save)


def test_failing_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    _fail_after(1, monkeypatch)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*last.ckpt: No space left on device; "
                                              r"the previous last.ckpt is intact"):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_full_disk_during_training_is_reported_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset(tmp_path / "data")
    _fail_after(3, monkeypatch)  # epoch 0 writes best + last; every write after that fails
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, "--trainer.max_epochs=3"])
    assert "could not write checkpoint" in str(exit_.value.code) and "No space left" in str(exit_.value.code)
    assert load_checkpoint(CHECKPOINTS / "last.ckpt")["global_step"] == 3  # epoch 0's, intact
    assert not [p for p in CHECKPOINTS.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_nan_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset(tmp_path / "data")
    import senet_pl.module

    real = senet_pl.module.F.cross_entropy
    training_calls = {"n": 0}

    def cross_entropy(logits, target, *args, **kwargs):
        loss = real(logits, target, *args, **kwargs)
        if torch.is_grad_enabled():
            training_calls["n"] += 1
            if training_calls["n"] == 5:  # the second step of the second epoch (3 steps per epoch)
                return loss * float("nan")
        return loss

    monkeypatch.setattr(senet_pl.module.F, "cross_entropy", cross_entropy)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, "--trainer.max_epochs=3"])
    message = str(exit_.value.code)
    assert "the training loss is nan at step 4 (epoch 1, batch 1)" in message
    files = sorted(p.name for p in CHECKPOINTS.iterdir())
    assert len(files) == 2 and files[0].startswith("best-epoch00")  # nothing from the non-finite epoch
    assert load_checkpoint(CHECKPOINTS / "last.ckpt")["global_step"] == 3
    assert all(torch.isfinite(w).all() for w in weights(CHECKPOINTS / "last.ckpt").values() if w.is_floating_point())


# -- safe loading ------------------------------------------------------------------------------


class Payload:
    """Pickles as a call to os.system: what a malicious checkpoint would run on a plain torch.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused_and_never_run(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data")
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"depth": 18}, "payload": Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused to load .*evil.ckpt.*Nothing in it was run"):
        load_checkpoint(evil)
    for subcommand in ("test", "fit"):
        with pytest.raises(SystemExit) as exit_:
            main([subcommand, *TINY, f"--ckpt_path={evil}"])
        assert "refused to load" in str(exit_.value.code)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["legacy format", "raw pickle"])
def test_pickled_code_outside_a_zip_archive_is_refused_and_never_run(tmp_path: Path, kind: str) -> None:
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    payload = {"state_dict": {}, "payload": Payload(marker)}
    if kind == "legacy format":
        torch.save(payload, evil, _use_new_zipfile_serialization=False)
    else:
        evil.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {evil}: .*not a zip archive"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["/dev/zero", "FIFO", "folder", "20 GB of zeros"])
def test_a_checkpoint_path_that_is_no_checkpoint_file_is_refused_before_it_is_read(tmp_path: Path, kind: str) -> None:
    """A device or a huge file of zeros was read by torch's legacy loader until memory ran out; a FIFO blocked."""
    path = tmp_path / "model.ckpt"
    if kind == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        with open(path, "wb") as f:
            f.truncate(20 * 2**30)  # sparse: no disk space used
    expected = "not a zip archive" if kind == "20 GB of zeros" else "it is not a regular file"
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path}: .*{expected}"):
            load_checkpoint(path, mmap=mmap)


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty"])
def test_damaged_checkpoint_gives_an_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "model.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "random bytes": os.urandom(5000), "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path}: it is truncated or not a checkpoint"):
        load_checkpoint(path)


def test_a_checkpoint_damaged_inside_a_tensor_is_refused_not_loaded_as_wrong_weights(tmp_path: Path) -> None:
    """Bytes overwritten in the middle of the weights leave a readable archive: torch.load gave wrong numbers."""
    path = tmp_path / "model.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(100_000)}}, path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["state_dict"]["w"].shape == (100_000,)  # torch reads it regardless
    for mmap in (False, True):  # a structure-only read too (the CLI's first look at a checkpoint)
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path, mmap=mmap)
        assert str(error.value) == (f"cannot read checkpoint {path}: it is damaged (its entry archive/data/0 fails the "
                                    "archive's checksum or header check). Use another copy, or an earlier checkpoint "
                                    "of the run.")


def test_checkpoint_files_get_normal_permissions(tmp_path: Path) -> None:
    path = tmp_path / "a.ckpt"
    AtomicCheckpointIO().save_checkpoint({"x": torch.zeros(1)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(("signum", "status"), SIGNALS)
def test_a_signal_while_reading_the_data_stops_with_a_message_and_no_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, signum: int, status: int
) -> None:
    """Before the Trainer handles signals (the data module's setup): no traceback, no half run folder."""
    import senet_pl.data.datamodule as datamodule

    make_dataset(tmp_path / "data")
    fit(*TINY, "--trainer.max_epochs=1")
    mixed_folder(tmp_path / "mine")
    read_folder = datamodule.read_folder

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return read_folder(*args, **kwargs)

    monkeypatch.setattr(datamodule, "read_folder", interrupted)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", *TINY, "--ckpt_path=last", "--data.predict_dir=mine"])
    assert exit_.value.code == status
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert f"{name}: predict stopped before it started; nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in Path("lightning_logs/mnist").iterdir()) == ["version_0"]


@pytest.mark.parametrize(("signum", "status"), SIGNALS)
def test_a_signal_while_parsing_stops_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, signum: int, status: int
) -> None:
    from senet_pl.cli import SENetCLI

    monkeypatch.setattr(SENetCLI, "before_instantiate_classes", lambda self: os.kill(os.getpid(), signum))
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY])
    assert exit_.value.code == status
    err = capsys.readouterr().err
    assert "stopped before any work; nothing was written" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is before


# -- weight EMA (--model.ema_decay) -------------------------------------------------------------------

EMA_RUN = [*TINY, "--trainer.deterministic=true", "--trainer.max_epochs=2", "--model.ema_decay=0.9"]


@pytest.fixture(scope="module")
def uninterrupted_ema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of an uninterrupted EMA run: 2 epochs of 3 steps."""
    cwd = tmp_path_factory.mktemp("uninterrupted_ema")
    make_dataset(cwd / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        fit(*EMA_RUN)
    return cwd / CHECKPOINTS / "last.ckpt"


def test_a_resume_refuses_to_drop_the_average_with_null(uninterrupted_ema: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--model.ema_decay null is a value given, not an option left out: refused like any other decay."""
    monkeypatch.chdir(uninterrupted_ema.parents[4])
    without = [a for a in EMA_RUN if not a.startswith("--model.ema_decay")]
    message = cli("fit", *without, "--trainer.max_epochs=3", "--model.ema_decay=null", f"--ckpt_path={uninterrupted_ema}")
    assert message is not None and "--model.ema_decay null, but the checkpoint has 0.9" in message, message
    assert load_checkpoint(uninterrupted_ema)["global_step"] == 6  # nothing ran


@pytest.mark.parametrize(("stop", "step"), [("mid-epoch", 4), ("SIGTERM in validation", 3)])
def test_a_resumed_ema_run_ends_equal_to_an_uninterrupted_one(
    tmp_path: Path, uninterrupted_ema: Path, capsys: pytest.CaptureFixture, stop: str, step: int
) -> None:
    make_dataset(tmp_path / "data")
    last = CHECKPOINTS / "last.ckpt"
    if stop == "mid-epoch":
        fit(*EMA_RUN, "--trainer.max_steps=4", "--last_checkpoint.every_n_train_steps=2",
            "--model.lr_scheduler.init_args.T_max=5")  # the 6-step run's schedule (PLANNED)
    else:  # the average is swapped in while validating: last.ckpt must still hold it as the average
        code, stderr = _signalled(capsys, "validation", signal.SIGTERM, "fit", *EMA_RUN)
        assert code == 143, stderr[-2000:]
    assert load_checkpoint(last)["global_step"] == step
    fit(*[a for a in EMA_RUN if not a.startswith("--model.ema_decay")], "--ckpt_path=last")  # left out: the checkpoint's
    ended, expected = load_checkpoint(last), load_checkpoint(uninterrupted_ema)
    for key in ("state_dict", "current_model_state"):  # the average, and the training weights
        different = [k for k in expected[key] if not torch.equal(ended[key][k], expected[key][k])]
        assert not different, (key, different)
    assert ended["averaging_state"]["n_averaged"] == 6  # one update per step, none lost or repeated
    assert not torch.equal(expected["state_dict"]["model.fc.weight"], expected["current_model_state"]["model.fc.weight"])
