from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.functional.classification import multiclass_confusion_matrix

from senet_pl.data import MNISTDataModule
from senet_pl.callbacks.figures import TensorBoardFigures
from senet_pl.module import SEResNetClassifier
from senet_pl.plots import confusion_matrix_figure, excitation_figure, misclassified_figure


def test_confusion_matrix_figure_has_a_cell_per_class_pair() -> None:
    matrix = torch.tensor([[5, 1, 0], [0, 4, 2], [1, 0, 7]])
    figure = confusion_matrix_figure(matrix, ["a", "b", "c"])
    (ax, *_) = figure.axes
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(matrix.flatten().tolist())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert "20 images" in ax.get_title()


def test_misclassified_figure_titles_true_and_predicted() -> None:
    images = torch.rand(3, 1, 28, 28) * torch.tensor([1.0, 5.0, 0.1]).view(3, 1, 1, 1)
    figure = misclassified_figure(images, ["1", "2", "3"], ["7", "5", "8"])
    (ax,) = figure.axes
    assert [t.get_text() for t in ax.texts] == ["1 -> 7", "2 -> 5", "3 -> 8"]
    # each image shown as it is, scaled to its own range (not the batch's), left to right
    for image, shown in zip(images, ax.images):
        assert torch.equal(torch.from_numpy(shown.get_array().data), image[0])
        assert (shown.norm.vmin, shown.norm.vmax) == pytest.approx((image.min().item(), image.max().item()))
    assert [shown.get_extent()[0] for shown in ax.images] == sorted(shown.get_extent()[0] for shown in ax.images)


def test_misclassified_figure_shows_images_the_right_way_up() -> None:
    """Rendered pixels: an image with a bright top-left quadrant shows it at the top left of its cell."""
    image = torch.zeros(1, 1, 28, 28)
    image[..., :14, :14] = 1
    figure = misclassified_figure(torch.cat([image, torch.rand(2, 1, 28, 28)]), ["1", "2", "3"], ["7", "5", "8"])
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = torch.from_numpy(np.asarray(canvas.buffer_rgba())[..., 0].copy()).float()
    box = figure.axes[0].images[0].get_window_extent(canvas.get_renderer())
    top = int(figure.bbox.height - box.y1)  # display y grows upwards, rows downwards
    cell = pixels[top:top + int(box.height), int(box.x0):int(box.x0) + int(box.width)]
    h, w = cell.shape[0] // 2, cell.shape[1] // 2
    quadrants = [cell[:h, :w].mean(), cell[:h, w:].mean(), cell[h:, :w].mean(), cell[h:, w:].mean()]
    assert quadrants[0] > 200 and max(quadrants[1:]) < 60


@pytest.mark.parametrize("n", [0, 3, 32])
def test_misclassified_figure_shows_every_word(n: int) -> None:
    """Every title (the longest class names of Fashion-MNIST), and the sentence of an empty figure, lies inside the
    figure: none cut off at its edge (an empty figure's sentence was)."""
    long = ["T-shirt/top", "Ankle boot"]
    true, predicted = [long[i % 2] for i in range(n)], [long[(i + 1) % 2] for i in range(n)]
    figure = misclassified_figure(torch.rand(n, 1, 28, 28), true, predicted)
    renderer = FigureCanvasAgg(figure).get_renderer()
    texts = [t for ax in figure.axes for t in ax.texts] + figure.texts
    assert len(texts) == max(n, 1) and all(t.get_text() for t in texts)
    box = figure.bbox
    extents = [text.get_window_extent(renderer) for text in texts]
    for text, extent in zip(texts, extents):
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, text.get_text()
    # no title runs into another one or into an image
    images = [image.get_window_extent(renderer) for ax in figure.axes for image in ax.images]
    for i, extent in enumerate(extents):
        assert not any(extent.overlaps(other) for other in extents[i + 1:] + images), texts[i].get_text()


def test_excitation_figure_has_a_panel_per_block_and_a_line_per_class() -> None:
    means = {name: torch.rand(11, c) for name, c in (("layer1.1", 64), ("layer2.1", 128), ("layer3.1", 256))}
    figure = excitation_figure(means, [str(k) for k in range(10)])
    assert [ax.get_title().split(" ")[0] for ax in figure.axes] == ["SE_2_2", "SE_3_2", "SE_4_2"]
    for ax, m in zip(figure.axes, means.values()):
        assert len(ax.lines) == 11  # ten classes and "all"
        assert len(ax.lines[0].get_xdata()) == m.shape[1]


