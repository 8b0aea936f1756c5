"""Sampling a trained generator to image files: a PNG grid, one PNG per image and an npz, for evaluation.

A sample folder is written beside its final name (`<out>.partial`) and renamed only when complete, with
its manifest `samples.json` (generator and tokenizer sha256, classes, seed, sampling settings, image
count): a killed or repeated run never leaves partial or stale images that look like a finished folder.

Several processes (`torchrun`, `srun`) share the work: the images are numbered in class order and cut into
fixed global batches of `batch_size`; batch b is drawn with seed `seed + b` and rank r draws batches r, r + W,
... of W ranks. A batch holds the same images, with the same shapes and seed, whatever the number of ranks, so
the folder is the same image for image (the samplers draw a whole batch from one generator, which is why the
batch, not the single image, is the unit of determinism: another `batch_size` gives other images). Every rank
writes its PNGs into the one `.partial` folder (so `out` must be on a filesystem all ranks see); rank 0 then
writes the npz, the grid and the manifest from them, and renames the folder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
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
from nativetok.data.tokens import process_rank
from nativetok.models import generate
from nativetok.precision import autocast

log = logging.getLogger(__name__)

SAMPLE_MANIFEST = "samples.json"
SAMPLE_FILES = {"images", "grid.png", "samples.npz", SAMPLE_MANIFEST}  # what a sample folder may hold
# How long ranks wait for each other at a barrier: ranks differ by at most one batch, but the last barrier
# waits for rank 0 to read every PNG back and write the npz.
BARRIER_TIMEOUT = timedelta(hours=2)


@torch.no_grad()
def generate_batch(generator, tokenizer, labels: torch.Tensor, sampling, seed: int,
                   precision: str = "32-true") -> torch.Tensor:
    """uint8 images [B, C, H, W] of one batch of `labels`, drawn with `seed`. `precision` bf16-mixed or
    16-mixed samples and decodes under autocast."""
    device = next(generator.parameters()).device
    with autocast(device, precision):
        images = tokenizer.decode(generate(generator, labels.to(device), sampling, seed))
    return to_uint8(images).cpu()


def generate_images(
    generator, tokenizer, labels: torch.Tensor, sampling, seed: int, batch_size: int, precision: str = "32-true"
) -> torch.Tensor:
    """uint8 images [N, C, H, W] for `labels`; batch b is drawn with seed `seed + b` (reproducible)."""
    starts = range(0, len(labels), batch_size)
    return torch.cat([
        generate_batch(generator, tokenizer, labels[start : start + batch_size], sampling, seed + number, precision)
        for number, start in enumerate(tqdm(starts, desc="sampling", unit="batch"))
    ])


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
    """Sample `per_class` images of each class (all classes by default) into `out`; returns `out`, complete,
    on every rank.

    Image n has class `classes[n // per_class]` and is drawn in batch `n // batch_size` with seed
    `seed + n // batch_size`: the same arguments give the same images, file for file, on any number of ranks.
    `samples.npz` is ADM's format (as TiTok and LlamaGen write it): `arr_0`, uint8 [N, H, W, 3] in image
    order, grey images replicated to 3 channels as ADM's evaluator expects RGB, and `labels` [N]. The
    tokenizer is the one the generator was trained with (pinned by sha256); another file, even at the same
    path, is refused unless `tokenizer_mismatch_ok`. A previous sample folder at `out` is replaced.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(p.name not in SAMPLE_FILES for p in out.iterdir())):
        raise ValueError(f"{out} exists and is not a sample folder: refusing to replace it")
    checkpoint = read_checkpoint(generator_path, "generator")
    config = from_container(checkpoint["hyper_parameters"]["config"])
    sampling = dataclasses.replace(config.sampling, **{k: v for k, v in sampling_overrides.items() if v is not None})
    num_classes = config.data.num_classes
    classes = list(range(num_classes)) if classes is None else list(classes)
    unknown = [c for c in classes if not 0 <= c < num_classes]
    if unknown:
        raise ValueError(f"unknown class ids {unknown}: the generator has {num_classes} classes (0..{num_classes - 1})")
    rank, world = process_rank()
    device = rank_device(device)
    generator = generator_from_checkpoint(checkpoint, device)
    g = config.generator
    tokenizer_file, tokenizer_sha256 = pinned_tokenizer(generator_path, checkpoint, tokenizer_path,
                                                        tokenizer_mismatch_ok)
    tokenizer = load_matching_tokenizer(tokenizer_file, g.codebook_size, g.num_tokens, device)
    labels = torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)
    names = [f"{i:06d}_class{label:04d}.png" for i, label in enumerate(labels.tolist())]
    partial = out.with_name(out.name + ".partial")
    joined = join_ranks(rank, world)
    try:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # a killed run's leftovers
            (partial / "images").mkdir(parents=True)
        barrier(world)
        batches = math.ceil(len(labels) / batch_size)
        numbers = range(rank, batches, world)
        log.info("rank %d of %d: %d of %d batches on %s", rank, world, len(numbers), batches, device)
        for number in tqdm(numbers, desc="sampling", unit="batch", disable=rank != 0):
            start = number * batch_size
            images = generate_batch(generator, tokenizer, labels[start : start + batch_size], sampling, seed + number,
                                    precision)
            for i, image in enumerate(images.permute(0, 2, 3, 1).numpy(), start):
                image = image.squeeze(-1) if image.shape[-1] == 1 else image
                Image.fromarray(image).save(partial / "images" / names[i])
        barrier(world)
        if rank == 0:
            _finish(partial, names, labels, classes, per_class, png, npz)
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
            log.info("%d samples from %d ranks -> %s", len(labels), world, out)
        barrier(world)
    finally:
        if joined:
            dist.destroy_process_group()
    return out


