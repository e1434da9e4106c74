"""What a checkpoint may tell the CLI (nothing it names is imported), and what may change when it is used."""

import math
import os
import shutil
from pathlib import Path
from typing import Literal

import pytest
import torch
import torchvision
import yaml
from conftest import N_TEST, TINY, cli, make_dataset, scalars
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, OpenUnitInterval, PositiveFloat, PositiveInt

from senet_pl.checkpoints import load_checkpoint
from senet_pl.model import SEResNet
from senet_pl.untrusted import fits

RUN = Path("lightning_logs/mnist/version_0")


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding synthetic data and a 1-epoch run (3 steps) of the tiny recipe."""
    cwd = tmp_path_factory.mktemp("one_epoch")
    make_dataset(cwd / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        assert cli("fit", *TINY, "--trainer.max_epochs=1") is None
    return cwd


def _link_checkpoints(src: str, dst: str) -> None:
    """Checkpoints (130 MB each) as hard links: the CLI replaces them, never writes into them; the rest copied."""
    if src.endswith(".ckpt"):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


@pytest.fixture
def run_copy(one_epoch: Path, tmp_path: Path) -> Path:
    """A private copy of the 1-epoch run in the test's own folder (the current directory). Tests that change
    a checkpoint go through ``rewrite``, which breaks the link first."""
    shutil.copytree(one_epoch / "data", tmp_path / "data")
    shutil.copytree(one_epoch / "lightning_logs", tmp_path / "lightning_logs", copy_function=_link_checkpoints)
    return tmp_path / RUN / "checkpoints" / "last.ckpt"


def rewrite(path: Path, obj: object) -> None:
    """``torch.save(obj, path)`` into a new file (``path`` may be a hard link to the shared run)."""
    path.unlink()
    torch.save(obj, path)


# -- a checkpoint never makes the program import or run anything ----------------------------------

PWN = '''
from pathlib import Path
Path("MARKER").write_text("imported")

class Opt:
    def __init__(self, *args, **kwargs):
        Path("MARKER").write_text("called")
'''


def _hostile(ckpt: dict, where: str) -> dict:
    hp, dm = ckpt["hyper_parameters"], ckpt["datamodule_hyper_parameters"]
    if where == "optimizer":
        hp["optimizer"] = {"class_path": "pwnmod.Opt", "init_args": {"lr": 0.1}}
    elif where == "lr_scheduler":
        hp["lr_scheduler"] = {"class_path": "pwnmod.Opt"}
    elif where == "data":
        dm["dataset"] = {"class_path": "pwnmod.Opt"}
    elif where == "unknown key":
        hp["backdoor"] = "pwnmod.Opt"
    elif where == "instantiator":
        hp["_instantiator"] = "pwnmod.Opt"
    elif where == "class_path":
        hp["_class_path"] = "pwnmod.Opt"
    elif where == "string value":
        hp["stem"] = "pwnmod.Opt"
    return ckpt


@pytest.mark.parametrize("subcommand", ["fit", "test", "predict", "analyze"])
@pytest.mark.parametrize(
    ("where", "named"),
    [
        ("optimizer", "hyper_parameters.optimizer"),
        ("lr_scheduler", "hyper_parameters.lr_scheduler"),
        ("data", "datamodule_hyper_parameters.dataset"),
        ("unknown key", "hyper_parameters.backdoor"),
        ("instantiator", "hyper_parameters._instantiator"),
        ("class_path", "hyper_parameters._class_path"),
        ("string value", "hyper_parameters.stem"),
    ],
)
def test_class_paths_in_a_checkpoint_are_refused_and_never_imported(
    run_copy: Path, tmp_path: Path, subcommand: str, where: str, named: str
) -> None:
    (tmp_path / "pwnmod.py").write_text(PWN.replace("MARKER", str(tmp_path / "marker")))
    evil = tmp_path / "evil.ckpt"
    torch.save(_hostile(load_checkpoint(run_copy), where), evil)
    message = cli(subcommand, *TINY, f"--ckpt_path={evil}")
    assert message is not None and message.startswith(f"error: refused {evil}: {named}"), message
    assert "Nothing was imported" in message
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        (18, Literal[18, 34], True),
        (20, Literal[18, 34], False),
        (True, Literal[1], False),  # a bool is not the int 1
        ("cifar", Literal["cifar"], True),
        (1, bool, False),
        (False, bool, True),
        (3, PositiveInt, True),
        (0, PositiveInt, False),
        (0, NonNegativeInt, True),
        (True, PositiveInt, False),
        (None, str | None, True),
        ("x", str | None, True),
        (2.5, float, True),
        ({"class_path": "os.system"}, str | None, False),
        (["a"], str, False),
        (0.1, ClosedUnitInterval, True),
        (1.5, ClosedUnitInterval, False),
        ("0.1", ClosedUnitInterval, False),
        (None, OpenUnitInterval | None, True),
        (1.0, OpenUnitInterval | None, False),
        ([0.02, 0.33], tuple[ClosedUnitInterval, ClosedUnitInterval], True),  # a tuple comes back as a list
        ((0.02, 0.33), tuple[ClosedUnitInterval, ClosedUnitInterval], True),
        ([0.02, 2.0], tuple[ClosedUnitInterval, ClosedUnitInterval], False),
        ([0.02], tuple[ClosedUnitInterval, ClosedUnitInterval], False),
        ({"class_path": "os.system"}, tuple[PositiveFloat, PositiveFloat], False),
    ],
)
def test_fits_accepts_plain_values_of_the_declared_type_only(value, annotation, expected: bool) -> None:
    assert fits(value, annotation) is expected


# -- what a resume or an evaluation may change -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--model.depth=34"], "--model.depth 34, but the checkpoint has 18"),
        (["--model.se=false"], "--model.se False, but the checkpoint has True"),
        (["--model.reduction=8"], "--model.reduction 8, but the checkpoint has 16"),
        (["--model.stem=imagenet", "--data.image_size=32"], "--model.stem imagenet, but the checkpoint has cifar"),
        (["--data.dataset=fashion_mnist"], "--data.dataset fashion_mnist, but the checkpoint has mnist"),
        (["--data.image_size=32"], "--data.image_size 32, but the checkpoint has 8"),
        (["--data.val_size=24"], "--data.val_size 24, but the checkpoint has 16"),
        (["--data.split_seed=1"], "--data.split_seed 1, but the checkpoint has 42"),
        (["--model.warmup_steps=5"], "--model.warmup_steps 5, but the checkpoint has 100"),
        (["--model.lr_interval=epoch"], "--model.lr_interval epoch, but the checkpoint has step"),
        (["--model.optimizer.init_args.lr=0.01"], "--model.optimizer.init_args.lr 0.01, but the checkpoint's SGD has 0.1"),
        (["--model.optimizer=Adam"], "--model.optimizer Adam, but the checkpoint's optimizer has other settings"),
        (["--model.lr_scheduler.init_args.T_max=5"], "CosineAnnealingLR T_max 5, but the checkpoint's has 2"),
        (["--model.lr_scheduler.init_args.eta_min=0.01"], "CosineAnnealingLR eta_min 0.01, but the checkpoint's has 0.0"),
        (["--model.lr_scheduler=null"], "the config's schedule has 1 scheduler(s) (LinearLR"),
        (["--model.ema_decay=0.9"], "--model.ema_decay 0.9, but the checkpoint has None"),
    ],
)
def test_resume_refuses_what_it_would_silently_ignore(run_copy: Path, args: list[str], line: str) -> None:
    config = (run_copy.parent.parent / "config.yaml").read_text()
    message = cli("fit", *TINY, "--trainer.max_epochs=2", f"--ckpt_path={run_copy}", *args)  # (se false: another run name)
    assert message is not None and line in message, message
    assert message.count("\n") <= 4 and "Traceback" not in message
    assert load_checkpoint(run_copy)["global_step"] == 3  # nothing ran
    assert (run_copy.parent.parent / "config.yaml").read_text() == config  # the run's record is untouched


ALLOWED = [  # option, the value config.yaml must then record (section, key, value)
    ("--data.batch_size=16", ("data", "batch_size", 16)),  # at an epoch boundary
    ("--seed_everything=7", (None, "seed_everything", 7)),  # at an epoch boundary
    ("--model.channels_last=false", ("model", "channels_last", False)),
    ("--trainer.precision=32-true", ("trainer", "precision", "32-true")),
    ("--data.translate=0", ("data", "translate", 0)),
    ("--data.hflip=true", ("data", "hflip", True)),
    ("--data.erasing=0.25", ("data", "erasing", 0.25)),
    ("--model.label_smoothing=0.1", ("model", "label_smoothing", 0.1)),
    ("--last_checkpoint.every_n_train_steps=1", ("last_checkpoint", "every_n_train_steps", 1)),
]


@pytest.mark.parametrize("changes", [[], ALLOWED], ids=["longer only", "every allowed change at once"])
def test_resume_may_change_these(run_copy: Path, changes: list) -> None:
    """max_epochs (train on for longer) alone, then with every other change the README allows."""
    assert cli("fit", *TINY, "--trainer.max_epochs=2", "--ckpt_path=last", *[option for option, _ in changes]) is None
    assert load_checkpoint(run_copy)["global_step"] == 6  # it trained on, to the new end
    config = yaml.safe_load((run_copy.parent.parent / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 2
    for _, (section, key, value) in changes:  # config.yaml describes what ran
        assert (config[section] if section else config)[key] == value, key


def test_a_longer_resumed_run_follows_the_cosine_of_its_new_length(run_copy: Path) -> None:
    """The 1-epoch run (3 steps, its cosine at 0 at step 2) resumed for 3 epochs: from step 3 on, the rate is
    that of a 9-step run (the recipe's 100-step warm-up times a cosine with T_max 8), and the last step is at 0."""
    assert cli("fit", *TINY, "--trainer.max_epochs=3", "--ckpt_path=last") is None
    lrs = dict(scalars(run_copy.parent.parent)["train/lr"])
    assert sorted(lrs) == list(range(9))
    assert lrs[2] == pytest.approx(0.0, abs=1e-12)  # the first run's end
    for step in range(3, 9):
        ramp = 0.01 + 0.99 * step / 100
        assert lrs[step] == pytest.approx(0.1 * ramp * (1 + math.cos(math.pi * step / 8)) / 2, rel=1e-5, abs=1e-9), step
    assert lrs[8] == pytest.approx(0.0, abs=1e-12)


def test_values_left_out_are_taken_from_the_checkpoint(run_copy: Path, tmp_path: Path) -> None:
    """A user who resumes without the recipe gets the checkpoint's model and data settings, recorded as such."""
    ckpt = load_checkpoint(run_copy)
    ckpt["hyper_parameters"]["reduction"] = 8  # as if trained with --model.reduction 8
    ckpt["state_dict"] = {f"model.{k}": v for k, v in SEResNet(reduction=8).state_dict().items()}
    torch.save(ckpt, tmp_path / "r8.ckpt")
    bare = [a for a in TINY if not a.startswith("--config")]  # no recipe: defaults, and the checkpoint
    assert cli("test", *bare, f"--ckpt_path={tmp_path / 'r8.ckpt'}") is None
    config = yaml.safe_load(next(Path("lightning_logs/senet").glob("version_*/config_test.yaml")).read_text())
    assert config["model"]["reduction"] == 8 and config["model"]["warmup_steps"] == 100


def _mid_epoch(run_copy: Path) -> None:
    """Replace the run by one whose last.ckpt was written 1 batch into its second epoch (every_n_train_steps)."""
    shutil.rmtree("lightning_logs")
    assert cli("fit", *TINY, "--trainer.max_steps=4", "--last_checkpoint.every_n_train_steps=1") is None
    position = load_checkpoint(run_copy)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert position == {"epoch": 1, "batches_done": 1, "batch_size": 8, "world_size": 1, "seed": 42}


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--data.batch_size=16"], "--data.batch_size 16, but the checkpoint stopped mid-epoch with batch size 8"),
        (["--seed_everything=7"], "--seed_everything 7, but the checkpoint stopped mid-epoch in the order of seed 42"),
    ],
)
def test_mid_epoch_resume_refuses_another_batch_size_or_seed(run_copy: Path, args: list[str], line: str) -> None:
    _mid_epoch(run_copy)
    message = cli("fit", *TINY, "--trainer.max_epochs=2", f"--ckpt_path={run_copy}", *args)  # (se false: another run name)
    assert message is not None and line in message, message
    assert load_checkpoint(run_copy)["global_step"] == 4


