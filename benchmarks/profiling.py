"""Host-side cost of a piece of code, measured on any device: dispatched aten ops and host syncs, and the
throughput and per-token host cost of a generator's `sample` (used by the benchmarks and their tests).

On a GPU at NativeTok's sizes a step is bound by how many ops the host dispatches and by every point
where the host waits for the device, not by FLOPs. Both can be counted on a CPU: `DispatchCounter`
(a `TorchDispatchMode`) sees every aten op, and the ops that make the host wait for a GPU value
(`aten._local_scalar_dense` behind `.item()`, `bool()`, `int()`, `.tolist()`, and ops whose output size
depends on data) are named in `SYNC_OPS`. Tensors built from Python data (`torch.tensor(x)`) show up as
`aten.lift_fresh`: on a GPU each is a blocking host-to-device copy, so they are counted apart.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nativetok.models.generator import Generator

# Ops that read a device value on the host, or whose output shape depends on device data (so the host
# must wait for it). `multinomial` validates its input with `.item()` inside its kernel, out of sight of
# a dispatch mode, so it is listed by name.
SYNC_OPS = frozenset({
    "aten._local_scalar_dense.default",
    "aten.item.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten.allclose.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
    "aten.multinomial.default",
})
HOST_DATA_OPS = frozenset({"aten.lift_fresh.default", "aten.lift_fresh_copy.default"})


class DispatchCounter(TorchDispatchMode):
    """Counts the aten ops run inside `with DispatchCounter() as counter:` (backward passes included)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def syncs(self) -> Dict[str, int]:
        return {name: count for name, count in self.ops.items() if name in SYNC_OPS}

    @property
    def host_data(self) -> Dict[str, int]:
        return {name: count for name, count in self.ops.items() if name in HOST_DATA_OPS}

    def matmuls(self) -> int:
        return sum(count for name, count in self.ops.items() if any(k in name for k in ("mm.", "addmm", "matmul")))


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
