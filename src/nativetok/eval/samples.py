"""Sampling a trained generator to image files: a PNG grid, one PNG per image and an npz, for evaluation.

A sample folder is written beside its final name (`<out>.partial`) and renamed only when complete, with
its manifest `samples.json` (generator and tokenizer sha256, classes, seed, sampling settings, image
count): a killed or repeated run never leaves partial or stale images that look like a finished folder.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from nativetok.checkpoints import (
    file_sha256,
    generator_from_checkpoint,
    load_matching_tokenizer,
    pinned_tokenizer,
    read_checkpoint,
)
from nativetok.config.loading import from_container
from nativetok.data.shards import Manifest
from nativetok.models import generate
from nativetok.precision import autocast

log = logging.getLogger(__name__)

SAMPLE_MANIFEST = "samples.json"
SAMPLE_FILES = {"images", "grid.png", "samples.npz", SAMPLE_MANIFEST}  # what a sample folder may hold


@torch.no_grad()
def generate_images(
    generator, tokenizer, labels: torch.Tensor, sampling, seed: int, batch_size: int, precision: str = "32-true"
) -> torch.Tensor:
    """uint8 images [N, C, H, W] for `labels`; batch b is drawn with seed `seed + b` (reproducible).
    `precision` bf16-mixed or 16-mixed samples and decodes under autocast."""
    device = next(generator.parameters()).device
    chunks = []
    for number, start in enumerate(tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch")):
        batch = labels[start : start + batch_size].to(device)
        with autocast(device, precision):
            images = tokenizer.decode(generate(generator, batch, sampling, seed + number))
        chunks.append(to_uint8(images).cpu())
    return torch.cat(chunks)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] to uint8, as they would be saved to PNG."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def balanced_labels(num_classes: int, count: int) -> torch.Tensor:
    """`count` class labels cycling through all classes (as even as possible)."""
    return torch.arange(count) % num_classes


def sample_to_folder(
    generator_path: str,
    out: Path,
    classes: Optional[Sequence[int]] = None,
    per_class: int = 8,
    tokenizer_path: Optional[str] = None,
    seed: int = 0,
    batch_size: int = 64,
    device: Optional[str] = None,
    png: bool = True,
    npz: bool = True,
    precision: str = "32-true",
    tokenizer_mismatch_ok: bool = False,
    **sampling_overrides,
) -> Path:
    """Sample `per_class` images of each class (all classes by default) into `out`; returns `out`.

    Batch b is drawn with seed `seed + b`: the same arguments give the same images, file for file. The
    tokenizer is the one the generator was trained with (pinned by sha256); another file, even at the same
    path, is refused unless `tokenizer_mismatch_ok`. A previous sample folder at `out` is replaced.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(p.name not in SAMPLE_FILES for p in out.iterdir())):
        raise ValueError(f"{out} exists and is not a sample folder: refusing to replace it")
    checkpoint = read_checkpoint(generator_path, "generator")
    config = from_container(checkpoint["hyper_parameters"]["config"])
    sampling = dataclasses.replace(config.sampling, **{k: v for k, v in sampling_overrides.items() if v is not None})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    generator = generator_from_checkpoint(checkpoint, device)
    g = config.generator
    tokenizer_file, tokenizer_sha256 = pinned_tokenizer(generator_path, checkpoint, tokenizer_path,
                                                        tokenizer_mismatch_ok)
    tokenizer = load_matching_tokenizer(tokenizer_file, g.codebook_size, g.num_tokens, device)
    num_classes = config.data.num_classes
    classes = list(range(num_classes)) if classes is None else list(classes)
    unknown = [c for c in classes if not 0 <= c < num_classes]
    if unknown:
        raise ValueError(f"unknown class ids {unknown}: the generator has {num_classes} classes (0..{num_classes - 1})")
    labels = torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)
    images = generate_images(generator, tokenizer, labels, sampling, seed, batch_size, precision)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a killed run's leftovers
    (partial / "images").mkdir(parents=True)
    array = images.permute(0, 2, 3, 1).numpy()  # [N, H, W, C] uint8
    if png:
        for i, (image, label) in enumerate(zip(array, labels.tolist())):
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
                partial / "images" / f"{i:06d}_class{label:04d}.png"
            )
    if npz:
        np.savez_compressed(partial / "samples.npz", images=array, labels=labels.numpy())
    # The grid: a row per class (at most 10 classes), at most 10 samples a row.
    shown = [i for i, label in enumerate(labels.tolist()) if classes.index(label) < 10 and i % per_class < 10]
    grid = make_grid(images[shown].float() / 255, nrow=min(per_class, 10), padding=1, pad_value=1.0)
    save_image(grid, partial / "grid.png")
    Manifest("sample", {
        "generator": str(Path(generator_path).resolve()),
        "generator_sha256": file_sha256(generator_path),
        "generator_step": int(checkpoint.get("global_step", 0)),
        "tokenizer": str(tokenizer_file),
        "tokenizer_sha256": tokenizer_sha256,
        "classes": classes,
        "per_class": per_class,
        "seed": seed,
        "batch_size": batch_size,
        "precision": precision,
        "sampling": dataclasses.asdict(sampling),
        "png": png,
        "npz": npz,
        "count": len(labels),
    }).save(partial, SAMPLE_MANIFEST)
    _replace_folder(partial, out)
    log.info("%d samples -> %s (grid.png, images/, samples.npz)", len(labels), out)
    return out


def _replace_folder(complete: Path, out: Path) -> None:
    """Move the complete folder to `out`; a previous sample folder there is removed only once it is moved away."""
    previous = out.with_name(out.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    complete.rename(out)
    shutil.rmtree(previous, ignore_errors=True)


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
