"""Writing webdataset shards atomically, and the JSON index that describes a sharded dataset.

A shard is `<name>-<split>-NNNNNN.tar`; it appears under its final name only when complete (it is
written to a temporary name and renamed), so a killed writer never leaves a half shard that looks whole.
The index (`index.json` beside the shards) lists each split's shards with their sample counts, the
class names and the image size: the DataModule reads it to split work exactly across ranks. A shard
name in the index is a plain relative path under the index's location (its folder, or the URL it was read
from), or under the http(s) URL or subfolder its `base` declares (see data/README.md). An index is data a
user may have downloaded: one that names a `pipe:` command, an absolute path, a URL of its own, a `..`, or a
character a shell or a URL gives a meaning to is refused, naming the file. A `pipe:` command runs only from
the user's own `data.train_shards` / `data.val_shards` patterns or `data.index`, with
`data.allow_pipes=true` in their experiment or on the command line (`open_location`).

A manifest (`manifest.json`) records what made a derived folder: the command and every input that
decides its contents. A re-run with the same inputs resumes; one with other inputs is refused (or, told
to, deletes the old outputs first), so a folder never holds the outputs of two runs under one index.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterable, List, Optional
from urllib.parse import urljoin, urlparse
from urllib.request import url2pathname

import numpy as np
from PIL import Image

from nativetok.io import atomic_open

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_VERSION = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# A fixed whole-second mtime: shards become byte-reproducible and need no PAX header per file.
SHARD_MTIME = 1_700_000_000
PIPE = "pipe:"
# What an index may declare as its `base` URL (curl reads them); other schemes run other programs.
BASE_URL_SCHEMES = ("http", "https")
# One folder or file name of an index entry: nothing a shell, a URL or curl's globbing gives a meaning to.
NAME_PART = re.compile(r"[A-Za-z0-9_.+=@,~-]+")
# A base URL: RFC 3986 characters without the quote, and {} where the name goes.
SAFE_URL = re.compile(r"[A-Za-z0-9_.~:/?#@!$&()*+,;=%{}-]+")
ALLOW_PIPES_HINT = ("to read shards through a command, give data.train_shards / data.val_shards (or data.index) "
                    "yourself and set data.allow_pipes=true in your experiment file or on the command line")


class DataError(RuntimeError):
    """Unreadable data in strict mode, no readable data at all, or data refused before it is read (a command or
    a path outside its folder named by a data file)."""


def shard_name(name: str, split: str, number: int) -> str:
    """The file name of shard `number`; the dataset name must be one an index may hold (`check_shard_name`)."""
    if not NAME_PART.fullmatch(name):
        raise ValueError(f"dataset name {name!r}: use letters, digits and ._-+=@,~ (it names the shard files)")
    return f"{name}-{split}-{number:06d}.tar"


def is_pipe(location: str) -> bool:
    return str(location).startswith(PIPE)


def open_location(location: str, allow_pipes: bool):
    """A shard or index opened with `webdataset.gopen`, where a `pipe:` command runs only when the user opted in."""
    if is_pipe(location) and not allow_pipes:
        raise DataError(f"'{location}' is a pipe: command, which runs only on request: {ALLOW_PIPES_HINT}")
    from webdataset.gopen import gopen

    return gopen(location, "rb")


def check_shard_name(name: str, index: str) -> None:
    """A shard entry of the index at `index` must stay under the index's location: a relative name of safe parts."""
    if is_pipe(name):
        raise DataError(f"{index}: shard '{name}' is a pipe: command; an index never runs one ({ALLOW_PIPES_HINT})")
    parts = name.split("/")
    if any(part in ("", ".", "..") or not NAME_PART.fullmatch(part) for part in parts):
        raise DataError(
            f"{index}: shard name {name!r} is refused: an index names its shards by relative paths inside its own "
            f"folder (or its base URL) of letters, digits and ._-+=@,~ (no '..', absolute path, URL or command)"
        )


