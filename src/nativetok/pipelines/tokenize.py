"""`nativetok tokenize`: image shards encoded once by a trained tokenizer into token shards for stage 2.

Shards are dealt out across ranks when launched with several processes (torchrun / srun), each written
atomically. The folder's manifest names the inputs (image index, tokenizer sha256, flip, precision): a re-run
with the same ones skips the complete shards, one with others is refused (or starts over with `force`), so
shards of two tokenizers never share an index. While a run writes into a folder it holds the folder's lock
(`run.lock`, as a training run does): a second run into it at the same time is refused, never interleaved.
The index records the codebook size, the sequence length and the tokenizer's sha256, which the generator
checks before training. The token shard format is data/tokens.py.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from nativetok.checkpoints import file_sha256, local_model_path, read_checkpoint, tokenizer_from_checkpoint
from nativetok.data.shards import (
    DatasetIndex,
    Manifest,
    ShardEntry,
    SplitIndex,
    claim_folder,
    count_samples,
    shard_name,
    wait_for_claim,
    write_shard,
)
from nativetok.data.stream import SHARD_ERRORS, DataError, ShardSpec, read_shard
from nativetok.data.tokens import encode_ids
from nativetok.data.transforms import ImageDecoder
from nativetok.lit.run_folder import RunLock
from nativetok.pipelines.ranks import process_rank, rank_device
from nativetok.precision import autocast
from nativetok.progress import track

log = logging.getLogger(__name__)


def _batches(samples: Iterator[dict], decoder: ImageDecoder, size: int, skipped: List[str]):
    batch: List[dict] = []
    for raw in samples:
        try:
            batch.append(decoder(raw, random.Random(0)))
        except Exception as error:  # an undecodable image is reported and left out, never mislabelled
            skipped.append(f"{raw.get('__key__')}: {error}")
            continue
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def _tokenize_shard(
    tokenizer, source: ShardSpec, target: Path, batch_size: int, flip: bool, device, progress, precision: str
) -> int:
    decoder = ImageDecoder(tokenizer.image_size, tokenizer.channels, train=False)
    skipped: List[str] = []
    samples = []
    try:
        for batch in _batches(read_shard(source), decoder, batch_size, skipped):
            images = torch.stack([b["image"] for b in batch]).to(device).float().div_(255)
            with autocast(device, precision):
                ids = tokenizer.encode(images).cpu().numpy()
                flipped = tokenizer.encode(images.flip(-1)).cpu().numpy() if flip else None
            for i, item in enumerate(batch):
                sample = {"__key__": item["key"], "tokens.npy": encode_ids(ids[i]), "cls": str(item["label"]).encode()}
                if flipped is not None:
                    sample["flip.npy"] = encode_ids(flipped[i])
                samples.append(sample)
            progress.update(len(batch))
    except SHARD_ERRORS as error:
        skipped.append(f"the rest of the shard: {error}")
    for message in skipped:
        log.warning("%s: skipped %s", source.url, message)
    return write_shard(target, samples)


def _wait_for(paths: List[Path], seconds: float) -> None:
    """Rank 0 waits for the other ranks' shards: a shard has its final name only once complete."""
    deadline = time.monotonic() + seconds
    missing = [p for p in paths if not p.is_file()]
    while missing:
        if time.monotonic() > deadline:
            raise DataError(f"{len(missing)} token shards never appeared (first: {missing[0]}); run the command again")
        log.info("waiting for %d token shards from other ranks (first: %s)", len(missing), missing[0].name)
        time.sleep(min(30.0, max(1.0, seconds / 100)))
        missing = [p for p in missing if not p.is_file()]


def _matching_images(image_index: str, tokenizer, tokenizer_path: str) -> DatasetIndex:
    """The image index, refused when its images are not the size the tokenizer encodes."""
    images = DatasetIndex.load(image_index, holds="images")
    if (images.image_size, images.channels) != (tokenizer.image_size, tokenizer.channels) and images.image_size:
        raise DataError(
            f"{image_index} holds {images.channels}x{images.image_size}px images but the tokenizer "
            f"{tokenizer_path} expects {tokenizer.channels}x{tokenizer.image_size}px"
        )
    return images


def _this_ranks_shards(images: DatasetIndex, splits: Sequence[str], out: Path, name: str, rank: int,
                       world: int) -> List[Tuple[ShardSpec, Path]]:
    """(image shard, token shard) of every shard this rank writes: every world-th, unless already complete."""
    jobs = []
    for split in splits:
        for number, (path, entry) in enumerate(zip(images.shard_paths(split), images.split(split).shards)):
            target = out / shard_name(name, split, number)
            if number % world == rank and not target.is_file():
                jobs.append((ShardSpec(path, entry.samples), target))
    return jobs


