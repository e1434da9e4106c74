"""Time to accuracy: ``fit`` then ``test --ckpt_path last`` through the CLI, in one process, and what they measured.

``python -m senet_pl.tools.tta --args '[--config=configs/mnist.yaml, ...]' [--out result.json]`` runs exactly
``python -m senet_pl fit ARGS`` and ``python -m senet_pl test ARGS --ckpt_path last`` (the final weights) and
reports the test accuracy, val/acc after each validation, the wall time ``fit`` reports at its end (from the start
of training, sanity check included, to its end: what the goals count), the whole command's time (parsing, reading
the data), the epochs and steps done (``--trainer.max_time`` may stop a run early), training images/s and the time
spent writing checkpoints inside ``fit``. The GPU campaign (``campaign.py``) runs it per dataset.
"""

import json
import shlex
import sys
import time
from pathlib import Path

import lightning.pytorch as L

from senet_pl.cli import SENetCLI
from senet_pl.compat import quiet
from senet_pl.tools import run_as_cli


class _ValidationHistory(L.Callback):
    """val/acc after each validation of fit (not the sanity check): the accuracy per epoch that a report shows."""

    def __init__(self) -> None:
        self.val_acc: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the epoch's metrics reached callback_metrics (a callback's on_validation_epoch_end comes before).
        acc = trainer.callback_metrics.get("val/acc")
        if not trainer.sanity_checking and trainer.state.fn == "fit" and acc is not None:
            self.val_acc.append(round(float(acc), 6))


class _MeasuredCLI(SENetCLI):
    """The CLI, with the time its checkpoint writes take counted and val/acc recorded after each validation."""

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        self.checkpoint_seconds = 0.0
        self.history = _ValidationHistory()
        if self.trainer is None:
            return
        self.trainer.callbacks.append(self.history)
        io = self.trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def timed(*args, **kwargs) -> None:
            started = time.perf_counter()
            save(*args, **kwargs)
            self.checkpoint_seconds += time.perf_counter() - started

        io.save_checkpoint = timed


def _cli(args: list[str]) -> _MeasuredCLI:
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args and sys.argv
    try:
        return _MeasuredCLI(args=args)
    finally:
        sys.argv = argv


def commands(args: list[str]) -> list[str]:
    """The two commands a user would type for these arguments."""
    return [shlex.join(["python", "-m", "senet_pl", "fit", *args]),
            shlex.join(["python", "-m", "senet_pl", "test", *args, "--ckpt_path", "last"])]


def tta(args: list[str] = [], out: str | None = None) -> dict:
    """Train with ``fit ARGS``, test the final weights with ``test ARGS --ckpt_path last``; print (and write) the result.
    ``out`` gets fit's figures as soon as fit ends, then the whole result (with ``test_acc``) after the test.

    Args:
        args: the CLI options of both commands, e.g. ["--config=configs/mnist.yaml", "--trainer.max_epochs=20"].
        out: JSON file for the result (it is printed as one JSON line either way when the test ends).
    """
    quiet()
    started = time.perf_counter()
    fit = _cli(["fit", *args])
    fit_command = time.perf_counter() - started
    trainer, summary = fit.trainer, fit.summary
    val = trainer.callback_metrics.get("val/acc")
    result = {
        "commands": commands(args),
        "args": args,
        "val_acc": float(val) if val is not None else None,
        "val_acc_per_validation": fit.history.val_acc,
        "fit_seconds": summary.seconds,
        "fit_command_seconds": fit_command,
        "checkpoint_seconds": fit.checkpoint_seconds,
        "epochs": trainer.current_epoch,
        "max_epochs": trainer.max_epochs,
        "steps": trainer.global_step,
        "images_per_s": summary.images / summary.seconds if summary.seconds else None,
        "precision": str(trainer.precision),
        "device": str(trainer.strategy.root_device),
    }
    # fit's figures first: a test that runs out of its budget (or fails) still leaves the training's record
    _write(out, result)
    test_started = time.perf_counter()
    test = _cli(["test", *args, "--ckpt_path", "last"])
    result |= {"test_acc": float(test.trainer.callback_metrics["test/acc"]),
               "test_command_seconds": time.perf_counter() - test_started}
    _write(out, result)
    print(json.dumps(result))
    return result


def _write(out: str | None, result: dict) -> None:
    """The result as one JSON line, written whole (a process ended mid-write leaves the previous file)."""
    if out:
        partial = Path(out).with_name(Path(out).name + ".partial")
        partial.write_text(json.dumps(result) + "\n")
        partial.replace(out)


if __name__ == "__main__":
    run_as_cli(tta)
