"""Writing webdataset shards atomically, and the JSON index that describes a sharded dataset.

A shard is `<name>-<split>-NNNNNN.tar`; it appears under its final name only when complete (it is
written to a temporary name and renamed), so a killed writer never leaves a half shard that looks whole.
The index (`index.json` beside the shards) lists each split's shards with their sample counts, the
class names and the image size: the DataModule reads it to split work exactly across ranks.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
from PIL import Image

INDEX_NAME = "index.json"
INDEX_VERSION = 1
# A fixed whole-second mtime: shards become byte-reproducible and need no PAX header per file.
SHARD_MTIME = 1_700_000_000


def shard_name(name: str, split: str, number: int) -> str:
    return f"{name}-{split}-{number:06d}.tar"


def encode_image(array: np.ndarray, fmt: str = "png") -> bytes:
    """uint8 [H, W] or [H, W, C] to PNG or JPEG bytes."""
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    elif fmt in ("jpg", "jpeg"):
        image.save(buffer, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown image format '{fmt}': use png or jpg")
    return buffer.getvalue()


def write_shard(path: Path, samples: Iterable[Dict[str, bytes]]) -> int:
    """Write samples (each with `__key__` and byte fields) to `path` atomically; returns the count.

    The tar goes to `<path>.tmp` first and is renamed only after it is complete and flushed to disk.
    """
    import webdataset as wds

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False, mtime=SHARD_MTIME)
            for sample in samples:
                writer.write(sample)
                count += 1
            writer.close()
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, f"could not write shard {path}: {error.strerror or error}") from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


@dataclass
class ShardEntry:
    file: str
    samples: int


@dataclass
class SplitIndex:
    shards: List[ShardEntry]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass
class DatasetIndex:
    """What `index.json` holds: the shards of each split, the classes and the stored image size."""

    name: str
    image_size: int
    channels: int
    classes: List[str]
    splits: Dict[str, SplitIndex]
    fmt: str = "png"
    # Token shards only: codebook size, tokens per image and the tokenizer that wrote them.
    tokens: Optional[Dict[str, Any]] = None
    root: Optional[Path] = None  # folder of the index; shard files are relative to it

    def shard_paths(self, split: str) -> List[str]:
        return [str(self.root / s.file) for s in self.split(split).shards]

    def split(self, split: str) -> SplitIndex:
        if split not in self.splits:
            raise KeyError(f"split '{split}' is not in the index of '{self.name}' (has {', '.join(self.splits)})")
        return self.splits[split]

    def to_json(self) -> dict:
        body = {
            "version": INDEX_VERSION,
            "name": self.name,
            "image_size": self.image_size,
            "channels": self.channels,
            "format": self.fmt,
            "classes": list(self.classes),
            "splits": {
                split: {
                    "samples": index.samples,
                    "shards": [{"file": s.file, "samples": s.samples} for s in index.shards],
                }
                for split, index in self.splits.items()
            },
        }
        if self.tokens is not None:
            body["tokens"] = self.tokens
        return body

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        path = folder / INDEX_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DatasetIndex":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"dataset index not found: {path} (image shards: `make data` or `nativetok shard`; "
                f"token shards: `make tokenize` or `nativetok tokenize`)"
            )
        raw = json.loads(path.read_text())
        try:
            splits = {
                split: SplitIndex([ShardEntry(s["file"], int(s["samples"])) for s in body["shards"]])
                for split, body in raw["splits"].items()
            }
            return cls(
                name=raw["name"],
                image_size=int(raw["image_size"]),
                channels=int(raw["channels"]),
                classes=list(raw["classes"]),
                splits=splits,
                fmt=raw.get("format", "png"),
                tokens=raw.get("tokens"),
                root=path.parent,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a NativeTok dataset index ({error!r})") from None


def plan_shards(count: int, per_shard: int) -> List[range]:
    """Sample ranges of each shard: fixed-size slices, so shard k is the same whatever else exists."""
    if per_shard <= 0:
        raise ValueError(f"samples per shard must be > 0, got {per_shard}")
    return [range(start, min(start + per_shard, count)) for start in range(0, count, per_shard)]


def count_samples(path: Path) -> int:
    """Distinct sample keys in a tar (reads headers only)."""
    with tarfile.open(path, "r:") as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isreg()})