def test_validation_figures_match_the_model(data_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SEResNetClassifier(channels_last=False)
    dm = MNISTDataModule(data_dir=str(data_root), batch_size=8, val_size=16, translate=0, download=False)
    figures = TensorBoardFigures(max_images=5)
    trainer = L.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path), callbacks=[figures],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=dm, verbose=False)

    module.eval()
    with torch.no_grad():
        x, y, _ = dm.val_set[(0, list(range(16)))]
        x = dm.on_after_batch_transfer([x, y, 0], 0)[0]
        predicted = module(x).argmax(dim=1)
    assert torch.equal(figures.confusion.compute(), multiclass_confusion_matrix(predicted, y, 10))
    wrong = (predicted != y).nonzero().flatten()[:5]
    assert len(figures.wrong) == len(wrong) > 0
    for (image, true, guess), i in zip(figures.wrong, wrong.tolist()):
        assert torch.equal(image, x[i]) and (true, guess) == (y[i].item(), predicted[i].item())
    # every gate value of the stage's SE blocks is counted: 16 images x 2 blocks x channels
    for stage, channels in (("layer1", 64), ("layer4", 512)):
        assert figures.gates[stage][0] == figures.gates[stage][5:].sum() == 16 * 2 * channels

    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    events.Reload()
    assert {"val/confusion_matrix", "val/misclassified"} <= set(events.Tags()["images"])
    assert {f"val/se_gates/layer{i}" for i in range(1, 5)} <= set(events.Tags()["histograms"])


def _hparams(run_dir: Path) -> dict:
    """The settings a run folder shows in TensorBoard's HParams view."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(run_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(HParamsPluginData.FromString(content).session_start_info.hparams)


def test_a_stopped_run_has_its_hparams_row_and_a_resume_shows_its_own_settings(tmp_path: Path, monkeypatch) -> None:
    """The row was written when fit ended: a run stopped by SIGTERM had none; and TensorBoard shows the first settings
    it finds in a folder, so a resume with another --data.hflip still showed the first piece's."""
    from conftest import TINY, cli, make_dataset

    make_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    message = cli("fit", *TINY, "--trainer.max_epochs=2", "--trainer.callbacks+=signal_probe.SendSignal",
                  "--trainer.callbacks.phase=training", "--trainer.callbacks.signum=15", "--trainer.callbacks.step=1")
    assert message == "143"  # stopped by the SIGTERM, after step 1
    run_dir = tmp_path / "lightning_logs/mnist/version_0"
    assert _hparams(run_dir)["data/hflip"].number_value == 0  # (bools as 0/1)
    assert cli("fit", *TINY, "--trainer.max_epochs=2", "--ckpt_path=last", "--data.hflip=true") is None
    assert _hparams(run_dir)["data/hflip"].number_value == 1
    assert len(list(run_dir.glob("events.out.tfevents.*.hparams"))) == 1
    # test and validate of a checkpoint copied out of its run start a run folder of their own, with a row each
    (tmp_path / "elsewhere").mkdir()
    copy = tmp_path / "elsewhere" / "copy.ckpt"
    copy.write_bytes((run_dir / "checkpoints/last.ckpt").read_bytes())
    for subcommand, version in (("test", 1), ("validate", 2)):
        assert cli(subcommand, *TINY, f"--ckpt_path={copy}") is None
        assert _hparams(tmp_path / f"lightning_logs/mnist/version_{version}")["data/dataset"].string_value == "mnist"


def test_other_loggers_get_no_figures_and_no_error(data_root: Path, tmp_path: Path) -> None:
    figures = TensorBoardFigures()
    trainer = L.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[figures], limit_val_batches=1,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(SEResNetClassifier(), datamodule=MNISTDataModule(data_dir=str(data_root), val_size=16,
                                                                      download=False), verbose=False)
    assert not hasattr(figures, "confusion")  # inactive: nothing collected, nothing drawn


def test_gate_histograms_count_as_histc_does_without_it(monkeypatch) -> None:
    """The bins are torch.histc's over 0..1 (gates of exactly 0 and 1 included), counted without histc, which
    torch refuses on a GPU under --trainer.deterministic true (it has no deterministic CUDA kernel)."""
    gates = torch.rand(300, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).float()
    gates[0, :3] = torch.tensor([0.0, 1.0, 0.5])
    expected = torch.histc(gates, bins=50, min=0, max=1) + torch.histc(gates[:10], bins=50, min=0, max=1)

    def refuse(*args, **kwargs):
        raise RuntimeError("histc_cuda does not have a deterministic implementation")

    monkeypatch.setattr(torch, "histc", refuse)
    figures = TensorBoardFigures(bins=50)
    figures.gates = {}
    figures._record_gates("layer1.0", gates)
    figures._record_gates("layer1.1", gates[:10])
    assert torch.equal(figures.gates["layer1"][5:], expected)
    assert figures.gates["layer1"][0] == 310 * 64  # the count