def test_mid_epoch_resume_refuses_another_number_of_processes(run_copy: Path) -> None:
    _mid_epoch(run_copy)
    ckpt = load_checkpoint(run_copy)
    ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["world_size"] = 2
    rewrite(run_copy, ckpt)
    message = cli("fit", *TINY, "--trainer.max_epochs=2", "--ckpt_path=last")
    assert message is not None and "1 process(es), but the checkpoint stopped mid-epoch with 2" in message, message


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict", "analyze"])
def test_evaluating_at_another_size_or_dataset_is_refused(run_copy: Path, tmp_path: Path, subcommand: str) -> None:
    ckpt = load_checkpoint(run_copy)
    ckpt["datamodule_hyper_parameters"]["image_size"] = 32  # a model trained at 32x32
    torch.save(ckpt, tmp_path / "at32.ckpt")
    message = cli(subcommand, *TINY, f"--ckpt_path={tmp_path / 'at32.ckpt'}")  # TINY says 8
    assert message is not None and "--data.image_size 8, but the checkpoint has 32" in message, message
    message = cli(subcommand, *TINY, f"--ckpt_path={run_copy}", "--data.dataset=kmnist")
    assert message is not None and "--data.dataset kmnist, but the checkpoint has mnist" in message, message
    # last: of the KMNIST runs (a recipe's run of another dataset is named after it), which there are none of
    message = cli(subcommand, *TINY, "--ckpt_path=last", "--data.dataset=kmnist")
    assert message is not None and "no run under lightning_logs/kmnist/ has a checkpoints/last.ckpt" in message


