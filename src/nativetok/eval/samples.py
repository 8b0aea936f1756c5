"""Sampling a trained generator to image files: a PNG grid, one PNG per image and an npz, for evaluation."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from nativetok.checkpoints import generator_config, load_generator, load_matching_tokenizer
from nativetok.models import generate
from nativetok.precision import autocast

log = logging.getLogger(__name__)


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
    **sampling_overrides,
) -> Path:
    """Sample `per_class` images of each class (all classes by default) into `out`; returns `out`.

    Batch b is drawn with seed `seed + b`: the same arguments give the same images, file for file.
    """
    config = generator_config(generator_path)
    sampling = dataclasses.replace(config.sampling, **{k: v for k, v in sampling_overrides.items() if v is not None})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    generator = load_generator(generator_path, device)
    g = config.generator
    tokenizer = load_matching_tokenizer(tokenizer_path or g.tokenizer, g.codebook_size, g.num_tokens, device)
    num_classes = config.data.num_classes
    classes = list(range(num_classes)) if classes is None else list(classes)
    unknown = [c for c in classes if not 0 <= c < num_classes]
    if unknown:
        raise ValueError(f"unknown class ids {unknown}: the generator has {num_classes} classes (0..{num_classes - 1})")
    labels = torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images = generate_images(generator, tokenizer, labels, sampling, seed, batch_size, precision)
    array = images.permute(0, 2, 3, 1).numpy()  # [N, H, W, C] uint8
    if png:
        for i, (image, label) in enumerate(zip(array, labels.tolist())):
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
                out / "images" / f"{i:06d}_class{label:04d}.png"
            )
    if npz:
        np.savez_compressed(out / "samples.npz", images=array, labels=labels.numpy())
    # The grid: a row per class (at most 10 classes), at most 10 samples a row.
    shown = [i for i, label in enumerate(labels.tolist()) if classes.index(label) < 10 and i % per_class < 10]
    grid = make_grid(images[shown].float() / 255, nrow=min(per_class, 10), padding=1, pad_value=1.0)
    save_image(grid, out / "grid.png")
    settings = {
        "generator": str(generator_path),
        "tokenizer": str(tokenizer_path or g.tokenizer),
        "classes": classes,
        "per_class": per_class,
        "seed": seed,
        "batch_size": batch_size,
        "sampling": dataclasses.asdict(sampling),
        "count": len(labels),
    }
    (out / "samples.json").write_text(json.dumps(settings, indent=1) + "\n")
    log.info("%d samples -> %s (grid.png, images/, samples.npz)", len(labels), out)
    return out
