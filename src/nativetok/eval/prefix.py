"""The prefix property: how well the first k tokens alone reconstruct an image (PSNR per image, averaged)."""

from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor

from nativetok.precision import autocast


def psnr_per_image(images: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB of each image in [0, 1] against its target (a perfect image is capped at 100 dB)."""
    mse = (images.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def prefix_reconstructions(tokenizer, images: Tensor, ks: Sequence[int], batch_size: int = 250,
                           precision: str = "32-true") -> Dict[int, Tensor]:
    """uint8 images [N, C, H, W] -> {k: reconstructions from the first k tokens, in [0, 1] on the CPU}."""
    device = next(tokenizer.parameters()).device
    out: Dict[int, list] = {k: [] for k in ks}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device).float() / 255
        with autocast(device, precision):
            ids = tokenizer.encode(batch)
            for k in ks:
                out[k].append(tokenizer.decode(ids, k=k).float().clamp(0, 1).cpu())
    return {k: torch.cat(parts) for k, parts in out.items()}


def prefix_psnr(tokenizer, images: Tensor, ks: Sequence[int], **options) -> Dict[int, float]:
    """Mean per-image PSNR (dB) of reconstructions from the first k tokens, for each k."""
    target = images.float() / 255
    rebuilt = prefix_reconstructions(tokenizer, images, ks, **options)
    return {k: psnr_per_image(r, target).mean().item() for k, r in rebuilt.items()}
