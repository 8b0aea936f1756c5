"""What both training stages do between backward and the optimizer step, without waiting for the device.

Gradients are clipped here, not by Lightning: Lightning refuses to clip for a fused optimizer under mixed
precision, since a fused step unscales fp16 gradients itself; under a GradScaler this guard unscales
first, and the fused step then skips its own unscaling. Whether a step may update the weights is decided
on the device: a fused AdamW reads `found_inf` and leaves weights and state as they were when it is set,
so a non-finite loss or gradient costs no host sync. A skipped step still counts as a step (as under
fp16 autocast, where the scaler skips steps the same way). The counts live on the device and are read
when the run logs anyway (`check`). The two facts about the running Lightning loop a step needs
(`logs_this_batch`, `grad_scaler`) are read here too, without host syncs, from Lightning's public state.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)


def logs_this_batch(trainer: pl.Trainer) -> bool:
    """Asked at a batch's start (`on_train_batch_start`): whether Lightning writes the logs of the step this batch
    belongs to. Only then are the step's scalars worth building, since each costs device work and every value
    read for a logger or progress bar is a host sync. At a batch's start `global_step` counts the optimizer steps
    before it, which is the count Lightning decides by (every `log_every_n_steps`-th step, and the last): the
    tokenizer's discriminator step does not count, and batches accumulated into one step share the answer."""
    every = trainer.log_every_n_steps
    return every > 0 and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)


def grad_scaler(trainer: pl.Trainer) -> Optional[torch.amp.GradScaler]:
    """The loss scaler of fp16 mixed precision (None under bf16 or full precision)."""
    return getattr(trainer.precision_plugin, "scaler", None)


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses too many steps in a row."""


class StepGuard:
    """Clips gradients and skips the updates of steps whose loss or gradients are not finite.

    Every DDP rank decides alike: the decision is all-reduced (max) on the device, so no rank updates
    weights that another rank refuses to.
    """

    def __init__(self, limit: int, name: str = "loss"):
        self.limit = limit
        self.name = name
        self.counts: Optional[Tensor] = None  # [in a row, most in a row, total, last bad step], on the device
        self.skipped: Optional[Tensor] = None  # whether the last step was skipped (device, 0-dim float)
        self.checked_total = 0

    def before_step(
        self, optimizer: torch.optim.Optimizer, loss: Tensor, clip: float, scaler=None, step: int = 0
    ) -> Tensor:
        """Unscale, clip, and tell the coming `optimizer.step()` whether to skip; returns the gradient norm."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        fused = bool(optimizer.defaults.get("fused"))
        if scaler is not None and fused:
            scaler.unscale_(optimizer)
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        bad = ~torch.isfinite(loss.detach())
        if scaler is None:  # under a scaler, overflowing gradients are the scaler's to skip
            bad = bad | ~torch.isfinite(norm)
        bad = bad.float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if fused:
            optimizer.found_inf = bad
        elif bool(bad):  # other optimizers cannot skip on the device: a host decision, then no gradients
            for p in params:
                p.grad = None
        self._count(bad, step)
        self.skipped = bad
        return norm

    def _count(self, bad: Tensor, step: int) -> None:
        if self.counts is None or self.counts.device != bad.device:
            self.counts = torch.zeros(4, device=bad.device)
        in_a_row = (self.counts[0] + 1) * bad
        worst = torch.maximum(self.counts[1], in_a_row)
        last = torch.where(bad > 0, float(step), self.counts[3])
        self.counts = torch.stack([in_a_row, worst, self.counts[2] + bad, last])

    def check(self) -> int:
        """Read the counts (a host sync: call it when logging); stop the run past the limit. Returns the total."""
        if self.counts is None:
            return 0
        _, worst, total, last = (int(v) for v in self.counts.tolist())
        if total > self.checked_total:
            log.warning("non-finite %s: %d steps skipped so far, the last at step %d", self.name, total, last)
        self.checked_total = total
        if worst >= self.limit:
            raise NonFiniteLossError(
                f"{worst} non-finite values of the {self.name} in a row, the last at step {last} "
                f"(trainer.max_nonfinite_steps={self.limit}): check the learning rate, precision and data"
            )
        return total

    @property
    def total(self) -> int:
        """Steps skipped so far (a host read)."""
        return 0 if self.counts is None else int(self.counts[2])


def fused_adamw(groups: Iterable, device: torch.device, **kwargs) -> torch.optim.AdamW:
    """AdamW as one kernel per step where torch has one (CPU and CUDA): fast, and able to skip on the device."""
    return torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"), **kwargs)
