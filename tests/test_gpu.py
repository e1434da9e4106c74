"""On a CUDA GPU: data in GPU memory, the batch transform, fp16/bf16, channels_last, torch.compile, exact resume,
DDP with nccl, predict and analyze, peak memory. Marked ``gpu``: skipped without CUDA (conftest.py);
``pytest -m gpu`` runs only these."""

import csv
import json
import os
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from conftest import FULL_EPOCHS, N_TEST, REPO, SMALL, TINY, cli, make_dataset
from test_ddp import run_ddp
from test_precision import overflowing_step_is_skipped

from senet_pl.checkpoints import load_checkpoint
from senet_pl.data import MNISTDataModule
from senet_pl.data.transforms import transform_batch

# The native 28x28, not the CPU suite's 8x8: these tests check the kernels a real run uses, and cost seconds on a GPU.
TINY = [a for a in TINY if a != SMALL]
FULL_EPOCHS = [a for a in FULL_EPOCHS if a != SMALL]

pytestmark = pytest.mark.gpu

ON_GPU = ["--trainer.accelerator=gpu", "--trainer.devices=1"]
RUN = Path("lightning_logs/mnist")


def newest(name: str) -> Path:
    """The newest run's file NAME (every command writes into a new version_N folder)."""
    return max(RUN.glob(f"version_*/{name}"), key=lambda p: p.stat().st_mtime)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def exact_fp32():
    """No TF32 in convolutions and matrix products, so that GPU results compare with the CPU's to fp32 rounding."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def restores_determinism():
    """Lightning's deterministic=True switches torch's deterministic algorithms on for the whole process."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


