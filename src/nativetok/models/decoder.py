"""ViT pixel decoder: tokens plus a grid of mask tokens in, pixel patches out.

Positions beyond a prefix are filled with a learned `missing` embedding, so the same decoder renders an
image from its first k tokens; trained with random prefix lengths, short prefixes give coarse images.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from nativetok.models.layers import Block, init_weights, learned_positions
from nativetok.models.mit import unpatchify


class PixelDecoder(nn.Module):
    def __init__(
        self,
        image_size: int,
        channels: int,
        patch_size: int,
        num_tokens: int,
        code_dim: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
    ):
        super().__init__()
        self.image_size = image_size
        self.channels = channels
        self.patch_size = patch_size
        self.num_tokens = num_tokens
        num_patches = (image_size // patch_size) ** 2
        self.token_in = nn.Linear(code_dim, width)
        self.token_positions = learned_positions(1, num_tokens, width)
        self.missing = learned_positions(1, 1, width)
        self.mask_token = learned_positions(1, 1, width)
        self.grid_positions = learned_positions(1, num_patches, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.to_pixels = nn.Linear(width, patch_size * patch_size * channels)
        init_weights(self)

    @property
    def last_layer(self) -> Tensor:
        """The weight the adaptive GAN loss weight is computed against."""
        return self.to_pixels.weight

    def forward(self, codes: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """codes [B, k, code_dim] (k <= num_tokens) -> images [B, C, H, W] in about [-1, 1].

        Tokens at positions >= k, and per sample at positions >= lengths[b], are replaced by `missing`.
        """
        batch, given = codes.shape[:2]
        tokens = self.token_in(codes)
        missing = self.missing.expand(batch, self.num_tokens - given, -1).to(tokens.dtype)
        tokens = torch.cat([tokens, missing], dim=1)
        if lengths is not None:
            keep = torch.arange(self.num_tokens, device=codes.device)[None, :, None] < lengths[:, None, None]
            tokens = torch.where(keep, tokens, self.missing.to(tokens.dtype))
        grid = (self.mask_token + self.grid_positions).expand(batch, -1, -1).to(tokens.dtype)
        x = torch.cat([tokens + self.token_positions, grid], dim=1)
        for block in self.blocks:
            x = block(x)
        patches = self.to_pixels(self.norm(x[:, self.num_tokens :]))
        return unpatchify(patches, self.patch_size, self.channels, self.image_size)
