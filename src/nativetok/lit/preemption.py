"""`LastCheckpoint`: owns `last.ckpt`, so a run killed or pre-empted at any moment resumes with little lost.

It is written every `trainer.checkpoint_every_n_steps` steps, at the end of training, and when the job is
told to stop: SIGUSR1 (which SLURM sends before the time limit), SIGTERM, SIGINT (Ctrl-C) or SIGHUP (the
terminal closed). The signal handler only records the signal; the checkpoint is written between two
training steps, so it is always consistent, and every rank agrees on the step at which the run stops.
Under SLURM rank 0 then requeues the job with `scontrol requeue`; the requeued job runs the same command,
which resumes from `last.ckpt` (`run.resume=auto`). Where `scontrol` does not exist the intended call is
recorded in `<run>/requeue.log`. The checkpoint before the latest is kept as `previous.ckpt`, the fallback
when `last.ckpt` is damaged.

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
from typing import Dict, Optional

import pytorch_lightning as pl

from nativetok.lit.loop import writing_logs

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
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


class LastCheckpoint(pl.Callback):
    def __init__(self, folder: Path, every_n_steps: int, requeue_record: Path):
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self.requeue_record = Path(requeue_record)
        self.received: Optional[int] = None
        self._previous_handlers: Dict[int, object] = {}
        self._saved_at: Optional[int] = None

    # -- signals -----------------------------------------------------------------------------------
    def _record(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            log.warning("received %s: checkpointing at the end of this step (Ctrl-C again aborts at once)",
                        signal.Signals(signum).name)
        self.received = signum

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
        """last.ckpt becomes previous.ckpt, then the new last.ckpt is written (atomically)."""
        if self._saved_at == trainer.global_step:
            return
        last = self.folder / LAST
        if trainer.is_global_zero and last.is_file():
            os.replace(last, self.folder / PREVIOUS)
        trainer.save_checkpoint(last, weights_only=False)
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._stop_now(trainer):
            self.save(trainer)
            log.warning("pre-empted at step %d: checkpoint %s written", trainer.global_step, self.folder / LAST)
            job = slurm_job_id()
            if job and trainer.is_global_zero:
                requeue(job, self.requeue_record)
            trainer.should_stop = True
        elif self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def _stop_now(self, trainer: pl.Trainer) -> bool:
        """Whether any rank was signalled. One process decides at every step; under DDP the ranks agree
        (a collective and a host read) only on steps whose logs are written, which wait for the device
        anyway: at most log_every_n_steps steps later, well inside SLURM's 90 s notice."""
        if trainer.world_size == 1:
            return self.received is not None
        if not writing_logs(trainer):
            return False
        return trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        # Validation (and with it the best-checkpoint callback) need not fall on the last step.
        self.save(trainer)
        self._restore_handlers()