def check_base(base: str, index: str) -> None:
    """An index's `base`: an http(s) URL without quotes or spaces, or a subfolder of the index's folder."""
    if is_pipe(base):
        raise DataError(f"{index}: base '{base}' is a pipe: command; an index never runs one ({ALLOW_PIPES_HINT})")
    if is_url(base):
        if urlparse(base).scheme not in BASE_URL_SCHEMES or not SAFE_URL.fullmatch(base):
            raise DataError(f"{index}: base {base!r} is refused: a base URL is http or https, without quotes, "
                            f"spaces or control characters")
        return
    parts = PurePosixPath(base).parts
    if base.startswith("/") or not parts or any(p == ".." or not NAME_PART.fullmatch(p) for p in parts):
        raise DataError(f"{index}: base {base!r} is refused: a local base is a subfolder of the index's folder "
                        f"(relative, no '..')")


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
    count = 0
    try:
        with atomic_open(path) as stream:
            writer = wds.TarWriter(stream, encoder=False, mtime=SHARD_MTIME)
            for sample in samples:
                writer.write(sample)
                count += 1
            writer.close()
    except OSError as error:
        raise OSError(error.errno, f"could not write shard {path}: {error.strerror or error}") from error
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
    # Token shards only: codebook size, tokens per image and the tokenizer (path, sha256) that wrote them.
    tokens: Optional[Dict[str, Any]] = None
    root: Optional[Path] = None  # folder of a local index; shard files are relative to it
    # The manifest of the run that wrote the shards (absent for shards written without one).
    provenance: Optional[Dict[str, Any]] = None
    # Where relative shard names are instead: the index's `base` (a subfolder, or an http(s) URL with or
    # without {} for the name), else the URL the index was read from.
    base: Optional[str] = None
    location: Optional[str] = None  # the file or URL it was read from, for messages

    def shard_paths(self, split: str) -> List[str]:
        """Where each shard of `split` is read from: a local path or a URL, checked (`check_locations`)."""
        self.check_locations()
        return [resolve_shard(s.file, self.root, self.base) for s in self.split(split).shards]

    def check_locations(self) -> None:
        """Refuse (DataError naming the index) a dataset name, base or shard name that would run a command or
        reach outside the index's folder (or its outputs' and caches' folders, which its name names files in)."""
        where = self.location or f"the index of '{self.name}'"
        if not NAME_PART.fullmatch(self.name):  # it names token shards and cached statistics
            raise DataError(f"{where}: dataset name {self.name!r} is refused: use letters, digits and ._-+=@,~")
        if self.base is not None:
            check_base(self.base, where)
        for split in self.splits.values():
            for entry in split.shards:
                check_shard_name(entry.file, where)

    def require(self, holds: str) -> "DatasetIndex":
        """This index, when it holds `holds` ("images" or "tokens"); else a DataError naming the file."""
        where = self.location or f"the index of '{self.name}'"
        if holds == "images" and self.tokens:
            raise DataError(f"{where} indexes token shards (written by `nativetok tokenize`), not images: "
                            f"give the index.json of image shards (`nativetok shard`)")
        if holds == "tokens" and not self.tokens:
            raise DataError(f"{where} indexes image shards, not token shards (run `nativetok tokenize`)")
        return self

    def split(self, split: str) -> SplitIndex:
        if split not in self.splits:  # a user's --split or data.*_split: a clear error, not a KeyError traceback
            raise ValueError(f"split '{split}' is not in the index of '{self.name}' (has {', '.join(self.splits)})")
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
        if self.provenance is not None:
            body["provenance"] = self.provenance
        if self.base is not None:
            body["base"] = self.base
        return body

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        return write_json(folder / INDEX_NAME, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, allow_pipes: bool = False, holds: Optional[str] = None) -> "DatasetIndex":
        """Read an index from a local path or `file:` URL, a URL, or a `pipe:` command when `allow_pipes` (the
        user's opt-in); its locations are checked, and with `holds` ("images", "tokens") what it indexes."""
        if urlparse(str(path)).scheme == "file":
            path = url2pathname(urlparse(str(path)).path)
        if is_url(str(path)):
            raw, root, base = _read_remote(str(path), allow_pipes), None, _url_folder(str(path))
        else:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"dataset index not found: {path} (image shards: `make data` or `nativetok shard`; "
                    f"token shards: `make tokenize` or `nativetok tokenize`)"
                )
            raw, root, base = path.read_bytes(), path.parent, None
        try:
            raw = json.loads(raw) if isinstance(raw, bytes) else raw
            splits = {
                split: SplitIndex([ShardEntry(s["file"], int(s["samples"])) for s in body["shards"]])
                for split, body in raw["splits"].items()
            }
            index = cls(
                name=raw["name"],
                image_size=int(raw["image_size"]),
                channels=int(raw["channels"]),
                classes=list(raw["classes"]),
                splits=splits,
                fmt=raw.get("format", "png"),
                tokens=raw.get("tokens"),
                root=root,
                provenance=raw.get("provenance"),
                base=raw.get("base", base),
                location=str(path),
            )
            index.check_locations()
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{path}: not a NativeTok dataset index ({type(error).__name__}: {error})") from None
        return index.require(holds) if holds else index


def is_url(name: str) -> bool:
    """Whether a shard or index name is a URL or a `pipe:` command (opened by webdataset.gopen) rather than a
    local path."""
    return len(urlparse(name).scheme) > 1  # a one-letter scheme is a Windows drive


def resolve_shard(name: str, root: Optional[Path], base: Optional[str]) -> str:
    """The location of an index's shard entry (checked by `check_locations`): `name` under `base` (substituted
    for {} in a URL, joined to a URL, or under a subfolder of the index's); else in `root`."""
    if base is None:
        if root is None:
            raise ValueError(f"shard '{name}' is relative, but its index was read through a pipe: give it a 'base'")
        return str(root / name)
    if "{}" in base:
        return base.replace("{}", name)
    if is_url(base):
        return urljoin(base if base.endswith("/") else base + "/", name)
    if root is None:
        raise ValueError(f"base '{base}' is a local folder, but its index was not read from a local file")
    return str(root / base / name)


