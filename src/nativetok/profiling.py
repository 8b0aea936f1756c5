"""Host-side cost of a piece of code, measured on any device: dispatched aten ops and host syncs.

On a GPU at NativeTok's sizes a step is bound by how many ops the host dispatches and by every point
where the host waits for the device, not by FLOPs. Both can be counted on a CPU: `DispatchCounter`
(a `TorchDispatchMode`) sees every aten op, and the ops that make the host wait for a GPU value
(`aten._local_scalar_dense` behind `.item()`, `bool()`, `int()`, `.tolist()`, and ops whose output size
depends on data) are named in `SYNC_OPS`. Tensors built from Python data (`torch.tensor(x)`) show up as
`aten.lift_fresh`: on a GPU each is a blocking host-to-device copy, so they are counted apart.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict

from torch.utils._python_dispatch import TorchDispatchMode

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
