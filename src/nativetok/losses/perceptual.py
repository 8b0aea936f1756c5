"""LPIPS-VGG perceptual distance (Zhang et al. 2018), built from local weight files.

The weights are never downloaded at run time: `loss.perceptual.vgg_weights` is torchvision's VGG16
state dict (vgg16-397923af.pth) and `loss.perceptual.lin_weights` is LPIPS' v0.1 `vgg.pth` (the five
1x1 linear heads). Both are fetched once by hand where there is internet; see the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch
from torch import Tensor, nn

# VGG16 `features` indices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, and their widths.
TAPS = (3, 8, 15, 22, 29)
WIDTHS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import vgg16

        self.features = vgg16(weights=None).features[: TAPS[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in WIDTHS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a fixed metric: never in training mode

    def _taps(self, x: Tensor) -> List[Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Mean LPIPS distance between image batches in [-1, 1] (grey images are repeated to RGB)."""
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        a = (a - self.shift) / self.scale
        b = (b - self.shift) / self.scale
        total = a.new_zeros(())
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b)):
            total = total + lin((fa - fb).pow(2)).mean()
        return total


def load_lpips(vgg_weights: str | Path, lin_weights: str | Path) -> LPIPS:
    for key, path in (("loss.perceptual.vgg_weights", vgg_weights), ("loss.perceptual.lin_weights", lin_weights)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{key}: LPIPS weights file '{path}' does not exist (README: Perceptual loss)")
    model = LPIPS()
    vgg = torch.load(vgg_weights, map_location="cpu", weights_only=True)
    features = {k[len("features.") :]: v for k, v in vgg.items() if k.startswith("features.")}
    missing = set(model.features.state_dict()) - set(features)
    if missing:
        raise ValueError(f"{vgg_weights}: not a torchvision VGG16 state dict (missing features.{sorted(missing)[0]})")
    model.features.load_state_dict({k: features[k] for k in model.features.state_dict()})
    lin = torch.load(lin_weights, map_location="cpu", weights_only=True)
    try:
        for i, conv in enumerate(model.lins):
            conv.weight.copy_(lin[f"lin{i}.model.1.weight"])
    except KeyError as error:
        raise ValueError(f"{lin_weights}: not LPIPS v0.1 linear heads (missing {error})") from None
    return model

