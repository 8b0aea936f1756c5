"""Pre-tokenized shards: images encoded once by a trained tokenizer, for stage-2 training.

A token shard mirrors an image shard: the same keys, with `tokens.npy` (the ids as a compact unsigned
integer array), optionally `flip.npy` (the ids of the horizontally flipped image) and `cls`. Shards are
dealt out across ranks when launched with several processes (torchrun / srun), each written atomically.
The folder's manifest names the inputs (image index, tokenizer sha256, flip, precision): a re-run with the
same ones skips the complete shards, one with others is refused (or starts over with `force`), so shards
of two tokenizers never share an index. The index records the codebook size, the sequence length and the
tokenizer's sha256, which the generator checks before training.
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

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
from nativetok.data.transforms import ImageDecoder
from nativetok.precision import autocast

log = logging.getLogger(__name__)


def encode_ids(ids: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, ids.astype(np.uint16 if ids.max(initial=0) < 2**16 else np.int32))
    return buffer.getvalue()


def decode_ids(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class TokenDecoder:
    """Token-shard sample -> {"tokens": long [K], "label": int, "key": str}; in training, the flipped
    image's tokens half of the time when the shard has them and `flip` is on."""

    def __init__(self, train: bool, flip: bool):
        self.flip = flip and train

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        if "tokens.npy" not in sample or "cls" not in sample:
            raise KeyError(f"sample {sample.get('__key__')} lacks tokens.npy or cls")
        field = "flip.npy" if self.flip and "flip.npy" in sample and rng.random() < 0.5 else "tokens.npy"
        ids = torch.from_numpy(decode_ids(sample[field]).astype(np.int64))
        return {"tokens": ids, "label": int(sample["cls"]), "key": sample["__key__"]}


def process_rank() -> Tuple[int, int]:
    """(rank, world size) of this process: torch.distributed, torchrun's or SLURM's variables, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ and world_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[world_key])
    return 0, 1


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
) -> Optional[DatasetIndex]:
    """Encode the image shards of `image_index` into token shards under `out`; rank 0 writes the index.

    `precision` bf16-mixed or 16-mixed encodes under autocast (faster on a GPU; a code whose distance ties
    within the lower precision may come out differently than in fp32). `out` holding shards of other
    inputs is refused, or with `force` emptied of them first."""
    from nativetok.checkpoints import file_sha256, read_checkpoint, tokenizer_from_checkpoint

    rank, world = process_rank()
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    checkpoint = read_checkpoint(tokenizer_path, "tokenizer")
    tokenizer = tokenizer_from_checkpoint(checkpoint, device=device)
    images = DatasetIndex.load(image_index)
    if (images.image_size, images.channels) != (tokenizer.image_size, tokenizer.channels) and images.image_size:
        raise DataError(
            f"{image_index} holds {images.channels}x{images.image_size}px images but the tokenizer "
            f"{tokenizer_path} expects {tokenizer.channels}x{tokenizer.image_size}px"
        )
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
    if rank == 0:
        claim_folder(out, manifest, name, force)
    else:
        wait_for_claim(out, manifest, name, force, wait_seconds)
    jobs = []
    for split in splits:
        for number, (path, entry) in enumerate(zip(images.shard_paths(split), images.split(split).shards)):
            target = out / shard_name(name, split, number)
            if number % world == rank and not target.is_file():
                jobs.append((ShardSpec(path, entry.samples), target))
    total = sum(spec.samples or 0 for spec, _ in jobs)
    log.info("rank %d of %d: %d shards (%d images) to tokenize on %s", rank, world, len(jobs), total, device)
    with tqdm(total=total, desc=f"tokenize (rank {rank})", unit="img", disable=rank != 0) as progress:
        for spec, target in jobs:
            _tokenize_shard(tokenizer, spec, target, batch_size, flip, device, progress, precision)
    if rank != 0:
        return None
    files = {split: [shard_name(name, split, n) for n in range(len(images.split(split).shards))] for split in splits}
    _wait_for([out / f for names in files.values() for f in names], wait_seconds)
    index_splits = {
        split: SplitIndex([ShardEntry(f, count_samples(out / f)) for f in names]) for split, names in files.items()
    }
    meta = {
        "codebook_size": tokenizer.quantizer.codebook_size,
        "num_tokens": tokenizer.num_active,
        "tokenizer": str(tokenizer_path),
        "tokenizer_sha256": tokenizer_sha256,
        "tokenizer_kind": tokenizer.kind,
        "flip": flip,
    }
    index = DatasetIndex(
        name, images.image_size, images.channels, images.classes, index_splits, fmt="npy", tokens=meta, root=out,
        provenance=manifest.to_json(),
    )
    index.save(out)
    counts = {split: index_splits[split].samples for split in splits}
    log.info("wrote %s: %s token sequences of %d ids (codebook %d)", out / "index.json", counts,
             meta["num_tokens"], meta["codebook_size"])
    return index
