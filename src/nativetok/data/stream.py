"""Streaming webdataset shards to DDP ranks and dataloader workers, exactly.

Work is split hierarchically: first across ranks, then across each rank's workers. At each level the
shards are dealt out when there are enough of them, otherwise every consumer reads the same shards and
keeps every n-th sample, so a split is always disjoint and complete.

Training streams have a fixed length: every rank yields `batches_per_rank` full batches per epoch,
cycling through its shards again if it runs out (uneven shards never leave a rank short, so DDP never
hangs on a missing batch). Evaluation streams read each sample exactly once across all ranks and
workers, with a final partial batch per worker.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import random
import tarfile
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from nativetok.data.shards import DataError, open_location

log = logging.getLogger(__name__)

Decode = Callable[[dict, random.Random], dict]


@dataclass(frozen=True)
class ShardSpec:
    url: str
    samples: Optional[int] = None  # from the index; None when unknown (a brace pattern)
    limit: Optional[int] = None  # read only the first `limit` samples
    # A `pipe:` command is run only when the user named it and opted in (data.allow_pipes); never from an index.
    pipe_allowed: bool = False

    @property
    def count(self) -> Optional[int]:
        if self.samples is None:
            return self.limit
        return self.samples if self.limit is None else min(self.samples, self.limit)


class SkipCounts:
    """Shards and samples skipped because they could not be read, shared with worker processes."""

    def __init__(self) -> None:
        self._shards = mp.Value("q", 0)
        self._samples = mp.Value("q", 0)

    def add(self, kind: str) -> None:
        counter = self._shards if kind == "shard" else self._samples
        with counter.get_lock():
            counter.value += 1

    @property
    def shards(self) -> int:
        return self._shards.value

    @property
    def samples(self) -> int:
        return self._samples.value

    def as_dict(self) -> Dict[str, int]:
        return {"skipped_shards": self.shards, "skipped_samples": self.samples}


@dataclass(frozen=True)
class Share:
    """What one consumer reads: these shards, keeping samples whose running index i has i % stride == offset."""

    shards: Tuple[ShardSpec, ...]
    stride: int = 1
    offset: int = 0

    def split(self, parts: int, part: int) -> "Share":
        if self.stride == 1 and len(self.shards) >= parts:
            return Share(self.shards[part::parts])
        return Share(self.shards, self.stride * parts, self.offset + self.stride * part)

    def count(self) -> Optional[int]:
        counts = [s.count for s in self.shards]
        if any(c is None for c in counts):
            return None
        total = sum(counts)
        return len(range(self.offset, total, self.stride))


def limit_samples(shards: Sequence[ShardSpec], samples: int) -> List[ShardSpec]:
    """The shortest prefix of `shards` holding `samples` samples, the last one cut to fit."""
    chosen, left = [], samples
    for spec in shards:
        if left <= 0:
            break
        if spec.samples is None:
            raise DataError(f"cannot take the first {samples} samples: the count of {spec.url} is unknown")
        chosen.append(replace(spec, limit=min(spec.samples, left)))
        left -= spec.samples
    return chosen


SHARD_ERRORS = (OSError, tarfile.TarError, ValueError)


def read_shard(spec: ShardSpec) -> Iterator[dict]:
    """The raw samples (dicts of bytes by extension, with `__key__`) of one shard, in order.

    The shard is opened with `webdataset.gopen`: a local path, a `file:` or http(s) URL (through curl), or
    a `pipe:` command whose output is the tar where `spec.pipe_allowed` (else a DataError, never skipped).
    Raises one of SHARD_ERRORS where the shard is missing, the tar is corrupt, the command fails, or it ends
    short of the samples its index lists (a tar cut off between two files reads as a complete one); the
    samples read before that point have been yielded.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = open_location(spec.url, spec.pipe_allowed)
    read, complete = 0, False
    try:
        for sample in group_by_keys(tar_file_expander([{"url": spec.url, "stream": stream}])):
            if spec.limit is not None and read >= spec.limit:
                break
            yield sample
            read += 1
        else:
            complete = True
    finally:
        _close(stream, check=complete)
    if complete and spec.count is not None and read < spec.count:
        raise ValueError(f"{spec.url} ends after {read} of the {spec.count} samples its index lists (truncated?)")


def _close(stream, check: bool) -> None:
    """Close a shard's stream. The command behind a `pipe:` or URL stream read to the end (`check`) reports
    its failure here; one left early (a limit reached, an error, the consumer gone) is killed, not waited
    for (a stalled download would hold the reader for hours), and its exit status ignored."""
    process = getattr(stream, "proc", None)
    if not check and process is not None and process.poll() is None:
        process.kill()
    try:
        stream.close()
    except OSError:
        if check:
            raise


def collate(samples: List[dict]) -> dict:
    return default_collate(samples)