def _url_folder(url: str) -> Optional[str]:
    """The folder of an index read from a URL, where its relative shard names are; None for a `pipe:` command."""
    return None if is_pipe(url) else urljoin(url, ".")


def _read_remote(url: str, allow_pipes: bool) -> bytes:
    try:
        with open_location(url, allow_pipes) as stream:
            return stream.read()
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"dataset index not readable: {url} ({error})") from error


def write_json(path: Path, body: dict) -> Path:
    """Write JSON under `path` atomically: readers see the old file or the whole new one."""
    with atomic_open(path, "w") as file:
        file.write(json.dumps(body, indent=1) + "\n")
    return path


def json_sha256(value: Any) -> str:
    """A content hash of a JSON-able value (a file list, class names), for a manifest."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class ProvenanceError(ValueError):
    """A folder holds outputs of other inputs than the run asked for."""


@dataclass
class Manifest:
    """What made a derived output: the command and the inputs that decide its contents, stored flat."""

    command: str
    inputs: Dict[str, Any]

    def __post_init__(self) -> None:
        self.inputs = json.loads(json.dumps(self.inputs))  # as it reads back: tuples as lists, keys as strings

    def to_json(self) -> dict:
        return {"version": MANIFEST_VERSION, "command": self.command, **self.inputs}

    def differences(self, old: "Manifest") -> List[str]:
        """'key old -> new' for each input (or the command) that differs from `old`'s."""
        new_body, old_body = self.to_json(), old.to_json()
        return [
            f"{key} {_brief(old_body.get(key))} -> {_brief(new_body.get(key))}"
            for key in sorted(set(new_body) | set(old_body))
            if new_body.get(key) != old_body.get(key)
        ]

    def save(self, folder: Path, name: str = MANIFEST_NAME) -> Path:
        return write_json(Path(folder) / name, self.to_json())

    @classmethod
    def load(cls, folder: Path, name: str = MANIFEST_NAME) -> Optional["Manifest"]:
        """The manifest in `folder`, or None when there is none (or the file is not a manifest)."""
        path = Path(folder) / name
        try:
            body = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if not isinstance(body, dict) or "command" not in body:
            return None
        return cls(body["command"], {k: v for k, v in body.items() if k not in ("version", "command")})


def _brief(value: Any) -> str:
    """An input's value short enough for a message: a sha256 as its first 12 digits, JSON cut at 60 characters."""
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def shard_outputs(folder: Path, name: str) -> List[Path]:
    """What a run writing `<name>-<split>-NNNNNN.tar` shards into `folder` owns there: shards, partial
    shards and the index."""
    pattern = glob.escape(name) + "-*.tar"
    return [*folder.glob(pattern), *folder.glob(pattern + ".tmp"), *[p for p in [folder / INDEX_NAME] if p.exists()]]


def _must_clear(folder: Path, manifest: Manifest, name: str, force: bool) -> bool:
    """Whether `folder` holds outputs of other inputs (or of unknown ones: no manifest) that must go first;
    refused unless `force`. False when it holds this run's outputs (it resumes) or none."""
    found = Manifest.load(folder)
    if found == manifest:
        return False
    existing = shard_outputs(folder, name)
    if not existing:
        return False
    if force:
        return True
    why = (
        "; ".join(manifest.differences(found)) if found is not None
        else f"{existing[0].name} and {len(existing) - 1} more files but no {MANIFEST_NAME}"
    )
    raise ProvenanceError(
        f"{folder} holds the output of another run ({why}): refusing to mix them; "
        f"use another folder, or --force to delete them and start over"
    )


def claim_folder(folder: Path, manifest: Manifest, name: str, force: bool) -> None:
    """Make `folder` the output of `manifest`'s run before writing any shard: a run with the same inputs
    resumes (its complete shards are kept); other inputs are refused, or with `force` their outputs deleted."""
    if _must_clear(folder, manifest, name, force):
        stale = shard_outputs(folder, name)
        log.warning("%s: deleting %d files of another run (--force)", folder, len(stale))
        for path in stale:
            path.unlink(missing_ok=True)
    manifest.save(folder)


def wait_for_claim(folder: Path, manifest: Manifest, name: str, force: bool, seconds: float) -> None:
    """Ranks other than 0: refuse what rank 0 refuses, else wait until it has claimed the folder."""
    deadline = time.monotonic() + seconds
    while Manifest.load(folder) != manifest:
        _must_clear(folder, manifest, name, force)
        if time.monotonic() > deadline:
            raise ProvenanceError(f"rank 0 never claimed {folder} (no matching {MANIFEST_NAME}); run the command again")
        time.sleep(1.0)


def plan_shards(count: int, per_shard: int) -> List[range]:
    """Sample ranges of each shard: fixed-size slices, so shard k is the same whatever else exists."""
    if per_shard <= 0:
        raise ValueError(f"samples per shard must be > 0, got {per_shard}")
    return [range(start, min(start + per_shard, count)) for start in range(0, count, per_shard)]


def count_samples(path: Path) -> int:
    """Distinct sample keys in a tar (reads headers only)."""
    with tarfile.open(path, "r:") as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isreg()})
