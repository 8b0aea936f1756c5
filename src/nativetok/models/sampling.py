"""Shared pieces of class-conditional sampling: guidance, drawing tokens from logits, and the keys of the
fixed-shape model steps that sampling loops run (eager, compiled, or replayed from a CUDA graph). The generators'
shared trunk and interface are in `generator.py`; what sampling costs is measured in `benchmarks/profiling.py`."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from nativetok.config.schema import GUIDANCE_SCHEDULES, GuidanceSchedule
from nativetok.models.graphs import Compile


def guidance_scale(scale: float, schedule: GuidanceSchedule, progress: float) -> float:
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
    """One token per row of logits [N, V] (argmax at temperature 0).

    The exponential race that `torch.multinomial` runs for one sample (argmax of p / q, q ~ Exp(1)): the same
    tokens for the same generator state, without multinomial's validation of p, which waits for the GPU.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


class StepKey(NamedTuple):
    """What a fixed-shape sampling step depends on besides the parameters."""

    rows: int
    autocast: Optional[torch.dtype]  # the dtype autocast computes in, None when it is off
    graph: bool
    compile: Union[bool, str]


def step_key(device: torch.device, rows: int, graph: Optional[bool], compile: Compile) -> StepKey:
    """The key of a step on `device` now: `graph` None means a CUDA graph on CUDA (and one is refused elsewhere)."""
    record = device.type == "cuda" if graph is None else graph
    if record and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    return StepKey(rows, autocast, record, compile if isinstance(compile, bool) else repr(sorted(compile.items())))
