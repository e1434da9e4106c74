"""The GPU campaign: ``python -m senet_pl.tools.campaign --out DIR`` measures, within a time budget (default 510 s),

1. ``gpu_tests``: the tests marked ``gpu`` (``pytest -m gpu tests``), as a child process: pass/fail counts;
2. ``bench``: the benchmark's cases (``bench.py``, each in its own process): the data path at 28x28 and 224x224,
   training images/s of ``fit`` at 28x28 for a few batch sizes and at 224x224, batch 32 (with its peak memory),
   Lightning's overhead at the best batch size;
3. ``mnist`` and ``fashion_mnist``: time to accuracy, ``fit`` then ``test`` of the final weights (``tta.py``)
   with settings for a fast GPU, on the reduced MNIST and the full Fashion-MNIST;
4. ``study`` (only when named in ``--parts``): ResNet-18 vs SE-ResNet-18 (r = 4, 8, 16, 32) on Fashion-MNIST,
   3 seeds of 10 epochs (``study.py``).

Each part has its own time budget (never more than what is left of the whole one): a child process that
overruns it is ended, and the part is recorded as timed out with what it had (the benchmark's rows and the
study's runs are kept as they finish). A part that fails is recorded with its error, and the next one runs.
``DIR`` gets ``<part>.json`` as soon as each part ends (``bench.json`` also after every row), and
``campaign.json`` / ``campaign.md`` (all parts, and the goals for an H200-class GPU as pass/fail) after each.
SIGTERM (``timeout``) stops it the same way: what was measured is written. The defaults are the GPU settings;
the tests run the same code with tiny ones on a CPU. ``.ci/gpu-campaign`` prepares an offline machine and runs it.
"""

import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt

from senet_pl.tools import run_as_cli
from senet_pl.tools.campaign_parts import (BENCH_ARGS, FASHION_ARGS, MNIST_ARGS, STUDY_RUN_ARGS, Stopped, part_bench,
                                           part_gpu_tests, part_study, part_tta)
from senet_pl.tools.campaign_report import Campaign

Part = Literal["gpu_tests", "bench", "mnist", "fashion_mnist", "study"]
PARTS: list[Part] = ["gpu_tests", "bench", "mnist", "fashion_mnist", "study"]
# The study only when asked for (--parts '[study]'): on an H200 a 10-epoch run at batch 512 takes about 40 s of
# training (14,500 images/s measured), so its 15 runs need about 14 minutes, never left after the other parts.
DEFAULT_PARTS: list[Part] = ["gpu_tests", "bench", "mnist", "fashion_mnist"]