def _write_index(out: Path, name: str, images: DatasetIndex, splits: Sequence[str], tokens: dict,
                 manifest: Manifest, wait_seconds: float) -> DatasetIndex:
    """Rank 0, once every rank's shards are there: the token index, counted from the shards themselves."""
    files = {split: [shard_name(name, split, n) for n in range(len(images.split(split).shards))] for split in splits}
    _wait_for([out / f for names in files.values() for f in names], wait_seconds)
    index_splits = {
        split: SplitIndex([ShardEntry(f, count_samples(out / f)) for f in names]) for split, names in files.items()
    }
    index = DatasetIndex(
        name, images.image_size, images.channels, images.classes, index_splits, fmt="npy", tokens=tokens, root=out,
        provenance=manifest.to_json(),
    )
    index.save(out)
    counts = {split: index_splits[split].samples for split in splits}
    log.info("wrote %s: %s token sequences of %d ids (codebook %d)", out / "index.json", counts,
             tokens["num_tokens"], tokens["codebook_size"])
    return index


@contextmanager
def _claimed(out: Path, manifest: Manifest, name: str, force: bool, wait_seconds: float, rank: int) -> Iterator[None]:
    """`out` locked (rank 0, as a training run locks its folder: a second `tokenize` into it while this one runs
    is refused) and claimed for `manifest` for the duration of the block."""
    lock = RunLock(out, kind="tokenize run", elsewhere="tokenize into another --out")
    if rank == 0:
        lock.acquire()
    try:
        if rank == 0:
            claim_folder(out, manifest, name, force)
        else:
            wait_for_claim(out, manifest, name, force, wait_seconds)
        yield
    finally:
        lock.release()


def tokenize_shards(
    tokenizer_path: str,
    image_index: str,
    out: Path,
    splits: Sequence[str] = ("train", "val"),
    batch_size: int = 256,
    flip: bool = False,
    device: Optional[str] = None,
    wait_seconds: float = 6 * 3600,
    precision: str = "32-true",
    force: bool = False,
    revision: Optional[str] = None,
) -> Optional[DatasetIndex]:
    """Encode the image shards of `image_index` into token shards under `out`; rank 0 writes the index.

    `precision` bf16-mixed or 16-mixed encodes under autocast (faster on a GPU; a code whose distance ties
    within the lower precision may come out differently than in fp32). `out` holding shards of other
    inputs is refused, or with `force` emptied of them first. `tokenizer_path` may be a Hub repo id (at
    `revision`): its snapshot is resolved once, so loading and hashing read one commit."""
    tokenizer_path = local_model_path(tokenizer_path, revision)
    rank, world = process_rank()
    device = rank_device(None) if device is None else device
    checkpoint = read_checkpoint(tokenizer_path, "tokenizer")
    tokenizer = tokenizer_from_checkpoint(checkpoint, device=device)
    images = _matching_images(image_index, tokenizer, tokenizer_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{images.name}-tokens"
    tokenizer_sha256 = file_sha256(tokenizer_path)
    manifest = Manifest("tokenize", {
        "images_sha256": file_sha256(image_index),
        "tokenizer_sha256": tokenizer_sha256,
        "tokenizer_step": int(checkpoint.get("global_step", 0)),
        "flip": flip,
        "precision": precision,
    })
    with _claimed(out, manifest, name, force, wait_seconds, rank):
        jobs = _this_ranks_shards(images, splits, out, name, rank, world)
        total = sum(spec.samples or 0 for spec, _ in jobs)
        log.info("rank %d of %d: %d shards (%d images) to tokenize on %s", rank, world, len(jobs), total, device)
        with track(total=total, desc=f"tokenize (rank {rank})", unit="img", disable=rank != 0) as progress:
            for spec, target in jobs:
                _tokenize_shard(tokenizer, spec, target, batch_size, flip, device, progress, precision)
        if rank != 0:
            return None
        tokens = {
            "codebook_size": tokenizer.quantizer.codebook_size,
            "num_tokens": tokenizer.num_active,
            "tokenizer": str(tokenizer_path),
            "tokenizer_sha256": tokenizer_sha256,
            "tokenizer_kind": tokenizer.kind,
            "flip": flip,
        }
        return _write_index(out, name, images, splits, tokens, manifest, wait_seconds)
