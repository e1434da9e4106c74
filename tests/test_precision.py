"""What a requested precision becomes on each kind of hardware, and every precision run end to end on the CPU."""

import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
import yaml
from conftest import TINY, cli, make_dataset
from lightning.pytorch.plugins.precision import MixedPrecision

from senet_pl.checkpoints import load_checkpoint
from senet_pl.data import MNISTDataModule
from senet_pl.module import SEResNetClassifier
from senet_pl.precision import input_dtype, resolve_precision

# -- the decision, on faked hardware ------------------------------------------------------------------

# Faked at torch's level, below torch.cuda.is_bf16_supported: GPUs are given by their compute capability,
# and torch's own emulation probe says yes, as it does on a real T4 or V100.
HARDWARE = {
    "cpu with bf16": {"cpu_bf16": True, "gpus": []},
    "cpu without bf16": {"cpu_bf16": False, "gpus": []},
    "gpu with native bf16": {"cpu_bf16": False, "gpus": [(9, 0)]},  # H100/H200; Ampere is 8.x
    "gpu without native bf16": {"cpu_bf16": True, "gpus": [(7, 0)]},  # V100 (T4: 7.5)
}


def fake_hardware(monkeypatch: pytest.MonkeyPatch, cpu_bf16: bool, gpus: list[tuple[int, int]]) -> None:
    """Pretend to be a machine with these GPUs (compute capabilities) and a CPU with or without bf16."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)

    def properties(device: object = None) -> SimpleNamespace:
        index = 0 if device is None else device if isinstance(device, int) else torch.device(device).index or 0
        major, minor = gpus[index]
        return SimpleNamespace(major=major, minor=minor, name=f"fake sm_{major}{minor}")

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)  # emulation works


# request -> what it becomes on (cpu with bf16, cpu without, gpu with native bf16, gpu without)
TABLE = {
    None: (None, None, None, None),
    "32-true": ("32-true",) * 4, 32: ("32-true",) * 4, "32": ("32-true",) * 4,
    "64-true": ("64-true",) * 4, 64: ("64-true",) * 4, "64": ("64-true",) * 4,
    "bf16-mixed": ("bf16-mixed", "32-true", "bf16-mixed", "16-mixed"),
    "bf16": ("bf16-mixed", "32-true", "bf16-mixed", "16-mixed"),
    # Lightning runs 16-mixed on a CPU as bf16-mixed: decided the same way
    "16-mixed": ("bf16-mixed", "32-true", "16-mixed", "16-mixed"),
    16: ("bf16-mixed", "32-true", "16-mixed", "16-mixed"),
    "16": ("bf16-mixed", "32-true", "16-mixed", "16-mixed"),
    "bf16-true": ("bf16-true",) * 4,  # as asked; a warning where it is emulated
    "16-true": ("16-true",) * 4,
}


@pytest.mark.parametrize("request_", list(TABLE), ids=repr)
@pytest.mark.parametrize("kind", list(HARDWARE))
def test_the_precision_decision_table(monkeypatch: pytest.MonkeyPatch, kind: str, request_: object) -> None:
    fake_hardware(monkeypatch, **HARDWARE[kind])
    expected = TABLE[request_][list(HARDWARE).index(kind)]
    accelerators = ["auto", "gpu", "cuda"] if HARDWARE[kind]["gpus"] else ["auto", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16-true's, tested below
        for accelerator in accelerators:
            assert resolve_precision(request_, accelerator, "auto") == expected, accelerator


@pytest.mark.parametrize("kind", ["gpu with native bf16", "gpu without native bf16"])
def test_cpu_accelerator_on_a_gpu_machine_is_decided_by_the_cpu(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    fake_hardware(monkeypatch, **HARDWARE[kind])
    expected = "bf16-mixed" if HARDWARE[kind]["cpu_bf16"] else "32-true"
    assert resolve_precision("bf16-mixed", "cpu", "auto") == expected


@pytest.mark.parametrize(("devices", "expected"), [
    ([0], "bf16-mixed"), ([1], "16-mixed"), ("0,", "bf16-mixed"), ("1,", "16-mixed"), ("0,1", "16-mixed"),
    (1, "bf16-mixed"), (2, "16-mixed"), ("1", "bf16-mixed"), ("auto", "16-mixed"), (-1, "16-mixed"),
])
def test_the_gpus_the_trainer_uses_decide_not_the_current_one(
    monkeypatch: pytest.MonkeyPatch, devices: object, expected: str
) -> None:
    fake_hardware(monkeypatch, cpu_bf16=True, gpus=[(8, 0), (7, 5)])  # an A100 and a T4; current_device() is 0
    assert resolve_precision("bf16-mixed", "gpu", devices) == expected


@pytest.mark.parametrize("kind", list(HARDWARE))
def test_bf16_true_warns_where_it_would_be_emulated(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    fake_hardware(monkeypatch, **HARDWARE[kind])
    native = kind in ("cpu with bf16", "gpu with native bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("bf16-true", "auto", "auto") == "bf16-true"
    messages = [str(w.message) for w in caught]
    assert (messages == []) if native else (len(messages) == 1 and "no native bf16" in messages[0]), messages


@pytest.mark.parametrize("kind", list(HARDWARE))
def test_16_true_warns_on_a_cpu(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    fake_hardware(monkeypatch, **HARDWARE[kind])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("16-true", "auto", "auto") == "16-true"
    messages = [str(w.message) for w in caught]
    if kind.startswith("cpu"):
        faster = "bf16-mixed" if kind == "cpu with bf16" else "32-true"
        assert len(messages) == 1 and f"--trainer.precision {faster} is faster" in messages[0], messages
    else:
        assert messages == []


def test_other_accelerators_keep_what_was_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hardware(monkeypatch, cpu_bf16=False, gpus=[])
    assert resolve_precision("bf16-mixed", "mps") == "bf16-mixed"
    assert resolve_precision("bf16", "tpu") == "bf16-mixed"  # spelled the long way, nothing else


@pytest.mark.parametrize(("precision", "dtype"), [
    ("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16), ("bf16-true", torch.bfloat16),
    ("16-true", torch.float16), ("32-true", torch.float32), ("64-true", torch.float64), (None, torch.float32),
])
def test_input_dtype_is_what_the_first_layer_computes_in(precision: object, dtype: torch.dtype) -> None:
    assert input_dtype(precision) == dtype


# -- every precision, end to end on the CPU -----------------------------------------------------------

WEIGHTS = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
SHORT = [*TINY, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
         "--trainer.limit_test_batches=1", "--trainer.num_sanity_val_steps=0"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true", "16-true", "32-true", "64-true"])
def test_every_precision_fits_and_tests_on_the_cpu(tmp_path: Path, precision: str, capsys) -> None:
    make_dataset(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ran = resolve_precision(precision, "cpu")
    assert cli("fit", *SHORT, f"--trainer.precision={precision}") is None
    run = Path("lightning_logs/mnist/version_0")
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == ran  # what ran is recorded
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 2
    conv = state["state_dict"]["model.conv1.weight"]
    assert conv.dtype == WEIGHTS.get(ran, torch.float32)  # -true trains in that dtype, -mixed keeps fp32 weights
    assert torch.isfinite(conv.double()).all()
    capsys.readouterr()
    assert cli("test", *SHORT, f"--trainer.precision={precision}", "--ckpt_path=last") is None
    assert any("test/acc" in line for line in capsys.readouterr().out.splitlines())


class InfiniteFirstStep(L.Callback):
    """Makes the first step's gradients infinite, as an fp16 overflow would, and records what the scaler did."""

    def __init__(self) -> None:
        self.changed: list[bool] = []
        self.scales: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:
            next(pl_module.parameters()).grad.fill_(float("inf"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self.before, pl_module.parameters())))
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