def test_validate_keeps_the_split_the_model_was_validated_on(run_copy: Path) -> None:
    """Another val_size (the recipe's 5000 after training with 1000) validated on images the model trained on."""
    message = cli("validate", *TINY, "--ckpt_path=last", "--data.val_size=24")  # TINY trained with 16 held out
    assert message is not None and "--data.val_size 24, but the checkpoint has 16" in message, message
    message = cli("validate", *TINY, "--ckpt_path=last", "--data.split_seed=7")
    assert message is not None and "--data.split_seed 7, but the checkpoint has 42" in message, message
    assert cli("test", *TINY, "--ckpt_path=last", "--data.val_size=24") is None  # the test split is another matter


# -- files that are not checkpoints of this project ---------------------------------------------------


def test_a_plain_state_dict_is_accepted_for_evaluation_only(run_copy: Path, tmp_path: Path, capsys) -> None:
    weights = {k.removeprefix("model."): v for k, v in load_checkpoint(run_copy)["state_dict"].items()}
    torch.save(weights, tmp_path / "weights.pt")
    assert cli("test", *TINY, "--trainer.limit_test_batches=1.0", f"--ckpt_path={run_copy}") is None
    from_ckpt = capsys.readouterr().out
    assert cli("test", *TINY, "--trainer.limit_test_batches=1.0", f"--ckpt_path={tmp_path / 'weights.pt'}") is None
    from_weights = capsys.readouterr().out
    acc = [line for line in from_ckpt.splitlines() if "test/acc" in line and "test done" not in line]
    assert acc and acc == [line for line in from_weights.splitlines() if "test/acc" in line and "test done" not in line]
    runs = sorted(p.name for p in Path("lightning_logs/mnist").iterdir())
    message = cli("fit", *TINY, f"--ckpt_path={tmp_path / 'weights.pt'}")
    assert message is not None and "holds only weights (a plain state dict): fit resumes" in message
    assert sorted(p.name for p in Path("lightning_logs/mnist").iterdir()) == runs  # no folder left behind


