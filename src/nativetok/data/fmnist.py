"""The embedded default dataset: Fashion-MNIST from its IDX files, written as 32x32 webdataset shards.

The files come from Debian's `dataset-fashion-mnist` package (`make data` installs it when run as root);
elsewhere they are downloaded once from the dataset's public source.
"""

from __future__ import annotations

import gzip
import logging
import struct
import urllib.request
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from nativetok.data.shards import (
    DatasetIndex,
    ShardEntry,
    SplitIndex,
    encode_image,
    plan_shards,
    shard_name,
    write_shard,
)
from nativetok.io import atomic_path
from nativetok.progress import track

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
PUBLIC_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
NATIVE_SIZE = 28


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a uint8 array: [N] for labels, [N, H, W] for images."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: holds {data.size} values, its header says {shape}")
    return data.reshape(shape)


def locate_files(source: Optional[Path], cache: Path) -> Path:
    """The folder with the four IDX files: `source`, Debian's package, or a one-time download."""
    candidates = [Path(source)] if source else [DEBIAN_DIR, cache]
    needed = [name for pair in FILES.values() for name in pair]
    for folder in candidates:
        if all((folder / name).is_file() for name in needed):
            return folder
    if source:
        missing = [n for n in needed if not (Path(source) / n).is_file()]
        raise FileNotFoundError(f"Fashion-MNIST files missing in {source}: {', '.join(missing)}")
    log.warning(
        "Fashion-MNIST not found in %s (Debian package dataset-fashion-mnist); downloading it from %s into %s",
        DEBIAN_DIR, PUBLIC_URL, cache,
    )
    cache.mkdir(parents=True, exist_ok=True)
    for name in needed:
        target = cache / name
        if target.is_file():
            continue
        try:
            with atomic_path(target, staging=target.with_suffix(".part")) as part:
                urllib.request.urlretrieve(PUBLIC_URL + name, part)
        except OSError as error:
            raise RuntimeError(
                f"could not download {PUBLIC_URL + name} ({error}). Install Debian's dataset-fashion-mnist "
                f"(apt-get install dataset-fashion-mnist) or put the four IDX files in {cache}"
            ) from None
    return cache


def load_split(folder: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = FILES[split]
    images = read_idx(folder / images_file)
    labels = read_idx(folder / labels_file)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels in split {split}")
    return images, labels


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """Centre the 28x28 images on a black square of `size` (no resampling: pixels stay exact)."""
    if size < NATIVE_SIZE:
        raise ValueError(f"Fashion-MNIST images are {NATIVE_SIZE}px; cannot pad them to {size}")
    before = (size - NATIVE_SIZE) // 2
    after = size - NATIVE_SIZE - before
    return np.pad(images, ((0, 0), (before, after), (before, after)))


def write_fmnist(
    out: Path,
    source: Optional[Path] = None,
    size: int = 32,
    per_shard: int = 2000,
    name: str = "fmnist",
    force: bool = False,
) -> DatasetIndex:
    """Shard Fashion-MNIST into `out`; a complete, matching earlier build is kept as it is."""
    out = Path(out)
    index_path = out / "index.json"
    if index_path.is_file() and not force:
        existing = DatasetIndex.load(index_path)
        complete = all(Path(p).is_file() for split in existing.splits for p in existing.shard_paths(split))
        train = existing.splits.get("train")
        same_plan = existing.image_size == size and train is not None and (
            train.shards[0].samples == min(per_shard, train.samples)
        )
        if complete and same_plan:
            log.info("%s is up to date (%s)", index_path, {k: v.samples for k, v in existing.splits.items()})
            return existing
    folder = locate_files(source, out / "raw")
    out.mkdir(parents=True, exist_ok=True)
    # The old index goes first: a rebuild killed half-way leaves no index to vouch for mixed shards.
    index_path.unlink(missing_ok=True)
    splits = {}
    for split in FILES:
        images, labels = load_split(folder, split)
        images = pad_to(images, size)
        entries = []
        ranges = plan_shards(len(images), per_shard)
        for number, rows in enumerate(track(ranges, desc=f"{name} {split}", unit="shard")):
            file = shard_name(name, split, number)
            samples = (
                {"__key__": f"{split}{i:07d}", "png": encode_image(images[i]), "cls": str(int(labels[i])).encode()}
                for i in rows
            )
            entries.append(ShardEntry(file, write_shard(out / file, samples)))
        splits[split] = SplitIndex(entries)
    index = DatasetIndex(name=name, image_size=size, channels=1, classes=CLASSES, splits=splits, root=out)
    index.save(out)
    log.info("wrote %s: %s", index_path, {k: v.samples for k, v in splits.items()})
    return index
