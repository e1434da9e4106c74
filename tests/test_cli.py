import csv
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FULL_EPOCHS, N_TEST, REPO, TINY, cli, make_dataset, mixed_folder, run, run_here, scalars

from senet_pl.callbacks.summary import as_test
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from senet_pl import runs
from senet_pl.checkpoints import load_checkpoint
from senet_pl.cli import main
from senet_pl.options import SMALLEST
from senet_pl.precision import resolve_precision

def bf16_cpu() -> bool:
    """Whether this CPU runs bf16-mixed (else the CLI falls back to 32-true)."""
    return resolve_precision("bf16-mixed", "cpu", 1) == "bf16-mixed"


CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
RECIPES = [c for c in CONFIGS if c.name != "no_se.yaml"]  # no_se.yaml is an override


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder in which ``python -m senet_pl fit`` ran for 2 tiny epochs on synthetic data."""
    cwd = tmp_path_factory.mktemp("run")
    make_dataset(cwd / "data", compress=True)  # as downloaded by hand: .gz files only
    result = run(cwd, "fit", *TINY, "--trainer.max_epochs=2", "--trainer.enable_model_summary=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (cwd / "fit.out").write_text(result.stdout)
    (cwd / "fit.err").write_text(result.stderr)
    return cwd


def test_fit_writes_checkpoints_config_and_tensorboard_curves(trained: Path) -> None:
    run_dir = trained / "lightning_logs" / "mnist" / "version_0"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints
    assert any(name.startswith("best-epoch") for name in checkpoints)
    assert (run_dir / "config.yaml").is_file()
    curves = scalars(run_dir)
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "train/lr"):
        assert key in curves, sorted(curves)
    assert len(curves["train/loss"]) == 6  # 2 epochs x 3 steps
    assert len(curves["val/acc"]) == 2
    events = EventAccumulator(str(run_dir))
    events.Reload()
    images = events.Tags()["images"]
    # each validation, not the sanity check, at the step of its scalars
    assert [e.step for e in events.Images("val/confusion_matrix")] == [s for s, _ in curves["val/acc"]] == [2, 5]
    assert "val/misclassified" in images
    assert {f"val/se_gates/layer{i}" for i in range(1, 5)} <= set(events.Tags()["histograms"])
    # HParams view: the settings, in an events file of their own; no experiment summary (TensorBoard took the first
    # run's for the columns of all), so TensorBoard builds the columns from every run's settings and scalar tags
    assert len(list(run_dir.glob("events.out.tfevents.*.hparams"))) == 1
    content = events.PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/session_start_info"}
    hparams = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["model/se"].number_value == 1 and hparams["optimizer"].string_value == "SGD"  # bools as 0/1
    assert hparams["optimizer/lr"].number_value == 0.1 and hparams["data/dataset"].string_value == "mnist"


def test_checkpoint_loads_safely_with_plain_hyperparameters(trained: Path) -> None:
    ckpt = torch.load(
        trained / "lightning_logs/mnist/version_0/checkpoints/last.ckpt", weights_only=True, map_location="cpu"
    )
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    assert hparams["depth"] == 18 and hparams["se"] is True and hparams["num_classes"] == 10
    assert all(v is None or isinstance(v, (int, float, str, bool)) for v in hparams.values()), hparams
    assert ckpt["global_step"] == 6


def test_test_and_validate_from_checkpoints(trained: Path) -> None:
    tested = run_here(trained, "test", *TINY, "--ckpt_path=best")
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "test/acc" in tested.stdout
    last = trained / "lightning_logs/mnist/version_0/checkpoints/last.ckpt"
    validated = run_here(trained, "validate", *TINY, f"--ckpt_path={last}")
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert "val/acc" in validated.stdout


def _newest(cwd: Path, name: str) -> Path:
    """The file NAME of the newest run that has one."""
    return max((cwd / "lightning_logs" / "mnist").glob(f"version_*/{name}"), key=lambda p: p.stat().st_mtime)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_one_row_per_test_image(trained: Path) -> None:
    result = run_here(trained, "predict", *TINY, "--ckpt_path=last", "--trainer.enable_progress_bar=true")
    assert result.returncode == 0, result.stderr[-3000:]
    csv_path = _newest(trained, "predictions.csv")
    # The summary is a line of its own, after the progress bar has closed (not appended to the bar's line).
    lines = [line.split("\r")[-1] for line in result.stdout.splitlines()]
    assert f"predictions for {N_TEST} images written to {csv_path.relative_to(trained)}" in lines, result.stdout[-2000:]
    rows = _csv(csv_path)
    assert list(rows[0]) == ["index", "prediction", "class", "confidence", "top3"]
    assert sorted(int(r["index"]) for r in rows) == list(range(N_TEST))
    for r in rows:
        top = [item.split(":") for item in r["top3"].split()]
        assert len(top) == 3 and top[0][0] == r["prediction"] and r["class"].startswith(r["prediction"] + " - ")
        probabilities = [float(p) for _, p in top]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < float(r["confidence"]) <= 1
        assert abs(float(r["confidence"]) - probabilities[0]) < 1e-4


def test_predict_removes_the_files_of_an_earlier_predict_with_another_number_of_processes(trained: Path) -> None:
    """A DDP predict's predictions_rank{N}.csv were left beside a later predict's own files, to be mixed with them."""
    folder = _newest(trained, "checkpoints/last.ckpt").parents[1]
    for name in ("predictions_rank0.csv", "predictions_rank1.csv", "predictions_mine.csv", "predictions_rank1.csv.bak"):
        (folder / name).write_text("an earlier file\n")
    (folder / "predictions_rank5.csv").mkdir()  # a folder of that name is not a prediction file (it crashed predict)
    result = run_here(trained, "predict", *TINY, "--ckpt_path=last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in folder.glob("predictions*")) == [  # a user's own files are kept
        "predictions.csv", "predictions_mine.csv", "predictions_rank1.csv.bak", "predictions_rank5.csv"]


def test_predict_on_a_folder_of_own_images(trained: Path) -> None:
    good = mixed_folder(trained / "mine")
    data = trained / "data"
    data.rename(trained / "elsewhere")  # one's own images need no dataset files
    try:
        result = run_here(trained, "predict", *TINY, "--ckpt_path=last", "--data.predict_dir=mine")
    finally:
        (trained / "elsewhere").rename(data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped mine/f_truncated.png: cannot decode" in result.stderr
    assert "skipped mine/notes.txt: not an image" in result.stderr
    path = _newest(trained, "skipped.csv").parent
    rows = _csv(path / "predictions.csv")
    assert [r["file"] for r in rows] == good
    assert all(0 <= int(r["prediction"]) < 10 and len(r["top3"].split()) == 3 for r in rows)
    assert [r["file"] for r in _csv(path / "skipped.csv")] == ["f_truncated.png", "notes.txt", "subfolder"]


def test_predict_writes_every_name_and_only_this_runs_skipped_files(trained: Path) -> None:
    """A file name that is not UTF-8 crashed predict after all its work; a skipped.csv of an earlier predict stayed
    beside the new predictions.csv."""
    good = mixed_folder(trained / "mixed")
    assert run_here(trained, "predict", *TINY, "--ckpt_path=last", "--data.predict_dir=mixed").returncode == 0
    folder = _newest(trained, "skipped.csv").parent
    (trained / "clean").mkdir()
    for name in (b"a.png", b"bad\xffname.png"):
        (trained / "clean" / os.fsdecode(name)).write_bytes((trained / "mixed" / good[0]).read_bytes())
    result = run_here(trained, "predict", *TINY, "--ckpt_path=last", "--data.predict_dir=clean")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["file"] for r in _csv(folder / "predictions.csv")] == ["a.png", "bad\\xffname.png"]
    assert not (folder / "skipped.csv").exists()


def test_evaluating_a_run_that_cannot_be_written_is_one_line(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = trained / "lightning_logs/mnist/version_0"
    before = sorted(p.name for p in run.iterdir())
    real = os.access  # the run read-only (root may write anyway); every other path as it is
    monkeypatch.setattr(runs.os, "access", lambda path, mode, **kw: Path(path) != run and real(path, mode, **kw))
    result = run_here(trained, "test", *TINY, "--ckpt_path=last")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot write into {run}, the run of lightning_logs/mnist/version_0/checkpoints/last.ckpt, where test "
        "logs: make it writable, or log elsewhere with --trainer.logger.save_dir DIR (and the checkpoint's path) or "
        "--trainer.logger false."), result.stderr[-2000:]
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_checkpoint_of_another_dataset_is_refused(trained: Path) -> None:
    mixed_folder(trained / "other")
    last = _newest(trained, "checkpoints/last.ckpt").relative_to(trained)
    result = run_here(trained, "predict", *TINY, f"--ckpt_path={last}", "--data.predict_dir=other", "--data.dataset=kmnist")
    assert result.returncode == 1
    assert "--data.dataset kmnist, but the checkpoint has mnist" in result.stderr and "Traceback" not in result.stderr


def test_mirror_images_of_digits_are_said_to_be_another_symbol(trained: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained)
    with pytest.warns(UserWarning, match="--model.test_hflip on mnist: a mirrored digit or character is another symbol"):
        assert cli("test", *TINY, "--ckpt_path=last", "--model.test_hflip=true") is None
    make_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # (a new run here, not among the trained folder's)
    with pytest.warns(UserWarning, match="--data.hflip on mnist: a mirrored digit or character is another symbol"):
        assert cli("fit", *TINY, "--trainer.max_steps=1", "--data.hflip=true") is None


@pytest.mark.parametrize(("subcommand", "split"), [("test", "official test"), ("validate", "validation")])
def test_predict_dir_given_to_an_evaluation_says_it_is_unused(trained: Path, monkeypatch: pytest.MonkeyPatch,
                                                              subcommand: str, split: str) -> None:
    """test --data.predict_dir my_digits scored the official test split without a word about the folder."""
    monkeypatch.chdir(trained)
    said = f"--data.predict_dir is read by predict only: {subcommand} uses the {split} split"
    with pytest.warns(UserWarning, match=said):
        assert cli(subcommand, *TINY, "--ckpt_path=last", "--data.predict_dir=other") is None


@pytest.mark.parametrize("folder", ["missing", "junk"])
def test_predict_dir_without_images_is_one_line(trained: Path, folder: str) -> None:
    (trained / "junk").mkdir(exist_ok=True)
    (trained / "junk" / "a.txt").write_text("text")
    result = run_here(trained, "predict", *TINY, "--ckpt_path=last", f"--data.predict_dir={folder}")
    assert result.returncode == 1
    message = "is not a folder" if folder == "missing" else "no readable image in junk (1 files skipped)"
    assert message in result.stderr and "Traceback" not in result.stderr


def _test_logs(folder: Path) -> tuple:
    """What a run folder holds of test: its test/* scalars, and how many test figures."""
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = events.Tags()
    figures = sum(len(events.Images(t)) for t in tags["images"] if t.startswith("test/"))
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags["scalars"] if t.startswith("test/")}, figures


def test_analyze_writes_the_excitation_figure_table_and_summary(trained: Path) -> None:
    run_folder = _newest(trained, "checkpoints/last.ckpt").parents[1]
    before = _test_logs(run_folder)
    result = run_here(trained, "analyze", *TINY, "--trainer.limit_test_batches=5", "--ckpt_path=last",
                      "--trainer.enable_progress_bar=true")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = _newest(trained, "excitation.png").parent
    summary = (folder / "excitation.txt").read_text().splitlines()
    assert summary[0] in result.stdout.splitlines(), result.stdout[-2000:]  # a line of its own, after the progress bar
    rows = _csv(folder / "excitation.csv")
    blocks = {"layer1.1": 64, "layer2.1": 128, "layer3.1": 256, "layer4.1": 512}  # each stage's last block
    assert {r["block"] for r in rows} == set(blocks)
    assert len(rows) == 11 * sum(blocks.values())  # 10 classes and "all", every channel
    assert {r["paper_name"] for r in rows} == {"SE_2_2", "SE_3_2", "SE_4_2", "SE_5_2"}
    assert all(0 <= float(r["mean_excitation"]) <= 1 for r in rows if r["mean_excitation"] != "nan")
    for name in ("SE_2_2", "SE_3_2", "SE_4_2", "SE_5_2"):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name))
        assert "class-agnostic" in line or "class-specific" in line
    assert (folder / "excitation.txt").read_text().strip() in result.stdout
    events = EventAccumulator(str(folder))
    events.Reload()
    assert "excitation/per_class" in events.Tags()["images"]
    step = load_checkpoint(run_folder / "checkpoints/last.ckpt")["global_step"] - 1  # as test logs it (not at 0)
    assert events.Images("excitation/per_class")[-1].step == step
    # Only the gates: its test loop logged test/acc and figures into the run, over those of the run's test.
    assert folder == run_folder and _test_logs(run_folder) == before


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict", "analyze", "export"])
def test_evaluating_needs_a_trained_model(data_root: Path, subcommand: str) -> None:
    """Without --ckpt_path Lightning scores the model's random initial weights and reports them as the results."""
    with pytest.raises(SystemExit) as exit_:
        main([subcommand, *TINY])
    assert str(exit_.value.code) == (f"error: {subcommand} needs a trained model: add --ckpt_path best, last or a "
                                     "checkpoint's path.")
    assert not (data_root.parent / "lightning_logs").exists()


def test_ckpt_path_auto_is_for_fit_only(trained: Path) -> None:
    """auto may start a new run; to evaluate, the model is named (best, last or a path)."""
    before = sorted((trained / "lightning_logs/mnist").iterdir())
    refused = run_here(trained, "test", *TINY, "--ckpt_path=auto")
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith("error: --ckpt_path auto resumes a run or starts one (fit only): test takes "
                                           "best, last or a checkpoint's path."), refused.stderr[-2000:]
    assert sorted((trained / "lightning_logs/mnist").iterdir()) == before


@pytest.mark.parametrize(("subcommand", "given", "said"), [
    ("fit", "", "--ckpt_path is empty (an unset variable?): leave it out to start a new run, or give best, last, auto "
                "or a checkpoint's path."),
    ("fit", "Last", "--ckpt_path Last: no such file. Did you mean --ckpt_path last?"),
    ("test", "bestt", "--ckpt_path bestt: no such file. Did you mean --ckpt_path best?"),
    ("fit", "atuo", "--ckpt_path atuo: no such file. Did you mean --ckpt_path auto?"),
])
def test_a_ckpt_path_typo_is_one_line_that_suggests_the_word(trained: Path, subcommand: str, given: str,
                                                              said: str) -> None:
    before = sorted((trained / "lightning_logs/mnist").iterdir())
    refused = run_here(trained, subcommand, *TINY, f"--ckpt_path={given}")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == f"error: {said}", refused.stderr[-2000:]
    assert sorted((trained / "lightning_logs/mnist").iterdir()) == before
    (trained / "bestt").write_bytes(b"")  # a file of that name is a path, not a typo
    named = run_here(trained, "test", *TINY, "--ckpt_path=bestt")
    (trained / "bestt").unlink()
    assert "Did you mean" not in named.stderr and "cannot read checkpoint bestt" in named.stderr


def test_evaluating_into_a_named_version_keeps_its_training_config(trained: Path) -> None:
    """With the run's version given explicitly, test wrote its settings over the training's config.yaml."""
    config = trained / "lightning_logs/mnist/version_0/config.yaml"
    before = config.read_bytes()
    tested = run_here(trained, "test", *TINY, "--ckpt_path=last", "--trainer.logger.init_args.version=0")
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert config.read_bytes() == before
    assert (config.parent / "config_test.yaml").is_file()


def test_analyze_needs_a_checkpoint_with_se(trained: Path, tmp_path: Path) -> None:
    # The CLI builds the model from the checkpoint's hyperparameters: a plain-ResNet checkpoint
    # is refused before its weights are read.
    ckpt = torch.load(trained / "lightning_logs/mnist/version_0/checkpoints/last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["se"] = False
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if ".se." not in k}
    torch.save(ckpt, tmp_path / "plain.ckpt")
    no_se = f"--config={REPO / 'configs' / 'no_se.yaml'}"
    refused = run_here(trained, "analyze", *TINY, no_se, f"--ckpt_path={tmp_path / 'plain.ckpt'}")
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "is a plain ResNet (se: false): it has no SE gates to analyze" in refused.stderr
    assert "Traceback" not in refused.stderr
    # With the SE recipe's explicit se: true, the conflict itself is named first.
    conflict = run_here(trained, "analyze", *TINY, f"--ckpt_path={tmp_path / 'plain.ckpt'}")
    assert conflict.returncode == 1 and "--model.se True, but the checkpoint has False" in conflict.stderr


def test_analyze_refuses_flip_tta(trained: Path) -> None:
    """The gates of the mirror images would overwrite those of the images themselves."""
    result = run_here(trained, "analyze", *TINY, "--ckpt_path=last", "--model.test_hflip=true")
    assert result.returncode == 1 and "leave out --model.test_hflip" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_resume_from_last_continues_the_same_run(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data")
    # Monitoring the epoch number in "min" mode makes epoch 0 the best for ever: last.ckpt must
    # still follow every later epoch (Lightning 2.6's save_last alone would leave it at epoch 0).
    never_improves = ["--checkpoint.monitor=epoch", "--checkpoint.mode=min"]
    first = run_here(tmp_path, "fit", *TINY, *never_improves, "--trainer.max_epochs=2")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "lightning_logs/mnist/version_0/checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == 6
    assert [p.name for p in checkpoints.glob("best-*")][0].startswith("best-epoch00")

    resumed = run_here(tmp_path, "fit", *TINY, *never_improves, "--trainer.max_epochs=3", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--ckpt_path last resolved to lightning_logs/mnist/version_0/checkpoints/last.ckpt" in resumed.stderr
    runs = sorted(p.name for p in (tmp_path / "lightning_logs" / "mnist").iterdir())
    assert runs == ["version_0"]  # resumed into its own folder: no new version
    assert torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == 9
    steps = [step for step, _ in scalars(tmp_path / "lightning_logs/mnist/version_0")["train/loss"]]
    assert steps == list(range(9))  # one curve: steps 0-5 from the first run, 6-8 after the resume


def test_last_ckpt_records_the_current_best_and_resume_keeps_one_best(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data")
    every_epoch_is_best = ["--checkpoint.monitor=epoch", "--checkpoint.mode=max"]
    main(["fit", *TINY, *every_epoch_is_best, "--trainer.max_epochs=1"])
    main(["fit", *TINY, *every_epoch_is_best, "--trainer.max_epochs=3", "--ckpt_path=last"])
    checkpoints = tmp_path / "lightning_logs/mnist/version_0/checkpoints"
    best = sorted(p.name for p in checkpoints.glob("best-*"))
    assert len(best) == 1 and best[0].startswith("best-epoch02")  # the old best was deleted, not orphaned
    state = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")["callbacks"]
    (recorded,) = [s["best_model_path"] for s in state.values() if s.get("monitor") == "epoch"]
    assert Path(recorded).name == best[0]  # last.ckpt was written after this validation's best


def test_resume_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, "--ckpt_path=last"])
    assert exit_.value.code != 0
    assert "no run under lightning_logs/mnist/ has a checkpoints/last.ckpt" in str(exit_.value.code)
    assert not (tmp_path / "lightning_logs").exists()  # stopped before any work


def test_ckpt_path_auto_starts_fresh_then_resumes(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data")
    main(["fit", *TINY, "--trainer.max_epochs=1", "--ckpt_path=auto"])
    main(["fit", *TINY, "--trainer.max_epochs=2", "--ckpt_path=auto"])
    assert sorted(p.name for p in (tmp_path / "lightning_logs" / "mnist").iterdir()) == ["version_0"]
    last = tmp_path / "lightning_logs/mnist/version_0/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 6


def test_missing_data_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = run_here(tmp_path, "fit", *TINY, "--data.data_dir=nowhere")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "nowhere/MNIST/raw" in line and "--data.data_dir" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data.batch_size=-3"], 'Parser key "data.batch_size"'),
        (["--data.val_size=0"], 'Parser key "data.val_size"'),
        (["--model.reduction=0"], 'Parser key "model.reduction"'),
        (["--model.depth=20"], 'Parser key "model.depth"'),
        (["--data.dataset=cifar"], 'Parser key "data.dataset"'),
        (["--trainer.max_epochs=many"], 'Parser key "trainer.max_epochs"'),
        (["--data.bogus=1"], "unrecognized arguments: --data.bogus=1"),
        (["--model.dept=34"], "unrecognized arguments: --model.dept=34"),  # no abbreviations: it would set depth
        (["--config=bad.yaml"], "depthh"),
        (["--config=empty.yaml"], "a --config file holds no settings (it is empty or only comments): write them as "
                                  "YAML keys, e.g. trainer: {max_epochs: 5}."),
        (["--config=list.yaml"], "a --config file holds no settings (it holds '- 1' ...)"),
        (["--data.image_size=4"], "--data.image_size 4 is too small for --model.stem cifar"),
        (["--data.image_size=28", "--model.stem=imagenet"], "use an image_size of at least 32, or --model.stem cifar"),
    ],
)
def test_bad_values_stop_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], expected: str
) -> None:
    make_dataset(tmp_path / "data")
    (tmp_path / "bad.yaml").write_text("model:\n  depthh: 18\n")  # a typo in a config file
    (tmp_path / "empty.yaml").write_text("# to be written\n")  # jsonargparse: "Unexpected config: # to be written"
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, *args])
    assert exit_.value.code != 0
    message = capsys.readouterr().err + (exit_.value.code if isinstance(exit_.value.code, str) else "")
    assert expected in message
    assert "Traceback" not in message and len(message.strip().splitlines()) <= 10  # a paragraph, not a page
    assert not (tmp_path / "lightning_logs").exists()  # nothing started


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trainer.max_epochs=many"], """Parser key "trainer.max_epochs": expected int or null, got 'many'"""),
        (["--trainer.limit_val_batches=x"], "expected int or float or null, got 'x'"),
        (["--model.ema_decay=1.5"], "expected a number > 0 and < 1 or null, got '1.5'"),  # a range, then null
        (["--model.ema_decay=abc"], "expected a number > 0 and < 1 or null, got 'abc'"),  # not "OpenUnitInterval"
        (["--data.erasing=x"], "expected a number >= 0 and <= 1, got 'x'"),
        # Lightning's literals in one list, then null
        (["--trainer.precision=15"], "expected one of 64, 32, 16, 'transformer-engine', "),
        # one type: jsonargparse's 2 lines
        (["--data.batch_size=0"], """Parser key "data.batch_size": expected an int > 0, got '0'"""),
        (["--data.num_workers=-1"], "expected an int >= 0, got '-1'"),
        (["--model.label_smoothing=2"], "expected a number >= 0 and <= 1, got '2'"),
        (["--model.depth=19"], """Parser key "model.depth": expected one of 18, 34, 50, 101, 152, got '19'"""),
        (["--model.stem=foo"], "expected one of 'cifar', 'imagenet', got 'foo'"),
        (["--model.se=maybe"], "expected bool, got 'maybe'"),
        (["--data.image_size=2.5"], "expected an int > 0, got '2.5'"),  # not "PositiveInt (invalid literal ...)"
    ],
)
def test_a_value_of_the_wrong_type_is_one_line(capsys: pytest.CaptureFixture, args: list[str], expected: str) -> None:
    """jsonargparse reports a value of the wrong type in 2 lines, or in 7 or more for a Union (int | None ...); the
    CLI says it in one, with the types it takes and the value given (and a reason beyond "not an int")."""
    with pytest.raises(SystemExit):
        main(["fit", *TINY, *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("tip:") and expected in lines[1], lines
    assert lines[1].count("one of") <= 1, lines
    assert lines[1].endswith(f"got {args[0].split('=')[1]!r}") or "(" in lines[1], lines


def test_a_class_name_two_classes_share_is_a_choice_between_their_paths(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", *TINY, "--model.lr_scheduler=ReduceLROnPlateau"])  # torch's and Lightning's
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[1:] == ['error: Parser key "model.lr_scheduler": ReduceLROnPlateau names 2 classes: give the full '
                         'class path, torch.optim.lr_scheduler.ReduceLROnPlateau or '
                         'lightning.pytorch.cli.ReduceLROnPlateau.'], lines


@pytest.mark.parametrize(("key", "value"), [("lr", "abc"), ("nesterov", "maybe")])
def test_a_class_options_error_keeps_its_details(capsys: pytest.CaptureFixture, key: str, value: str) -> None:
    """A wrong argument of the optimizer class is reported with jsonargparse's details: the class option, the
    class, the key and the value (the key's own report may be one line inside it)."""
    with pytest.raises(SystemExit):
        main(["fit", *TINY, f"--model.optimizer.{key}={value}"])
    message = capsys.readouterr().err
    assert 'Parser key "model.optimizer"' in message and f'Parser key "{key}"' in message, message
    assert "torch.optim.SGD" in message and value in message.split(f'Parser key "{key}"')[1], message


def test_unreadable_checkpoint_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        main(["test", *TINY, f"--ckpt_path={bad}"])
    assert f"cannot read checkpoint {bad}" in str(exit_.value.code)


@pytest.mark.parametrize("config", RECIPES, ids=lambda p: p.name)
def test_print_config_for_every_recipe(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--config={config}", "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "checkpoint:" in printed


def test_no_se_override_turns_se_off(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", f"--config={REPO / 'configs/mnist.yaml'}", f"--config={REPO / 'configs/no_se.yaml'}",
              "--print_config"])
    printed = capsys.readouterr().out
    assert "  se: false" in printed  # (--print_config exits while parsing, before the run name gets _no_se)


@pytest.mark.parametrize("recipe", ["mnist", "fashion_mnist"])
def test_plain_runs_are_named_after_their_recipe(data_root: Path, recipe: str) -> None:
    """--ckpt_path best of one recipe never picks the plain ResNet of another (or of the same) recipe."""
    from senet_pl.cli import SENetCLI

    args = [*TINY, f"--config={REPO / 'configs' / f'{recipe}.yaml'}"]
    plain = SENetCLI(args=[*args, f"--config={REPO / 'configs/no_se.yaml'}"], run=False)
    assert plain.trainer.logger.name == f"{recipe}_no_se" and plain.model.hparams.se is False
    for name, expected in (("mine", "mine_no_se"), ("casino_se", "casino_se_no_se"), ("mine_no_se", "mine_no_se")):
        named = SENetCLI(args=[*args, "--model.se=false", f"--trainer.logger.init_args.name={name}"], run=False)
        assert named.trainer.logger.name == expected
    assert SENetCLI(args=args, run=False).trainer.logger.name == recipe
    # a recipe on another dataset: named after that dataset (mnist.yaml's runs of KMNIST took over lightning_logs/mnist,
    # and --ckpt_path best of the MNIST recipe was then refused: the checkpoint's dataset was kmnist)
    for dataset, se in (("kmnist", "true"), ("kmnist", "false"), (recipe, "false")):
        other = SENetCLI(args=[*args, f"--data.dataset={dataset}", f"--model.se={se}"], run=False)
        assert other.trainer.logger.name == dataset + ("_no_se" if se == "false" else "")
    mine = SENetCLI(args=[*args, "--data.dataset=kmnist", "--trainer.logger.init_args.name=mine"], run=False)
    assert mine.trainer.logger.name == "mine"  # a name of the user's own is kept


def test_a_plain_checkpoint_without_its_config_stays_in_plain_runs(data_root: Path, tmp_path: Path) -> None:
    """se comes from the checkpoint when no option or config gives it: the run name follows it, so testing or
    resuming a plain model never puts it where --ckpt_path best of an SE-ResNet's runs looks."""
    assert main(["fit", *TINY, "--trainer.max_epochs=1", f"--config={REPO / 'configs/no_se.yaml'}"]) is None
    last = tmp_path / "lightning_logs/mnist_no_se/version_0/checkpoints/last.ckpt"
    bare = [a for a in TINY if not a.startswith("--config")]  # the defaults: se not given
    assert main(["test", *bare, f"--ckpt_path={last}"]) is None
    schedule = "--model.lr_scheduler=senet_pl.schedule.CosineAnnealingLR"  # the recipe's (the default has none)
    assert main(["fit", *bare, "--trainer.max_epochs=2", "--seed_everything=42", schedule, f"--ckpt_path={last}"]) is None
    runs = sorted(p.name for p in (tmp_path / "lightning_logs").iterdir())
    assert len(runs) == 2 and all(name.endswith("_no_se") for name in runs), runs
    assert "se: false" in (tmp_path / "lightning_logs" / runs[1] / "version_1/config.yaml").read_text()


def test_seed_224_is_the_tutorial_recipe(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", f"--config={REPO / 'configs/seed_224.yaml'}", "--print_config"])
    printed = capsys.readouterr().out
    for line in ("image_size: 224", "batch_size: 32", "lr: 0.05", "momentum: 0.5", "max_epochs: 20",
                 "lr_scheduler: null", "stem: cifar", "depth: 18"):
        assert line in printed


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict", "analyze"])
def test_help_names_the_options(subcommand: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([subcommand, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model.depth", "--model.stem", "--model.se", "--model.reduction", "--data.dataset",
                   "--data.data_dir", "--data.image_size", "--data.batch_size", "--data.val_size",
                   "--data.predict_dir", "--data.invert", "--ckpt_path"):
        assert option in text


def test_a_file_where_the_run_folders_go_is_one_line(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data")
    (tmp_path / "lightning_logs").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY])
    message = str(exit_.value.code)
    assert message.startswith("error: lightning_logs is a file, but the logger keeps its runs in that folder")
    assert "--trainer.logger.init_args.save_dir" in message


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data.val_size=1000"], "--data.val_size 1000 must be between 1 and 95"),
        (["--trainer.max_epochs=0"], "--trainer.max_epochs 0 trains nothing"),
        (["--trainer.max_steps=0"], "--trainer.max_steps 0 trains nothing"),
        (["--trainer.max_epochs=-2"], "--trainer.max_epochs -2: give a number of epochs (or -1 for no limit)"),
        # Lightning would quietly train 1000 epochs (and stretch the cosine over them)
        (["--trainer.max_epochs=null"], "--trainer.max_epochs null sets no length (Lightning would train 1000 epochs)"),
        (["--trainer.max_time=banana"], "--trainer.max_time banana: write a duration as DD:HH:MM:SS"),
        (["--trainer.max_time=00:00:00:00"], "--trainer.max_time 00:00:00:00 trains nothing"),
        (["--trainer.max_time={minutes: 0}"], "trains nothing: give a duration of at least a second"),
        # the best checkpoint would be the one of the highest loss (the recipes' mode is max, for val/acc)
        (["--checkpoint.monitor=val/loss"], "--checkpoint.monitor val/loss improves as it falls, but --checkpoint.mode "
                                            "is max: give --checkpoint.mode min."),
        (["--checkpoint.monitor=val/acc", "--checkpoint.mode=min"], "give --checkpoint.mode max."),
        (["--trainer.limit_val_batches=-1"], "invalid value -1 for limit_val_batches"),  # Lightning's check, one line
        (["--trainer.val_check_interval=-1"], "invalid value -1 for val_check_interval"),
        (["--trainer.val_check_interval=5"], "`val_check_interval` (5) must be less than or equal to the number of the"),
        (["--model.lr_scheduler.init_args.T_max=0"], "CosineAnnealingLR T_max 0: give a positive number"),
        (["--model.label_smoothing=1"], "--model.label_smoothing 1.0: the targets would all be uniform"),
        (["--ckpt_path=broken.ckpt"], "cannot read checkpoint broken.ckpt"),
        (["--seed_everything=-1"], "--seed_everything -1 is out of range: use a seed from 0 to 4294967295"),
        (["--seed_everything=4294967296"], "--seed_everything 4294967296 is out of range"),
        (["--trainer.limit_train_batches=0"], "--trainer.limit_train_batches 0 trains nothing"),
        (["--trainer.limit_train_batches=0.0"], "--trainer.limit_train_batches 0.0 trains nothing"),
        (["--trainer.val_check_interval=0"], "--trainer.val_check_interval 0: give a number of training batches"),
        (["--trainer.val_check_interval=0.0"], "--trainer.val_check_interval 0.0: give a number of training batches"),
        # the recipe's warm-up (100 steps) would be overwritten by a schedule that sets the rate outright
        (["--model.lr_scheduler=OneCycleLR", "--model.lr_scheduler.max_lr=0.1"], "give --model.warmup_steps 0"),
        (["--model.lr_scheduler=CosineAnnealingWarmRestarts", "--model.lr_scheduler.T_0=2"],
         "CosineAnnealingWarmRestarts sets the learning rate outright"),
        # Lightning's own checks when the Trainer is built, as one line (they were a page of traceback)
        (["--trainer.devices=x"], "error: Trainer: `devices` selected with `CPUAccelerator` should be an int > 0."),
        (["--trainer.devices=[1, 2]"], "error: Trainer: `devices` selected with `CPUAccelerator`"),
        (["--trainer.strategy=foo"], "error: Trainer: You selected an invalid strategy name: `strategy='foo'`"),
        (["--trainer.accelerator=foo"], "error: Trainer: You selected an invalid accelerator name: `accelerator='foo'`"),
        (["--trainer.num_nodes=0"], "error: Trainer: `num_nodes` must be a positive integer, but got 0."),
        # torch's checks of the optimizer's and schedule's settings, before any data is read
        (["--model.optimizer.init_args.lr=-1"], "error: --model.optimizer: Invalid learning rate: -1.0"),
        (["--model.optimizer.init_args.momentum=-0.5"], "error: --model.optimizer: Invalid momentum value: -0.5"),
        (["--model.lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau", "--model.lr_scheduler.factor=2"],
         "error: --model.lr_scheduler: Factor should be < 1.0."),
        # torch takes these and fails at the schedule's first step, or sets a negative rate
        (["--model.lr_scheduler=StepLR", "--model.lr_scheduler.step_size=0"],
         "error: --model.lr_scheduler StepLR step_size 0: give the number of scheduler steps between decays"),
        (["--model.lr_scheduler=StepLR", "--model.lr_scheduler.step_size=-1"],  # torch: a decay at every step
         "error: --model.lr_scheduler StepLR step_size -1: give the number of scheduler steps between decays"),
        # a plateau schedule with nothing to watch would stop the run at the end of its first epoch
        (["--model.lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau", "--trainer.limit_val_batches=0"],
         "error: --model.lr_scheduler ReduceLROnPlateau watches 'val/loss' after validations, but this run never"),
        (["--model.lr_scheduler=lightning.pytorch.cli.ReduceLROnPlateau", "--model.lr_scheduler.monitor=val/acc"],
         "error: --model.lr_scheduler ReduceLROnPlateau watches 'val/acc' in mode 'min'"),
        (["--model.lr_scheduler=OneCycleLR", "--model.lr_scheduler.max_lr=-1", "--model.warmup_steps=0"],
         "error: the learning rate is -0.04 at step 0: training stopped before its first step"),  # max_lr / 25
        # OneCycleLR refuses a step past its length: once the run's length is known, before the first step
        (["--model.lr_scheduler=OneCycleLR", "--model.lr_scheduler.max_lr=0.1", "--model.lr_scheduler.total_steps=40",
          "--model.warmup_steps=0"], "error: --model.lr_scheduler OneCycleLR is 40 steps long, but this run takes 45"),
        # Lightning refuses to clip the gradients of a fused optimizer under mixed precision at the first step
        pytest.param(["--trainer.gradient_clip_val=0.5"],
                     "error: --trainer.gradient_clip_val 0.5: Lightning cannot clip the gradients of a fused optimizer",
                     marks=pytest.mark.skipif(not bf16_cpu(), reason="this CPU runs 32-true, where clipping works")),
    ],
)
def test_runs_that_fail_before_their_first_step_leave_no_run_folder(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    make_dataset(tmp_path / "data")
    (tmp_path / "broken.ckpt").write_bytes(b"\0" * 100)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, *args])
    assert expected in str(exit_.value.code) and "\n" not in str(exit_.value.code), exit_.value.code
    assert not list(tmp_path.glob("lightning_logs/*/version_*"))  # nothing for --ckpt_path last|best|auto to pick
    assert not (tmp_path / "lightning_logs").exists()  # nor an empty lightning_logs/mnist/ (it was left)


