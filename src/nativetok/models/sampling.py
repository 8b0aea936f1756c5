"""Shared pieces of class-conditional sampling: guidance, drawing tokens from logits, the keys of the fixed-shape
model steps that sampling loops run (eager, compiled, or replayed from a CUDA graph), and what they cost the host.
The generators' shared trunk and interface are in `generator.py`."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Dict, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from nativetok.config.schema import GUIDANCE_SCHEDULES, GuidanceSchedule
from nativetok.models.graphs import Compile
from nativetok.profiling import DispatchCounter

if TYPE_CHECKING:  # generator.py imports this module
    from nativetok.models.generator import Generator


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


def sampling_throughput(
    model: Generator,
    batch: int = 8,
    cfg_scale: float = 2.0,
    device: str | torch.device = "cuda",
    graph: Optional[bool] = None,
    repeats: int = 3,
    **sample_options,
) -> float:
    """Generated tokens per second of `model.sample` (moved to `device`) for `batch` labels: the median of
    `repeats` timed calls after one untimed call that records the graph or compiles."""
    device = torch.device(device)
    labels = (torch.arange(batch) % model.num_classes).to(device)
    model.to(device)

    def timed_call() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.sample(labels, cfg_scale=cfg_scale, graph=graph, **sample_options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed_call()
    return batch * model.num_tokens / statistics.median(timed_call() for _ in range(repeats))


def dispatch_cost_per_token(
    model: Generator, batch: int = 8, cfg_scale: float = 2.0, **sample_options
) -> Dict[str, float]:
    """Aten ops, host syncs and tensors made from host data per token position of one eager `model.sample`
    call (every row gets its token at that position together), counted after one warm-up call."""
    labels = (torch.arange(batch) % model.num_classes).to(next(model.parameters()).device)
    model.sample(labels, cfg_scale=cfg_scale, graph=False, **sample_options)
    with DispatchCounter() as counter:
        model.sample(labels, cfg_scale=cfg_scale, graph=False, **sample_options)
    return {
        "ops": counter.total / model.num_tokens,
        "syncs": sum(counter.syncs.values()) / model.num_tokens,
        "host_data": sum(counter.host_data.values()) / model.num_tokens,
    }
