"""Shard an image folder tree (`<root>/<split>/<class>/<image>`, the ImageNet layout) into webdataset tars.

Shard k always holds the same slice of the sorted file list, so shards can be written by parallel
worker processes and a re-run skips shards that are already complete (only a finished shard has its
final name). A final pass counts the samples of every shard against the plan.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from nativetok.data.shards import (
    DatasetIndex,
    ShardEntry,
    SplitIndex,
    count_samples,
    encode_image,
    plan_shards,
    shard_name,
    write_shard,
)
from nativetok.data.transforms import crop_square, resize_short_side

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
Item = Tuple[str, int]  # (image path, class index)


def read_classes(root: Path, splits: Sequence[str], classes_file: Optional[Path]) -> List[str]:
    """Class names: one per line in `classes_file`, or the sorted folder names of the first split."""
    if classes_file:
        names = [line.strip() for line in Path(classes_file).read_text().splitlines() if line.strip()]
    else:
        names = sorted(p.name for p in (Path(root) / splits[0]).iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"no classes: {root}/{splits[0]} has no class folders and no class list was given")
    if len(set(names)) != len(names):
        raise ValueError("the class list has duplicate names")
    return names


def list_split(root: Path, split: str, classes: Sequence[str]) -> List[Item]:
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"split folder not found: {folder}")
    lookup = {name: i for i, name in enumerate(classes)}
    items: List[Item] = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if class_dir.name not in lookup:
            raise ValueError(f"{class_dir}: folder '{class_dir.name}' is not in the class list")
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        items += [(str(p), lookup[class_dir.name]) for p in files]
    if not items:
        raise ValueError(f"no images under {folder}/<class>/")
    return items


def _sample(path: str, label: int, key: str, size: int, fmt: str, mode: str) -> dict:
    if fmt == "original":
        suffix = Path(path).suffix.lower().lstrip(".").replace("jpeg", "jpg")
        return {"__key__": key, suffix: Path(path).read_bytes(), "cls": str(label).encode()}
    with Image.open(path) as image:
        image = crop_square(resize_short_side(image.convert(mode), size), size)
        return {"__key__": key, fmt: encode_image(np.asarray(image), fmt), "cls": str(label).encode()}


def _write_one(job) -> Tuple[str, int]:
    path, items, start, split, size, fmt, mode = job
    samples = (
        _sample(p, label, f"{split}{start + i:08d}", size, fmt, mode) for i, (p, label) in enumerate(items)
    )
    return str(path), write_shard(Path(path), samples)


def shard_folder(
    root: Path,
    out: Path,
    name: str,
    splits: Sequence[str] = ("train", "val"),
    size: int = 256,
    per_shard: int = 1000,
    fmt: str = "jpg",
    channels: int = 3,
    workers: int = 4,
    classes_file: Optional[Path] = None,
) -> DatasetIndex:
    """Write `<out>/<name>-<split>-NNNNNN.tar` for each split and `<out>/index.json`."""
    if fmt not in ("png", "jpg", "original"):
        raise ValueError(f"format must be png, jpg or original, got '{fmt}'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = read_classes(root, splits, classes_file)
    mode = "L" if channels == 1 else "RGB"
    index_splits = {}
    for split in splits:
        items = list_split(root, split, classes)
        ranges = plan_shards(len(items), per_shard)
        jobs = []
        for number, rows in enumerate(ranges):
            path = out / shard_name(name, split, number)
            if not path.is_file():
                jobs.append((path, items[rows.start : rows.stop], rows.start, split, size, fmt, mode))
        log.info("%s/%s: %d images, %d shards, %d to write", name, split, len(items), len(ranges), len(jobs))
        with ProcessPoolExecutor(max(1, workers)) as pool:
            futures = [pool.submit(_write_one, job) for job in jobs]
            for future in tqdm(as_completed(futures), total=len(futures), desc=f"{name} {split}", unit="shard"):
                future.result()
        entries = []
        for number, rows in enumerate(ranges):
            file = shard_name(name, split, number)
            found = count_samples(out / file)
            if found != len(rows):
                raise RuntimeError(f"{out / file}: holds {found} samples, the plan says {len(rows)}")
            entries.append(ShardEntry(file, found))
        index_splits[split] = SplitIndex(entries)
        log.info("%s/%s: checked %d samples in %d shards", name, split, index_splits[split].samples, len(entries))
    stored_size = 0 if fmt == "original" else size
    index = DatasetIndex(name, stored_size, channels, classes, index_splits, fmt=fmt, root=out)
    index.save(out)
    return index
