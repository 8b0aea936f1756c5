"""Checkpoints when training stops: at its end, or on SIGUSR1 / SIGTERM (pre-emption), then requeue.

The signal handler only records the signal; the checkpoint is written between two training steps, so
it is always consistent (never mid-step), and every rank agrees on the step at which the run stops.
Under SLURM (`--signal=SIGUSR1@90`, `--requeue`) rank 0 then requeues the job with `scontrol requeue`;
the requeued job runs the same command, which resumes from `last.ckpt` (`run.resume=auto`). Where
`scontrol` does not exist the intended call is recorded in `<run>/requeue.log` instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Dict, Optional

import pytorch_lightning as pl

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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


class Preemption(pl.Callback):
    """Write `last.ckpt` when training ends, and stop cleanly (checkpointed) when the job is told to stop."""

    def __init__(self, checkpoint: Path, requeue_record: Path):
        self.checkpoint = Path(checkpoint)
        self.requeue_record = Path(requeue_record)
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}
        self._saved_at: Optional[int] = None

    def _record(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received signal %d: checkpointing at the end of this step", signum)
        self.received = signum

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _save(self, trainer: pl.Trainer) -> None:
        if self._saved_at != trainer.global_step:
            trainer.save_checkpoint(self.checkpoint)
            self._saved_at = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        # Validation (and with it ModelCheckpoint) need not fall on the last step: the end is saved too.
        self._save(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Any rank may be signalled: all agree to stop at this step (a collective only under DDP).
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self._save(trainer)
        log.warning("pre-empted at step %d: checkpoint %s written", trainer.global_step, self.checkpoint)
        job = slurm_job_id()
        if job and trainer.is_global_zero:
            requeue(job, self.requeue_record)
        trainer.should_stop = True
