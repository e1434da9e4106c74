"""``python -m senet_pl export --format onnx|pt2``: the trained model with its preprocessing, for use elsewhere.

The exported graph takes what the datasets hold, uint8 images (N, 1, 28, 28) with a dynamic batch, and does
what the data module does to a test batch (``transforms.transform_batch`` without shifts): /255, the dataset's
normalization, the resize to the trained image size; then the model. It returns logits. The metadata (class
names, sizes, normalization, val/acc, version, and the marker that it is this project's) travels in the file:
ONNX ``metadata_props["senet_pl"]``, or the ``.pt2`` extra file ``senet_pl.json``, both the same JSON.

Every export is checked before the file is put in place: the exported model runs (onnxruntime, or the
reloaded ExportedProgram) on up to 256 test images and must give the PyTorch model's logits within
``TOLERANCE`` and the same classes; otherwise nothing is written.
"""

import copy
import importlib
import importlib.metadata
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from senet_pl.checkpoints import as_lightning_checkpoint, is_state_dict, load_checkpoint
from senet_pl.data import DataError, MNISTDataModule
from senet_pl.data.transforms import resize_weights
from senet_pl.files import give_default_mode
from senet_pl.images import INK_BOX, SIZE
from senet_pl.infer import INSTALL, MARKER, METADATA_KEY, load_model, run_model

Format = Literal["onnx", "pt2"]
EXTRA_FILE = f"{METADATA_KEY}.json"
# The largest |logit| difference accepted. fp32 kernels of two runtimes differ by rounding only
# (measured: about 1e-6 on logits of magnitude 10); a real fault (a wrong normalization, a layer lost) is
# off by far more than this.
TOLERANCE = 1e-3
CHECK_IMAGES = 256


class ExportError(Exception):
    """An export that cannot be done or did not pass its check; nothing was written."""


class WithPreprocessing(nn.Module):
    """uint8 images (N, 1, 28, 28) -> logits: the data module's test-time transform, then the model."""

    def __init__(self, model: nn.Module, mean: float, std: float, image_size: int) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std, self.image_size = mean, std, image_size
        if image_size != SIZE:  # transforms.resize_bilinear's matrices, as constants of the graph
            self.register_buffer("rows", resize_weights(SIZE, image_size, torch.device("cpu"), torch.float32).clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255 - self.mean) / self.std
        if self.image_size != SIZE:
            x = self.rows @ x @ self.rows.T  # square images: the same matrix for rows and columns
        return self.model(x)