@pytest.mark.parametrize("option", sorted(SMALLEST))
def test_a_trainer_setting_below_its_smallest_is_refused(data_root: Path, option: str) -> None:
    """Lightning takes these without a check and divides by zero (accumulate_grad_batches 0), turns the gradients
    around (gradient_clip_val -1) or quietly does something else; the CLI refuses them in one line."""
    value = SMALLEST[option][0] - 1
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, f"--trainer.{option}={value}"])
    message = str(exit_.value.code)
    assert message.startswith(f"error: --trainer.{option} {value}: give ") and "\n" not in message, message
    assert not (data_root.parent / "lightning_logs").exists()


@pytest.mark.parametrize(("yaml", "expected"), [
    ("trainer:\n  gradient_clip_val: .nan\n", "error: --trainer.gradient_clip_val nan: give the largest gradient"),
    ("model:\n  optimizer:\n    class_path: torch.optim.SGD\n    init_args:\n      lr: .nan\n",
     "error: the learning rate is nan at step 0: training stopped before its first step"),
])
def test_a_nan_setting_in_a_yaml_file_is_refused(data_root: Path, tmp_path: Path, yaml: str, expected: str) -> None:
    """YAML's .nan passes every "less than" check; it is refused, not trained (a NaN rate ended in a NaN loss,
    which blamed the rate's size)."""
    (tmp_path / "nan.yaml").write_text(yaml)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, f"--config={tmp_path / 'nan.yaml'}"])
    assert str(exit_.value.code).startswith(expected), exit_.value.code
    assert not list(tmp_path.glob("lightning_logs/*/version_*"))