class DeviceProbe(L.Callback):
    """Loaded by the CLI (``--trainer.callbacks+=test_gpu.DeviceProbe``); records where things are, once."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        DeviceProbe.seen.clear()
        DeviceProbe.seen["precision"] = trainer.precision
        DeviceProbe.seen["data"] = trainer.datamodule.train_set.images.device.type
        DeviceProbe.seen["compiled"] = getattr(pl_module.model, "_compiled_call_impl", None) is not None

        def record(module, inputs, output) -> None:
            DeviceProbe.seen.setdefault("layer1", (output.device.type, output.is_contiguous(memory_format=torch.channels_last)))

        self._hook = pl_module.model.layer1.register_forward_hook(record)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y = batch
        DeviceProbe.seen.setdefault("batch", (x.device.type, x.dtype, y.device.type))

    def on_train_end(self, trainer, pl_module) -> None:
        self._hook.remove()
        weight = pl_module.model.layer1[0].conv1.weight  # 64 x 64 x 3 x 3: its layout is unambiguous
        DeviceProbe.seen["weight"] = (weight.device.type, weight.is_contiguous(memory_format=torch.channels_last))


PROBE = "--trainer.callbacks+=test_gpu.DeviceProbe"


# -- data and transform --------------------------------------------------------------------------------


def test_data_are_kept_in_gpu_memory_and_fall_back_to_host_memory(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = L.Trainer(accelerator="gpu", devices=1, logger=False)
    gpu = trainer.strategy.root_device
    dm = MNISTDataModule(data_dir=str(data_root), batch_size=8, val_size=16, download=False)
    dm.trainer = trainer
    dm.setup("fit")
    dm.setup("test")
    splits = (dm.train_set, dm.val_set, dm.test_set)
    assert all(s.images.device == gpu and s.labels.device == gpu for s in splits)
    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.device == y.device == gpu and x.dtype == torch.uint8  # cut out on the GPU, still uint8

    nbytes = sum(s.nbytes for s in splits)
    free, total = torch.cuda.mem_get_info(gpu)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * nbytes - 1, total))  # a fuller GPU
    dm.place_datasets(gpu)
    assert all(s.images.device.type == s.labels.device.type == "cpu" for s in splits)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    dm.place_datasets(gpu)
    assert all(s.images.device == gpu for s in splits)  # and back
    for other in (MNISTDataModule(data_dir=str(data_root), val_size=16, download=False, num_workers=1),
                  MNISTDataModule(data_dir=str(data_root), val_size=16, download=False, on_device=False)):
        other.trainer = trainer
        other.setup("fit")
        assert other.train_set.images.device.type == "cpu"


@pytest.mark.parametrize(("size", "dtype", "translate", "atol"), [
    (28, torch.float32, 2, 1e-5), (224, torch.float32, 0, 1e-5), (224, torch.float32, 2, 1e-5),
    (224, torch.bfloat16, 2, 2 * 2**-6), (64, torch.float16, 1, 2 * 2**-9),  # 2 units in the last place at 2..4
])
def test_the_gpu_batch_transform_is_the_cpu_one(exact_fp32, size: int, dtype: torch.dtype, translate: int, atol: float) -> None:
    x = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cpu = transform_batch(x, 0.1307, 0.3081, size, dtype, translate, seed=123)
    gpu = transform_batch(x.cuda(), 0.1307, 0.3081, size, dtype, translate, seed=123)
    assert gpu.is_cuda and gpu.dtype == cpu.dtype == dtype and gpu.shape == cpu.shape == (32, 1, size, size)
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), atol=atol, rtol=0)  # the same shifts, too
    assert (gpu.cpu().float() - cpu.float()).abs().mean() < atol / 4


# -- precision, layout, compile --------------------------------------------------------------------------


def test_fp16_gradient_scaler_skips_an_overflowing_step_on_the_gpu(data_root: Path, tmp_path: Path) -> None:
    overflowing_step_is_skipped(data_root, tmp_path, "gpu")


@pytest.mark.parametrize("channels_last", [True, False])
def test_bf16_mixed_on_a_gpu_with_native_bf16(tmp_path: Path, channels_last: bool) -> None:
    assert torch.cuda.get_device_capability() >= (8, 0), "this test is for Ampere or later"
    make_dataset(tmp_path / "data")
    assert cli("fit", *TINY, *ON_GPU, "--trainer.max_epochs=1", f"--model.channels_last={channels_last}", PROBE) is None
    seen = DeviceProbe.seen
    assert seen["precision"] == "bf16-mixed"  # the recipe's, kept: this GPU has native bf16
    assert seen["data"] == "cuda"  # the uint8 datasets in GPU memory
    assert seen["batch"] == ("cuda", torch.bfloat16, "cuda")  # delivered in autocast's dtype
    assert seen["weight"] == ("cuda", channels_last) and seen["layer1"] == ("cuda", channels_last)
    state = load_checkpoint(newest("checkpoints/last.ckpt"))
    assert state["global_step"] == 3 and all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())


def test_compile_on_the_gpu_trains_and_saves_plain_checkpoints(tmp_path: Path, capsys) -> None:
    make_dataset(tmp_path / "data")
    assert cli("fit", *TINY, *ON_GPU, "--trainer.max_epochs=1", "--model.compile=true", PROBE) is None
    assert DeviceProbe.seen["compiled"]
    last = newest("checkpoints/last.ckpt")
    weights = load_checkpoint(last)["state_dict"]
    assert not [k for k in weights if "_orig_mod" in k]  # interchangeable with an uncompiled model's
    capsys.readouterr()
    assert cli("test", *TINY, *ON_GPU, f"--ckpt_path={last}") is None  # loaded without compiling
    assert any("test/acc" in line for line in capsys.readouterr().out.splitlines())


# -- exact resume, DDP -----------------------------------------------------------------------------------------


def test_resume_is_bitwise_exact_on_the_gpu_with_deterministic(tmp_path: Path, restores_determinism) -> None:
    exact = [*FULL_EPOCHS, *ON_GPU, "--trainer.deterministic=true", "--trainer.max_epochs=2"]
    for name in ("uninterrupted", "resumed"):
        make_dataset(tmp_path / name / "data")
    os.chdir(tmp_path / "uninterrupted")
    assert cli("fit", *exact) is None
    os.chdir(tmp_path / "resumed")
    assert cli("fit", *exact, "--trainer.max_epochs=1") is None
    assert load_checkpoint(RUN / "version_0/checkpoints/last.ckpt")["global_step"] == 10
    assert cli("fit", *exact, "--ckpt_path=last") is None
    a = load_checkpoint(tmp_path / "uninterrupted" / RUN / "version_0/checkpoints/last.ckpt")
    b = load_checkpoint(tmp_path / "resumed" / RUN / "version_0/checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 20
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, different


def test_ddp_on_one_gpu_uses_nccl(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data")
    result = run_ddp(tmp_path, "fit", *TINY, *ON_GPU, "--trainer.strategy=ddp", "--trainer.max_epochs=1",
                     "--trainer.callbacks+=ddp_probe.ShardRecorder", f"--trainer.callbacks.out_dir={tmp_path / 'ddp'}",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "ddp" / "rank0_epoch0.json").read_text())
    assert record["backend"] == "nccl" and record["world_size"] == 1 and record["steps"] == 3
    assert load_checkpoint(tmp_path / RUN / "version_0/checkpoints/last.ckpt")["global_step"] == 3


# -- predict, analyze, memory ----------------------------------------------------------------------------------


def test_predict_and_analyze_on_the_gpu_agree_with_the_cpu(tmp_path: Path, exact_fp32) -> None:
    make_dataset(tmp_path / "data")
    assert cli("fit", *TINY, *ON_GPU, "--trainer.max_epochs=1") is None
    last = str(newest("checkpoints/last.ckpt"))
    fp32 = [*TINY, "--trainer.precision=32-true", "--trainer.limit_test_batches=1.0", f"--ckpt_path={last}"]
    results = {}
    for device in ("gpu", "cpu"):
        where = ON_GPU if device == "gpu" else ["--trainer.accelerator=cpu"]
        assert cli("predict", *fp32, *where) is None
        predictions = rows(newest("predictions.csv"))
        assert cli("analyze", *fp32, *where) is None
        results[device] = predictions, rows(newest("excitation.csv"))
    (gpu_predictions, gpu_gates), (cpu_predictions, cpu_gates) = results["gpu"], results["cpu"]
    assert len(gpu_predictions) == N_TEST and [r["index"] for r in gpu_predictions] == [r["index"] for r in cpu_predictions]
    assert [r["prediction"] for r in gpu_predictions] == [r["prediction"] for r in cpu_predictions]
    for g, c in zip(gpu_predictions, cpu_predictions):
        assert float(g["confidence"]) == pytest.approx(float(c["confidence"]), abs=1e-4)
    assert len(gpu_gates) == len(cpu_gates) == 11 * (64 + 128 + 256 + 512)
    for g, c in zip(gpu_gates, cpu_gates):
        assert g["block"] == c["block"] and g["class"] == c["class"] and g["channel"] == c["channel"]
        if c["mean_excitation"] != "nan":
            assert float(g["mean_excitation"]) == pytest.approx(float(c["mean_excitation"]), abs=1e-4)


def test_peak_gpu_memory_of_the_tutorial_recipe_at_224_batch_32(tmp_path: Path) -> None:
    """configs/seed_224.yaml (fp32, NCHW, batch 32 at 224x224): the tutorial needed about 12 GB."""
    make_dataset(tmp_path / "data")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    args = [f"--config={REPO / 'configs' / 'seed_224.yaml'}", "--data.data_dir=data", "--data.download=false",
            "--data.val_size=16", *ON_GPU, "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", PROBE]
    assert cli("fit", *args) is None
    peak = torch.cuda.max_memory_allocated()
    print(f"torch.cuda.max_memory_allocated: {peak / 2**30:.2f} GiB ({torch.cuda.get_device_name()})")
    assert DeviceProbe.seen["batch"] == ("cuda", torch.float32, "cuda")
    assert load_checkpoint(tmp_path / "lightning_logs/seed_224/version_0/checkpoints/last.ckpt")["global_step"] == 3
    assert 2 * 2**30 < peak < 12 * 2**30, f"{peak / 2**30:.2f} GiB"