def val_acc_of(checkpoint: dict[str, Any], path: str | Path) -> float | None:
    """The checkpoint's own val/acc, when the best-checkpoint callback recorded it (None for last.ckpt
    written mid-epoch, plain state dicts, ...)."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") == "val/acc":
            for file, score in (state.get("best_k_models") or {}).items():
                if Path(str(file)).name == Path(path).name and score is not None:
                    return float(score)
    return None


def metadata(hparams: dict[str, Any], dm: MNISTDataModule, val_acc: float | None,
             checkpoint: str) -> dict[str, Any]:
    """What a user of the exported file needs to know, as JSON-able values."""
    try:
        version = importlib.metadata.version("senet_pl")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    dataset = dm.hparams.dataset
    return {
        "format": MARKER,
        "format_version": 1,
        "senet_pl_version": version,
        "dataset": dataset,
        "class_names": dm.class_names,
        "input": "uint8 images (N, 1, 28, 28), light on black as in the dataset; N is dynamic",
        "input_size": [1, SIZE, SIZE],
        "image_size": dm.hparams.image_size,
        "ink_box": INK_BOX[dataset],
        "normalization": {"mean": dm.mean, "std": dm.std, "after": "/255"},
        "output": "logits (N, classes)",
        "val_acc": val_acc,
        "architecture": {k: hparams.get(k) for k in ("depth", "stem", "se", "reduction", "num_classes")},
        "checkpoint": str(checkpoint),
    }


def check_images(dm: MNISTDataModule, count: int = CHECK_IMAGES) -> tuple[torch.Tensor, str]:
    """Up to ``count`` uint8 images to compare on: the test split, else the predict_dir images, else random
    images (the comparison of logits holds for any input)."""
    try:
        dm.prepare_data()
        dm.setup("test")
        return dm.test_set.images[:count].cpu(), "test images"
    except DataError as err:
        reason = str(err).split(". ")[0]  # its first sentence: "mnist: 4 of 4 files missing in data/MNIST/raw ..."
    if dm.hparams.predict_dir:
        from senet_pl.images import read_folder

        found = read_folder(dm.hparams.predict_dir, INK_BOX[dm.hparams.dataset], dm.hparams.invert)
        if found.files:
            return torch.from_numpy(found.images[:count]), f"images of {dm.hparams.predict_dir} (no test split: {reason})"
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 1, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    return images, f"random images (no test split: {reason})"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)  # torch.onnx imports them anyway; a broken install counts as missing
    except ImportError:
        return False
    return True


def _needs(modules: tuple[str, ...], what: str) -> None:
    missing = [m for m in modules if not _importable(m)]
    if missing:
        raise ExportError(f"{what} needs {', '.join(missing)}, which is not installed: install the export extra ({INSTALL}).")


def _write(wrapper: nn.Module, example: torch.Tensor, fmt: Format, path: Path, meta: dict[str, Any]) -> None:
    dynamic = {"images": {0: torch.export.Dim("batch", min=1, max=65536)}}
    if fmt == "pt2":
        program = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic)
        torch.export.save(program, path, extra_files={EXTRA_FILE: json.dumps(meta)})
        return
    program = torch.onnx.export(wrapper, (example,), dynamo=True, dynamic_shapes=dynamic, input_names=["images"],
                                output_names=["logits"], verbose=False)
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    program.save(str(path))


def run_exported(path: Path, fmt: Format, images: torch.Tensor) -> np.ndarray:
    """Logits of the exported file, run as its users run it: onnxruntime, or torch.export.load."""
    if fmt == "onnx":
        session, _ = load_model(path)
        return run_model(session, images.numpy())
    extra = {EXTRA_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    if json.loads(extra[EXTRA_FILE] or "{}").get("format") != MARKER:
        raise ExportError(f"{path}: the metadata did not survive saving.")
    with torch.no_grad():
        return program.module()(images).numpy()


def export(model: nn.Module, hparams: dict[str, Any], dm: MNISTDataModule, fmt: Format, out: Path,
           val_acc: float | None, checkpoint: str) -> dict[str, Any]:
    """Export ``model`` (an SEResNet, trained on ``dm``'s data) to ``out``, checked against PyTorch.

    Returns the check's figures; raises ExportError (and leaves no file) when anything fails."""
    _needs(("onnx", "onnxscript", "onnxruntime") if fmt == "onnx" else (), "ONNX export")
    model = copy.deepcopy(model).float().to("cpu", memory_format=torch.contiguous_format).eval()
    wrapper = WithPreprocessing(model, dm.mean, dm.std, dm.hparams.image_size).eval()
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder: give a file name (e.g. {out / f'model.{fmt}'}).")
    try:  # a hidden file beside the target, renamed into place only after the check: never a half file
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".partial-{out.name}.", suffix=f".{fmt}")
        os.close(fd)
    except OSError as err:
        raise ExportError(f"cannot write {out}: {err.strerror or err}.") from None
    tmp = Path(tmp_name)
    try:
        images, source = check_images(dm)
        meta = metadata(hparams, dm, val_acc, checkpoint)
        start = time.perf_counter()
        _write(wrapper, images[:2], fmt, tmp, meta)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            reference = model(dm.transform_batch(images, training=False)).numpy()
        exported = run_exported(tmp, fmt, images)
        if exported.shape != reference.shape:
            raise ExportError(f"the exported model gives logits of shape {exported.shape}, PyTorch {reference.shape}.")
        diff = float(np.abs(exported - reference).max())
        same = int((exported.argmax(1) == reference.argmax(1)).sum())
        result = {"images": len(images), "source": source, "max_abs_diff": diff, "same_class": same, "seconds": seconds}
        if not diff <= TOLERANCE or same != len(images):
            raise ExportError(
                f"the exported model does not match PyTorch on {len(images)} {source}: max |logit difference| "
                f"{diff:.3g} (tolerance {TOLERANCE:g}), {len(images) - same} different classes; nothing was written."
            )
        give_default_mode(tmp)
        os.replace(tmp, out)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):  # writing the file, unless the error names another (the images read ...)
            other = err.filename is not None and Path(err.filename) not in (tmp, out, out.parent)
            raise ExportError(f"cannot {'read ' + str(err.filename) if other else 'write ' + str(out)}: "
                              f"{err.strerror or err}.") from None
        raise
    return result


def export_checkpoint(classifier: nn.Module, dm: MNISTDataModule, ckpt_path: str | None, fmt: Format,
                      out: str | None) -> Path:
    """``python -m senet_pl export``: load the checked checkpoint into ``classifier`` (an SEResNetClassifier
    whose shape the CLI has matched to it), export, check, and say what was done. Returns the file written."""
    if not ckpt_path:
        raise ExportError("export needs a trained model: add --ckpt_path PATH (or best / last).")
    out = os.path.expanduser(os.path.expandvars(out)) if out else out  # as the checkpoint folders' (runs.py)
    named = Path(out).suffix.lower().lstrip(".") if out else None
    if named in get_args(Format) and named != fmt:  # an ONNX file named .pt2 (or the reverse) would not load as one
        raise ExportError(f"--out {out} names a .{named} file, but --format is {fmt}: give --format {named}, or an "
                          f"--out ending in .{fmt}.")
    if out and named != fmt and not Path(out).is_dir():  # (a folder gets its own message)
        raise ExportError(f"--out {out}: give a file name ending in .{fmt}, which says what the file is (and an "
                          "export replaces an earlier export, never another file).")
    target = Path(out) if out else Path(ckpt_path).with_suffix(f".{fmt}")
    if target.is_file() and target.samefile(ckpt_path):  # a checkpoint named model.onnx, exported by default
        raise ExportError(f"{target} is the checkpoint itself: give an --out ending in .{fmt}.")
    checkpoint = load_checkpoint(ckpt_path)
    weights = (as_lightning_checkpoint(checkpoint) if is_state_dict(checkpoint) else checkpoint)["state_dict"]
    classifier.load_state_dict(weights)
    found = export(classifier.model, dict(classifier.hparams), dm, fmt, target, val_acc_of(checkpoint, ckpt_path),
                   ckpt_path)
    print(f"checked on {found['images']} {found['source']}: max |logit difference| {found['max_abs_diff']:.2g} "
          f"(tolerance {TOLERANCE:g}), the same class for {found['same_class']} of {found['images']}")
    print(f"exported {ckpt_path} to {target} ({fmt}, {target.stat().st_size / 2**20:.1f} MiB, "
          f"{found['seconds']:.1f} s to export)")
    return target
