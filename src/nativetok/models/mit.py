"""Meta Image Transformer (MIT): a bidirectional ViT over patches, then a linear dimension switcher.

Its output Z (one feature per patch, at the expert width) is computed once per image and read by every
expert. The baselines append their latent tokens to the patches here (`extra`), with an attention mask.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from nativetok.models.layers import Block, init_weights, learned_positions


def patchify(images: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], row-major over patches."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Tensor, patch: int, channels: int, size: int) -> Tensor:
    b = patches.shape[0]
    grid = size // patch
    x = patches.reshape(b, grid, grid, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, size, size)


class MetaImageTransformer(nn.Module):
    def __init__(
        self,
        image_size: int,
        channels: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        out_width: int,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.width = width
        self.patch_embed = nn.Linear(patch_size * patch_size * channels, width)
        self.positions = learned_positions(1, self.num_patches, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.switch = nn.Linear(width, out_width)  # the dimension switcher
        init_weights(self)

    def forward(self, images: Tensor, extra: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        """images in [-1, 1] -> Z [B, patches (+ extra tokens), out_width]."""
        x = self.patch_embed(patchify(images, self.patch_size)) + self.positions
        if extra is not None:
            x = torch.cat([x, extra.expand(x.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.switch(self.norm(x))