@pytest.mark.parametrize("args", [
    # a linear OneCycleLR of one step (the length the check had before the data was known) dips below 0
    ["--model.lr_scheduler=OneCycleLR", "--model.lr_scheduler.max_lr=0.05", "--model.lr_scheduler.anneal_strategy=linear",
     "--model.warmup_steps=0"],
    # LBFGS's step needs a closure: the check steps only the schedule
    # (one iteration a step: its default 20 took 108 s of the suite on a 2-core AVX2 CPU)
    ["--model.optimizer=LBFGS", "--model.optimizer.lr=0.1", "--model.optimizer.max_iter=1", "--model.warmup_steps=0",
     "--trainer.precision=32-true", "--model.channels_last=false"],
    # clipping an optimizer that is not fused, under the recipe's mixed precision
    ["--trainer.gradient_clip_val=0.5", "--model.optimizer.init_args.fused=false"],
])
def test_settings_the_checks_must_let_through_train(data_root: Path, args: list[str]) -> None:
    assert cli("fit", *TINY, "--trainer.max_epochs=1", *args) is None
    assert (data_root.parent / "lightning_logs/mnist/version_0/checkpoints/last.ckpt").is_file()


def test_a_rate_that_turns_negative_stops_before_that_step(data_root: Path) -> None:
    """StepLR with gamma -1 takes the rate from 0.1 to -0.1 after 2 steps: the run stops before the optimizer step
    that would use it (it would climb the loss), and what was written before stays."""
    message = cli("fit", *TINY, "--trainer.max_epochs=1", "--model.warmup_steps=0", "--model.lr_scheduler=StepLR",
                  "--model.lr_scheduler.step_size=2", "--model.lr_scheduler.gamma=-1",
                  "--last_checkpoint.every_n_train_steps=1")
    assert message is not None and message.startswith("error: the learning rate is -0.1 at step 2: training stopped "
                                                       "before that step (the checkpoints from before are intact)"), message
    last = torch.load(data_root.parent / "lightning_logs/mnist/version_0/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 2


def test_each_trainer_settings_smallest_value_trains(data_root: Path) -> None:
    """The smallest values that SMALLEST lets through are Lightning's own meanings (0: no clipping, no logging,
    no minimum; -1: every validation batch in the sanity check), and a run with all of them trains."""
    smallest = [f"--trainer.{option}={value}" for option, (value, _) in SMALLEST.items()]
    assert cli("fit", *TINY, "--trainer.max_epochs=1", *smallest) is None
    assert (data_root.parent / "lightning_logs/mnist/version_0/checkpoints/last.ckpt").is_file()


@pytest.mark.parametrize(("subcommand", "limit"), [("validate", "limit_val_batches 0"), ("test", "limit_test_batches 0.0"),
                                                  ("analyze", "limit_test_batches 0"), ("predict", "limit_predict_batches 0")])
def test_an_evaluation_of_no_batches_is_refused(data_root: Path, subcommand: str, limit: str) -> None:
    """Lightning would report success with no metrics (or an empty CSV)."""
    from senet_pl.model import SEResNet

    torch.save(SEResNet(depth=18, stem="cifar").state_dict(), data_root.parent / "weights.pt")  # a trained model
    with pytest.raises(SystemExit) as exit_:
        main([subcommand, *TINY, f"--trainer.{limit.replace(' ', '=')}", f"--ckpt_path={data_root.parent / 'weights.pt'}"])
    message = str(exit_.value.code)
    assert f"--trainer.{limit}: {subcommand} would evaluate nothing" in message and "\n" not in message, message


@pytest.mark.parametrize("form", ["argv", "yaml"])
def test_an_integer_limit_is_a_number_of_batches(data_root: Path, tmp_path: Path, form: str) -> None:
    """``--trainer.limit_val_batches 1`` is one batch (Lightning's own signature would read 1.0: all of them);
    1.0 stays a fraction. Tried on a real fit: 80 training images in batches of 8, 16 validation images."""
    from senet_pl.cli import SENetCLI

    limits = {"limit_train_batches": "2", "limit_val_batches": "1", "limit_test_batches": "1.0"}
    base = [a for a in TINY if not a.startswith("--trainer.limit_")] + ["--trainer.max_epochs=1"]
    if form == "argv":
        extra = [x for key, value in limits.items() for x in (f"--trainer.{key}", value)]
    else:
        (tmp_path / "limits.yaml").write_text("trainer:\n" + "".join(f"  {k}: {v}\n" for k, v in limits.items()))
        extra = [f"--config={tmp_path / 'limits.yaml'}"]
    cli = SENetCLI(args=["fit", *base, *extra])
    trainer = cli.trainer
    assert (trainer.limit_train_batches, trainer.limit_val_batches) == (2, 1)
    assert type(trainer.limit_val_batches) is int and trainer.limit_test_batches == 1.0
    assert type(trainer.limit_test_batches) is float
    assert trainer.num_training_batches == 2 and trainer.num_val_batches == [1]
    assert trainer.global_step == 2


def test_fit_ends_with_a_summary_whose_next_command_works(trained: Path) -> None:
    out = (trained / "fit.out").read_text()
    run_dir = "lightning_logs/mnist/version_0"
    assert "fit done: 2 epoch(s), step 6 (6 in this run) in " in out and " training images/s." in out, out[-2000:]
    best = next(line for line in out.splitlines() if line.startswith("best checkpoint (val/acc "))
    assert best.split(": ", 1)[1].startswith(f"{run_dir}/checkpoints/best-epoch")
    assert f"last checkpoint: {run_dir}/checkpoints/last.ckpt" in out
    assert "curves: tensorboard --logdir lightning_logs/mnist" in out
    next_command = next(line for line in out.splitlines() if line.startswith("next: python -m senet_pl test "))
    args = next_command.split()[4:]
    assert args[:3] == ["test", "--config", f"{run_dir}/config.yaml"]
    result = run(trained, *args[:-2], "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false", *args[-2:])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"test done of {args[-1]}: test/acc " in result.stdout


def test_a_run_cut_within_an_epoch_says_how_far_it_got_and_what_to_test(data_root: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """max_steps 4 of an epoch of 10 batches: no validation ran, so there is no best checkpoint; last.ckpt is next."""
    full = [a for a in TINY if not a.startswith("--trainer.limit_train_batches")]
    assert main(["fit", *full, "--trainer.max_epochs=5", "--trainer.max_steps=4"]) is None
    out = capsys.readouterr().out
    assert "fit done: 0 epoch(s) and 4 of 10 batches, step 4 (4 in this run)" in out, out[-2000:]
    assert "best checkpoint" not in out
    assert "next: python -m senet_pl test --config lightning_logs/mnist/version_0/config.yaml --ckpt_path " \
           "lightning_logs/mnist/version_0/checkpoints/last.ckpt" in out, out[-2000:]


@pytest.mark.parametrize(("typed", "expected"), [
    (["fit", "--a=1", "--ckpt_path", "last", "--b", "x y"], ["test", "--a=1", "--b", "x y"]),
    (["--config", "c.yaml", "fit", "--ckpt_path=last", "--a=1"], ["--config", "c.yaml", "test", "--a=1"]),
    (["--ckpt_path=auto", "--a=1"], ["test", "--a=1"]),
])
def test_a_fit_without_a_config_yaml_is_repeated_as_a_test(typed: list[str], expected: list[str]) -> None:
    """The next command of a run without a logger: fit's command line, options before the subcommand kept before."""
    assert as_test(typed) == expected

@pytest.mark.parametrize("logger", [[], ["--trainer.logger=CSVLogger"]])
def test_a_home_folder_and_variables_in_the_logger_paths_keep_a_run_in_one_folder(
        data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        logger: list[str]) -> None:
    """``--trainer.logger.save_dir ~/runs``: TensorBoard's logger expanded ~ and $VARS, Lightning's checkpoints did
    not, and a run was split between $HOME/runs/... and a folder named ~ in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EXPERIMENT", "sweep1")
    paths = ["--trainer.logger.save_dir=~/runs", "--trainer.logger.name=$EXPERIMENT"]
    assert main(["fit", *TINY, "--trainer.max_epochs=1", *logger, *paths]) is None
    out = capsys.readouterr().out
    run_dir = tmp_path / "home" / "runs" / "sweep1" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "hparams.yaml").is_file()
    assert not Path("~").exists() and not list(Path().glob("*/sweep1")) and not Path("$EXPERIMENT").exists()
    assert f"last checkpoint: {run_dir}/checkpoints/last.ckpt" in out, out[-2000:]
    # a resume finds it by the same words
    assert main(["fit", *TINY, "--trainer.max_epochs=2", *logger, *paths, "--ckpt_path=last"]) is None
    resumed = capsys.readouterr()
    assert f"--ckpt_path last resolved to {run_dir}/checkpoints/last.ckpt" in resumed.err, resumed.err[-2000:]
    assert "fit done: 2 epoch(s), step 6 (3 in this run)" in resumed.out

def test_the_next_command_can_be_pasted_when_the_run_folder_has_a_space(data_root: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", *TINY, "--trainer.max_epochs=1", "--trainer.logger.init_args.save_dir=my logs"]) is None
    out = capsys.readouterr().out
    assert "curves: tensorboard --logdir 'my logs/mnist'" in out, out[-2000:]
    pasted = next(line for line in out.splitlines() if line.startswith("next: python -m senet_pl test "))
    command = pasted.removeprefix("next: python") + " --trainer.limit_test_batches=2 --trainer.enable_progress_bar=false"
    result = subprocess.run(["bash", "-c", shlex.quote(sys.executable) + command], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "test done of my logs/mnist/version_0/checkpoints/best-epoch00" in result.stdout, \
        result.stderr[-2000:]


def test_a_run_prints_no_message_a_user_cannot_act_on(trained: Path) -> None:
    printed = (trained / "fit.out").read_text() + (trained / "fit.err").read_text()
    for noise in ("Tip:", "litlogger", "LeafSpec", "not supported by the model summary", "Loading `train_dataloader`",
                  "Detected call of `lr_scheduler.step()`"):  # the check of the schedule before fit (its one step)
        assert noise not in printed, noise
    assert "GPU available" in printed  # Lightning's own lines are kept
    # a warning is one line: no file name and source line of the code that warned
    assert "\nUserWarning: --model.warmup_steps 100 is longer than this run's 6 optimizer steps" in printed, printed
    assert "rank_zero_warn(" not in printed and "module.py:" not in printed


def test_a_resume_with_nothing_left_to_train_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Resumed at its end: no step is trained; the summary says why, and still names last.ckpt (the checkpoint it
    resumed from, unchanged) for the next command."""
    make_dataset(tmp_path / "data")
    main(["fit", *TINY, "--trainer.max_epochs=1"])
    last = tmp_path / "lightning_logs/mnist/version_0/checkpoints/last.ckpt"
    before = last.read_bytes()
    capsys.readouterr()
    main(["fit", *TINY, "--trainer.max_epochs=1", "--ckpt_path=last"])
    out = capsys.readouterr().out
    assert "fit done: step 3 (0 in this run)" in out  # no epochs: Lightning's counter is then the checkpoint's
    assert "nothing left to train: the checkpoint had reached this run's end; give a larger --trainer.max_epochs" in out
    assert "last checkpoint: lightning_logs/mnist/version_0/checkpoints/last.ckpt" in out, out
    assert last.read_bytes() == before
    # cut by max_steps at the end of its second epoch: Lightning's counter said "1 epoch(s)" on such a resume
    main(["fit", *TINY, "--trainer.max_epochs=5", "--trainer.max_steps=6", "--ckpt_path=last"])
    assert "fit done: 2 epoch(s), step 6 (3 in this run)" in capsys.readouterr().out
    main(["fit", *TINY, "--trainer.max_epochs=5", "--trainer.max_steps=6", "--ckpt_path=last"])
    out = capsys.readouterr().out
    assert "fit done: step 6 (0 in this run)" in out and "epoch" not in out.split("fit done:")[1].split("\n")[0]


def test_the_model_summary_shows_shapes_and_flops(trained: Path) -> None:
    """The fit of ``trained`` prints Lightning's model summary (its example input goes through the data
    module's batch transform, as a batch would): with shapes and the FLOPs of one image, not "Total Flops 0"."""
    out = (trained / "fit.out").read_text() + (trained / "fit.err").read_text()  # the summary is logged to stderr
    flops = next(line for line in out.splitlines() if line.rstrip().endswith("Total Flops"))
    assert float(flops.split()[0].replace(",", "")) > 0, flops
    assert "[1, 1, 8, 8]" in out and "[1, 10]" in out  # In sizes (resized to TINY's 8x8, as a batch is) / Out sizes


def test_a_changed_precision_is_said_in_one_line(data_root: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from senet_pl import precision
    from senet_pl.cli import SENetCLI

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    cli = SENetCLI(args=[*TINY, "--trainer.precision=bf16-mixed"], run=False)
    assert cli.config.trainer.precision == "32-true"
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("precision:")]
    assert lines == ["precision: bf16-mixed asked, but this CPU has no bf16 (AVX512-BF16 or AMX): using 32-true "
                     "(set --trainer.precision to choose)."]
    SENetCLI(args=[*TINY, "--trainer.precision=32"], run=False)  # an alias is no change
    assert "precision:" not in capsys.readouterr().err
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)  # another process of a DDP run: the same change, said once
    assert SENetCLI(args=[*TINY, "--trainer.precision=bf16-mixed"], run=False).config.trainer.precision == "32-true"
    assert "precision:" not in capsys.readouterr().err


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict", "analyze"])
def test_help_explains_this_projects_ckpt_path(subcommand: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([subcommand, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    help_text = text.split("--ckpt_path CKPT_PATH", 2)[-1]
    assert '"last"' in help_text and '"best"' in help_text
    assert "hpc" not in help_text and "registry" not in help_text and "--weights_only" not in text


def test_evaluating_a_checkpoint_logs_into_its_run(trained: Path, tmp_path: Path) -> None:
    """test/validate of a run's checkpoint add their metrics to that run's folder (one TensorBoard run, one HParams
    row per trained model), keep its config.yaml and start no new version."""
    import os
    import shutil

    shutil.copytree(trained / "data", tmp_path / "data")
    shutil.copytree(trained / "lightning_logs", tmp_path / "lightning_logs",
                    copy_function=lambda a, b: os.link(a, b) if a.endswith(".ckpt") else shutil.copy2(a, b))
    run_dir = tmp_path / "lightning_logs/mnist/version_0"
    before = sorted(p.name for p in run_dir.parent.iterdir())
    config = (run_dir / "config.yaml").read_text()
    earlier = scalars(run_dir)  # (other tests may have evaluated this run before)
    best = load_checkpoint(next((run_dir / "checkpoints").glob("best-*.ckpt")))
    for subcommand in ("test", "validate"):
        result = run_here(tmp_path, subcommand, *TINY, "--ckpt_path=best")
        assert result.returncode == 0, result.stderr[-2000:]
        assert "logged to lightning_logs/mnist/version_0" in result.stdout
    assert sorted(p.name for p in run_dir.parent.iterdir()) == before  # no new version_N
    assert (run_dir / "config.yaml").read_text() == config
    assert (run_dir / "config_test.yaml").is_file() and (run_dir / "config_validate.yaml").is_file()
    curves = scalars(run_dir)
    assert {"train/loss", "val/acc", "test/acc"} <= set(curves)
    # At the step where fit logged the validation of the checkpoint's weights, not at 0 (the curves jumped back):
    # validate, on the same split, adds the very same point.
    step = best["global_step"] - 1
    new = {tag: points[len(earlier.get(tag, [])):] for tag, points in curves.items()}
    assert [s for s, _ in new["test/acc"]] == [step] and len(new["val/acc"]) == 1
    assert new["val/acc"][0] == next(point for point in earlier["val/acc"] if point[0] == step)
    assert curves["epoch"][-1] == (step, best["epoch"])
    events = EventAccumulator(str(run_dir))
    events.Reload()
    # figures at the steps of the scalars (they were one step later in fit)
    assert {e.step for e in events.Images("val/confusion_matrix")} == {s for s, _ in curves["val/acc"]}
    assert events.Images("test/confusion_matrix")[-1].step == step
    # one HParams row: fit's settings, whose metric columns (the run's scalars) now hold the test's too
    assert len(list(run_dir.glob("events.out.tfevents.*.hparams"))) == 1
    assert set(events.PluginTagToContent("hparams")) == {"_hparams_/session_start_info"}


def test_a_run_without_a_logger_keeps_its_checkpoints_and_writes_nothing_else(tmp_path: Path) -> None:
    """``--trainer.logger false``: no run folder, no train/lr (nothing to log it to), and no config.yaml over a file
    of that name in the working directory; the checkpoints go to ./checkpoints and resume from there."""
    make_dataset(tmp_path / "data")
    (tmp_path / "config.yaml").write_text("mine\n")
    result = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=1", "--trainer.logger=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "config.yaml").read_text() == "mine\n"
    assert not (tmp_path / "lightning_logs").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "tensorboard" not in result.stdout and "--config config.yaml" not in result.stdout
    # no config.yaml to point at: the next command repeats fit's own options, and works as printed
    pasted = next(line for line in result.stdout.splitlines() if line.startswith("next: python -m senet_pl test "))
    words = shlex.split(pasted.removeprefix("next: python -m senet_pl "))
    assert words[1:-2] == [*TINY, "--trainer.max_epochs=1", "--trainer.logger=false"]
    assert words[-2] == "--ckpt_path" and Path(words[-1]).parent == tmp_path / "checkpoints"
    pasted_test = run_here(tmp_path, *words)
    assert pasted_test.returncode == 0 and "test/acc" in pasted_test.stdout, pasted_test.stderr[-2000:]
    resumed = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=2", "--trainer.logger=false",
                  "--ckpt_path=checkpoints/last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "fit done: 2 epoch(s), step 6 (3 in this run)" in resumed.stdout
    pasted = next(line for line in resumed.stdout.splitlines() if line.startswith("next: python -m senet_pl test "))
    assert pasted.count("--ckpt_path") == 1 and "last.ckpt" not in pasted  # the resumed checkpoint's option is not kept
    # a finished run resumed with nothing left to train: its steps are the checkpoint's, none of them this run's
    again = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=2", "--trainer.logger=false",
                "--ckpt_path=checkpoints/last.ckpt")
    assert again.returncode == 0 and "fit done: step 6 (0 in this run)" in again.stdout, again.stdout
    tested = run_here(tmp_path, "test", *TINY, "--trainer.logger=false", "--ckpt_path=checkpoints/last.ckpt")
    assert tested.returncode == 0 and "test/acc" in tested.stdout and "logged to" not in tested.stdout
    # auto and last look in ./checkpoints (auto started afresh and replaced last.ckpt), and a new run is refused there
    last = tmp_path / "checkpoints" / "last.ckpt"
    auto = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=3", "--trainer.logger=false", "--ckpt_path=auto")
    assert auto.returncode == 0 and "fit done: 3 epoch(s), step 9 (3 in this run)" in auto.stdout, auto.stderr[-2000:]
    assert load_checkpoint(last)["global_step"] == 9
    assert run_here(tmp_path, "test", *TINY, "--trainer.logger=false", "--ckpt_path=last").returncode == 0
    before = last.read_bytes()
    fresh = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=1", "--trainer.logger=false")
    assert fresh.returncode == 1 and fresh.stderr.strip().splitlines()[-1] == (
        "error: checkpoints already holds the last.ckpt of a run, which a new run would replace: resume it with "
        "--ckpt_path last, or give another --checkpoint.dirpath (or move the folder away)."), fresh.stderr[-2000:]
    assert last.read_bytes() == before
    quick = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=1", "--trainer.logger=false",
                     "--trainer.enable_checkpointing=false")  # writes no checkpoint: nothing to replace
    assert quick.returncode == 0 and last.read_bytes() == before, quick.stderr[-2000:]


def test_a_named_version_resumes_itself_and_checkpoint_folders_expand_like_the_logs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--ckpt_path auto with a named version resumed the newest run of any name (and wrote into it); ~ in a
    checkpoint folder was a folder named ~ for the writers and $HOME for --ckpt_path last."""
    make_dataset(tmp_path / "data")
    for version in ("expA", "expB"):
        result = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=1",
                          f"--trainer.logger.init_args.version={version}", "--ckpt_path=auto")
        assert result.returncode == 0 and "step 3 (3 in this run)" in result.stdout, result.stderr[-2000:]
    runs = tmp_path / "lightning_logs/mnist"
    assert [load_checkpoint(runs / v / "checkpoints/last.ckpt")["global_step"] for v in ("expA", "expB")] == [3, 3]
    again = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=2", "--trainer.logger.init_args.version=expA",
                     "--ckpt_path=auto")
    assert "resolved to lightning_logs/mnist/expA/checkpoints/last.ckpt" in again.stderr, again.stderr[-2000:]
    assert load_checkpoint(runs / "expA/checkpoints/last.ckpt")["global_step"] == 6
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    first = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=1", "--last_checkpoint.dirpath=~/lk")
    assert first.returncode == 0 and (tmp_path / "home/lk/last.ckpt").is_file() and not (tmp_path / "~").exists()
    resumed = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=2", "--last_checkpoint.dirpath=~/lk",
                       "--ckpt_path=last")
    assert resumed.returncode == 0 and "step 6 (3 in this run)" in resumed.stdout, resumed.stderr[-2000:]


def test_a_new_run_into_a_given_checkpoint_folder_of_another_run_is_refused(tmp_path: Path) -> None:
    """--checkpoint.dirpath names one folder for every run: a second fit replaced the first one's checkpoints."""
    make_dataset(tmp_path / "data")
    first = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=1", "--checkpoint.dirpath=mine")
    assert first.returncode == 0 and (tmp_path / "mine/last.ckpt").is_file(), first.stderr[-2000:]
    second = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=1", "--checkpoint.dirpath=mine")
    assert second.returncode == 1 and "error: mine already holds the last.ckpt of a run" in second.stderr
    assert sorted(p.name for p in (tmp_path / "lightning_logs/mnist").iterdir()) == ["version_0"]
    resumed = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=2", "--checkpoint.dirpath=mine", "--ckpt_path=last")
    assert resumed.returncode == 0 and "step 6 (3 in this run)" in resumed.stdout, resumed.stderr[-2000:]
    # the best checkpoint in its own folder, last.ckpt in another: --ckpt_path best finds it
    both = ["--checkpoint.dirpath=bestdir", "--last_checkpoint.dirpath=lastdir"]
    assert run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=1", *both).returncode == 0
    tested = run_here(tmp_path, "test", *TINY, *both, "--ckpt_path=best")
    assert tested.returncode == 0 and "--ckpt_path best resolved to bestdir/best-" in tested.stderr, tested.stderr[-2000:]


@pytest.mark.parametrize(("every", "steps"), [(1, [0, 1, 2, 3, 4, 5]), (2, [0, 1, 3, 5])])
def test_a_run_without_a_schedule_logs_its_rate_as_train_lr(tmp_path: Path, every: int, steps: list[int]) -> None:
    """No schedule and no warm-up (as seed_224.yaml): the constant rate is train/lr like every other run's,
    not Lightning's lr-SGD; one point at each logged step (log_every_n_steps: 1 or 2, Lightning's steps 1, 3, 5)
    and at each epoch's start (0, 3), never two at one step (Lightning's monitor logged both at step 3)."""
    make_dataset(tmp_path / "data")
    result = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=2", "--trainer.enable_checkpointing=false",
                 "--model.lr_scheduler=null", "--model.warmup_steps=0", f"--trainer.log_every_n_steps={every}")
    assert result.returncode == 0, result.stderr[-3000:]
    curves = scalars(tmp_path / "lightning_logs" / "mnist" / "version_0")
    assert not [key for key in curves if key.startswith("lr-")], sorted(curves)
    assert [step for step, _ in curves["train/lr"]] == steps, curves["train/lr"]  # 2 epochs of 3 steps
    assert {round(rate, 6) for _, rate in curves["train/lr"]} == {0.1}  # the recipe's lr


