"""Codebook usage over a whole evaluation pass, summed correctly across DDP ranks."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from nativetok.models.quantizer import statistics_from_counts


class CodeUsage(Metric):
    full_state_update = False

    def __init__(self, codebook_size: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.add_state("counts", default=torch.zeros(codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ids: Tensor) -> None:
        self.counts += torch.bincount(ids.flatten(), minlength=self.codebook_size)

    def compute(self) -> dict[str, Tensor]:
        return statistics_from_counts(self.counts)
