import csv
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch

from senet_pl.data import MNISTDataModule
from senet_pl.callbacks.excitation import ExcitationAnalysis
from senet_pl.gates import describe, paper_name, se_blocks, spread
from senet_pl.model import SEResNet
from senet_pl.module import SEResNetClassifier


@pytest.mark.parametrize(
    ("depth", "last"),
    [(18, ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]), (50, ["layer1.2", "layer2.3", "layer3.5", "layer4.2"])],
)
def test_last_block_of_each_stage_and_paper_names(depth: int, last: list[str]) -> None:
    model = SEResNet(depth=depth)
    assert list(se_blocks(model, last_per_stage=True)) == last
    assert len(se_blocks(model)) == {18: 8, 50: 16}[depth]
    assert not se_blocks(SEResNet(depth=depth, se=False))
    # Fig. 6 names ResNet-50's blocks SE_2_3, SE_3_4, SE_4_6, SE_5_3 (stages conv2_x..conv5_x)
    assert [paper_name(b) for b in last] == (
        ["SE_2_2", "SE_3_2", "SE_4_2", "SE_5_2"] if depth == 18 else ["SE_2_3", "SE_3_4", "SE_4_6", "SE_5_3"]
    )


def test_spread_and_wording() -> None:
    same = torch.full((11, 8), 0.7)  # every class (and "all") excites every channel alike
    different = torch.rand(11, 8, generator=torch.Generator().manual_seed(0))
    assert spread(same) == 0
    assert spread(different) > 0.1
    text = describe({"layer1.1": same, "layer4.1": different}, [str(k) for k in range(10)])
    assert "SE_2_2 (layer1.1, 8 channels): mean gate 0.700, spread 0.000 -> class-agnostic" in text
    assert "SE_5_2 (layer4.1, 8 channels)" in text and "-> class-specific" in text
    assert "averaged per class (10 classes)." in text
    different[[2, 7]] = float("nan")  # classes without images (a test split cut short): class_means gives NaN
    text = describe({"layer4.1": different}, [f"c{k}" for k in range(10)])
    assert "averaged per class (10 classes; 2 without images, left out: c2, c7)." in text


def test_class_means_equal_a_direct_computation(data_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SEResNetClassifier(channels_last=False)
    dm = MNISTDataModule(data_dir=str(data_root), batch_size=8, download=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ExcitationAnalysis()], default_root_dir=tmp_path)
    trainer.test(module, datamodule=dm, verbose=False)
    with open(Path(trainer.log_dir or ".") / "excitation.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["block"] == "layer4.1"]

    # Independently: the gate is sigmoid of the block's second FC layer, over the whole test split.
    fc2 = []
    handle = module.model.layer4[1].se.fc2.register_forward_hook(lambda m, i, out: fc2.append(out.flatten(1)))
    module.eval()
    with torch.no_grad():
        x, y, _ = dm.test_set[(0, list(range(len(dm.test_set))))]
        module(dm.on_after_batch_transfer([x, y, 0], 0)[0])
    handle.remove()
    gates = torch.sigmoid(fc2[0])
    for k in (0, 3, 9):
        expected = gates[y == k].mean(dim=0)
        got = torch.tensor([float(r["mean_excitation"]) for r in rows if r["class"] == str(k)])
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-4)
    overall = torch.tensor([float(r["mean_excitation"]) for r in rows if r["class"] == "all"])
    torch.testing.assert_close(overall, gates.mean(dim=0), atol=2e-6, rtol=1e-4)
