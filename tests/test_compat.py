"""One test per private Lightning name in senet_pl/compat.py: a Lightning upgrade that changes one fails here."""

import inspect
import os
import signal

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from senet_pl import compat


class Record(L.Callback):
    def __init__(self) -> None:
        self.done, self.last = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.done.append(compat.batches_done(trainer))
        self.last.append(compat.at_last_batch(trainer))


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callback: L.Callback, batches: int, **trainer_args) -> L.Trainer:
    """``Tiny`` fitted on ``batches`` batches of 2 an epoch, with ``callback`` and nothing else (no logger, no files)."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2 * batches, 2)), batch_size=2)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback], default_root_dir=tmp_path, **trainer_args)
    trainer.fit(Tiny(), data)
    return trainer


def test_fit_loop_progress_counts_batches_of_the_epoch(tmp_path) -> None:
    record = Record()
    _fit(tmp_path, record, 3, max_epochs=2)
    assert record.done == [1, 2, 3, 1, 2, 3]  # processed before on_train_batch_end, reset every epoch
    assert record.last == [False, False, True] * 2


class Steps(L.Callback):
    def __init__(self) -> None:
        self.stepped, self.sigterm = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stepped.append(compat.stepped(trainer))
        compat.hold_sigterm(trainer, False)  # as a received SIGTERM: the loop must stop at the end of this batch
        self.sigterm.append(trainer.received_sigterm)
        compat.hold_sigterm(trainer, True)  # held: it goes on


def test_stepped_follows_gradient_accumulation_and_a_held_sigterm_is_not_seen(tmp_path) -> None:
    steps = Steps()
    # a SIGTERM seen by the loop would raise SIGTERMException after the first batch
    trainer = _fit(tmp_path, steps, 5, max_epochs=1, accumulate_grad_batches=2)
    assert steps.stepped == [False, True, False, True, True]  # the last batch steps alone
    assert steps.sigterm == [True] * 5 and trainer.global_step == 3


def test_path_type() -> None:
    assert str in getattr(compat.PATH, "__args__", ())


def test_lightning_cli_still_calls_the_steps_this_project_replaces() -> None:
    init = inspect.getsource(LightningCLI.__init__)
    assert "self._parse_ckpt_path()" in init and "self._run_subcommand(self.subcommand)" in init
    assert set(inspect.signature(LightningCLI._run_subcommand).parameters) == {"self", "subcommand"}
    # trainer_callbacks: _instantiate_trainer(config, callbacks) is where the callback groups' objects reach the Trainer
    assert "self._instantiate_trainer(trainer_config, extra_callbacks)" in inspect.getsource(LightningCLI.instantiate_trainer)
    assert list(inspect.signature(LightningCLI._instantiate_trainer).parameters) == ["self", "config", "callbacks"]


def test_estimated_steps_drops_the_early_training_loader(tmp_path) -> None:
    """Asked from configure_optimizers, the step count sets up the training data early; compat drops that
    loader (fit_loop._combined_loader) so that fit sets it up again, with a resumed run's loader state."""
    from senet_pl.module import SEResNetClassifier

    seen = {}

    class Probe(SEResNetClassifier):
        def configure_optimizers(self):
            seen["steps"] = compat.estimated_steps(self.trainer)
            seen["dropped"] = self.trainer.fit_loop._combined_loader is None
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Probe(depth=18), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
    assert seen == {"steps": 2, "dropped": True} and trainer.global_step == 2


