"""``export`` (ONNX and .pt2 with the preprocessing in the graph, checked against PyTorch) and ``senet_pl.infer``."""

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from conftest import N_TEST, REPO, TINY, cli, make_dataset, mixed_folder  # noqa: E402

from senet_pl import export as export_module  # noqa: E402
from senet_pl.checkpoints import load_checkpoint  # noqa: E402
from senet_pl.data import MNISTDataModule  # noqa: E402
from senet_pl.export import TOLERANCE  # noqa: E402
from senet_pl.infer import MARKER, METADATA_KEY  # noqa: E402
from senet_pl.model import SEResNet  # noqa: E402

RUN = Path("lightning_logs/mnist/version_0")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 1-epoch run of the tiny recipe, exported in both formats: the folder, the files and what export printed."""
    cwd = tmp_path_factory.mktemp("export")
    make_dataset(cwd / "data")
    printed = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        assert cli("fit", *TINY, "--trainer.max_epochs=1") is None
        for fmt in ("onnx", "pt2"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert cli("export", *TINY, "--ckpt_path=best", f"--format={fmt}", f"--out=model.{fmt}") is None
            printed[fmt] = out.getvalue()
    best = next((cwd / RUN / "checkpoints").glob("best-*.ckpt"))
    return {"cwd": cwd, "best": best, "printed": printed}


def reference_logits(ckpt: Path, images: torch.Tensor) -> np.ndarray:
    """The PyTorch model of a checkpoint on uint8 images, through the data module's test-time transform at the
    checkpoint's image size."""
    model = SEResNet(18, "cifar", 1, 10).eval()
    checkpoint = load_checkpoint(ckpt)
    weights = checkpoint["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")})
    dm = MNISTDataModule(image_size=checkpoint["datamodule_hyper_parameters"]["image_size"])
    with torch.no_grad():
        return model(dm.transform_batch(images, training=False)).numpy()


def some_images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def test_export_prints_the_parity_check(exported: dict) -> None:
    for fmt in ("onnx", "pt2"):
        printed = exported["printed"][fmt]
        assert f"checked on {N_TEST} test images: max |logit difference|" in printed, printed
        assert f"the same class for {N_TEST} of {N_TEST}" in printed and f"tolerance {TOLERANCE:g}" in printed
        assert f"to model.{fmt} ({fmt}," in printed
        assert not list(exported["cwd"].glob(".partial-*"))


def test_onnx_takes_uint8_with_any_batch_and_carries_its_metadata(exported: dict) -> None:
    path = exported["cwd"] / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [1, 28, 28] and not isinstance(inp.shape[0], int)
    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA_KEY])
    assert meta["format"] == MARKER and meta["dataset"] == "mnist" and meta["class_names"][7] == "7 - seven"
    # 28x28 images in, resized in the graph to the size the model was trained at (TINY's 8x8)
    assert meta["image_size"] == 8 and meta["input_size"] == [1, 28, 28]
    assert meta["normalization"]["mean"] == 0.1307 and meta["normalization"]["std"] == 0.3081
    assert meta["architecture"]["se"] is True and meta["senet_pl_version"]
    assert meta["val_acc"] == pytest.approx(float(exported["best"].stem.split("acc")[1]), abs=1e-4)
    for n in (1, 7):  # other batch sizes than the example the graph was traced with
        images = some_images(n)
        logits = session.run(None, {inp.name: images.numpy()})[0]
        assert np.abs(logits - reference_logits(exported["best"], images)).max() < TOLERANCE


def test_pt2_loads_with_its_metadata_and_matches(exported: dict) -> None:
    extra = {"senet_pl.json": ""}
    program = torch.export.load(exported["cwd"] / "model.pt2", extra_files=extra)
    assert json.loads(extra["senet_pl.json"])["format"] == MARKER
    images = some_images(5)
    logits = program.module()(images).detach().numpy()
    assert np.abs(logits - reference_logits(exported["best"], images)).max() < TOLERANCE