def test_train_lr_has_one_point_per_logged_optimizer_step_when_accumulating(tmp_path: Path) -> None:
    """With accumulate_grad_batches 2 both batches of an optimizer step see the same logged step: Lightning's
    monitor logged the rate at each of them, two points per step."""
    make_dataset(tmp_path / "data")
    result = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=2", "--trainer.enable_checkpointing=false",
                 "--trainer.accumulate_grad_batches=2", "--trainer.log_every_n_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [step for step, _ in scalars(tmp_path / "lightning_logs" / "mnist" / "version_0")["train/lr"]]
    assert steps == sorted(set(steps)) and len(steps) >= 3, steps  # 2 epochs of 2 optimizer steps (3 batches each)


def test_a_run_without_checkpointing_writes_no_checkpoint(tmp_path: Path) -> None:
    """``--trainer.enable_checkpointing false`` trains without checkpoint files (Lightning refuses the flag
    beside the CLI's checkpoint callbacks); the TensorBoard run is still written."""
    make_dataset(tmp_path / "data")
    result = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=1", "--trainer.enable_checkpointing=false")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "lightning_logs" / "mnist" / "version_0"
    assert "train/lr" in scalars(run_dir) and (run_dir / "config.yaml").is_file()
    assert not list(tmp_path.rglob("*.ckpt"))
    assert "fit done: 1 epoch(s), step 3" in result.stdout and "checkpoint" not in result.stdout


