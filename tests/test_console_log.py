"""Console progress: a step-counting bar on a terminal, one log line per logging step in batch jobs."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl

from nativetok.config import ConfigError
from nativetok.lit.console import ConsoleLog, StepProgressBar, progress, shows_bar

from .test_host_syncs import SyncProbe
from .test_stage1_training import fit

GROWTH = "growth.stages=[{step: 0, experts: 4}, {step: 2, experts: 8, train: [decoder]}]"


class Terminal(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty, env, bar", [
    (True, {}, True),
    (False, {}, False),
    (True, {"SLURM_JOB_ID": "7"}, False),  # sbatch job (a site may still give it a pty)
    (True, {"SLURM_JOB_ID": "7", "SLURM_PTY_PORT": "4000"}, True),  # srun --pty
])
def test_auto_shows_a_bar_only_on_a_terminal_outside_slurm_batch_jobs(monkeypatch, tty, env, bar):
    for key in ("SLURM_JOB_ID", "SLURM_PTY_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("sys.stdout", Terminal(tty))
    assert shows_bar("auto") is bar
    assert isinstance(progress("auto", 10), StepProgressBar if bar else ConsoleLog)
    assert shows_bar(True) and not shows_bar(False)  # explicit settings win


def test_progress_bar_setting_is_checked(tiny_config):
    assert tiny_config("trainer.progress_bar=auto").trainer.progress_bar == "auto"
    with pytest.raises(ConfigError, match="trainer.progress_bar: must be true, false or auto; got 'sometimes'"):
        tiny_config("trainer.progress_bar=sometimes")


def test_without_a_bar_each_logging_step_writes_one_line(tiny_config, caplog):
    config = tiny_config("trainer.max_steps=6", "trainer.log_every_n_steps=3", "trainer.val_every_n_steps=100",
                         "trainer.progress_bar=false", GROWTH)
    with caplog.at_level(logging.INFO, logger="nativetok.lit.console"):
        trainer, _ = fit(config)
    lines = [r.getMessage() for r in caplog.records if r.name == "nativetok.lit.console"]
    assert len(lines) == 3
    pattern = (r"step (\d)/6 \((50|100)\.0%\) \| \S+ img/s \| loss (\S+) quantizer_loss \S+ rec_loss \S+ \| "
               r"lr \S+ \| HNT stage 1: 8 experts \| ETA \d\d:\d\d:\d\d")
    steps = [re.fullmatch(pattern, line) for line in lines[:2]]
    assert all(steps), lines
    assert [int(m.group(1)) for m in steps] == [3, 6]
    assert steps[1].group(3) == f"{float(trainer.callback_metrics['train/loss']):.4g}"
    assert steps[1].group(0).endswith("ETA 00:00:00")
    assert re.fullmatch(r"training stopped at step 6/6 after \d\d:\d\d:\d\d", lines[2])


def test_the_line_logger_reads_the_device_only_on_logging_steps(tiny_config):
    config = tiny_config("trainer.max_steps=10", "trainer.log_every_n_steps=4", "trainer.val_every_n_steps=100",
                         "trainer.progress_bar=false", GROWTH)
    probe = SyncProbe()
    trainer, _ = fit(config, [probe])
    assert isinstance(trainer.callbacks[0], ConsoleLog)  # runs inside the probe's window
    quiet = probe.quiet_steps(10)
    assert len(quiet) >= 5
    for step, counter in quiet:
        assert counter.syncs == {} and counter.host_data == {}, (step, counter.syncs, counter.host_data)


class SaysAtStep(pl.Callback):
    """Logs a record in the middle of training, while the bar shows."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            logging.getLogger("nativetok.test").warning("step three")


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_the_bar_counts_steps_toward_max_steps_across_epochs_and_resumes(tiny_config, capsys):
    """Two steps an epoch: Lightning's own bar would restart at 0 of 2 each epoch. A record logged while it
    shows is written through the bar (`tqdm.write`, on a line of its own), and only while it shows."""
    overrides = ["trainer.log_every_n_steps=2", "trainer.val_every_n_steps=100", "trainer.progress_bar=true",
                 "data.train_samples_per_epoch=32"]
    handlers = list(logging.getLogger().handlers)
    trainer, _ = fit(tiny_config("trainer.max_steps=6", *overrides), [SaysAtStep()])
    bar = trainer.progress_bar_callback.train_progress_bar
    assert trainer.current_epoch == 3 and (bar.total, bar.n) == (6, 6)
    shown = capsys.readouterr()
    assert "6/6" in shown.out and "Epoch" not in shown.out
    assert "step three" in shown.err.splitlines()  # pytest's own handlers alone would keep it off stderr
    assert logging.getLogger().handlers == handlers
    last = Path(tiny_config().run.dir) / "checkpoints" / "last.ckpt"
    trainer, _ = fit(tiny_config("trainer.max_steps=8", *overrides), ckpt_path=str(last))
    bar = trainer.progress_bar_callback.train_progress_bar
    assert (bar.initial, bar.n, bar.total) == (6, 8, 8)