@pytest.fixture
def run_copy(exported: dict, tmp_path: Path) -> Path:
    """The exported run's data in the test's own folder (the current directory); its best checkpoint's path."""
    os.symlink(exported["cwd"] / "data", tmp_path / "data")
    return exported["best"]


def test_a_mismatch_fails_the_export_and_writes_nothing(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = export_module.run_exported

    def altered(path, fmt, images):  # as if the exported graph computed one logit slightly wrong
        logits = real(path, fmt, images)
        logits[3, 0] += 10 * TOLERANCE
        return logits

    monkeypatch.setattr(export_module, "run_exported", altered)
    error = cli("export", *TINY, f"--ckpt_path={run_copy}", "--format=pt2", "--out=altered.pt2")
    assert error is not None and error.startswith("error: the exported model does not match PyTorch")
    assert "\n" not in error and f"tolerance {TOLERANCE:g}" in error
    assert not list(Path().glob("altered*")) and not list(Path().glob(".partial-*"))


def test_a_plain_resnet_exports_too(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data")
    torch.save(SEResNet(18, "cifar", 1, 10, se=False).state_dict(), "plain.pt")
    no_se = f"--config={REPO / 'configs' / 'no_se.yaml'}"
    assert cli("export", *TINY, no_se, "--ckpt_path=plain.pt", "--format=onnx") is None
    meta = json.loads({p.key: p.value for p in onnx.load("plain.onnx").metadata_props}[METADATA_KEY])
    assert meta["architecture"]["se"] is False and meta["val_acc"] is None


def _predictions(path: Path) -> list[tuple[str, str]]:
    with open(path) as f:
        return [(row["file"], row["prediction"]) for row in csv.DictReader(f)]


BLOCK = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError(f'{{name}} is blocked by the test')
sys.meta_path.insert(0, Block())
sys.argv[0] = 'python -m senet_pl.infer'
runpy.run_module('senet_pl.infer', run_name='__main__')
assert not [m for m in sys.modules if m.split('.')[0] in {blocked!r}]
"""


def infer(cwd: Path, *args: str, blocked: tuple[str, ...] = ("torch", "lightning", "torchvision")):
    """``python -m senet_pl.infer ARGS`` in a process where the ``blocked`` packages cannot be imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, not whichever one is installed
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=blocked), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_infer_without_torch_gives_predicts_classes(run_copy: Path, exported: dict, tmp_path: Path) -> None:
    good = mixed_folder(tmp_path / "mine")
    assert cli("predict", *TINY, f"--ckpt_path={run_copy}", "--data.predict_dir=mine") is None
    predicted = sorted(Path("lightning_logs/mnist").glob("version_*/predictions.csv"))[-1]
    result = infer(tmp_path, str(exported["cwd"] / "model.onnx"), "mine", "--out", "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped mine/notes.txt: not an image Pillow can read" in result.stderr
    assert [f for f, _ in _predictions(tmp_path / "out/predictions.csv")] == good
    assert _predictions(tmp_path / "out/predictions.csv") == _predictions(predicted)
    with open(predicted) as a, open(tmp_path / "out/predictions.csv") as b:
        assert next(csv.reader(a)) == next(csv.reader(b))  # the same columns
    assert (tmp_path / "out/skipped.csv").read_text() == (predicted.parent / "skipped.csv").read_text()


def test_infer_refuses_other_files_in_one_line(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), "other.onnx")
    Path("notes.txt").write_text("not a model\n")
    (tmp_path / "mine").mkdir()
    for model, says in (("other.onnx", "is not a model exported by senet_pl"),
                        ("notes.txt", "is not an ONNX model onnxruntime can load"), ("gone.onnx", "no such file"),
                        ("mine", "Is a directory")):
        result = infer(tmp_path, model, "mine")
        assert result.returncode == 1 and result.stderr.startswith("error: ") and says in result.stderr, result.stderr
        assert f" {model}" in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr


def test_infer_without_onnxruntime_names_the_extra(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    result = infer(tmp_path, "model.onnx", "mine", blocked=("torch", "lightning", "onnxruntime"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "onnxruntime is not installed" in result.stderr and "pip install -e '.[export]'" in result.stderr


def test_export_errors_are_one_line(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = f"--ckpt_path={run_copy}"
    error = cli("export", *TINY, ckpt, "--out=no/such/folder/model.onnx")
    assert error == "error: cannot write no/such/folder/model.onnx: No such file or directory."
    Path("taken").mkdir()
    assert cli("export", *TINY, ckpt, "--out=taken").startswith("error: --out taken is a folder")
    for args, named, fmt in ((["--out=m.pt2"], "pt2", "onnx"), (["--format=pt2", "--out=m.ONNX"], "onnx", "pt2")):
        assert cli("export", *TINY, ckpt, *args) == (f"error: --out {args[-1][6:]} names a .{named} file, but --format is "
                                                     f"{fmt}: give --format {named}, or an --out ending in .{fmt}.")
    assert not list(Path().glob("m.*"))
    torch.save({"epoch": 3, "weights": [1, 2]}, "theirs.ckpt")
    error = cli("export", *TINY, "--ckpt_path=theirs.ckpt")
    assert error.startswith("error: theirs.ckpt is not a checkpoint of this project") and "\n" not in error
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    error = cli("export", *TINY, ckpt, "--format=onnx", "--out=m.onnx")
    assert error == ("error: ONNX export needs onnxruntime, which is not installed: install the export extra "
                     "(pip install -e '.[export]').")
    assert not list(Path().glob("m.onnx")) and not list(Path().glob(".partial-*"))


def test_export_replaces_an_earlier_export_but_nothing_else(run_copy: Path) -> None:
    """--out the checkpoint itself (or any other file) replaced it with an ONNX model: the training was lost."""
    ckpt = Path("model.ckpt")
    ckpt.write_bytes(run_copy.read_bytes())
    Path("notes.txt").write_text("mine\n")
    for out in ("model.ckpt", "notes.txt", "mymodel"):  # (a name without the suffix: refused before it exists too)
        error = cli("export", *TINY, "--ckpt_path=model.ckpt", f"--out={out}")
        assert error == (f"error: --out {out}: give a file name ending in .onnx, which says what the file is (and an "
                         "export replaces an earlier export, never another file)."), error
    assert not Path("mymodel").exists()
    assert ckpt.read_bytes() == run_copy.read_bytes() and Path("notes.txt").read_text() == "mine\n"
    Path("model.onnx").write_bytes(b"an earlier export")
    assert cli("export", *TINY, "--ckpt_path=model.ckpt") is None  # beside the checkpoint, as model.onnx
    assert onnx.load("model.onnx").graph.input[0].name


def _forged(source: Path, target: Path, meta: dict | None = None, float_input: bool = False) -> None:
    """The exported model with other metadata, or with a float input the graph does not take."""
    model = onnx.load(source)
    if meta is not None:
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                prop.value = json.dumps(meta)
    if float_input:
        model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.save(model, target)


def test_infer_refuses_forged_metadata_and_odd_graphs_in_one_line(exported: dict, tmp_path: Path) -> None:
    model = exported["cwd"] / "model.onnx"
    meta = json.loads({p.key: p.value for p in onnx.load(model).metadata_props}[METADATA_KEY])
    mixed_folder(tmp_path / "mine")
    cases = {"list.onnx": ({**meta, "dataset": ["mnist"]}, False, "has damaged 'senet_pl' metadata"),
             "names.onnx": ({**meta, "class_names": "0123456789"}, False, "has damaged 'senet_pl' metadata"),
             "short.onnx": ({**meta, "class_names": ["a", "b"]}, False, "gives 10 classes but its metadata names 2"),
             "float.onnx": (None, True, "does not run on uint8 images N x 1 x 28 x 28")}
    for name, (forged, float_input, says) in cases.items():
        _forged(model, tmp_path / name, forged, float_input)
        result = infer(tmp_path, name, "mine", "--out", "out")
        assert result.returncode == 1 and result.stderr.splitlines()[-1].startswith(f"error: {name}"), result.stderr
        assert says in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_infer_writes_every_name_and_only_this_runs_skipped_files(exported: dict, tmp_path: Path) -> None:
    """A file name that is not UTF-8 stopped the CSV half-written (the earlier one gone); a skipped.csv of an earlier
    run stayed beside the new predictions."""
    good = mixed_folder(tmp_path / "mine")
    model = str(exported["cwd"] / "model.onnx")
    assert infer(tmp_path, model, "mine", "--out", "out").returncode == 0
    assert (tmp_path / "out/skipped.csv").is_file()
    clean = tmp_path / "clean"
    clean.mkdir()
    source = (tmp_path / "mine" / good[0]).read_bytes()
    for name in (b"a.png", b"bad\xffname.png", b"z.png"):
        (clean / os.fsdecode(name)).write_bytes(source)
    result = infer(tmp_path, model, "clean", "--out", "out")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [f for f, _ in _predictions(tmp_path / "out/predictions.csv")] == ["a.png", "bad\\xffname.png", "z.png"]
    assert not (tmp_path / "out/skipped.csv").exists()  # nothing was skipped this time
    assert not list((tmp_path / "out").glob(".*partial*"))


def test_an_unreadable_folder_is_one_line(exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from senet_pl import images
    from senet_pl.infer import InferError, infer as infer_here

    listing = images.Path.iterdir

    def refuse(self):  # as for a folder without read permission (root may read every folder)
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(images.Path, "iterdir", refuse)
    with pytest.raises(InferError, match="^cannot read the folder locked: Permission denied.$"):
        infer_here(exported["cwd"] / "model.onnx", "locked")
    assert cli("predict", *TINY, f"--ckpt_path={exported['best']}", "--data.predict_dir=locked") == (
        "error: cannot read --data.predict_dir locked: Permission denied.")


def test_without_a_test_split_the_check_says_why_in_full(tmp_path: Path) -> None:
    images, source = export_module.check_images(MNISTDataModule(data_dir=str(tmp_path / "none"), download=False), 8)
    assert images.shape == (8, 1, 28, 28) and images.dtype == torch.uint8
    assert source == f"random images (no test split: mnist: 4 of 4 files missing in {tmp_path / 'none'}/MNIST/raw and " \
                     "download is off)"


def test_a_signal_during_export_writes_no_file_and_says_so(run_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """It said "export stopped before it started", though the export had run."""
    import signal

    def interrupted(path, fmt, images):  # the check of the written file, interrupted by a SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(export_module, "run_exported", interrupted)
    assert cli("export", *TINY, f"--ckpt_path={run_copy}", "--format=pt2", "--out=cut.pt2") == "143"
    assert capsys.readouterr().err.strip().splitlines()[-1] == "SIGTERM: export stopped; no file was written."
    assert not list(Path().glob("cut*")) and not list(Path().glob(".partial-*"))


def test_a_home_folder_in_out_is_expanded(run_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--out '~/m.onnx' (quoted, or from a YAML file) was "cannot write ~/m.onnx: No such file or directory"."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert cli("export", *TINY, f"--ckpt_path={run_copy}", "--out=~/m.onnx") is None
    assert (tmp_path / "home/m.onnx").is_file() and not Path("~").exists()
    from senet_pl.infer import infer as infer_here

    mixed_folder(tmp_path / "home/mine")
    assert infer_here("~/m.onnx", "~/mine", "~/out") == tmp_path / "home/out/predictions.csv"  # model, folder, out
    assert (tmp_path / "home/out/predictions.csv").is_file() and not Path("~").exists()
