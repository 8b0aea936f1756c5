"""Shard an image folder tree (`<root>/<split>/<class>/<image>`, the ImageNet layout) into webdataset tars.

A split is either class folders, or (ImageNet's validation set) a flat folder of images with a label
file: Kaggle's `LOC_val_solution.csv`, a two-column `<file> <class>` text file, or the devkit's
`ILSVRC2012_validation_ground_truth.txt` with the devkit's `meta.mat`.

A split's files are written in a seeded shuffled order (the seed is in the manifest): in the sorted order
each shard would hold about one class, and a training batch drawn through a shuffle buffer, or the first N
images of an evaluation, only a handful of classes. Shard k always holds the same slice of that order, so
shards can be written by parallel worker processes and a re-run skips shards that are already complete
(only a finished shard has its final name). The folder's manifest names what decides the shards (file
list, classes, size, format, channels, shard size, order seed): a re-run with other values is refused, or
starts over with `force`, never mixed in. A final pass counts the samples of every shard against the plan.

An image that cannot be decoded stops the run with its file named, or with `skip_bad` is left out and
counted. 16-bit images are scaled to 8 bits. Ctrl-C stops the workers at once and leaves no partial shard.
"""

from __future__ import annotations

import logging
import random
import signal
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from nativetok.data.shards import (
    DatasetIndex,
    Manifest,
    ShardEntry,
    SplitIndex,
    claim_folder,
    count_samples,
    encode_image,
    json_sha256,
    plan_shards,
    shard_name,
    write_shard,
)
from nativetok.data.transforms import crop_square, resize_short_side
from nativetok.progress import track

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
WIDE_GREY_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # PIL's modes of 16-bit grey PNGs
Item = Tuple[str, int]  # (image path, class index)


class UnreadableImage(ValueError):
    """An image file that cannot be decoded (truncated, corrupt, not an image); the message names the file."""


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


def read_flat_labels(labels_file: Path, classes: Sequence[str], devkit_meta: Optional[Path] = None) -> Dict[str, int]:
    """File stem -> class index, from one of the label files of a flat validation folder."""
    lookup = {name: i for i, name in enumerate(classes)}
    text = Path(labels_file).read_text().splitlines()
    lines = [line.strip() for line in text if line.strip()]
    labels: Dict[str, str] = {}
    if lines and lines[0].lower().startswith("imageid,"):  # Kaggle LOC_val_solution.csv
        for line in lines[1:]:
            stem, prediction = line.split(",", 1)
            labels[stem] = prediction.split()[0]
    elif lines and all(len(line.split()) == 1 for line in lines):  # devkit ground truth: IDs in file order
        if devkit_meta is None:
            raise ValueError(f"{labels_file} holds devkit class IDs: pass the devkit's data/meta.mat too")
        from scipy.io import loadmat

        synsets = loadmat(str(devkit_meta), squeeze_me=True)["synsets"]
        by_id = {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in synsets}
        labels = {f"ILSVRC2012_val_{n:08d}": by_id[int(line)] for n, line in enumerate(lines, start=1)}
    else:  # "<file> <class name or index>"
        for line in lines:
            name, label = line.split()[:2]
            labels[Path(name).stem] = classes[int(label)] if label.isdigit() and label not in lookup else label
    unknown = sorted({v for v in labels.values() if v not in lookup})
    if unknown:
        raise ValueError(f"{labels_file}: classes not in the class list, e.g. {unknown[:3]}")
    return {stem: lookup[name] for stem, name in labels.items()}


