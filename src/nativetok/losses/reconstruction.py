"""Pixel reconstruction loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from nativetok.config.schema import PIXEL_LOSSES, PixelLoss


def pixel_loss(reconstruction: Tensor, target: Tensor, kind: PixelLoss = "l1") -> Tensor:
    if kind == "l1":
        return F.l1_loss(reconstruction, target)
    if kind == "l2":
        return F.mse_loss(reconstruction, target)
    raise ValueError(f"unknown pixel loss '{kind}': use {' or '.join(PIXEL_LOSSES)}")