def test_lightning_still_says_val_check_interval_in_these_words(tmp_path) -> None:
    """compat.SETTING_ERRORS matches Lightning's ValueError for an int val_check_interval above the epoch's batches."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    data = torch.utils.data.DataLoader(torch.randn(6, 32), batch_size=2)  # 3 batches
    trainer = L.Trainer(max_epochs=1, val_check_interval=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError) as err:
        trainer.fit(BoringModel(), train_dataloaders=data, val_dataloaders=data)
    assert compat.is_setting_error(err.value)
    assert not compat.is_setting_error(ValueError("some other fault"))


@pytest.mark.parametrize("scheduled", [False, True])
def test_learning_rate_monitor_names_a_lone_optimizers_rate_train_lr(tmp_path, scheduled: bool) -> None:
    """compat.LearningRateMonitor: an optimizer without a scheduler is logged as train/lr (Lightning: lr-SGD);
    a scheduler's rate keeps Lightning's name."""
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import CSVLogger

    class Model(BoringModel):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
            return ([optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1)]) if scheduled else optimizer

    monitor = compat.LearningRateMonitor()
    trainer = L.Trainer(max_steps=3, logger=CSVLogger(tmp_path), callbacks=[monitor], log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(Model())
    assert set(monitor.lrs) == ({"lr-SGD"} if scheduled else {"train/lr"})
    rates = next(iter(monitor.lrs.values()))
    assert rates and all(rate == 0.05 for rate in rates), monitor.lrs  # logged, not just named
    if not scheduled:
        assert len(rates) >= 3  # every step (a StepLR's once per epoch)


def test_logs_this_step_follows_log_every_n_steps(tmp_path) -> None:
    """compat.logs_this_step (Lightning's ``_logger_connector.should_update_logs``) is true at the batches whose
    metrics the Trainer logs: with log_every_n_steps 2, those of steps 1, 3, 5 (Lightning counts from 1)."""
    from lightning.pytorch.loggers import CSVLogger

    seen = []

    class Look(L.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            seen.append((trainer.global_step, compat.logs_this_step(trainer)))

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(6, 2)), batch_size=2)
    trainer = L.Trainer(max_epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=2, callbacks=[Look()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(Tiny(), data)
    assert seen == [(step, step % 2 == 1) for step in range(6)], seen


def test_clips_in_the_optimizer_names_fused_optimizers() -> None:
    """compat.clips_in_the_optimizer (Lightning's ``_optimizer_handles_unscaling``): a fused SGD, as the recipes',
    unscales in its step (Lightning's mixed precision then refuses clipping); a plain SGD does not."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert compat.clips_in_the_optimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True))
    assert not compat.clips_in_the_optimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9))


def test_averaged_module_is_the_average_of_a_weight_averaging_callback(tmp_path) -> None:
    """compat.averaged_module: None before fit; in fit, the module that holds the average (not the trained one)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from lightning.pytorch.demos.boring_classes import BoringModel

    seen = []

    class Look(L.Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            seen.append(compat.averaged_module(average))

    average = EMAWeightAveraging(decay=0.5)
    assert compat.averaged_module(average) is None
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[average, Look()])
    model = BoringModel()
    trainer.fit(model)
    assert isinstance(seen[0], BoringModel) and seen[0] is not model


def test_a_cut_validation_is_restarted_mid_evaluation_from_its_first_batch() -> None:
    """The progress of a validation stopped after 3 of its batches (the 2nd validation of a run), rewritten: Lightning
    reads it as restarted mid-evaluation, and restarts from batch 0."""
    from lightning.pytorch.loops.progress import _BatchProgress

    done = {"ready": 3, "started": 3, "processed": 3, "completed": 3}
    state = {"total": {k: v + 5 for k, v in done.items()}, "current": dict(done), "is_last_batch": False}
    checkpoint = {"loops": {"fit_loop": {"epoch_loop.val_loop.batch_progress": state}}}
    compat.rerun_cut_validation(checkpoint)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop.batch_progress = _BatchProgress()
    val_loop.batch_progress.load_state_dict(state)
    val_loop.restarting = True
    val_loop.update_restart_stage()
    assert val_loop.restarted_mid_evaluation
    val_loop.batch_progress.reset_on_restart()
    assert val_loop.batch_progress.current.ready == 0  # the validation's first batch comes next
    assert val_loop.batch_progress.total.completed == 5  # the earlier validation's batches stay counted


def test_a_cut_epoch_stays_open() -> None:
    """The fit loop's epoch progress of a checkpoint written at the end of an epoch that max_steps cut (the 2nd
    epoch), rewritten: Lightning restarts inside that epoch rather than after it."""
    from lightning.pytorch.loops.progress import _ProcessedTracker, _Progress

    cut = {"ready": 2, "started": 2, "processed": 2, "completed": 1}
    state = {"total": dict(cut), "current": dict(cut)}
    checkpoint = {"loops": {"fit_loop": {"epoch_progress": state}}}
    compat.keep_epoch_open(checkpoint)
    progress = _Progress.from_defaults(_ProcessedTracker)
    progress.load_state_dict(state)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit_loop.epoch_progress = progress
    assert trainer.fit_loop.epoch_progress.current.processed == trainer.fit_loop.epoch_progress.current.started - 1
    trainer.fit_loop.epoch_progress.reset_on_restart()
    assert trainer.current_epoch == 1  # epochs completed: the first; the cut one is the one in progress


class ReplaceSigterm(L.Callback):
    def __init__(self) -> None:
        self.seen, self.batches = [], 0

    def setup(self, trainer, pl_module, stage) -> None:
        compat.handle_sigterm_with(trainer, lambda signum, frame: self.seen.append(signum), None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_the_replaced_sigterm_handler_is_the_one_the_trainer_registers(tmp_path) -> None:
    replace = ReplaceSigterm()
    trainer = _fit(tmp_path, replace, 3, max_epochs=1)
    # Lightning's own handler, which sets the flag its loops stop on, did not run: all 3 batches were trained
    assert replace.seen == [signal.SIGTERM] and replace.batches == 3 and not trainer.received_sigterm


class LoggedSteps(L.Callback):
    def __init__(self) -> None:
        self.steps = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.steps.append((compat.logged_step(trainer), trainer.global_step))


class Logs(Tiny):
    def validation_step(self, batch, batch_idx):
        self.log("val/x", 1.0)

    def test_step(self, batch, batch_idx):
        self.log("test/x", 1.0)


def test_logged_step_is_the_step_of_a_validations_metrics_and_log_at_moves_an_evaluations(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(6, 2)), batch_size=2)
    steps = LoggedSteps()
    trainer = L.Trainer(max_epochs=2, logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[steps], default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(Logs(), data, data)
    assert steps.steps == [(2, 3), (5, 6)]  # one less than global_step in a validation of fit: val/x was logged there
    tester = L.Trainer(logger=CSVLogger(tmp_path, version="test"), enable_progress_bar=False, default_root_dir=tmp_path)
    compat.log_at(tester, 7, 3)
    tester.test(Logs(), data, verbose=False)
    rows = (tmp_path / "lightning_logs/test/metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["epoch", "step"] and rows[1].split(",")[:2] == ["3", "7"], rows