class ShardStream(IterableDataset):
    """Decoded, batched samples from webdataset shards for one rank (see the module docstring)."""

    def __init__(
        self,
        shards: Sequence[ShardSpec],
        decode: Decode,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        train: bool = False,
        batches_per_rank: Optional[int] = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        strict: bool = False,
        skips: Optional[SkipCounts] = None,
    ):
        if not shards:
            raise DataError("no shards to read")
        if train and not batches_per_rank:
            raise DataError("a training stream needs batches_per_rank > 0")
        self.shards = tuple(shards)
        self.decode = decode
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.train = train
        self.batches_per_rank = batches_per_rank
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.strict = strict
        self.skips = skips or SkipCounts()
        self.epoch = 0
        self.skip_batches = 0

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """The epoch decides shard order and shuffling; a resumed pass skips the batches already trained on."""
        self.epoch = epoch
        self.skip_batches = skip_batches

    # -- how work is split -------------------------------------------------------------------
    def share(self, worker: int, workers: int, order: Sequence[ShardSpec] | None = None) -> Share:
        return Share(tuple(order or self.shards)).split(self.world_size, self.rank).split(workers, worker)


    def __len__(self) -> int:
        if self.train:
            return self.batches_per_rank
        workers = max(1, self.num_workers)
        counts = [self.share(w, workers).count() for w in range(workers)]
        if any(c is None for c in counts):
            raise TypeError("the length of a stream over shards of unknown size is unknown")
        return sum(math.ceil(c / self.batch_size) for c in counts)

    # -- reading -------------------------------------------------------------------------------
    def _skip(self, kind: str, message: str) -> None:
        if self.strict:
            raise DataError(f"{message} (data.strict is on)")
        self.skips.add(kind)
        log.warning("skipped a %s: %s", kind, message)

    def _read_shard(self, spec: ShardSpec) -> Iterator[dict]:
        try:
            yield from read_shard(spec)
        except SHARD_ERRORS as error:
            self._skip("shard", f"{spec.url}: {error}")

    def _samples(self, share: Share, rng: random.Random) -> Iterator[dict]:
        index = 0
        for spec in share.shards:
            for raw in self._read_shard(spec):
                keep = index % share.stride == share.offset
                index += 1
                if not keep:
                    continue
                try:
                    yield self.decode(raw, rng)
                except Exception as error:  # a sample that does not decode is skipped, never mislabelled
                    self._skip("sample", f"{spec.url} key {raw.get('__key__')}: {error}")

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: List[dict] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            pick = rng.randrange(len(buffer))
            buffer[pick], sample = sample, buffer[pick]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _batches(self, samples: Iterator[dict], limit: Optional[int], partial: bool) -> Iterator[dict]:
        batch: List[dict] = []
        produced = 0
        for sample in samples:
            if limit is not None and produced >= limit:
                return
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch)
                produced += 1
                batch = []
        if batch and partial and (limit is None or produced < limit):
            yield collate(batch)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if not self.train:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
            share, produced = self.share(worker, workers), 0
            for batch in self._batches(self._samples(share, rng), None, partial=True):
                produced += 1
                yield batch
            if not produced and share.shards and share.count() != 0:  # every shard skipped as unreadable
                raise DataError(f"rank {self.rank} worker {worker}: no readable validation samples: all "
                                f"{len(share.shards)} of its shards were skipped (first: {share.shards[0].url})")
            return
        # Batch b of the epoch comes from role b % workers. The DataLoader asks worker 0 first, so after
        # skipping s batches worker w plays role (w + s) % workers: the order is that of an unbroken epoch.
        role = (worker + self.skip_batches) % workers
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{role}")
        count = len(range(role, self.batches_per_rank, workers))
        skip = len(range(role, self.skip_batches, workers))
        batches = self._batches(self._training_samples(role, workers, rng), count, partial=False)
        for number, batch in enumerate(batches):
            if number >= skip:  # skipped batches are still decoded: random crops and flips stay in step
                yield batch

    def _training_samples(self, worker: int, workers: int, rng: random.Random) -> Iterator[dict]:
        """Endless: round r deals out a fresh permutation of the shards; the caller stops it."""
        round_number = 0
        while True:
            order = list(self.shards)
            random.Random(f"{self.seed}-{self.epoch}-{round_number}").shuffle(order)
            share = self.share(worker, workers, order)
            got = 0
            for sample in self._shuffled(self._samples(share, rng), rng):
                got += 1
                yield sample
            if got == 0 and share.shards:
                raise DataError(
                    f"rank {self.rank} worker {worker}: no readable samples in {len(share.shards)} shards "
                    f"(first: {share.shards[0].url})"
                )
            round_number += 1


class EpochLoader(DataLoader):
    """A DataLoader that tells its stream the epoch, and after a resume the batches to skip, before each pass.

    Lightning only calls `set_epoch` on samplers, and an IterableDataset has none of its own; the
    epoch decides the shard order and shuffling, so each epoch differs. The loader is stateful in
    Lightning's sense: its state (epoch, batches trained on) goes into checkpoints, and a run resumed
    mid-epoch continues with exactly the batches an unbroken run would have seen.
    `progress_fn` returns (epoch, batches trained on in that epoch) from the trainer.
    """

    def __init__(self, dataset: ShardStream, progress_fn: Callable[[], Tuple[int, int]], **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.progress_fn = progress_fn
        self._resume_at: Optional[Tuple[int, int]] = None

    def state_dict(self) -> Dict[str, int]:
        epoch, batches = self.progress_fn()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def __iter__(self):
        epoch, _ = self.progress_fn()
        resume, self._resume_at = self._resume_at, None
        self.dataset.set_position(epoch, resume[1] if resume and resume[0] == epoch else 0)
        return super().__iter__()


def to_float_images(batch: dict) -> dict:
    """uint8 images (cheap to move) become float in [0, 1] after the transfer to the device."""
    if "image" in batch and batch["image"].dtype == torch.uint8:
        batch = dict(batch, image=batch["image"].float().div_(255.0))
    return batch
