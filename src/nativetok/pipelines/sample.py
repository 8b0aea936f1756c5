"""`nativetok sample`: a trained generator's samples as image files (a PNG grid, one PNG per image, an npz).

A sample folder is written beside its final name (`<out>.partial`) and renamed only when complete, with
its manifest `samples.json` (generator and tokenizer sha256, classes, seed, sampling settings, image
count): a killed or repeated run never leaves partial or stale images that look like a finished folder.

Several processes (`torchrun`, `srun`) share the work: the images are numbered in class order and cut into
fixed global batches of `batch_size`; batch b is drawn with seed `seed + b` and rank r draws batches r, r + W,
... of W ranks. A batch holds the same images, with the same shapes and seed, whatever the number of ranks, so
the folder is the same image for image (the samplers draw a whole batch from one generator, which is why the
batch, not the single image, is the unit of determinism: another `batch_size` gives other images). Every rank
writes its PNGs into the one `.partial` folder (so `out` must be on a filesystem all ranks see); rank 0 then
writes the npz, the grid and the manifest from them, and renames the folder. What a finished folder must hold
is checked by eval/samples.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision.utils import save_image

from nativetok.checkpoints import (
    file_sha256,
    generator_from_checkpoint,
    load_tokenizer,
    local_model_path,
    pinned_tokenizer,
    read_checkpoint,
)
from nativetok.config.loading import from_container
from nativetok.config.schema import ExperimentConfig, SamplingConfig
from nativetok.data.shards import Manifest
from nativetok.eval.samples import SAMPLE_FILES, SAMPLE_MANIFEST, generate_batch
from nativetok.io import naming_the_file, replace_folder
from nativetok.lit.callbacks import class_label, labelled_grid
from nativetok.pipelines.ranks import barrier, join_ranks, process_rank, rank_device
from nativetok.progress import track

log = logging.getLogger(__name__)


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
    revision: Optional[str] = None,
    tokenizer_revision: Optional[str] = None,
    **sampling_overrides,
) -> Path:
    """Sample `per_class` images of each class (all classes by default) into `out`; returns `out`, complete,
    on every rank.

    Image n has class `classes[n // per_class]` and is drawn in batch `n // batch_size` with seed
    `seed + n // batch_size`: the same arguments give the same images, file for file, on any number of ranks.
    `samples.npz` is ADM's format (as TiTok and LlamaGen write it): `arr_0`, uint8 [N, H, W, 3] in image
    order, grey images replicated to 3 channels as ADM's evaluator expects RGB, and `labels` [N]. The
    tokenizer is the one the generator was trained with (pinned by sha256); another file, even at the same
    path, is refused unless `tokenizer_mismatch_ok`. A previous sample folder at `out` is replaced. Either model
    may be a Hub repo id at its revision (`revision`, `tokenizer_revision`), resolved once."""
    generator_path = local_model_path(generator_path, revision)
    tokenizer_path = local_model_path(tokenizer_path, tokenizer_revision)
    out = _replaceable(Path(out))
    checkpoint, config, sampling, classes = _read_generator(generator_path, classes, sampling_overrides)
    rank, world = process_rank()
    generator, tokenizer, tokenizer_file, tokenizer_sha256 = _load_models(
        generator_path, checkpoint, config, tokenizer_path, tokenizer_mismatch_ok, rank_device(device))
    labels = torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)
    names = [f"{i:06d}_class{label:04d}.png" for i, label in enumerate(labels.tolist())]
    partial = out.with_name(out.name + ".partial")
    joined = join_ranks(rank, world)
    try:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # a killed run's leftovers
            (partial / "images").mkdir(parents=True)
        barrier(world)
        _draw_pngs(partial / "images", names, generator, tokenizer, labels, sampling, seed, batch_size, precision,
                   rank, world)
        barrier(world)
        if rank == 0:
            manifest = Manifest("sample", {
                "generator": str(Path(generator_path).resolve()), "generator_sha256": file_sha256(generator_path),
                "generator_step": int(checkpoint.get("global_step", 0)), "tokenizer": str(tokenizer_file),
                "tokenizer_sha256": tokenizer_sha256, "classes": classes, "per_class": per_class, "seed": seed,
                "batch_size": batch_size, "precision": precision, "sampling": dataclasses.asdict(sampling),
                "png": png, "npz": npz, "count": len(labels)})
            _publish(partial, out, names, labels, manifest, _class_names(checkpoint))
            log.info("%d samples from %d ranks -> %s", len(labels), world, out)
        barrier(world)
    finally:
        if joined:
            dist.destroy_process_group()
    return out


def _replaceable(out: Path) -> Path:
    """`out`, refused when it exists and is not a sample folder (replacing it would delete what it holds)."""
    if out.exists() and (not out.is_dir() or any(p.name not in SAMPLE_FILES for p in out.iterdir())):
        raise ValueError(f"{out} exists and is not a sample folder: refusing to replace it")
    return out


def _read_generator(generator_path: str, classes: Optional[Sequence[int]],
                    overrides: dict) -> Tuple[dict, ExperimentConfig, SamplingConfig, List[int]]:
    """The generator's checkpoint and config, its sampling settings with the `overrides` that are set, and the
    classes to sample (every class by default; an id the generator does not know is refused)."""
    checkpoint = read_checkpoint(generator_path, "generator")
    config = from_container(checkpoint["hyper_parameters"]["config"])
    sampling = dataclasses.replace(config.sampling, **{k: v for k, v in overrides.items() if v is not None})
    num_classes = config.data.num_classes
    classes = list(range(num_classes)) if classes is None else list(classes)
    unknown = [c for c in classes if not 0 <= c < num_classes]
    if unknown:
        raise ValueError(f"unknown class ids {unknown}: the generator has {num_classes} classes (0..{num_classes - 1})")
    return checkpoint, config, sampling, classes


def _class_names(checkpoint: dict) -> List[str]:
    """The class names the generator's checkpoint keeps (from its training data's index), to name the grid's
    rows; none (rows named by class id) in a checkpoint written before it kept them."""
    names = checkpoint.get("nativetok", {}).get("classes")
    return [str(name) for name in names] if isinstance(names, list) else []


def _load_models(generator_path: str, checkpoint: dict, config: ExperimentConfig, tokenizer_path: Optional[str],
                 mismatch_ok: bool, device: str) -> tuple:
    """(generator, tokenizer, tokenizer file, its sha256): the tokenizer the generator was trained with, by sha256."""
    generator = generator_from_checkpoint(checkpoint, device)
    tokenizer_file, tokenizer_sha256 = pinned_tokenizer(generator_path, checkpoint, tokenizer_path, mismatch_ok)
    tokenizer = load_tokenizer(tokenizer_file, device, fits=config.generator)
    return generator, tokenizer, tokenizer_file, tokenizer_sha256


def _draw_pngs(folder: Path, names: List[str], generator, tokenizer, labels: torch.Tensor, sampling: SamplingConfig,
               seed: int, batch_size: int, precision: str, rank: int, world: int) -> None:
    """This rank's share of the global batches (r, r + W, ...), each image saved as its PNG in `folder`."""
    batches = math.ceil(len(labels) / batch_size)
    numbers = range(rank, batches, world)
    log.info("rank %d of %d: %d of %d batches on %s", rank, world, len(numbers), batches,
             next(generator.parameters()).device)
    for number in track(numbers, desc="sampling", unit="batch", disable=rank != 0):
        start = number * batch_size
        images = generate_batch(generator, tokenizer, labels[start : start + batch_size], sampling, seed + number,
                                precision)
        for i, image in enumerate(images.permute(0, 2, 3, 1).numpy(), start):
            image = image.squeeze(-1) if image.shape[-1] == 1 else image
            with naming_the_file(folder / names[i]):
                Image.fromarray(image).save(folder / names[i])


