"""PatchGAN discriminator (as in pix2pix / taming-transformers): one real/fake logit per image patch.

GroupNorm instead of BatchNorm: the same result on every DDP rank without synchronised statistics.
"""

from __future__ import annotations

from torch import Tensor, nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class PatchDiscriminator(nn.Module):
    def __init__(self, channels: int, width: int = 64, layers: int = 3):
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        current = width
        for i in range(1, layers):
            out = width * min(2**i, 8)
            modules += [nn.Conv2d(current, out, 4, 2, 1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
            current = out
        out = width * min(2**layers, 8)
        modules += [nn.Conv2d(current, out, 4, 1, 1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
        modules.append(nn.Conv2d(out, 1, 4, 1, 1))
        self.net = nn.Sequential(*modules)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, images: Tensor) -> Tensor:
        """images in [-1, 1] -> logits [B, 1, h, w]."""
        return self.net(images)
