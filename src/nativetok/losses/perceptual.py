"""LPIPS-VGG perceptual distance (Zhang et al. 2018), built from local weight files.

The weights are never downloaded at run time: `loss.perceptual.vgg_weights` is torchvision's VGG16
state dict (vgg16-397923af.pth), fetched once by hand where there is internet (data/README.md,
"Perceptual loss weights"); `loss.perceptual.lin_weights` is LPIPS' v0.1 `vgg.pth` (the five 1x1 linear
heads), by default the copy the `lpips` package ships.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List, Optional

import torch
from torch import Tensor, nn

# VGG16 `features` indices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, and their widths.
TAPS = (3, 8, 15, 22, 29)
WIDTHS = (64, 128, 256, 512, 512)
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"


class LPIPS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # VGG16's `features` alone: building the whole vgg16() would first initialise 120M classifier weights.
        self.features = make_layers(cfgs["D"])[: TAPS[-1] + 1]
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


def package_lin_weights() -> Path:
    """LPIPS' v0.1 linear heads as the `lpips` package ships them, found without importing it (its import
    pulls in scipy and its training code)."""
    spec = importlib.util.find_spec("lpips")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "loss.perceptual.lin_weights is unset and the lpips package (which ships weights/v0.1/vgg.pth) "
            "is not installed: `pip install lpips==0.1.4`, or set loss.perceptual.lin_weights"
        )
    return path


def load_lpips(vgg_weights: str | Path | None, lin_weights: Optional[str | Path] = None) -> LPIPS:
    """LPIPS from torchvision's VGG16 state dict and the linear heads (by default the lpips package's)."""
    if not vgg_weights or not Path(vgg_weights).is_file():
        problem = f"'{vgg_weights}' does not exist" if vgg_weights else "is not set"
        raise FileNotFoundError(
            f"loss.perceptual.vgg_weights: LPIPS weights file {problem}: download torchvision's VGG16 "
            f"{VGG16_URL} (sha256 {VGG16_SHA256[:8]}...) there; the ImageNet experiments expect "
            f"weights/lpips/vgg16-397923af.pth (data/README.md: Perceptual loss weights)"
        )
    lin_weights = lin_weights or package_lin_weights()
    if not Path(lin_weights).is_file():
        raise FileNotFoundError(
            f"loss.perceptual.lin_weights: LPIPS weights file '{lin_weights}' does not exist "
            f"(leave it unset for the lpips package's heads)"
        )
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

