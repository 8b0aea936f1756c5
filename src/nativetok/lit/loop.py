"""Small facts about the running Lightning loop that the training steps need, read without host syncs."""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl


def writing_logs(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this step's logs: only then are the step's scalars worth building, since
    each costs device work and every value read for a logger or progress bar is a host sync."""
    return trainer._logger_connector.should_update_logs


def grad_scaler(trainer: pl.Trainer) -> Optional["torch.amp.GradScaler"]:  # noqa: F821
    """The loss scaler of fp16 mixed precision (None under bf16 or full precision)."""
    return getattr(trainer.precision_plugin, "scaler", None)
