"""Generator samples as evaluation sees them: images drawn in memory for gFID, and the check that a folder
written by `nativetok sample` (pipelines/sample.py) is complete before its images are measured.

A batch of samples is drawn with one seed from one generator, so the batch is the unit of determinism: the
same labels, seed and batch size give the same images.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nativetok.data.shards import Manifest
from nativetok.precision import autocast
from nativetok.progress import track

SAMPLE_MANIFEST = "samples.json"
SAMPLE_FILES = {"images", "grid.png", "samples.npz", SAMPLE_MANIFEST}  # what a sample folder may hold


@torch.no_grad()
def generate_batch(generator, tokenizer, labels: torch.Tensor, sampling, seed: int,
                   precision: str = "32-true") -> torch.Tensor:
    """uint8 images [B, C, H, W] of one batch of `labels`, drawn with `seed`. `precision` bf16-mixed or
    16-mixed samples and decodes under autocast."""
    device = next(generator.parameters()).device
    with autocast(device, precision):
        images = tokenizer.decode(generator.sample(labels.to(device), sampling, seed))
    return to_uint8(images).cpu()


def generate_images(
    generator, tokenizer, labels: torch.Tensor, sampling, seed: int, batch_size: int, precision: str = "32-true"
) -> torch.Tensor:
    """uint8 images [N, C, H, W] for `labels`; batch b is drawn with seed `seed + b` (reproducible)."""
    starts = range(0, len(labels), batch_size)
    return torch.cat([
        generate_batch(generator, tokenizer, labels[start : start + batch_size], sampling, seed + number, precision)
        for number, start in enumerate(track(starts, desc="sampling", unit="batch"))
    ])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] to uint8, as they would be saved to PNG."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def balanced_labels(num_classes: int, count: int) -> torch.Tensor:
    """`count` class labels cycling through all classes (as even as possible)."""
    return torch.arange(count) % num_classes


def check_sample_folder(folder: Path) -> Manifest:
    """The manifest of a complete `nativetok sample` folder; a folder without one (a killed run, a run made
    before manifests, any other folder of images) or whose images do not match it is refused."""
    folder = Path(folder)
    manifest = Manifest.load(folder, SAMPLE_MANIFEST)
    if manifest is None or manifest.command != "sample":
        raise ValueError(
            f"{folder} has no sample manifest ({SAMPLE_MANIFEST}): not a complete `nativetok sample` folder "
            f"(a killed run, or one made before manifests); sample it again"
        )
    if manifest.inputs["png"]:
        found = len(list((folder / "images").glob("*.png")))
        if found != manifest.inputs["count"]:
            raise ValueError(f"{folder}/images holds {found} images but its manifest lists {manifest.inputs['count']}")
    return manifest