def rank_device(device: Optional[str]) -> str:
    """This rank's device: its own GPU (LOCAL_RANK under torchrun, SLURM_LOCALID under srun) for `cuda` or by
    default when there is one, else the CPU."""
    if device not in (None, "cuda") or not torch.cuda.is_available():
        return device or "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ.get('SLURM_LOCALID', 0)))}"


def join_ranks(rank: int, world: int) -> bool:
    """Join the other ranks in a gloo process group for the barriers (no tensors move, so any device will
    do) unless alone or already in one; True when this call made the group. Under srun without MASTER_ADDR,
    the address and port come from SLURM's node list and job id, as Lightning's training derives them."""
    if world == 1 or dist.is_initialized():
        return False
    if "MASTER_ADDR" not in os.environ and "SLURM_NODELIST" in os.environ:
        from pytorch_lightning.plugins.environments import SLURMEnvironment

        os.environ["MASTER_ADDR"] = SLURMEnvironment.resolve_root_node_address(os.environ["SLURM_NODELIST"])
        if "MASTER_PORT" not in os.environ:  # Lightning's rule: 15000 + the job id's last 4 digits
            os.environ["MASTER_PORT"] = str(15000 + int(os.environ["SLURM_JOB_ID"][-4:]))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
    return True


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _finish(partial: Path, names: List[str], labels: torch.Tensor, classes: List[int], per_class: int,
            png: bool, npz: bool) -> None:
    """Rank 0, once every rank has written its PNGs: the npz and the grid from them, in image order."""
    # The grid: a row per class (at most 10 classes), at most 10 samples a row.
    shown = [i for i, label in enumerate(labels.tolist()) if classes.index(label) < 10 and i % per_class < 10]
    if npz:
        images = read_pngs(partial / "images", names)
        rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
        np.savez(partial / "samples.npz", arr_0=rgb, labels=labels.numpy())
        images = images[shown]
    else:
        images = read_pngs(partial / "images", [names[i] for i in shown])
    grid = make_grid(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, nrow=min(per_class, 10), padding=1,
                     pad_value=1.0)
    save_image(grid, partial / "grid.png")
    if not png:
        shutil.rmtree(partial / "images")


def read_pngs(folder: Path, names: Sequence[str]) -> np.ndarray:
    """uint8 [n, H, W, C] (C=1 for grey) of the PNGs `names`, filled in place: no second copy of 50k images."""
    array = None
    for i, name in enumerate(names):
        with Image.open(folder / name) as image:
            pixels = np.asarray(image)
        pixels = pixels.reshape(*pixels.shape[:2], -1)
        if array is None:
            array = np.empty((len(names), *pixels.shape), np.uint8)
        array[i] = pixels
    return array


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
