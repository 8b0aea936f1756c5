"""The one place pixel scales meet: images are [0, 1] at every public boundary, the networks (MIT, decoder,
discriminator, LPIPS) work in [-1, 1]."""

from __future__ import annotations

from torch import Tensor


def to_signed(images: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]: public images onto the networks' scale."""
    return images * 2 - 1


def to_unit(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] (unclamped): the networks' scale back to public images."""
    return (images + 1) / 2