@pytest.mark.parametrize("subcommand", ["fit", "test", "predict", "analyze"])
@pytest.mark.parametrize("kind", ["torchvision resnet18", "other dict", "tensor"])
def test_files_of_other_kinds_get_one_line(run_copy: Path, tmp_path: Path, subcommand: str, kind: str) -> None:
    path = tmp_path / "other.pt"
    obj = {"torchvision resnet18": lambda: torchvision.models.resnet18().state_dict(),
           "other dict": lambda: {"epoch": 3, "model": {"w": torch.zeros(2)}},
           "tensor": lambda: torch.zeros(3)}[kind]()
    torch.save(obj, path)
    runs = sorted(p.name for p in Path("lightning_logs/mnist").iterdir())
    message = cli(subcommand, *TINY, f"--ckpt_path={path}")
    assert message is not None and message.startswith("error: ") and "\n" not in message, message
    if kind == "torchvision resnet18" and subcommand != "fit":
        assert "does not fit the model" in message and "model.conv1.weight: (64, 3, 7, 7) in the file" in message
    elif kind != "torchvision resnet18":
        assert f"{path} is not a checkpoint of this project" in message
    assert sorted(p.name for p in Path("lightning_logs/mnist").iterdir()) == runs


def test_predict_from_a_plain_state_dict(run_copy: Path, tmp_path: Path) -> None:
    weights = {k.removeprefix("model."): v for k, v in load_checkpoint(run_copy)["state_dict"].items()}
    torch.save(weights, tmp_path / "weights.pt")
    assert cli("predict", *TINY, f"--ckpt_path={tmp_path / 'weights.pt'}") is None
    rows = next(Path("lightning_logs/mnist").glob("version_*/predictions.csv")).read_text().splitlines()
    assert len(rows) == N_TEST + 1


