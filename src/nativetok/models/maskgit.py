"""MaskGIT-style class-conditional generator: a bidirectional transformer over partly masked sequences.

Training masks a random fraction of the tokens drawn from the mask schedule and predicts them.
Sampling starts fully masked and, over a few steps, keeps the most confident predictions; the number
still masked after step t follows the schedule, so the last step leaves none. Every step is a forward pass
of the same shapes and waits for nothing on the host, so on CUDA it replays one recorded CUDA graph.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from nativetok.config.schema import MASK_SCHEDULES, GeneratorConfig, GuidanceSchedule, MaskSchedule
from nativetok.models.generator import Generator
from nativetok.models.graphs import Compile, FixedShapeStep
from nativetok.models.layers import learned_positions
from nativetok.models.sampling import draw, guidance_scale, guide, step_key


def mask_ratio(progress: Tensor | float, schedule: MaskSchedule) -> Tensor:
    """Fraction of tokens masked at `progress` in [0, 1]: 1 at 0, 0 at 1."""
    p = torch.as_tensor(progress, dtype=torch.float32)
    if schedule == "cosine":
        return torch.cos(p * math.pi / 2)
    if schedule == "arccos":
        return torch.arccos(p) / (math.pi / 2)
    if schedule == "linear":
        return 1 - p
    raise ValueError(f"unknown mask schedule '{schedule}': use {', '.join(MASK_SCHEDULES)}")


def masked_after_step(num_tokens: int, steps: int, schedule: MaskSchedule) -> List[int]:
    """Tokens left masked after each sampling step: the schedule, forced to unmask at least one a step."""
    counts, previous = [], num_tokens
    for t in range(steps):
        target = int(math.floor(num_tokens * float(mask_ratio((t + 1) / steps, schedule))))
        target = 0 if t == steps - 1 else min(max(target, 0), previous - 1)
        counts.append(max(target, 0))
        previous = counts[-1]
    return counts


@functools.lru_cache(maxsize=64)
def cached_schedule(num_tokens: int, steps: int, schedule: MaskSchedule) -> tuple[int, ...]:
    """`masked_after_step`, computed once per setting: its float32 arithmetic runs in torch on the host."""
    return tuple(masked_after_step(num_tokens, steps, schedule))


class MaskGITGenerator(Generator, kind="maskgit"):
    extra_ids = 1  # the last token id is [MASK]
    sampling_fields = ("steps", "cfg_scale", "cfg_schedule", "temperature", "choice_temperature")

    def __init__(
        self,
        codebook_size: int,
        num_tokens: int,
        num_classes: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        class_dropout: float = 0.1,
        schedule: MaskSchedule = "cosine",
        **order: Any,
    ):
        mask_ratio(0.5, schedule)  # fail early on an unknown schedule
        super().__init__(codebook_size, num_tokens, num_classes, width, depth, heads, mlp_ratio, class_dropout,
                         **order)
        self.schedule = schedule

    @classmethod
    def config_options(cls, config: GeneratorConfig) -> Dict[str, Any]:
        return {"schedule": config.mask_schedule}

    def add_positions(self) -> None:
        """Learned positions for the class and the tokens."""
        self.positions = learned_positions(1, self.num_tokens + 1, self.width)

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """tokens [B, K] with mask ids where unknown -> logits [B, K, V] for every position."""
        x = torch.cat([self.class_embed(labels)[:, None], self.token_embed(tokens)], dim=1) + self.positions
        return self.logits(self.run_blocks(x)[:, 1:])

    def random_mask(self, tokens: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """A mask [B, K] (True: hidden) with ceil(K * schedule(u)) positions per row, u ~ U(0, 1)."""
        batch, length = tokens.shape
        u = torch.rand(batch, device=tokens.device, generator=generator)
        count = torch.ceil(mask_ratio(u, self.schedule).to(tokens.device) * length).clamp(1, length)
        scores = torch.rand(batch, length, device=tokens.device, generator=generator)
        rank = scores.argsort(dim=1).argsort(dim=1)
        return rank < count[:, None]

    def sequence_loss(
        self, tokens: Tensor, labels: Tensor, generator: Optional[torch.Generator] = None
    ) -> tuple[Tensor, Tensor]:
        """Cross-entropy on the masked tokens (nats), overall and at each position [K]."""
        mask = self.random_mask(tokens, generator)
        per_token = self.token_losses(self(tokens.masked_fill(mask, self.mask_id), labels), tokens)
        masked = mask.float()
        per_position = (per_token * masked).sum(0) / masked.sum(0).clamp_min(1)
        return (per_token * masked).sum() / masked.sum(), per_position

    def _forward_step(self, rows: Tensor, graph: Optional[bool], compile: Compile) -> FixedShapeStep:
        """The forward pass over ids [rows, K] for the class `rows`, made once per rows count, autocast state,
        graph and compile setting (and kept until the parameters move)."""
        key = step_key(rows.device, len(rows), graph, compile)

        def build() -> FixedShapeStep:
            example = (torch.full((len(rows), self.num_tokens), self.mask_id, device=rows.device), rows)
            return FixedShapeStep(self.forward, example, graph=key.graph, compile=compile)

        return self.sampling_step(key, build)

    def sample_tokens(
        self,
        labels: Tensor,
        *,
        seed: int,
        graph: Optional[bool],
        compile: Compile,
        steps: int = 8,
        cfg_scale: float = 1.0,
        cfg_schedule: GuidanceSchedule = "constant",
        temperature: float = 1.0,
        choice_temperature: float = 4.5,
        return_steps: bool = False,
    ):
        """`steps` parallel decoding steps (`return_steps`: and the partly masked ids after each step).

        Which predictions are kept is decided by their probability plus Gumbel noise whose temperature
        anneals linearly from `choice_temperature` to 0 over the steps; `graph` and `compile` apply to the
        forward pass.
        """
        rows, guided, generator = self.sampling_start(labels, cfg_scale, cfg_schedule, seed)
        forward = self._forward_step(rows, graph, compile)
        ids = torch.full((len(labels), self.num_tokens), self.mask_id, device=labels.device)
        history = []
        for t, keep_masked in enumerate(cached_schedule(self.num_tokens, steps, self.schedule)):
            logits = forward(torch.cat([ids, ids]) if guided else ids, rows)
            if guided:
                logits = guide(logits, guidance_scale(cfg_scale, cfg_schedule, (t + 1) / steps))
            unknown = ids == self.mask_id
            drawn = draw(logits.flatten(0, 1), temperature, generator=generator).view(ids.shape)
            drawn = torch.where(unknown, drawn, ids)
            probs = F.softmax(logits.float(), dim=-1).gather(-1, drawn[..., None]).squeeze(-1)
            uniform = torch.rand(ids.shape, device=ids.device, generator=generator).clamp(1e-20, 1 - 1e-7)
            noise = -torch.log(-torch.log(uniform))
            confidence = probs.clamp_min(1e-30).log() + choice_temperature * (1 - (t + 1) / steps) * noise
            confidence = confidence.masked_fill(~unknown, float("inf"))  # decided tokens stay decided
            rank = confidence.argsort(dim=1).argsort(dim=1)
            ids = drawn.masked_fill(rank < keep_masked, self.mask_id)
            if return_steps:
                history.append(ids)
        return (ids, history) if return_steps else ids