def _publish(partial: Path, out: Path, names: List[str], labels: torch.Tensor, manifest: Manifest,
             class_names: Sequence[str]) -> None:
    """Rank 0, once every rank has written its PNGs: the folder completed, then moved to `out` in one rename."""
    settings = manifest.inputs
    row_names = [class_label(c, class_names) for c in settings["classes"]]
    _finish(partial, names, labels, row_names, settings["per_class"], settings["png"], settings["npz"])
    manifest.save(partial, SAMPLE_MANIFEST)
    replace_folder(partial, out, aside=out.with_name(out.name + ".previous"))


def _finish(partial: Path, names: List[str], labels: torch.Tensor, row_names: List[str], per_class: int,
            png: bool, npz: bool) -> None:
    """Rank 0, once every rank has written its PNGs: the npz and the grid from them, in image order."""
    # The grid: a row per class (at most 10 classes), at most 10 samples a row, named and enlarged as the
    # training grids are.
    shown = [i for i in range(len(labels)) if i // per_class < 10 and i % per_class < 10]
    if npz:
        images = read_pngs(partial / "images", names)
        rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
        with naming_the_file(partial / "samples.npz"):
            np.savez(partial / "samples.npz", arr_0=rgb, labels=labels.numpy())
        images = images[shown]
    else:
        images = read_pngs(partial / "images", [names[i] for i in shown])
    rows = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).split(min(per_class, 10))
    save_image(labelled_grid(rows, row_names[:10]), partial / "grid.png")
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
