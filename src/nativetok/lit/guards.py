"""Guards of a training step: non-finite losses skip the step; too many in a row stop the run."""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses too many steps in a row."""


class NonFiniteGuard:
    """Counts non-finite losses; `finite(loss, step, agree)` says whether the step may go on (one host sync).

    `agree` (the strategy's `reduce_boolean_decision`) makes every DDP rank skip the same steps: a rank
    that skipped its backward pass alone would leave the others waiting in the gradient all-reduce.
    """

    def __init__(self, limit: int, name: str = "loss"):
        self.limit = limit
        self.name = name
        self.in_a_row = 0
        self.total = 0

    def finite(self, loss: Tensor, step: int, agree: Optional[Callable[..., bool]] = None) -> bool:
        finite = bool(torch.isfinite(loss.detach()).all())
        if agree is not None:
            finite = agree(finite, all=True)
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        log.warning("non-finite %s at step %d: step skipped (%d in a row, %d in all)",
                    self.name, step, self.in_a_row, self.total)
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite values of the {self.name} in a row, the last at step {step} "
                f"(trainer.max_nonfinite_steps={self.limit}): check the learning rate, precision and data"
            )
        return False
