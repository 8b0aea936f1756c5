"""A cache of what a growth stage cannot change, per image view: Z and the frozen experts' outputs.

In a growth stage of Hierarchical Native Training the MIT is frozen, so Z is a fixed function of the
image view; when the earlier experts and the codebook are frozen too, so are those experts' outputs.
A step whose views are cached skips the MIT forward and the frozen experts, and runs only the new
experts, the decoder and the losses. A view is the image after its random crop and flip (the data
pipeline names it), so a hit needs the same view to recur within the stage: with Fashion-MNIST or
ImageNet shards made at the training size, an image has two views (flipped or not) and recurs from the
stage's second epoch on; with random crops it almost never does.

The cache holds tensors on the model's device, stops storing (never evicts) at its byte budget, and is
valid only for the stage it was reset for: its owner resets it whenever what is frozen changes.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor

Entry = Tuple[Tensor, Tensor]  # Z [N, W] and the first `prefix` experts' raw outputs [prefix, code_dim]


class FrozenPrefixCache:
    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"a prefix cache needs a positive byte budget, got {max_bytes}")
        self.max_bytes = max_bytes
        self.prefix = 0
        self.entries: Dict[str, Entry] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def reset(self, prefix: int) -> None:
        """Forget everything; from now on entries hold Z and the outputs of experts 0..prefix-1."""
        self.prefix = prefix
        self.entries.clear()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, views: Sequence[str]) -> List[Optional[Entry]]:
        found = [self.entries.get(view) for view in views]
        hits = sum(entry is not None for entry in found)
        self.hits += hits
        self.misses += len(found) - hits
        return found

    def put(self, view: str, z: Tensor, prefix: Tensor) -> Entry:
        """Store one view's Z and prefix outputs (copied out of their batch) while the budget allows."""
        if prefix.shape[0] != self.prefix:
            raise ValueError(f"the cache holds {self.prefix} expert outputs per view, got {prefix.shape[0]}")
        size = z.nelement() * z.element_size() + prefix.nelement() * prefix.element_size()
        if self.bytes + size > self.max_bytes:
            return z, prefix
        entry = (z.clone(), prefix.clone())
        self.entries[view] = entry
        self.bytes += size
        return entry

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def hit_rate(self) -> float:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else 0.0