def campaign(
    out: str = "campaign_out",
    data_dir: str = "data",
    work: str | None = None,
    parts: list[Part] = DEFAULT_PARTS,
    budget_s: PositiveFloat = 510,
    gpu_tests_s: PositiveFloat = 100,
    bench_s: PositiveFloat = 160,
    mnist_s: PositiveFloat = 70,
    fashion_mnist_s: PositiveFloat = 180,
    pytest_args: list[str] = ["-m", "gpu", "--tb=short", "tests"],
    bench_args: list[str] = BENCH_ARGS,
    bench_batches: list[PositiveInt] = [256, 512, 1024],
    bench_size: PositiveInt = 224,
    bench_size_batch: PositiveInt = 32,
    mnist_epochs: PositiveInt = 15,
    mnist_args: list[str] = MNIST_ARGS,
    fashion_mnist_epochs: PositiveInt = 30,
    fashion_mnist_args: list[str] = FASHION_ARGS,
    tta_reserve_s: PositiveFloat = 30,
    study_seeds: PositiveInt = 3,
    study_epochs: PositiveInt = 10,
    study_reductions: list[PositiveInt] = [4, 8, 16, 32],
    study_args: list[str] = ["--val_size=1000"],
    study_run_args: list[str] = STUDY_RUN_ARGS,
    study_reserve_s: PositiveFloat = 20,
    compile: bool = False,
    require_cuda: bool = False,
) -> dict:
    """Run the GPU campaign's parts within a time budget; write DIR/<part>.json, campaign.json and campaign.md.

    Args:
        out: folder for the results (8 files at most: the parts' JSON, campaign.json, campaign.md).
        data_dir: torchvision root holding MNIST/raw/ (the reduced MNIST) and FashionMNIST/raw/ (the full one).
        work: folder for the runs' logs and checkpoints (default: a new temporary folder).
        parts: the parts to run, in this order: gpu_tests, bench, mnist, fashion_mnist, study (the study only
            when named: it needs about 14 minutes on an H200).
        budget_s: the whole campaign's time budget; a part gets at most what is left of it.
        gpu_tests_s: time budget of the gpu-marked tests.
        bench_s: time budget of the benchmark rows.
        mnist_s: time budget of MNIST's fit and test (process start and data included).
        fashion_mnist_s: time budget of Fashion-MNIST's fit and test.
        pytest_args: what pytest runs (in the repository's root).
        bench_args: options of every benchmark case (python -m senet_pl.tools.bench), besides --data_dir.
        bench_batches: batch sizes of the 28x28 training rows; the fastest one is compared with a plain loop.
        bench_size: image size of the large data-path and training rows.
        bench_size_batch: batch size of the large training row (whose peak memory has a goal at 224 and 32).
        mnist_epochs: MNIST's epochs (validation after the last one only).
        mnist_args: further options of MNIST's fit and test (after configs/mnist.yaml).
        fashion_mnist_epochs: Fashion-MNIST's epochs.
        fashion_mnist_args: further options of Fashion-MNIST's fit and test (after configs/fashion_mnist.yaml).
        tta_reserve_s: of a time-to-accuracy part's budget, the seconds left for starting and testing
            (training stops at the rest: --trainer.max_time).
        study_seeds: the study's seeds per model.
        study_epochs: the study's epochs per run.
        study_reductions: the SE reduction ratios of the study.
        study_args: further options of python -m senet_pl.tools.study.
        study_run_args: further CLI options of every study run (its --args).
        study_reserve_s: of the study's budget (what is left of the whole one), the seconds kept for starting
            and writing its table: it starts no run that would end later.
        compile: add a torch.compile benchmark row, and fit the time-to-accuracy runs with --model.compile
            (falling back to eager when that fails).
        require_cuda: stop at once, writing nothing, when no CUDA GPU is visible (for the GPU machine's script).
    """
    if require_cuda and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU is visible (torch.cuda.is_available() is False): the campaign did not run.")
    settings = {k: v for k, v in locals().items() if k not in ("out", "work", "require_cuda")}
    settings["data_dir"] = str(Path(data_dir).resolve())
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix="senet_campaign_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    c = Campaign(out_dir, work_dir.resolve(), budget_s, settings)
    budgets = {"gpu_tests": gpu_tests_s, "bench": bench_s, "mnist": mnist_s, "fashion_mnist": fashion_mnist_s,
               "study": float("inf")}
    run = {"gpu_tests": part_gpu_tests, "bench": part_bench, "study": part_study,
           "mnist": lambda c, b, s: part_tta(c, b, s, "mnist"),
           "fashion_mnist": lambda c, b, s: part_tta(c, b, s, "fashion_mnist")}

    state = {"running": False, "stopped": False}

    def stop(signum, frame) -> None:  # SIGTERM: the running part stops; the rest is skipped; all is written
        state["stopped"] = True
        if state["running"]:
            state["running"] = False
            raise Stopped()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for name in PARTS:
            budget = min(budgets[name], c.left())
            if name not in parts or budget < 1 or state["stopped"]:
                why = "not asked for" if name not in parts else "SIGTERM" if state["stopped"] else "no time left"
                c.save(name, {"status": "skipped", "note": why})
                continue
            print(f"campaign: {name} (budget {budget:.0f} s, {c.left():.0f} s left)", file=sys.stderr, flush=True)
            started, c.current = time.monotonic(), {}
            try:
                state["running"] = True
                result = run[name](c, budget, settings)
            except Stopped:
                result = c.current | {"status": "stopped", "note": "SIGTERM"}
            except Exception as err:  # recorded; the next part runs
                result = c.current | {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            finally:
                state["running"] = False
            c.save(name, result | {"seconds": time.monotonic() - started, "budget_s": budget})
            print(f"campaign: {name} {result['status']} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    stopped = state["stopped"]
    c.write_all(finished=not stopped)
    print((out_dir / "campaign.md").read_text())
    if stopped:
        sys.exit(143)
    return c.results


if __name__ == "__main__":
    run_as_cli(campaign)