def test_a_new_run_named_as_an_existing_version_is_refused(trained: Path) -> None:
    """--trainer.logger.init_args.version 0 without --ckpt_path: a fresh run wrote over version_0's checkpoints."""
    run = trained / "lightning_logs/mnist/version_0"
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = run_here(trained, "fit", *TINY, "--trainer.logger.init_args.version=0")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --trainer.logger.init_args.version 0: lightning_logs/mnist/version_0 holds a run, whose checkpoints a "
        "new run would replace: resume it with --ckpt_path lightning_logs/mnist/version_0/checkpoints/last.ckpt, or "
        "leave the version out (a new version_N is made)."), result.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_a_csv_logger_run_resumes_by_name_and_keeps_its_metrics(tmp_path: Path) -> None:
    """``--ckpt_path last|best`` look in a CSVLogger's runs too; resuming or testing then starts a new version folder,
    because Lightning's CSV logger deletes the metrics.csv of a folder it logs into."""
    make_dataset(tmp_path / "data")
    csv_logger = [*TINY, "--trainer.logger=CSVLogger", "--trainer.logger.save_dir=csv"]
    never_improves = ["--checkpoint.monitor=epoch", "--checkpoint.mode=min"]  # epoch 0 stays the best for ever
    assert run_here(tmp_path, "fit", *csv_logger, *never_improves, "--trainer.max_epochs=1").returncode == 0
    first = tmp_path / "csv" / "mnist" / "version_0"
    metrics = (first / "metrics.csv").read_text()
    assert "val/acc" in metrics
    resumed = run_here(tmp_path, "fit", *csv_logger, *never_improves, "--trainer.max_epochs=2", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"--ckpt_path last resolved to {first.relative_to(tmp_path)}/checkpoints/last.ckpt" in resumed.stderr
    assert "fit done: 2 epoch(s), step 6 (3 in this run)" in resumed.stdout
    pasted = next(line for line in resumed.stdout.splitlines() if line.startswith("next: python -m senet_pl test "))
    assert pasted.count("--ckpt_path") == 1 and "last.ckpt" not in pasted  # the resumed checkpoint's option is not kept
    # The best of the whole run, not of the resumed piece: its checkpoints stay in the run's folder.
    assert [p.name[:12] for p in tmp_path.rglob("best-*.ckpt")] == ["best-epoch00"]
    assert torch.load(first / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 6
    assert f"best checkpoint (epoch 0.0000): {first.relative_to(tmp_path)}/checkpoints/best-epoch00" in resumed.stdout
    assert "metrics.csv" in {p.name for p in (tmp_path / "csv/mnist/version_1").iterdir()}  # the resumed piece's
    tested = run_here(tmp_path, "test", *csv_logger, "--ckpt_path=best")
    assert tested.returncode == 0 and "test/acc" in tested.stdout, tested.stderr[-2000:]
    assert (first / "metrics.csv").read_text() == metrics  # the first run's record is intact
    # ... also when the run's folder is named: Lightning's CSV logger deletes the metrics.csv of a folder it logs into
    named = run_here(tmp_path, "test", *csv_logger, "--trainer.logger.init_args.version=0", "--ckpt_path=best")
    assert named.returncode == 1 and "csv/mnist/version_0 holds the metrics.csv of another command" in named.stderr
    assert (first / "metrics.csv").read_text() == metrics


def test_a_warm_up_longer_than_the_run_is_said(data_root: Path) -> None:
    """The recipe's 100-step warm-up in a 3-step run: the rate never gets above a few percent of lr; it says so."""
    from senet_pl.cli import SENetCLI

    with pytest.warns(UserWarning, match=r"--model.warmup_steps 100 is longer than this run's 3 optimizer steps"):
        SENetCLI(args=["fit", *TINY, "--trainer.max_epochs=1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SENetCLI(args=["fit", *TINY, "--trainer.max_epochs=1", "--model.warmup_steps=3",
                       "--trainer.logger.init_args.version=short"])
    assert not [w for w in caught if "warmup_steps" in str(w.message)]


def test_an_average_that_would_keep_the_initial_weights_is_said(data_root: Path) -> None:
    """EMA starts as a copy of the weights after step 1; with 0.9, 2 more steps leave 0.9**2 = 81% of them."""
    from senet_pl.cli import SENetCLI

    ema = ["--model.warmup_steps=0", "--trainer.max_epochs=1"]
    with pytest.warns(UserWarning, match=r"ema_decay 0.9 averages about the last 10 optimizer steps, but this run "
                                         r"has 3: the weights of its first step, barely trained, will still be 81.0%.*at most 0.2236"):
        SENetCLI(args=["fit", *TINY, *ema, "--model.ema_decay=0.9"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SENetCLI(args=["fit", *TINY, *ema, "--model.ema_decay=0.2", "--trainer.logger.init_args.version=short"])
    assert not [w for w in caught if "ema_decay" in str(w.message)]


@pytest.mark.parametrize(("args", "said"), [(["--data.val_size=15"], "(81 images in batches of 8)"),
                                           (["--data.batch_size=1"], "(80 images in batches of 1)")])
def test_a_batch_of_one_image_at_a_1x1_map_is_refused_before_training(tmp_path: Path, args: list[str],
                                                                      said: str) -> None:
    """At image_size 8 a last batch of one image failed in batch norm at the end of the epoch, with a traceback."""
    make_dataset(tmp_path / "data")
    result = run_here(tmp_path, "fit", *FULL_EPOCHS, "--trainer.max_epochs=1", *args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --data.image_size 8 leaves the last stage of --model.stem cifar a 1x1 map, where batch norm needs 2 "
        f"images per batch, but a training batch holds 1 {said}: change --data.batch_size or --data.val_size, or use "
        "a larger --data.image_size."), result.stderr[-2000:]
    assert not (tmp_path / "lightning_logs").exists()
    if "--data.val_size=15" in args:  # only the last batch holds one image: a run of 2 batches never reaches it
        limited = run_here(tmp_path, "fit", *FULL_EPOCHS, "--trainer.max_epochs=1", *args,
                           "--trainer.limit_train_batches=2")
        assert limited.returncode == 0, limited.stderr[-2000:]


def test_validation_after_every_batch_keeps_the_best_of_all_validations(tmp_path: Path) -> None:
    """--trainer.val_check_interval 1 (an integer: every batch): Lightning's ModelCheckpoint took it for 1.0 (every
    epoch) and chose the best among the epochs' last validations only."""
    make_dataset(tmp_path / "data")
    result = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=1", "--trainer.val_check_interval=1",
                      "--trainer.limit_val_batches=4", "--model.warmup_steps=0", "--seed_everything=3")
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "lightning_logs/mnist/version_0"
    accuracies = [value for _, value in scalars(run_dir)["val/acc"]]
    assert len(accuracies) == 3, accuracies  # (on an Intel Xeon, fp32: the best 0.25, the last 0.125, which was chosen)
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    assert best.name == f"best-epoch00-acc{max(accuracies):.4f}.ckpt"


def test_last_ckpt_records_the_best_when_every_n_steps_wrote_the_epochs_last_step(tmp_path: Path) -> None:
    """every_n_train_steps wrote last.ckpt at the epoch's last step, before its validation; the epoch's end then
    skipped its own write (a file of that step existed), so last.ckpt recorded no best checkpoint."""
    make_dataset(tmp_path / "data")
    result = run_here(tmp_path, "fit", *TINY, "--trainer.max_epochs=1", "--last_checkpoint.every_n_train_steps=3")
    assert result.returncode == 0, result.stderr[-2000:]
    last = load_checkpoint(tmp_path / "lightning_logs/mnist/version_0/checkpoints/last.ckpt")
    (best,) = (tmp_path / "lightning_logs/mnist/version_0/checkpoints").glob("best-*.ckpt")
    recorded = [s["best_model_path"] for s in last["callbacks"].values() if s.get("monitor")]
    assert [Path(b).name for b in recorded] == [best.name]
    tested = run_here(tmp_path, "test", *TINY, "--ckpt_path=best")
    assert tested.returncode == 0, tested.stderr[-2000:]
