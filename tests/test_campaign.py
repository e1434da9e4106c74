"""The GPU campaign (senet_pl/tools/campaign.py) run whole on a CPU with tiny settings, its budgets, failures and
SIGTERM, and what its results say (pytest's counts, the goals). Child processes get one thread each: on a shared
2-core machine torch's default threads make a tiny training step ten times slower."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, make_dataset, scalars

from senet_pl.model import SEResNet
from senet_pl.tools.campaign import PARTS, campaign
from senet_pl.tools import campaign_parts
from senet_pl.tools.campaign_parts import tta_outcome
from senet_pl.tools.campaign_report import goals, pytest_counts, pytest_failures
from senet_pl.tools.process import Finished, run_process

TINY_RUN = ["--data.val_size=16", "--data.batch_size=8", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
GPU_TESTS = """import pytest, time
@pytest.mark.gpu
def test_passes(): pass
@pytest.mark.gpu
def test_fails(): assert False
@pytest.mark.gpu
def test_hangs(): time.sleep({sleep})
def test_not_gpu(): pass
"""


def _tiny(tmp_path: Path, sleep: float = 0) -> dict:
    """The campaign's options for a run of seconds on a CPU: tiny data, 1-2 steps, one seed of two models."""
    (tmp_path / "t_gpu.py").write_text(GPU_TESTS.format(sleep=sleep))
    return dict(
        out=str(tmp_path / "out"), work=str(tmp_path / "work"), data_dir=str(tmp_path / "data"), parts=PARTS,
        pytest_args=["-m", "gpu", str(tmp_path / "t_gpu.py")],
        bench_args=["--val_size=16", "--steps=1", "--data_steps=2"],
        # the large rows at 28x28 and batch 8: the same cases as the small ones, so each runs once
        bench_batches=[8], bench_size=28, bench_size_batch=8,
        mnist_epochs=1, mnist_args=TINY_RUN, fashion_mnist_epochs=1, fashion_mnist_args=TINY_RUN,
        study_seeds=1, study_epochs=1, study_reductions=[4], study_args=["--val_size=16", "--train_batches=2"],
        study_run_args=["--data.batch_size=8", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"],
    )


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.slow
def test_the_whole_campaign_writes_measured_results(tmp_path: Path, one_thread: None) -> None:
    make_dataset(tmp_path / "data", compress=True)
    make_dataset(tmp_path / "data", folder="FashionMNIST", compress=True)
    campaign(**_tiny(tmp_path))
    out = tmp_path / "out"
    # what the GPU machine's tool brings back: at most 8 files, no half-written ones
    assert sorted(p.name for p in out.iterdir()) == sorted(["campaign.json", "campaign.md", *(f"{p}.json" for p in PARTS)])
    summary = json.loads((out / "campaign.json").read_text())
    assert summary["finished"] and summary["device"].startswith("CPU") and summary["cuda"] is False
    parts = summary["parts"]
    assert {name: parts[name]["status"] for name in PARTS} == dict.fromkeys(PARTS, "done")
    for name in PARTS:  # each part's file holds what campaign.json holds
        assert json.loads((out / f"{name}.json").read_text()) == parts[name]
        assert 0 < parts[name]["seconds"] <= parts[name]["budget_s"] + 10

    tests = parts["gpu_tests"]
    assert tests["counts"] == {"passed": 2, "failed": 1, "skipped": 0, "deselected": 1, "error": 0, "xfailed": 0, "xpassed": 0}
    assert tests["note"] == "some tests failed" and "test_fails" in tests["output_tail"]

    rows = {r["label"]: r for r in parts["bench"]["rows"]}
    # the goals' rows first (a budget that runs out leaves the data path unmeasured); same label twice: one entry
    assert list(rows) == ["training, 28x28, batch 8: fit", "Lightning overhead, 28x28, batch 8: plain loop vs fit",
                          "data path, 28x28, batch 32: tutorial vs ours"]
    assert len(parts["bench"]["rows"]) == 5
    for row in parts["bench"]["rows"]:
        assert "error" not in row
        for side in ("left", "right"):
            if row[side] is not None:
                assert row[side]["images_per_s"] > 0 and row[side]["rss_mb"] > 100 and row[side]["gpu_mb"] is None
        if row["left"]:
            assert row["ratio"] == pytest.approx(row["right"]["images_per_s"] / row["left"]["images_per_s"])
    fit = rows["training, 28x28, batch 8: fit"]["right"]
    assert fit["case"] == "train:fit:28:8" and rows["Lightning overhead, 28x28, batch 8: plain loop vs fit"]["right"] == fit
    assert rows["Lightning overhead, 28x28, batch 8: plain loop vs fit"]["left"]["case"] == "train:plain:28:8"

    for name, max_time in (("mnist", "00:00:00:40"), ("fashion_mnist", "00:00:02:30")):  # budget - 30 s
        r = parts[name]
        assert (r["epochs"], r["max_epochs"], r["steps"], r["stopped_early"]) == (1, 1, 2, False)
        assert 0 < r["fit_seconds"] < r["fit_command_seconds"] < r["process_seconds"] and r["images_per_s"] > 0
        assert r["checkpoint_seconds"] > 0 and r["device"] == "cpu"
        assert r["commands"][0].startswith("python -m senet_pl fit --config=") and f"configs/{name}.yaml" in r["commands"][0]
        assert r["commands"][1].endswith("--ckpt_path last") and r["args"][-1] == f"--trainer.max_time={max_time}"
        # the accuracy reported is the one test logged into the run's folder
        logged = scalars(tmp_path / "work" / "lightning_logs" / name / "version_0")
        assert logged["test/acc"][-1][1] == pytest.approx(r["test_acc"])
        # one validation (after the last epoch), not the sanity check's, as logged
        assert r["val_acc_per_validation"] == [pytest.approx(v, abs=1e-6) for _, v in logged["val/acc"]]
        assert len(r["val_acc_per_validation"]) == 1

    study = parts["study"]
    assert (study["planned_runs"], study["completed_runs"], study["stopped"]) == (2, 2, None)
    assert [(r["model"], r["seed"]) for r in study["runs"]] == [("ResNet", 0), ("SE-ResNet r=4", 0)]
    assert [r["params"] for r in study["runs"]] == [
        sum(p.numel() for p in SEResNet(depth=18, se=se, reduction=4).parameters()) for se in (False, True)]
    assert all(0 <= r["acc"] <= 1 and r["images_per_s"] > 0 for r in study["runs"])

    verdicts = {g["goal"].split(":")[0]: (g["measured"], g["verdict"]) for g in summary["goals"]}
    assert verdicts["training images/s at 28x28"] == (f"{fit['images_per_s']:,.0f} img/s at batch 8", "fail")
    assert verdicts["peak GPU memory of fit at 224x224, batch 32 (torch.cuda.max_memory_allocated)"] == ("-", "not measured")
    assert verdicts["MNIST (reduced split)"][0] == f"{100 * parts['mnist']['test_acc']:.2f}% in {parts['mnist']['fit_seconds']:.1f} s (1 epochs)"

    md = (out / "campaign.md").read_text()
    for text in ("## Goals (for an H200-class GPU)", "## Parts", "2 passed, 1 failed, 1 deselected", "## Benchmark",
                 f"| training, 28x28, batch 8: fit | - | {fit['images_per_s']:,.1f} |", "## Time to accuracy",
                 parts["mnist"]["commands"][0], "## SE vs ResNet study (Fashion-MNIST)", "2 of 2 runs", study["table"],
                 f"- fashion_mnist: {parts['fashion_mnist']['val_acc_per_validation'][0]:.4f}"):
        assert text in md, text


@pytest.mark.slow
def test_budgets_failures_and_no_time_left(tmp_path: Path, one_thread: None) -> None:
    options = _tiny(tmp_path, sleep=60) | {"data_dir": str(tmp_path / "nothing"), "gpu_tests_s": 2}
    started = time.monotonic()
    campaign(**options | {"parts": ["gpu_tests", "bench"]})
    parts = json.loads((tmp_path / "out" / "campaign.json").read_text())["parts"]
    assert parts["gpu_tests"]["status"] == "timeout" and "within" in parts["gpu_tests"]["error"]
    assert parts["bench"]["status"] == "failed" and "DataError" in parts["bench"]["error"]  # recorded; the rest ran
    assert {n: parts[n] for n in ("mnist", "fashion_mnist", "study")} == dict.fromkeys(
        ("mnist", "fashion_mnist", "study"), {"status": "skipped", "note": "not asked for"})
    # a part gets at most what is left of the whole budget; none starts with less than a second
    campaign(**options | {"parts": ["mnist", "fashion_mnist"], "budget_s": 2})
    parts = json.loads((tmp_path / "out" / "campaign.json").read_text())["parts"]
    assert parts["mnist"]["status"] == "timeout" and parts["mnist"]["budget_s"] <= 2
    assert parts["fashion_mnist"] == {"status": "skipped", "note": "no time left"}
    assert time.monotonic() - started < 60  # the sleeping test and the MNIST run were ended at their budgets


@pytest.mark.slow
def test_sigterm_stops_the_running_part_and_writes_what_was_measured(tmp_path: Path) -> None:
    o = _tiny(tmp_path, sleep=60)
    command = [sys.executable, "-m", "senet_pl.tools.campaign", f"--out={o['out']}", f"--work={o['work']}",
               f"--pytest_args={json.dumps(o['pytest_args'])}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("campaign: gpu_tests"):
            break
    time.sleep(2)  # pytest is running the sleeping test
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143
    summary = json.loads((tmp_path / "out" / "campaign.json").read_text())
    assert not summary["finished"] and "not finished" in stdout
    assert summary["parts"]["gpu_tests"]["status"] == "stopped"
    assert all(summary["parts"][n] == {"status": "skipped", "note": "SIGTERM"} for n in PARTS[1:4])
    assert summary["parts"]["study"] == {"status": "skipped", "note": "not asked for"}  # by default: only when named


@pytest.mark.slow
def test_a_test_that_fails_after_fit_keeps_the_training_record(tmp_path: Path, one_thread: None) -> None:
    """A GPU call is one try: when the test after a long fit fails or runs out of time, fit's figures (epochs,
    val/acc after each validation) are still in the results, and the part is not counted as done. Here the test
    fails by a limit that only the test command refuses."""
    make_dataset(tmp_path / "data", folder="FashionMNIST", compress=True)
    o = _tiny(tmp_path)
    campaign(**o | {"parts": ["fashion_mnist"], "fashion_mnist_args": [*TINY_RUN, "--trainer.limit_test_batches=0"]})
    r = json.loads((tmp_path / "out" / "fashion_mnist.json").read_text())
    assert r["status"] == "failed" and r["error"].startswith("the test after fit exited with status 1")
    assert "test would evaluate nothing" in r["output_tail"] and "test_acc" not in r  # the CLI's refusal
    assert (r["epochs"], r["steps"], r["stopped_early"]) == (1, 2, False) and len(r["val_acc_per_validation"]) == 1
    md = (tmp_path / "out" / "campaign.md").read_text()
    assert "| fashion_mnist | failed | - |" in md and f"- fashion_mnist: {r['val_acc_per_validation'][0]:.4f}" in md
    summary = json.loads((tmp_path / "out" / "campaign.json").read_text())
    verdicts = {g["goal"].split(":")[0]: g["verdict"] for g in summary["goals"]}
    assert verdicts["Fashion-MNIST"] == "not measured"


def test_a_written_test_accuracy_counts_and_fits_figures_outlive_a_cut_test(tmp_path: Path) -> None:
    """tta.py writes fit's figures when fit ends, then the whole result; what the part makes of each case."""
    path = tmp_path / "result.json"
    fit = {"epochs": 30, "steps": 3_000, "val_acc_per_validation": [0.9, 0.95], "fit_seconds": 500.0}
    cut = Finished(None, "", "Epoch 29 ...", 545.0, timed_out=True)

    nothing = tta_outcome(cut, path, epochs=30)  # ended before fit did: nothing kept, a timeout
    assert nothing["status"] == "timeout" and "the fit/test process did not finish" in nothing["error"]
    assert "epochs" not in nothing

    path.write_text(json.dumps(fit | {"epochs": 28}))  # the test ran out of time after fit stopped at max_time
    r = tta_outcome(cut, path, epochs=30)
    assert r["status"] == "timeout" and "the test after fit did not finish" in r["error"] and "test_acc" not in r
    assert r["val_acc_per_validation"] == [0.9, 0.95] and r["stopped_early"] is True

    path.write_text(json.dumps(fit | {"test_acc": 0.961}))  # the accuracy was written, the process ended on its way out
    r = tta_outcome(cut, path, epochs=30)
    assert (r["status"], r["test_acc"], r["stopped_early"]) == ("done", 0.961, False)
    assert "after writing its result" in r["note"]
    r = tta_outcome(Finished(0, "", "", 540.0, timed_out=False), path, epochs=30)
    assert (r["status"], r["process_seconds"]) == ("done", 540.0) and "note" not in r


@pytest.mark.parametrize("case", ["fit ended, test failed", "failed before fit ended", "SIGTERM after fit"])
def test_compile_retries_only_a_fit_that_did_not_end_and_sigterm_keeps_fits_figures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """With --compile true, the part tries the run compiled, then plain; a plain retry would replace a fit that had
    ended, so it retries only one that had not. The children are stand-ins: they write what tta.py writes."""
    fit = {"epochs": 30, "steps": 3_000, "val_acc_per_validation": [0.95], "fit_seconds": 400.0}
    tries = []

    def child(command: list[str], timeout: float, cwd: Path) -> Finished:
        tries.append(command)
        out = Path(command[-1].removeprefix("--out="))
        if case != "failed before fit ended" or len(tries) == 2:
            out.write_text(json.dumps(fit | ({"test_acc": 0.96} if len(tries) == 2 else {})))
        if case == "SIGTERM after fit":
            raise campaign_parts.Stopped()
        return Finished(0 if len(tries) == 2 else 1, "", "Traceback ...", 450.0, timed_out=False)

    monkeypatch.setattr(campaign_parts, "run_process", child)
    c = SimpleNamespace(work=tmp_path, current={})
    settings = {"fashion_mnist_epochs": 30, "fashion_mnist_args": [], "tta_reserve_s": 30, "data_dir": "data",
                "compile": True}
    if case == "SIGTERM after fit":  # the campaign then records c.current as the part's result
        with pytest.raises(campaign_parts.Stopped):
            campaign_parts.part_tta(c, 545, settings, "fashion_mnist")
        assert c.current == fit | {"stopped_early": False} and len(tries) == 1
        return
    r = campaign_parts.part_tta(c, 545, settings, "fashion_mnist")
    assert "--model.compile=true" in json.loads(tries[0][3].removeprefix("--args="))
    if case == "fit ended, test failed":
        assert len(tries) == 1 and r["status"] == "failed" and r["error"].startswith("the test after fit exited")
        assert r["val_acc_per_validation"] == [0.95] and r["compile_error"] is None
    else:  # compiling failed before training ended: the plain run is measured
        assert len(tries) == 2 and "--model.compile=true" not in json.loads(tries[1][3].removeprefix("--args="))
        assert r["status"] == "done" and r["test_acc"] == 0.96
        assert r["compile_error"]["error"].startswith("the fit/test process exited with status 1")

def test_pytest_counts_read_the_closing_line() -> None:
    assert pytest_counts("...\n1 failed, 2 passed, 1 error, 290 deselected in 3.21s\n")["error"] == 1
    assert pytest_counts("====== 3 passed, 2 skipped, 1 xfailed in 12.00s ======")["skipped"] == 2
    assert set(pytest_counts("no tests ran in 0.01s").values()) == {0}
    assert set(pytest_counts("ImportError while loading conftest").values()) == {0}


def test_a_failures_traceback_is_kept_when_warnings_fill_the_closing_lines(tmp_path: Path) -> None:
    """The first GPU run of the campaign (H200, 2026-12-04) reported "1 failed" and kept only the last 3000
    characters of pytest's output: the warnings summary and durations, not the failure."""
    tests = "import warnings, pytest\n@pytest.mark.gpu\ndef test_fails():\n    seen = 41\n    assert seen == 42, 'MARKER'\n"
    tests += "".join(f"@pytest.mark.gpu\ndef test_warns_{i}():\n    warnings.warn('{'w' * 200} {i}')\n" for i in range(30))
    (tmp_path / "t_gpu.py").write_text(tests)
    out = tmp_path / "out"
    campaign(out=str(out), work=str(tmp_path / "work"), parts=["gpu_tests"],
             pytest_args=["-m", "gpu", "--tb=short", str(tmp_path / "t_gpu.py")])
    result = json.loads((out / "gpu_tests.json").read_text())
    assert result["counts"]["failed"] == 1 and result["counts"]["passed"] == 30
    # the failing line of source is in the traceback only: the closing lines (all the results held before) lack it,
    # while pytest's one-line summary may quote the message there, as wide as the terminal allows
    assert "assert seen == 42" not in result["output_tail"]
    assert "assert seen == 42" in result["failures"] and "AssertionError: MARKER" in result["failures"]
    assert result["failures"].splitlines()[0].strip("= ") == "FAILURES"
    assert "warnings summary" not in result["failures"]
    assert "AssertionError: MARKER" in (out / "campaign.md").read_text()
    # a long section is cut at its end, saying by how much
    cut = pytest_failures(f"=== FAILURES ===\n{'x' * 100}\n=== short test summary info ===\n", limit=40)
    assert cut.startswith("=== FAILURES ===") and cut.endswith("[... 77 more characters]")
    assert pytest_failures("1 passed in 0.01s") == ""


def test_goals_judge_only_what_was_measured_at_the_goals_settings() -> None:
    settings = {"bench_batches": [256, 512], "bench_size": 224, "bench_size_batch": 32}
    fit = lambda rate, gpu=None: {"label": "", "right": {"images_per_s": rate, "gpu_mb": gpu}}  # noqa: E731
    rows = [fit(40_000) | {"label": "training, 28x28, batch 256: fit"}, fit(61_000) | {"label": "training, 28x28, batch 512: fit"},
            fit(900, gpu=5_600) | {"label": "training, 224x224, batch 32: fit"}]
    results = {"bench": {"rows": rows},
               "mnist": {"status": "done", "test_acc": 0.9931, "fit_seconds": 19.5, "epochs": 20},
               "fashion_mnist": {"status": "done", "test_acc": 0.9512, "fit_seconds": 130.0, "epochs": 40}}
    found = [(g["measured"], g["verdict"]) for g in goals(results, settings)]
    assert found == [("61,000 img/s at batch 512", "pass"), ("5.87 GB at 224x224, batch 32", "pass"),
                     ("99.31% in 19.5 s (20 epochs)", "pass"), ("95.12% in 130.0 s (40 epochs)", "fail")]
    rows[2]["right"]["gpu_mb"] = 5_800  # 6.08 GB
    results["mnist"] = {"status": "timeout"}
    found = [g["verdict"] for g in goals(results, settings)]
    assert found == ["pass", "fail", "not measured", "fail"]
    # the large row measured elsewhere than at 224 and 32 is shown, not judged
    assert goals(results, settings | {"bench_size": 56})[1]["verdict"] == "not measured"


@pytest.mark.slow
def test_a_child_at_its_limit_is_ended_with_its_own_children() -> None:
    script = "import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); time.sleep(60)"
    finished = run_process([sys.executable, "-c", script], timeout=2, grace=1)
    assert finished.timed_out and finished.returncode is None and finished.seconds < 10
    grandchild = int(finished.stdout.split()[0])
    time.sleep(0.2)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
