"""Shared pieces of class-conditional generation: the class embedding with its null class, guidance,
and drawing tokens from logits."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GUIDANCE_SCHEDULES = ("constant", "linear")


class ClassConditional(nn.Module):
    """What the AR and MaskGIT generators share: their sizes, a class embedding whose last row is the null
    class (trained by label dropout, used by the unconditional half of guided sampling)."""

    def __init__(self, codebook_size: int, num_tokens: int, num_classes: int, width: int, class_dropout: float):
        super().__init__()
        self.codebook_size = codebook_size
        self.num_tokens = num_tokens
        self.num_classes = num_classes
        self.class_dropout = class_dropout
        self.class_embed = nn.Embedding(num_classes + 1, width)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop_labels(self, labels: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Replace labels by the null class with probability class_dropout (training for guidance)."""
        if self.class_dropout <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.class_dropout
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def sampling_rows(self, labels: Tensor, cfg_scale: float, cfg_schedule: str) -> tuple[Tensor, bool]:
        """The class of each row of a sampling batch, and whether it is guided.

        Guidance runs whenever it can change the result (scale != 1 or a schedule): the conditional rows
        then have, below them, the same rows with the null class.
        """
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"class ids must be in [0, {self.num_classes}), got {labels.tolist()}")
        guided = cfg_scale != 1.0 or cfg_schedule != "constant"
        rows = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
        return rows, guided


def guidance_scale(scale: float, schedule: str, progress: float) -> float:
    """The guidance scale at `progress` in (0, 1] of the sequence: constant, or rising linearly from 1."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * progress
    raise ValueError(f"unknown guidance schedule '{schedule}': use {' or '.join(GUIDANCE_SCHEDULES)}")


def guide(logits: Tensor, scale: float) -> Tensor:
    """Mix the conditional (first half) and unconditional (second half) logits of a guided batch.

    Written as cond + (scale - 1) * (cond - uncond), which equals uncond + scale * (cond - uncond) and
    gives the conditional logits exactly at scale 1.
    """
    cond, uncond = logits.chunk(2)
    return cond + (scale - 1.0) * (cond - uncond)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top_p; the rest -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - ordered.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """One token per row of logits [N, V] (argmax at temperature 0)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
