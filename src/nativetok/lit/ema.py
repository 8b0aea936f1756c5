"""Exponential moving average of a model's weights, kept as a frozen copy that evaluation uses."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        shadow = [p for p in self.shadow.parameters()]
        live = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(shadow, live, 1.0 - self.decay)
        for mine, theirs in zip(self.shadow.buffers(), model.buffers()):
            mine.copy_(theirs)
        for mine, theirs in zip(self.shadow.modules(), model.modules()):  # non-tensor state (e.g. expert count)
            if type(theirs).get_extra_state is not nn.Module.get_extra_state:
                mine.set_extra_state(theirs.get_extra_state())

    @torch.no_grad()
    def reset(self, pairs: Iterable[tuple[nn.Module, nn.Module]]) -> None:
        """Copy freshly (re)initialised modules into the average: (shadow module, live module) pairs."""
        for mine, theirs in pairs:
            mine.load_state_dict(theirs.state_dict())

    def train(self, mode: bool = True) -> "EMA":
        super().train(mode)
        self.shadow.eval()  # the average is only ever evaluated
        return self
