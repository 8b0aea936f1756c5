"""`LastCheckpoint`: owns `last.ckpt`, so a run killed or pre-empted at any moment resumes with little lost.

It is written every `trainer.checkpoint_every_n_steps` steps, at the end of training (after the final
validation, so its best-checkpoint record is current), and when the job is told to stop: SIGUSR1 (which
SLURM sends before the time limit: `--signal=SIGUSR1@90`), SIGTERM (`scancel`, or the time limit itself),
SIGINT (Ctrl-C) or SIGHUP (the terminal closed). The signal handler only records the signal; the checkpoint
is written between two training steps, so it is always consistent, and every rank agrees on the step at
which the run stops. The run then exits at once, without the validation Lightning would run for a stop
request: the signal's grace time is short. Only the time-limit signal (`REQUEUE_SIGNAL`) requeues, as in
Lightning's SLURMEnvironment: under SLURM rank 0 calls `scontrol requeue`, and the requeued job runs the same
command, which resumes from `last.ckpt` (`run.resume=auto`); a cancelled job (SIGTERM) stays cancelled.
Where `scontrol` does not exist the intended call is recorded in `<run>/requeue.log`. The checkpoint before
the latest is kept as `previous.ckpt`, the fallback when `last.ckpt` is damaged.

A second Ctrl-C aborts at once, without a checkpoint. The handlers are installed when training starts,
after Lightning's own: its SIGTERM handler would end the run at a step boundary without this checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Dict, Optional, Set

import pytorch_lightning as pl

from nativetok.lit.checkpoint_io import staging_path
from nativetok.lit.guards import logs_this_batch

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR1  # what the sbatch template asks SLURM to send before the time limit
SIGNALS = (REQUEUE_SIGNAL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LAST = "last.ckpt"
PREVIOUS = "previous.ckpt"


def slurm_job_id() -> Optional[str]:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(job_id: str, record: Path) -> None:
    """`scontrol requeue <job>`, or a line in `record` where scontrol is not installed."""
    command = ["scontrol", "requeue", job_id]
    if shutil.which("scontrol") is None:
        record.parent.mkdir(parents=True, exist_ok=True)
        with open(record, "a") as f:
            f.write(" ".join(command) + "\n")
        log.warning("scontrol not found: recorded '%s' in %s", " ".join(command), record)
        return
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0:
        log.info("requeued SLURM job %s", job_id)
    else:
        log.error("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())


def keep_as_previous(last: Path, previous: Path) -> None:
    """Give `last` the name `previous` too (a hard link, or a copy where the file system has none), replacing
    what `previous` was; `last` itself stays in place."""
    staged = staging_path(previous)  # a killed link or copy is removed with the other staged files at start
    staged.unlink(missing_ok=True)
    try:
        os.link(last, staged)
    except OSError:
        shutil.copyfile(last, staged)
    os.replace(staged, previous)


class LastCheckpoint(pl.Callback):
    def __init__(self, folder: Path, every_n_steps: int, requeue_record: Path):
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self.requeue_record = Path(requeue_record)
        self.received: Optional[int] = None
        self.signals: Set[int] = set()  # every stop signal received, to tell a time limit from a cancel
        self._previous_handlers: Dict[int, object] = {}
        self._saved_at: Optional[int] = None
        self._logging = False  # this batch's step is logged (`logs_this_batch`)

    # -- signals -----------------------------------------------------------------------------------
    def _record(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            log.warning("received %s: checkpointing at the end of this step (Ctrl-C again aborts at once)",
                        signal.Signals(signum).name)
        self.received = signum
        self.signals.add(signum)

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        for sig in SIGNALS:
            self._previous_handlers[sig] = signal.signal(sig, self._record)

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    # -- saving --------------------------------------------------------------------------------------
    def save(self, trainer: pl.Trainer) -> None:
        """previous.ckpt becomes the current last.ckpt (a second name for it), then the new last.ckpt replaces
        it atomically: at every instant last.ckpt is a whole checkpoint, so a kill during the write leaves the
        one before it instead of none."""
        if self._saved_at == trainer.global_step:
            return
        last = self.folder / LAST
        if trainer.is_global_zero and last.is_file():
            keep_as_previous(last, self.folder / PREVIOUS)
        trainer.save_checkpoint(last, weights_only=False)
        self._saved_at = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._logging = logs_this_batch(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._stop_now(trainer):
            self.save(trainer)
            log.warning("pre-empted at step %d: checkpoint %s written", trainer.global_step, self.folder / LAST)
            job = slurm_job_id()
            cancelled = job and self._agreed(trainer, bool(self.signals - {REQUEUE_SIGNAL}))  # scancel, Ctrl-C
            if job and not cancelled and trainer.is_global_zero:
                requeue(job, self.requeue_record)
            trainer.should_stop = True
            trainer.limit_val_batches = 0  # a stop request would otherwise validate first, past the grace time
        elif self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def _stop_now(self, trainer: pl.Trainer) -> bool:
        """Whether any rank was signalled. One process decides at every step; under DDP the ranks agree
        (a collective and a host read) only on steps whose logs are written, which wait for the device
        anyway: at most log_every_n_steps steps later, well inside SLURM's 90 s notice."""
        if trainer.world_size == 1:
            return self.received is not None
        if not self._logging:
            return False
        return self._agreed(trainer, self.received is not None)

    @staticmethod
    def _agreed(trainer: pl.Trainer, mine: bool) -> bool:
        """Whether any rank says yes (every rank calls this at the same step)."""
        return mine if trainer.world_size == 1 else trainer.strategy.reduce_boolean_decision(mine, all=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self._saved_at == trainer.global_step:  # saved before this validation: its best record is stale
            self._saved_at = None

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        # After the final validation, whichever step it fell on: the best-checkpoint record is current.
        self.save(trainer)
        self._restore_handlers()
