"""The GPU campaign's parts (``campaign.py`` runs them): each takes the campaign, its time budget in seconds and the
campaign's settings, runs its child processes within the budget, and returns its result (a dict with a status)."""

import json
import time
from pathlib import Path

from senet_pl.tools.bench import _run_case
from senet_pl.tools.campaign_report import Campaign, pytest_counts, pytest_failures
from senet_pl.tools.process import REPO, Finished, run_process

TAIL = 3000  # characters of a failed child's output kept in the results

# Time to accuracy on a GPU. The reduced MNIST has 9,000 training images: a larger batch leaves too few steps, so
# its recipe is the one measured on a CPU (batch 128, lr 0.1, 15 epochs: 99.27-99.32% from the best checkpoints
# of three seeds; the campaign tests the final weights).
# Fashion-MNIST: batch 512, lr scaled linearly (0.4) with a longer warm-up, mirror images and random erasing, 30
# epochs. Validation only after the last epoch; cuDNN picks its algorithms. Sized by the first run on an H200
# (README "GPU campaign"): 4,365 training images/s at batch 128 and 14,453 at 512, so 15 and 30 epochs take about
# 31 s and 122 s, inside the parts' default budgets less their 30 s for starting and testing (20 and 40 epochs
# were stopped by --trainer.max_time after 16 and 33).
MNIST_ARGS = ["--data.val_size=1000", "--trainer.benchmark=true"]
FASHION_ARGS = ["--data.val_size=1000", "--data.batch_size=512", "--model.optimizer.init_args.lr=0.4",
                "--model.warmup_steps=200", "--data.hflip=true", "--data.erasing=0.25", "--trainer.benchmark=true"]
STUDY_RUN_ARGS = ["--data.batch_size=512", "--model.optimizer.init_args.lr=0.2", "--trainer.benchmark=true"]
BENCH_ARGS = ["--val_size=1000", "--steps=100", "--steps_224=20", "--data_steps=300", "--cudnn_benchmark=true"]


class Stopped(BaseException):
    """SIGTERM: stop the part that runs, write what was measured."""


def _failure(finished, what: str) -> dict:
    if finished.timed_out:
        return {"status": "timeout", "error": f"{what} did not finish within {finished.seconds:.0f} s",
                "output_tail": (finished.stdout + finished.stderr)[-TAIL:]}
    return {"status": "failed", "error": f"{what} exited with status {finished.returncode}",
            "output_tail": finished.stderr[-TAIL:] or finished.stdout[-TAIL:]}


def part_gpu_tests(c: Campaign, budget: float, s: dict) -> dict:
    command = ["python", "-m", "pytest", "-p", "no:cacheprovider", "-q", *s["pytest_args"]]
    finished = run_process(command, timeout=budget, cwd=REPO)
    result = {"command": command, "returncode": finished.returncode, "counts": pytest_counts(finished.stdout),
              "failures": pytest_failures(finished.stdout)}  # the tracebacks: the tail below may hold only warnings
    # pytest: 0 all passed, 1 some failed, 5 none selected (no gpu-marked tests yet); other codes: it broke
    if finished.timed_out or finished.returncode not in (0, 1, 5):
        return result | _failure(finished, "pytest")
    note = {1: "some tests failed", 5: "no tests were selected"}.get(finished.returncode)
    tail = finished.stdout[-TAIL:] if finished.returncode == 1 else finished.stdout[-600:]
    return result | {"status": "done", "note": note, "output_tail": tail}


def part_bench(c: Campaign, budget: float, s: dict) -> dict:
    from senet_pl.data import MNISTDataModule

    ends = time.monotonic() + budget
    MNISTDataModule(data_dir=s["data_dir"], download=False).prepare_data()  # .gz decompressed, or a clear error
    argv = [f"--data_dir={s['data_dir']}", *s["bench_args"]]
    big, big_batch = s["bench_size"], s["bench_size_batch"]
    rows: list[dict] = []
    result = c.current = {"status": "running", "argv": argv, "rows": rows}

    measured: dict[str, dict] = {}  # case -> its result: a case in several rows runs once

    def measure(label: str, right: str, left: str | None = None, options: list[str] = []) -> dict:
        """One row: the cases left and right (None: no left), each in its own process with ``options`` added to
        the benchmark's; saved at once."""
        row = {"label": label, "left": None, "right": None, "ratio": None}
        rows.append(row)
        try:
            for side, case in (("left", left), ("right", right)):
                key = " ".join([case or "", *options])
                if case is not None and key not in measured:
                    if time.monotonic() >= ends:
                        raise SystemExit("no time left in the part's budget")
                    found = _run_case(case, [*argv, *options], timeout=ends - time.monotonic())
                    measured[key] = found | {"case": case, "options": options}
                row[side] = measured.get(key)
            if row["left"]:
                row["ratio"] = row["right"]["images_per_s"] / row["left"]["images_per_s"]
        except SystemExit as err:  # the case's error (bench.py's message), or no time left
            row["error"] = str(err.code)[-TAIL:]
        c.save("bench", result)
        return row

    # The goals' rows first: on the first GPU run (H200) each case took 12-28 s with its process start, and the
    # 110 s budget of then ended before the 224x224 row and the overhead row; the data path rows come last.
    fits = [measure(f"training, 28x28, batch {b}: fit", f"train:fit:28:{b}") for b in s["bench_batches"]]
    # cuDNN's autotuning would count the workspaces of the algorithms it tries in the peak memory: off, as in the recipes
    untuned = ["--cudnn_benchmark=false"] if "--cudnn_benchmark=true" in argv else []
    measure(f"training, {big}x{big}, batch {big_batch}: fit", f"train:fit:{big}:{big_batch}", options=untuned)
    done = [row["right"] for row in fits if row["right"]]
    if done:  # the fastest batch size: Lightning's overhead there (fit: measured above), and torch.compile
        case = max(done, key=lambda m: m["images_per_s"])["case"]
        b = case.split(":")[-1]
        measure(f"Lightning overhead, 28x28, batch {b}: plain loop vs fit", case, f"train:plain:28:{b}")
        if s["compile"]:
            measure(f"torch.compile, 28x28, batch {b}: fit vs compiled fit", f"train:fit_compiled:28:{b}", case)
    measure("data path, 28x28, batch 32: tutorial vs ours", "data:ours:28:32", "data:tutorial:28:32")
    measure(f"data path, {big}x{big}, batch 32: tutorial vs ours", f"data:ours:{big}:32", f"data:tutorial:{big}:32")
    return result | {"status": "done"}


