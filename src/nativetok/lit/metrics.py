"""Evaluation metrics summed correctly across DDP ranks: codebook usage, loss per token position."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from nativetok.models.quantizer import code_counts, statistics_from_counts


class CodeUsage(Metric):
    full_state_update = False

    def __init__(self, codebook_size: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.add_state("counts", default=torch.zeros(codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ids: Tensor) -> None:
        self.counts += code_counts(ids, self.codebook_size)

    def compute(self) -> dict[str, Tensor]:
        return statistics_from_counts(self.counts)


class PositionLoss(Metric):
    """Mean loss at each token position over an evaluation pass (a curve over positions)."""

    full_state_update = False

    def __init__(self, num_tokens: int):
        super().__init__()
        self.add_state("total", default=torch.zeros(num_tokens, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_tokens, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, per_position: Tensor, count: int) -> None:
        self.total += per_position.detach().double() * count
        self.count += count

    def compute(self) -> Tensor:
        return self.total / self.count.clamp_min(1)
