"""What both training stages share about optimization: parameter groups, the scaled learning rate, AdamW
with warm-up and cosine decay, and the per-step seed of whatever a step draws at random."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nativetok.config.schema import ExperimentConfig, OptimConfig
from nativetok.lit.guards import fused_adamw


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at `step` (0-based): linear warm-up, then cosine to a floor."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_split(
    named: Iterable[Tuple[str, nn.Parameter]], no_decay: Sequence[str]
) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """Trainable parameters with and without weight decay: vectors (norms, biases) and any whose name holds
    one of `no_decay` (positions, queries, codes, embeddings) take none."""
    decay, plain = [], []
    for name, p in named:
        if p.requires_grad:
            (plain if p.ndim < 2 or any(k in name for k in no_decay) else decay).append(p)
    return decay, plain


def scaled_lr(config: ExperimentConfig) -> float:
    """optim.lr, times global batch / optim.base_batch_size when that is set (the linear scaling rule)."""
    o = config.optim
    return o.lr * (config.data.batch_size / o.base_batch_size if o.base_batch_size else 1.0)


@dataclass(frozen=True)
class Optimization:
    """What a LightningModule is given to optimize with (as lightning-hydra-template hands its module an
    optimizer and a scheduler): the optim section, the learning rate it scales to and the steps the schedule
    spans, read from the whole config once by `of`."""

    optim: OptimConfig
    lr: float
    total_steps: int

    @classmethod
    def of(cls, config: ExperimentConfig) -> "Optimization":
        return cls(config.optim, scaled_lr(config), config.trainer.max_steps)

    def adamw_with_schedule(
        self, groups: Tuple[List[nn.Parameter], List[nn.Parameter]], device: torch.device
    ) -> Tuple[torch.optim.AdamW, dict]:
        """Fused AdamW over (decay, no decay) groups at the scaled lr, and its per-step warm-up/cosine schedule
        in the form Lightning's `configure_optimizers` returns, named for Lightning's LearningRateMonitor."""
        o = self.optim
        decay, plain = groups
        optimizer = fused_adamw(
            [{"params": decay, "weight_decay": o.weight_decay, "name": "decay"},
             {"params": plain, "weight_decay": 0.0, "name": "no_decay"}],
            device, lr=self.lr, betas=tuple(o.betas),
        )
        total = self.total_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, o.warmup_steps, total, o.min_lr_ratio)
        )
        # LearningRateMonitor logs it as train/lr/decay and train/lr/no_decay (the groups' names).
        return optimizer, {"scheduler": schedule, "interval": "step", "name": "train/lr"}


def step_generator(
    seed: int, step: int, rank: int, device: torch.device, micro_batch: Optional[int] = None
) -> torch.Generator:
    """A generator seeded by (seed, step, rank[, micro-batch]): a resumed run draws what an unbroken one
    would, ranks draw differently, and micro-batches accumulated into one step draw differently."""
    base = (seed * 1_000_003 + step) * 1009 + rank
    return torch.Generator(device=device).manual_seed(base if micro_batch is None else base * 64 + micro_batch)