def overflowing_step_is_skipped(data_root: Path, tmp_path: Path, accelerator: str) -> None:
    """16-mixed with its gradient scaler: a first step whose gradients overflow changes no weight and halves the
    scale, and training goes on as it would have without that step, with the recipes' fused SGD as with the
    plain one (shared with tests/test_gpu.py)."""
    device = "cpu" if accelerator == "cpu" else "cuda"
    weights = []
    for fused in (True, False):
        torch.manual_seed(0)
        probe = InfiniteFirstStep()
        # The plugin, as Lightning builds it for precision="16-mixed" (which it runs as bf16-mixed on a CPU), with
        # a start scale at which nothing but the injected infinity overflows.
        plugin = MixedPrecision("16-mixed", device, scaler=torch.amp.GradScaler(device, init_scale=2.0**8))
        trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=2, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[probe], default_root_dir=tmp_path, plugins=[plugin])
        dm = MNISTDataModule(data_dir=str(data_root), batch_size=8, val_size=16, image_size=8, download=False)
        optimizer = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=fused)
        model = SEResNetClassifier(optimizer=optimizer)
        trainer.fit(model, datamodule=dm)
        assert trainer.precision == "16-mixed" and trainer.global_step == 2
        assert probe.changed == [False, True]  # the overflowing step was skipped, the next one was not
        assert probe.scales == [2.0**7] * 2  # halved once
        weights.append([p.detach().float().cpu() for p in model.parameters()])
    for fused, plain in zip(*weights):  # fused SGD's momentum did not start from the skipped step's garbage
        torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_fp16_gradient_scaler_skips_an_overflowing_step_on_the_cpu(data_root: Path, tmp_path: Path) -> None:
    overflowing_step_is_skipped(data_root, tmp_path, "cpu")
