"""``python -m senet_pl.infer MODEL.onnx FOLDER [--out DIR]``: classify image files without torch or Lightning.

Needs only onnxruntime, numpy and Pillow. The ONNX file written by ``python -m senet_pl export --format onnx``
holds the whole preprocessing (uint8 28x28 in, /255, normalization, resize, logits out) and the class names
in its metadata, so this module prepares each file exactly as ``predict --data.predict_dir`` does (the same
``images.py`` code: grayscale, invert, crop, center) and writes the same ``predictions.csv`` and
``skipped.csv``. The CSV rows are built here for both (``callbacks/predictions.py`` uses them too).
"""

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from senet_pl.images import INK_BOX, SIZE, read_folder

METADATA_KEY = "senet_pl"  # ONNX metadata_props key; in a .pt2 file the extra file "senet_pl.json"
MARKER = "senet_pl classifier"  # the metadata's "format": what says a file is a model of this project
INSTALL = "pip install -e '.[export]'"
PREDICTIONS_HEADER = ["prediction", "class", "confidence"]  # after the file/index column, before topN


class InferError(Exception):
    """A model file or folder that cannot be used; the message says what to do."""


def prediction_rows(names: Sequence[Any], probs: np.ndarray, class_names: Sequence[str] | None,
                    top: int = 3) -> list[list[Any]]:
    """``predictions.csv`` rows: name, predicted class, class name, probability, the top ``top`` as class:p."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
    rows = []
    for name, ks, p in zip(names, order.tolist(), probs):
        label = class_names[ks[0]] if class_names else ks[0]
        rows.append([name, ks[0], label, f"{p[ks[0]]:.6f}", " ".join(f"{k}:{p[k]:.4f}" for k in ks)])
    return rows


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Written whole beside ``path`` and renamed into place: a failure never leaves half a file, nor removes the
    previous one."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, *rows])
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_predictions(folder: Path, name: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
                      skipped: Sequence[Sequence[str]] | None) -> list[str]:
    """``name`` (predictions.csv) into ``folder``, and ``skipped.csv`` unless ``skipped`` is None; a skipped.csv of an
    earlier run with files skipped is removed when none were this time. Returns what to tell the user."""
    write_csv(folder / name, header, rows)
    said = [f"predictions for {len(rows)} images written to {folder / name}"]
    if skipped:
        write_csv(folder / "skipped.csv", ["file", "reason"], skipped)
        said.append(f"{len(skipped)} skipped files listed, with the reason, in {folder / 'skipped.csv'}")
    elif skipped is not None:
        (folder / "skipped.csv").unlink(missing_ok=True)
    return said


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise InferError(f"onnxruntime is not installed: install the export extra ({INSTALL}).") from None
    return onnxruntime


def check_metadata(text: str | None, path: str | Path) -> dict[str, Any]:
    """The model's metadata (class names, sizes, normalization ...), or InferError if it is not this project's."""
    try:
        meta = json.loads(text) if text else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != MARKER:
        raise InferError(f"{path} is not a model exported by senet_pl (no {METADATA_KEY!r} metadata): "
                         "export one with `python -m senet_pl export --format onnx`.")
    names, dataset = meta.get("class_names"), meta.get("dataset")
    if not (names is None or isinstance(names, list) and names and all(isinstance(n, str) for n in names)) or not (
            dataset is None or isinstance(dataset, str)):
        raise InferError(f"{path} has damaged {METADATA_KEY!r} metadata (class_names must be a list of names, dataset "
                         "a name): export it again with `python -m senet_pl export --format onnx`.")
    return meta


def load_model(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """An onnxruntime session (CPU) for an exported model, and its metadata."""
    ort = _onnxruntime()
    path = Path(path).expanduser()
    if not path.exists():
        raise InferError(f"{path}: no such file.")
    try:
        open(path, "rb").close()  # a folder, an unreadable file: said as such, not as a model onnxruntime rejects
    except OSError as err:
        raise InferError(f"cannot read {path}: {err.strerror or err}.") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the session's warnings are not the user's business
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf/... for files it cannot load
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InferError(f"{path} is not an ONNX model onnxruntime can load ({first[:200]}).") from None
    meta = check_metadata(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path)
    return session, meta


def run_model(session: Any, images: np.ndarray, batch_size: int = 256, path: str | Path = "the model") -> np.ndarray:
    """Logits (N, classes) of uint8 images (N, 1, 28, 28), batch by batch."""
    name = session.get_inputs()[0].name
    try:
        out = [session.run(None, {name: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    except Exception as err:  # a graph that does not take what export writes (onnxruntime's own error types)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InferError(f"{path} does not run on uint8 images N x 1 x {SIZE} x {SIZE} ({first[:200]}): export it "
                         "again with `python -m senet_pl export --format onnx`.") from None
    logits = np.concatenate(out) if out else np.empty((0, 0), np.float32)
    if logits.ndim != 2 or len(logits) != len(images):
        raise InferError(f"{path} gives outputs of shape {logits.shape}, not one row of logits per image: export it "
                         "again with `python -m senet_pl export --format onnx`.")
    return logits


def infer(model: str | Path, folder: str | Path, out: str | Path = ".", invert: str = "auto",
          batch_size: int = 256) -> Path:
    """Classify every image file in ``folder``; writes OUT/predictions.csv (and skipped.csv); returns its path."""
    session, meta = load_model(model)
    folder, out = Path(folder).expanduser(), Path(out).expanduser()  # (~ from a quoted or YAML value)
    if not folder.is_dir():
        raise InferError(f"{folder} is not a folder: give the folder that holds your images.")
    try:
        found = read_folder(folder, INK_BOX.get(meta.get("dataset"), SIZE), invert)  # type: ignore[arg-type]
    except OSError as err:
        raise InferError(f"cannot read the folder {folder}: {err.strerror or err}.") from None
    for name, reason in found.skipped:
        print(f"skipped {folder / name}: {reason}", file=sys.stderr)
    if not found.files:
        raise InferError(f"no readable image in {folder} ({len(found.skipped)} files skipped): nothing to predict.")
    probs = softmax(run_model(session, found.images, batch_size, model).astype(np.float64))
    names = meta.get("class_names")
    if names is not None and len(names) != probs.shape[1]:
        raise InferError(f"{model} gives {probs.shape[1]} classes but its metadata names {len(names)}: export it again "
                         "with `python -m senet_pl export --format onnx`.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        top = min(3, probs.shape[1])
        said = write_predictions(out, "predictions.csv", ["file", *PREDICTIONS_HEADER, f"top{top}"],
                                 prediction_rows(found.files, probs, names, top), found.skipped)
    except OSError as err:
        raise InferError(f"cannot write into {out}: {err.strerror or err}.") from None
    print("\n".join(said))
    return out / "predictions.csv"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m senet_pl.infer", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("model", help="an ONNX file written by `python -m senet_pl export --format onnx`")
    parser.add_argument("folder", help="the folder of image files to classify (subfolders are not read)")
    parser.add_argument("--out", default=".", help="folder for predictions.csv and skipped.csv (default: here)")
    parser.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                        help="invert light-background images: auto guesses from the border (as predict does)")
    parser.add_argument("--batch_size", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        infer(args.model, args.folder, args.out, args.invert, max(1, args.batch_size))
    except InferError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