def part_tta(c: Campaign, budget: float, s: dict, name: str) -> dict:
    epochs, extra = s[f"{name}_epochs"], s[f"{name}_args"]
    # --trainer.max_time: training stops in time for test to run within the budget (the schedule keeps its length)
    stop = max(int(budget - s["tta_reserve_s"]), 1)
    args = [f"--config={REPO / 'configs' / f'{name}.yaml'}", f"--data.data_dir={s['data_dir']}", "--data.download=false",
            f"--trainer.max_epochs={epochs}", f"--trainer.check_val_every_n_epoch={epochs}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra,
            f"--trainer.max_time=00:00:{stop // 60:02d}:{stop % 60:02d}"]
    ends = time.monotonic() + budget
    tries = [[*args, "--model.compile=true"], args] if s["compile"] else [args]
    errors = []
    for tried in tries:
        path = c.work / f"{name}.result.json"
        path.unlink(missing_ok=True)
        command = ["python", "-m", "senet_pl.tools.tta", f"--args={json.dumps(tried)}", f"--out={path}"]
        try:
            finished = run_process(command, timeout=max(ends - time.monotonic(), 1), cwd=c.work)
        except Stopped:  # SIGTERM: the campaign records what the child had written as this part's result
            c.current = _written(path, epochs)
            raise
        result = tta_outcome(finished, path, epochs)
        if result["status"] == "done":
            return result | ({"compile_error": errors[0]} if errors else {})
        errors.append(result)
        # no second try without --model.compile after a timeout, or once fit had ended (the compiled model trained:
        # the failure came after it, and a second fit would replace the one measured)
        if finished.timed_out or "epochs" in result:
            break
    return {"args": args} | errors[-1] | {"compile_error": errors[0] if len(errors) > 1 else None}


def _written(path: Path, epochs: int) -> dict:
    """What ``tta.py`` wrote: nothing, fit's figures, or the whole result."""
    kept = json.loads(path.read_text()) if path.exists() else {}
    if "epochs" in kept:
        kept["stopped_early"] = kept["epochs"] < epochs  # by --trainer.max_time
    return kept


def tta_outcome(finished: Finished, path: Path, epochs: int) -> dict:
    """A time-to-accuracy process's result: ``tta.py`` writes fit's figures to ``path`` when fit ends and the whole
    result (``test_acc``) when the test ends. A test accuracy written counts, even if the process was then ended
    at its limit on its way out; a process that failed or ran out of time after fit keeps fit's figures."""
    kept = _written(path, epochs)
    if "test_acc" in kept:
        late = finished.timed_out or finished.returncode != 0
        note = {"note": f"the process was ended or failed after writing its result ({finished.seconds:.0f} s)"}
        return kept | {"status": "done", "process_seconds": finished.seconds} | (note if late else {})
    return kept | _failure(finished, "the fit/test process" if not kept else "the test after fit")


def part_study(c: Campaign, budget: float, s: dict) -> dict:
    path, epochs = c.work / "study.json", s["study_epochs"]
    path.unlink(missing_ok=True)
    run_args = [f"--trainer.check_val_every_n_epoch={epochs}", *s["study_run_args"]]  # validate after the last epoch
    command = ["python", "-m", "senet_pl.tools.study", f"--data_dir={s['data_dir']}", "--dataset=fashion_mnist",
               f"--config={REPO / 'configs' / 'fashion_mnist.yaml'}", f"--seeds={s['study_seeds']}",
               f"--epochs={epochs}", f"--reductions={json.dumps(s['study_reductions'])}",
               f"--out={c.work / 'study.md'}", f"--json_out={path}", f"--budget_s={max(budget - s['study_reserve_s'], 1):.0f}",
               *s["study_args"], f"--args={json.dumps(run_args)}"]
    finished = run_process(command, timeout=budget, cwd=c.work)
    study = json.loads(path.read_text()) if path.exists() else {}  # the runs so far, even after a timeout
    if finished.returncode == 0 and study.get("finished"):
        return study | {"status": "done", "process_seconds": finished.seconds}
    return study | _failure(finished, "the study") | {"command": command}
