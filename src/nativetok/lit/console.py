"""Training progress on the console: a bar on a terminal, one log line per logging step in a batch job.

A progress bar redraws itself with carriage returns; a batch job's log file keeps every redraw, so
without a terminal (or in a SLURM batch job, `trainer.progress_bar=auto`) the run instead logs a line
every `trainer.log_every_n_steps`, e.g.

    step 1200/500000 (0.2%) | 1843 img/s | loss 0.0412 quantizer_loss 0.0011 rec_loss 0.0301 | lr 0.0001 |
    HNT stage 1: 16 experts | ETA 3d 02:11:05

Both read the device only on the steps whose logs Lightning writes anyway (no extra host sync). The policy
(bar or lines) and the line's formatting are those of every long command (nativetok/progress.py); while the
bar shows, log records are written above it.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack
from typing import Any, List, Mapping, Optional, Protocol, runtime_checkable

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from tqdm.contrib.logging import logging_redirect_tqdm

from nativetok.lit.guards import logs_this_batch
from nativetok.progress import duration, on_terminal, per_second

log = logging.getLogger(__name__)


def shows_bar(setting: Any) -> bool:
    """`trainer.progress_bar`: true, false, or auto (a bar only on a terminal and outside a SLURM batch job)."""
    if setting == "auto":
        return on_terminal(sys.stdout)  # where Lightning draws its bar
    return bool(setting)


def progress(setting: Any, log_every_n_steps: int) -> pl.Callback:
    """The step-counting bar when it shows, else the line logger."""
    return StepProgressBar(log_every_n_steps) if shows_bar(setting) else ConsoleLog()


class StepProgressBar(TQDMProgressBar):
    """A bar toward `trainer.max_steps` at `global_step` (Lightning's counts batches of one epoch), refreshed
    on the logging steps (every batch accumulated into one, none of the others) and at the end: each refresh reads
    the shown values from the device. While it shows, the console's
    log records go through `tqdm.write`, above the bar rather than over it."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._logs_above = ExitStack()
        self._logging = False  # this batch's step is logged (`logs_this_batch`)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.is_enabled:
            self._logs_above.enter_context(logging_redirect_tqdm())
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = trainer.global_step  # a resumed run starts where it stopped; it/s counts this run
        bar.set_description("train")

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """Keep counting across epochs (the parent resets the bar to the epoch's batches)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._logging = logs_this_batch(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.is_enabled and (self._logging or step == self.train_progress_bar.total):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._logs_above.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._logs_above.close()


def _batch_size(batch: Any) -> int:
    """Samples in this rank's batch: the length of its first tensor (a shape, no device read)."""
    while isinstance(batch, (Mapping, list, tuple)):
        batch = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return len(batch)


@runtime_checkable
class ConsoleNote(Protocol):
    """A callback that adds a note to every console line (HNT's `ExpertGrowth`: its stage)."""

    def console_note(self) -> str: ...


class ConsoleLog(pl.Callback):
    """One INFO line per logging step (rank 0): step / max_steps, images/s, the training losses, the learning
    rate, the callbacks' notes (the HNT stage) and the ETA. It reads only what the module logged for that step."""

    def __init__(self):
        self._start = self._last = 0.0
        self._start_step = self._last_step = 0
        self._validating_since: Optional[float] = None
        self._validation_seconds = 0.0  # since the last line: not training time
        self._notes: List[ConsoleNote] = []
        self._logging = False  # this batch's step is logged (`logs_this_batch`)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._start_step = self._last_step = trainer.global_step
        self._notes = [c for c in trainer.callbacks if isinstance(c, ConsoleNote)]

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validating_since = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validating_since is not None:
            self._validation_seconds += time.perf_counter() - self._validating_since
            self._validating_since = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._logging = logs_this_batch(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.is_global_zero and self._logging:
            log.info("%s", self.line(trainer, _batch_size(batch) * trainer.world_size))

    def line(self, trainer: pl.Trainer, batch_size: int) -> str:
        metrics = trainer.callback_metrics
        losses = {k[6:]: v for k, v in metrics.items() if k.startswith("train/") and k.endswith("loss")}
        if not losses and "loss" in metrics:
            losses = {"loss": metrics["loss"]}
        shown = " ".join(  # the step's device reads
            f"{name} {float(losses[name]):.4g}" for name in sorted(losses, key=lambda name: (name != "loss", name))
        )
        now, step, total = time.perf_counter(), trainer.global_step, trainer.max_steps
        training = max(now - self._last - self._validation_seconds, 1e-9)
        parts = [f"step {step}/{total} ({100 * step / total:.1f}%)",
                 per_second((step - self._last_step) * batch_size, training, "img")]
        if shown:
            parts.append(shown)
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        parts += [note.console_note() for note in self._notes]
        done = step - self._start_step
        if done > 0:  # the whole run's pace so far, validation and checkpoints included
            parts.append(f"ETA {duration((now - self._start) / done * (total - step))}")
        self._last, self._last_step, self._validation_seconds = now, step, 0.0
        return " | ".join(parts)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info("training stopped at step %d/%d after %s", trainer.global_step, trainer.max_steps,
                     duration(time.perf_counter() - self._start))