def list_split(
    root: Path, split: str, classes: Sequence[str], labels: Optional[Dict[str, int]] = None
) -> List[Item]:
    """(image path, class index) of a split: from class folders, or a flat folder and its labels."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"split folder not found: {folder}")
    lookup = {name: i for i, name in enumerate(classes)}
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not class_dirs:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if labels is None:
            raise ValueError(f"{folder} holds images but no class folders: give its label file (--val-labels)")
        missing = [p.name for p in files if p.stem not in labels]
        if missing:
            raise ValueError(f"{len(missing)} images of {folder} have no label, e.g. {missing[0]}")
        return [(str(p), labels[p.stem]) for p in files]
    items: List[Item] = []
    for class_dir in class_dirs:
        if class_dir.name not in lookup:
            raise ValueError(f"{class_dir}: folder '{class_dir.name}' is not in the class list")
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        items += [(str(p), lookup[class_dir.name]) for p in files]
    if not items:
        raise ValueError(f"no images under {folder}/<class>/")
    return items


def eight_bit(image: Image.Image, mode: str) -> Image.Image:
    """`image` in `mode` ("L" or "RGB"); 16-bit grey scaled to 8 bits (PIL's conversion would clip it to white)."""
    if image.mode in WIDE_GREY_MODES:
        pixels = np.asarray(image, dtype=np.float64) / 257  # 65535 -> 255
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return image.convert(mode)


def _sample(path: str, label: int, key: str, size: int, fmt: str, mode: str) -> dict:
    if fmt == "original":
        suffix = Path(path).suffix.lower().lstrip(".").replace("jpeg", "jpg")
        return {"__key__": key, suffix: Path(path).read_bytes(), "cls": str(label).encode()}
    try:
        with Image.open(path) as image:
            image = crop_square(resize_short_side(eight_bit(image, mode), size), size)
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # PIL's truncated and unknown files
        raise UnreadableImage(f"cannot decode image {path}: {error}") from None
    return {"__key__": key, fmt: encode_image(np.asarray(image), fmt), "cls": str(label).encode()}


def _samples(items: List[Item], start: int, split: str, encoding: Tuple[int, str, str], skipped: Optional[List[str]]):
    """The shard's samples; an unreadable image is an error, or with a `skipped` list recorded there and left out."""
    for i, (path, label) in enumerate(items):
        try:
            yield _sample(path, label, f"{split}{start + i:08d}", *encoding)
        except UnreadableImage as error:
            if skipped is None:
                raise
            skipped.append(str(error))


def _write_one(job) -> List[str]:
    """A worker's shard; the messages of the images it skipped."""
    path, items, start, split, encoding, skip_bad = job
    skipped: Optional[List[str]] = [] if skip_bad else None
    write_shard(Path(path), _samples(items, start, split, encoding, skipped))
    return skipped or []


def _ignore_ctrl_c() -> None:
    """Workers leave Ctrl-C to the main process, which stops them all at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_jobs(jobs: list, workers: int, description: str) -> List[str]:
    """Write the shards of `jobs` in worker processes; the messages of every image skipped. On Ctrl-C (or a
    worker's error) the workers are killed and their partial shards removed before the exception goes on."""
    skipped: List[str] = []
    with Pool(max(1, workers), initializer=_ignore_ctrl_c) as pool:
        try:
            for messages in track(pool.imap_unordered(_write_one, jobs), total=len(jobs), desc=description,
                                 unit="shard"):
                skipped += messages
        except BaseException:
            pool.terminate()
            pool.join()
            for job in jobs:
                Path(str(job[0]) + ".tmp").unlink(missing_ok=True)
            raise
    return skipped


def _write_split(out: Path, name: str, split: str, items: List[Item], per_shard: int, workers: int,
                 encoding: Tuple[int, str, str], skip_bad: bool) -> SplitIndex:
    """Write the missing shards of one split in parallel workers, then count every shard against the plan
    (with `skip_bad` a shard may hold fewer: its skipped images)."""
    ranges = plan_shards(len(items), per_shard)
    jobs = []
    for number, rows in enumerate(ranges):
        path = out / shard_name(name, split, number)
        if not path.is_file():
            jobs.append((path, items[rows.start : rows.stop], rows.start, split, encoding, skip_bad))
    log.info("%s/%s: %d images, %d shards, %d to write", name, split, len(items), len(ranges), len(jobs))
    for message in _run_jobs(jobs, workers, f"{name} {split}"):
        log.warning("skipped: %s", message)
    entries = []
    for number, rows in enumerate(ranges):
        file = shard_name(name, split, number)
        found = count_samples(out / file)
        if found > len(rows) or (found < len(rows) and not skip_bad):
            raise RuntimeError(f"{out / file}: holds {found} samples, the plan says {len(rows)} (a shard written "
                               f"with --skip-bad holds fewer: run with --skip-bad again)")
        entries.append(ShardEntry(file, found))
    index = SplitIndex(entries)
    if index.samples < len(items):
        log.warning("%s/%s: skipped %d undecodable images of %d (--skip-bad)", name, split,
                    len(items) - index.samples, len(items))
    log.info("%s/%s: checked %d samples in %d shards", name, split, index.samples, len(entries))
    return index


def shuffled(items: List[Item], seed: int) -> List[Item]:
    """The items in the order `seed` gives them (a copy: the sorted list stays what the manifest hashes)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order


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
    val_labels: Optional[Path] = None,
    devkit_meta: Optional[Path] = None,
    force: bool = False,
    seed: int = 0,
    skip_bad: bool = False,
) -> DatasetIndex:
    """Write `<out>/<name>-<split>-NNNNNN.tar` for each split and `<out>/index.json`.

    `root` is the folder holding the splits, or an ILSVRC folder (its Data/CLS-LOC is used). A split
    that is a flat folder takes its labels from `val_labels` (and the devkit's `devkit_meta`). `out`
    holding shards made with other settings is refused, or with `force` emptied of them first. Each split
    is written in the order `seed` shuffles it to; `skip_bad` leaves undecodable images out (and counts them)
    instead of stopping at the first.
    """
    if fmt not in ("png", "jpg", "original"):
        raise ValueError(f"format must be png, jpg or original, got '{fmt}'")
    root = Path(root)
    if (root / "Data" / "CLS-LOC").is_dir():
        root = root / "Data" / "CLS-LOC"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = read_classes(root, splits, classes_file)
    labels = read_flat_labels(val_labels, classes, devkit_meta) if val_labels else None
    mode = "L" if channels == 1 else "RGB"
    listed = {split: list_split(root, split, classes, labels) for split in splits}
    # The file list relative to the root: a moved tree is the same input.
    relative = {split: [(str(Path(p).relative_to(root)), label) for p, label in items]
                for split, items in listed.items()}
    manifest = Manifest("shard folder", {
        "files_sha256": json_sha256({"classes": classes, "splits": relative}),
        "splits": list(splits),
        "size": size,
        "format": fmt,
        "channels": channels,
        "per_shard": per_shard,
        "order_seed": seed,
    })
    claim_folder(out, manifest, name, force)
    index_splits = {split: _write_split(out, name, split, shuffled(items, seed), per_shard, workers,
                                        (size, fmt, mode), skip_bad)
                    for split, items in listed.items()}
    stored_size = 0 if fmt == "original" else size
    index = DatasetIndex(
        name, stored_size, channels, classes, index_splits, fmt=fmt, root=out, provenance=manifest.to_json()
    )
    index.save(out)
    return index
