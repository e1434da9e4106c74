"""The study script runs end to end with tiny settings and writes its table."""

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import REPO, make_dataset

from senet_pl.model import SEResNet
from senet_pl.tools import study as study_module
from senet_pl.tools.study import forward_flops, study


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
            "--out=table.md", "--json_out=study.json",
            "--args=[--data.batch_size=8,--trainer.limit_val_batches=1,--trainer.limit_test_batches=2]"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, not whichever one is installed
    result = subprocess.run([sys.executable, "-m", "senet_pl.tools.study", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("Tip:", "LeafSpec", "Loading `train_dataloader`"):  # the CLI's quiet(), in the tools too
        assert noise not in result.stdout + result.stderr, noise
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
    # the plain ResNet's runs under the recipe's name plus _no_se, as every se: false run of the CLI
    assert sorted(p.name for p in (tmp_path / "lightning_logs" / "study_mnist").iterdir()) == ["se_r4_seed0", "se_r4_seed1"]
    assert sorted(p.name for p in (tmp_path / "lightning_logs" / "study_mnist_no_se").iterdir()) == ["resnet_seed0", "resnet_seed1"]
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["finished"] and saved["table"] == table and (saved["planned_runs"], saved["completed_runs"]) == (4, 4)
    assert [(r["model"], r["seed"]) for r in saved["runs"]] == [("ResNet", 0), ("SE-ResNet r=4", 0), ("ResNet", 1), ("SE-ResNet r=4", 1)]
    assert [100 * r["acc"] for r in saved["runs"][::2]] == pytest.approx([float(a) for a in rows[0][4].split(",")], abs=0.006)


def test_a_study_over_its_budget_stops_between_runs_with_every_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]

    def run(args: list[str]) -> dict:  # each run takes 10 s of the study's clock
        now[0] += 10
        return {"acc": 0.5, "params": 1, "flops": 2, "images_per_s": 3.0}

    monkeypatch.setattr(study_module.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(study_module, "_run", run)
    table = study(seeds=3, reductions=[4, 8], budget_s=45, out=str(tmp_path / "t.md"), json_out=str(tmp_path / "s.json"))
    saved = json.loads((tmp_path / "s.json").read_text())
    # seed 0 of every model first; a run is assumed to take as long as the longest so far (10 s)
    assert [(r["model"], r["seed"]) for r in saved["runs"]] == [
        ("ResNet", 0), ("SE-ResNet r=4", 0), ("SE-ResNet r=8", 0), ("ResNet", 1)]
    assert (saved["planned_runs"], saved["completed_runs"]) == (9, 4) and saved["stopped"].startswith("budget: 4 of 9 runs")
    assert "Stopped by the budget: 4 of 9 runs" in table and "| SE-ResNet r=8 |" in table


@pytest.mark.parametrize(("tool", "args", "expected"), [
    ("study", ["--train_batches", "abc"], """error: Parser key "train_batches": expected an int > 0 or null, got 'abc'"""),
    ("study", ["--epochs", "2.5"], """error: Parser key "epochs": expected an int > 0, got '2.5'"""),
    ("study", ["--trian_batches", "3"], "error: unrecognized arguments: --trian_batches 3"),
    ("bench", ["--steps", "abc"], """error: Parser key "steps": expected an int > 0, got 'abc'"""),
    ("bench", ["--data_steps", "0"], """error: Parser key "data_steps": expected an int > 0, got '0'"""),
    ("bench", ["--workers", "-1"], """error: Parser key "workers": expected an int >= 0, got '-1'"""),
])
def test_a_tools_bad_option_is_one_line_and_a_pointer_to_help(tool: str, args: list[str], expected: str) -> None:
    """As python -m senet_pl: not jsonargparse's usage page followed by its nested report of every type tried."""
    result = _run_tool(tool, *args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"tip: For details of accepted options run: python -m senet_pl.tools.{tool} --help", expected]


def test_a_tools_missing_data_or_earlier_study_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing data folder was a page of traceback (study: 43 lines, bench: 19); a second study in the same folder
    replaced the first one's runs, which are named by model and seed."""
    monkeypatch.chdir(tmp_path)
    for tool in ("study", "bench"):
        result = _run_tool(tool, "--data_dir", "nowhere")
        last = result.stderr.splitlines()[-1]
        assert result.returncode == 1 and last.startswith("error: mnist: 4 of 4 files missing in nowhere/MNIST/raw"), \
            result.stderr
        assert "point --data_dir at" in last, last  # the tool's own option, not the CLI's --data.data_dir
    make_dataset(tmp_path / "data")
    result = _run_tool("study", "--reductions", "[16, 8, 16]")  # refused before any run, not after two
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == (
        "error: --reductions lists 16 more than once: give each ratio once."), result.stderr
    assert not Path("lightning_logs").exists()
    result = _run_tool("bench", "--val_size", "100")  # more than the 96 synthetic training images
    assert result.returncode == 1 and result.stderr.splitlines()[-1].startswith("error: --val_size 100 must be")
    earlier = tmp_path / "lightning_logs/study_mnist_no_se/resnet_seed0/checkpoints"  # (the plain ResNet: _no_se)
    earlier.mkdir(parents=True)
    (earlier / "last.ckpt").write_bytes(b"an earlier study's run")
    result = _run_tool("study", "--seeds", "1", "--reductions", "[]", "--val_size", "16")
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == (
        "error: lightning_logs/study_mnist_no_se/resnet_seed0 holds a run of an earlier study, which this one would "
        "replace: move study_mnist and study_mnist_no_se out of lightning_logs, or run the study in another folder."
    ), result.stderr
    assert (earlier / "last.ckpt").read_bytes() == b"an earlier study's run"


def test_a_tools_help_is_its_own() -> None:
    """Its name as typed and its docstring, not the Lightning CLI's description."""
    result = _run_tool("study", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m senet_pl.tools.study ")
    assert "Train ResNet and SE-ResNets" in result.stdout and "Lightning" not in result.stdout


def _run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m senet_pl.tools.TOOL ARGS`` in this process, as runpy runs it for ``-m`` (``__main__`` is the
    tool's module, so the tool names itself as typed): the same exit code and output without a process's seconds
    of importing torch and Lightning. The options are parsed before any work, so nothing else runs."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, sys.argv = sys.argv, [f"senet_pl.tools.{tool}", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before (by this file)
            runpy.run_module(f"senet_pl.tools.{tool}", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        if isinstance(exit_.code, str):  # sys.exit("error: ..."): Python prints it to stderr
            err.write(exit_.code + "\n")
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess([sys.executable, "-m", f"senet_pl.tools.{tool}", *args], code,
                                       out.getvalue(), err.getvalue())