# -- crafted checkpoints beyond the settings (found by attacking the first version) ---------------------


def _best_state(ckpt: dict) -> dict:
    (state,) = [s for s in ckpt["callbacks"].values() if s.get("monitor")]
    return state


def test_a_checkpoint_cannot_make_a_resumed_run_delete_a_file(run_copy: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    ckpt = load_checkpoint(run_copy)
    state = _best_state(ckpt)
    outside = f"{state['dirpath']}/../../../../victim.txt"  # relative, as Lightning stores its own paths
    state.update(best_k_models={outside: torch.tensor(-1.0)}, kth_best_model_path=outside, kth_value=torch.tensor(-1.0))
    rewrite(run_copy, ckpt)
    message = cli("fit", *TINY, "--trainer.max_epochs=3", "--ckpt_path=last")
    assert message is not None and f"refused {run_copy.relative_to(tmp_path)}: its callbacks state names the file" in message
    assert victim.read_text() == "keep me"


def test_best_is_only_looked_for_beside_last(run_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.ckpt"
    shutil.copy(run_copy, elsewhere)
    ckpt = load_checkpoint(run_copy)
    _best_state(ckpt)["best_model_path"] = str(elsewhere)
    rewrite(run_copy, ckpt)
    message = cli("test", *TINY, "--ckpt_path=best")
    assert message is not None and "records no best checkpoint that still exists in " in message
    # a link beside last.ckpt to a file elsewhere is not beside it
    (run_copy.parent / "linked.ckpt").symlink_to(elsewhere)
    _best_state(ckpt)["best_model_path"] = "linked.ckpt"
    rewrite(run_copy, ckpt)
    message = cli("test", *TINY, "--ckpt_path=best")
    assert message is not None and "records no best checkpoint that still exists in " in message


def test_best_is_found_from_another_folder_and_in_a_moved_run(run_copy: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning records the best checkpoint's path as training saw it (relative to its working directory):
    --ckpt_path best finds the file by its name beside last.ckpt, from anywhere, after the runs were moved."""
    recorded = _best_state(load_checkpoint(run_copy))["best_model_path"]
    assert not Path(recorded).is_absolute()  # what makes the record go stale
    (tmp_path / "lightning_logs").rename(tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    data = [a if not a.startswith("--data.data_dir") else "--data.data_dir=../data" for a in TINY]
    assert cli("test", *data, "--trainer.logger.init_args.save_dir=../moved", "--ckpt_path=best") is None
    assert (tmp_path / "moved/mnist/version_0/config_test.yaml").is_file()  # tested and logged into that run


def _unbeatable(path: Path) -> str:
    """Make the best so far of the checkpoint at ``path`` score val/acc 2.0, which no validation can beat; its name."""
    ckpt = load_checkpoint(path)
    state = _best_state(ckpt)
    best, score = state["best_model_path"], torch.tensor(2.0)
    state.update(best_model_score=score, kth_value=score, kth_best_model_path=best, best_k_models={best: score})
    rewrite(path, ckpt)
    return Path(best).name


def test_a_moved_run_resumes_with_its_best(run_copy: Path, tmp_path: Path) -> None:
    """Lightning restores the best only if the checkpoints folder is the string it recorded: after the logs were
    moved (another save_dir), the next validation, however worse, became the best."""
    best = _unbeatable(run_copy)
    (tmp_path / "lightning_logs").rename(tmp_path / "moved")
    assert cli("fit", *TINY, "--trainer.logger.init_args.save_dir=moved", "--trainer.max_epochs=2", "--ckpt_path=last") is None
    folder = tmp_path / "moved/mnist/version_0/checkpoints"
    assert [p.name for p in folder.glob("best-*")] == [best]
    state = _best_state(load_checkpoint(folder / "last.ckpt"))
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == 6
    assert float(state["best_model_score"]) == 2.0 and Path(state["best_model_path"]).resolve() == folder / best


def test_a_run_with_its_own_checkpoint_folders_resumes_with_its_best(data_root: Path, capsys) -> None:
    """--checkpoint.dirpath apart from --last_checkpoint.dirpath: the best's folder is not last.ckpt's, but the same."""
    folders = ["--checkpoint.dirpath=ck", "--last_checkpoint.dirpath=lk"]
    assert cli("fit", *TINY, *folders, "--trainer.max_epochs=1") is None
    best = _unbeatable(Path("lk/last.ckpt"))
    capsys.readouterr()
    assert cli("fit", *TINY, *folders, "--trainer.max_epochs=2", "--ckpt_path=lk/last.ckpt") is None
    assert [p.name for p in Path("ck").glob("best-*")] == [best]
    assert float(_best_state(load_checkpoint(Path("lk/last.ckpt")))["best_model_score"]) == 2.0
    assert "into a new folder" not in capsys.readouterr().err


def test_a_run_resumed_into_a_new_folder_chooses_its_own_best(run_copy: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """From another working directory the run's relative save_dir names a new folder (here the same string,
    lightning_logs/mnist/version_0, elsewhere): its best is among its own validations, and named files exist."""
    _unbeatable(run_copy)
    original = {p.name: p.stat().st_mtime_ns for p in run_copy.parent.iterdir()}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    data = [a if not a.startswith("--data.data_dir") else "--data.data_dir=../data" for a in TINY]
    assert cli("fit", *data, "--trainer.max_epochs=2", f"--ckpt_path={run_copy}") is None
    folder = tmp_path / "elsewhere" / RUN / "checkpoints"
    (best,) = folder.glob("best-*")
    assert best.name.startswith("best-epoch01")
    state = _best_state(load_checkpoint(folder / "last.ckpt"))
    assert Path(state["best_model_path"]).resolve() == best and list(state["best_k_models"]) == [state["best_model_path"]]
    assert {p.name: p.stat().st_mtime_ns for p in run_copy.parent.iterdir()} == original  # left alone
    assert "this run's best checkpoint is chosen among its own validations" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda c: c.update(loops={"fit_loop": "x"}), "its loops.'fit_loop' is not what fit writes"),
        (lambda c: c.update({"pytorch-lightning_version": "not.a version!"}), "pytorch-lightning_version is not a version"),
        (lambda c: c.update({"pytorch-lightning_version": {"class_path": "x"}}), "its pytorch-lightning_version is a dict"),
        (lambda c: c.update(global_step=True), "its global_step is a bool"),
        (lambda c: c.update(optimizer_states=["x"]), "optimizer or scheduler states are not what fit writes"),
        (lambda c: c["datamodule_hyper_parameters"].update(split_seed=10**40), "--data.split_seed 1000"),
        (lambda c: c["state_dict"].update({"model.fc.bias": 3}), "its state_dict holds 'model.fc.bias' of type int, not"),
    ],
)
def test_malformed_checkpoints_get_one_line(run_copy: Path, tmp_path: Path, damage, expected: str) -> None:
    ckpt = load_checkpoint(run_copy)
    damage(ckpt)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    runs = sorted(p.name for p in Path("lightning_logs/mnist").iterdir())
    message = cli("fit", *TINY, "--trainer.max_epochs=2", f"--ckpt_path={tmp_path / 'bad.ckpt'}")
    assert message is not None and message.startswith("error: ") and expected in message, message
    assert sorted(p.name for p in Path("lightning_logs/mnist").iterdir()) == runs


def test_a_last_ckpt_that_is_no_dict_is_one_line_for_best(run_copy: Path) -> None:
    rewrite(run_copy, torch.zeros(3))
    message = cli("test", *TINY, "--ckpt_path=best")
    assert message is not None and "records no best checkpoint" in message and "use --ckpt_path last" in message


def test_a_resume_that_fails_in_setup_leaves_no_new_folder(run_copy: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(run_copy)
    ckpt["datamodule_hyper_parameters"]["val_size"] = 100_000  # taken from the checkpoint, fails in setup
    torch.save(ckpt, tmp_path / "outside.ckpt")  # not in a run folder: fit starts a new version
    args = [a for a in TINY if not a.startswith("--data.val_size")] + ["--data.val_size=100000"]  # as it says
    message = cli("fit", *args, "--trainer.max_epochs=2", f"--ckpt_path={tmp_path / 'outside.ckpt'}")
    assert message is not None and "--data.val_size 100000 must be between" in message, message
    assert sorted(p.name for p in Path("lightning_logs/mnist").iterdir()) == ["version_0"]  # no new version_1


def test_optimizer_conflicts_say_when_the_value_is_a_default(run_copy: Path) -> None:
    bare = [a for a in TINY if not a.startswith("--config")]
    message = cli("fit", *bare, "--trainer.max_epochs=2", f"--ckpt_path={run_copy}", "--model.depth=34")
    assert message is not None
    assert "--model.depth 34, but the checkpoint has 18" in message  # shape and optimizer conflicts together
    assert "lr 0.1 (not given: the default)" not in message  # the default optimizer is the recipes' now
    assert f"--config {run_copy.parent.parent / 'config.yaml'}" in message


def test_a_batch_size_left_out_is_the_checkpoints_even_mid_epoch() -> None:
    """Only a batch size the user gave can conflict with a mid-epoch position; a default is replaced."""
    from jsonargparse import Namespace

    from senet_pl.data import MNISTDataModule
    from senet_pl.resume import reconcile
    from senet_pl.untrusted import CheckpointInfo

    info = CheckpointInfo("x.ckpt", "lightning", data={"batch_size": 8}, position={"epoch": 1, "batches_done": 1})
    cfg = Namespace(data=Namespace(dataset="mnist", batch_size=128), seed_everything=True)
    assert reconcile(info, cfg, Namespace(), "fit", MNISTDataModule.data_shape) == []
    assert cfg.data.batch_size == 8
    cfg.data.batch_size = 16
    given = Namespace(data=Namespace(batch_size=16))
    (line,) = reconcile(info, cfg, given, "fit", MNISTDataModule.data_shape)
    assert line.startswith("--data.batch_size 16, but the checkpoint stopped mid-epoch with batch size 8")


def test_a_tracker_state_of_the_wrong_shape_is_refused(run_copy: Path) -> None:
    ckpt = load_checkpoint(run_copy)
    _best_state(ckpt)["best_k_models"] = 7
    rewrite(run_copy, ckpt)
    message = cli("fit", *TINY, "--trainer.max_epochs=2", "--ckpt_path=last")
    assert message is not None and "is not what fit writes" in message and "\n" not in message, message


@pytest.mark.parametrize("optimizer", [[], ["--model.optimizer=Adam", "--model.optimizer.lr=0.001"]], ids=["SGD", "Adam"])
def test_a_one_cycle_run_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: list[str]) -> None:
    """OneCycleLR cycles the momentum (SGD's momentum, Adam's first beta): its value in the checkpoint is the
    schedule's state, not a setting to compare. The same run resumes; a longer one is refused (fixed phases)."""
    make_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    one_cycle = [*TINY, *optimizer, "--model.lr_scheduler=OneCycleLR", "--model.lr_scheduler.max_lr=0.01",
                 "--model.warmup_steps=0"]
    assert cli("fit", *one_cycle, "--trainer.max_epochs=1") is None
    assert cli("fit", *one_cycle, "--trainer.max_epochs=1", "--ckpt_path=last") is None
    message = cli("fit", *one_cycle, "--trainer.max_epochs=2", "--ckpt_path=last")
    assert message is not None and "OneCycleLR" in message and "cannot be resized" in message, message
    assert "Traceback" not in message and message.count("\n") <= 2
    assert torch.load(RUN / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
