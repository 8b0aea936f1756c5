"""`ImageShardsDataModule`: the image shards of a dataset index (or brace patterns) as Lightning data."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from braceexpand import braceexpand

from nativetok.config.schema import DataConfig
from nativetok.data.shards import ALLOW_PIPES_HINT, DatasetIndex, is_pipe, is_url
from nativetok.data.stream import (
    DataError,
    EpochLoader,
    ShardSpec,
    ShardStream,
    SkipCounts,
    limit_samples,
    to_float_images,
)
from nativetok.data.tokens import TokenDecoder, decode_ids
from nativetok.data.transforms import ImageDecoder

log = logging.getLogger(__name__)


class ShardsDataModule(pl.LightningDataModule):
    """Shard discovery, rank-aware streams and loaders; subclasses say how a sample decodes and what their
    index must hold (`HOLDS`: an index of the other kind is refused by `check_index`)."""

    HOLDS = "images"

    def __init__(self, config: DataConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.seed = seed
        self.skips = SkipCounts()
        self.index: Optional[DatasetIndex] = (
            DatasetIndex.load(config.index, allow_pipes=config.allow_pipes) if config.index else None
        )
        self._streams: dict = {}

    # -- what there is to read -------------------------------------------------------------------
    def _split_name(self, train: bool) -> str:
        return self.config.train_split if train else self.config.val_split

    def shard_specs(self, train: bool) -> List[ShardSpec]:
        """The shards of a split, with sample counts where the index knows them; missing local files dropped.

        Shards named by URLs or `pipe:` commands cannot be checked before they are read: one that turns out
        unreadable is skipped and counted then (an error under data.strict), like a corrupt local shard."""
        pattern = self.config.train_shards if train else self.config.val_shards
        known = {}
        if self.index is not None:
            for name in self.index.splits:
                paths = self.index.shard_paths(name)
                known.update((_where(p), e.samples) for p, e in zip(paths, self.index.splits[name].shards))
        if pattern:
            urls = list(braceexpand(pattern))
            source = f"pattern '{pattern}'"
            if any(map(is_pipe, urls)) and not self.config.allow_pipes:
                side = "train" if train else "val"
                raise DataError(f"data.{side}_shards '{pattern}' runs a pipe: command per shard; {ALLOW_PIPES_HINT}")
        else:
            side, split = ("train" if train else "val"), self._split_name(train)
            if self.index is None:
                raise DataError(f"data.{side}_shards is empty and there is no index")
            if split not in self.index.splits:
                raise DataError(
                    f"data.{side}_split '{split}' is not a split of {self.config.index} "
                    f"(it has {', '.join(self.index.splits) or 'none'})"
                )
            urls = self.index.shard_paths(split)
            source = f"split '{split}' of {self.config.index}"
        specs = [ShardSpec(url, known.get(_where(url)), pipe_allowed=bool(pattern) and self.config.allow_pipes)
                 for url in urls]
        remote = sum(is_url(s.url) for s in specs)
        if remote:
            log.info("%d of %d shards of %s are URLs or commands: checked as they are read", remote, len(specs), source)
        missing = [s.url for s in specs if not is_url(s.url) and not Path(s.url).is_file()]
        if missing:
            message = f"{len(missing)} of {len(specs)} shards of {source} are missing: {', '.join(missing[:3])}"
            if self.config.strict or len(missing) == len(specs):
                raise DataError(message)
            log.warning("%s; skipping them", message)
            for _ in missing:
                self.skips.add("shard")
            specs = [s for s in specs if s.url not in missing]
        if not specs:
            raise DataError(f"{source} matches no shards")
        return specs

    def check_index(self) -> None:
        if self.index is None:
            return
        self.index.require(self.HOLDS)
        c = self.config
        if self.index.channels != c.channels:
            raise DataError(f"data.channels is {c.channels} but {c.index} holds {self.index.channels}-channel images")
        if len(self.index.classes) != c.num_classes:
            raise DataError(f"data.num_classes is {c.num_classes} but {c.index} has {len(self.index.classes)} classes")

    # -- ranks and batch sizes ---------------------------------------------------------------------
    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def per_device_batch(self, world_size: int, train: bool = True) -> int:
        total = self.config.batch_size if train else (self.config.val_batch_size or self.config.batch_size)
        if train and total % world_size:
            raise DataError(f"data.batch_size {total} is not divisible by the {world_size} devices")
        return max(1, total // world_size)

    def train_samples_per_epoch(self, specs: List[ShardSpec]) -> int:
        if self.config.train_samples_per_epoch:
            return self.config.train_samples_per_epoch
        counts = [s.samples for s in specs]
        if any(c is None for c in counts):
            raise DataError("data.train_samples_per_epoch is needed: shard sizes are unknown without the index")
        return sum(counts)

    def decoder(self, train: bool):
        raise NotImplementedError

    def make_stream(self, train: bool, rank: int = 0, world_size: int = 1) -> ShardStream:
        specs = self.shard_specs(train)
        batch = self.per_device_batch(world_size, train)
        batches_per_rank = None
        if train:
            batches_per_rank = self.train_samples_per_epoch(specs) // (batch * world_size)
            if batches_per_rank < 1:
                raise DataError(
                    f"an epoch of {self.train_samples_per_epoch(specs)} samples is less than one global batch "
                    f"of {batch * world_size}"
                )
        elif self.config.val_samples:
            specs = limit_samples(specs, self.config.val_samples)
        return ShardStream(
            specs,
            self.decoder(train),
            batch,
            rank=rank,
            world_size=world_size,
            num_workers=self.config.num_workers,
            train=train,
            batches_per_rank=batches_per_rank,
            shuffle_buffer=self.config.shuffle_buffer if train else 0,
            seed=self.seed,
            strict=self.config.strict,
            skips=self.skips,
        )

    # -- Lightning ---------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        self.check_index()
        rank, world = self.rank_and_world()
        if stage in (None, "fit"):
            self._streams["train"] = self.make_stream(True, rank, world)
            log.info(
                "data: global batch %d = %d per device x %d devices; %d batches per rank per epoch",
                self.config.batch_size, self._streams["train"].batch_size, world,
                self._streams["train"].batches_per_rank,
            )
        if stage in (None, "fit", "validate"):
            self._streams["val"] = self.make_stream(False, rank, world)

    def _loader(self, name: str) -> EpochLoader:
        if name not in self._streams:
            self.setup()
        workers = self.config.num_workers
        return EpochLoader(
            self._streams[name],
            progress_fn=self._progress if name == "train" else lambda: (0, 0),
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )

    def _progress(self) -> tuple[int, int]:
        """(epoch, batches trained on in it) from the trainer: what a checkpoint must remember of the data."""
        if self.trainer is None:
            return 0, 0
        return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> EpochLoader:
        return self._loader("train")

    def val_dataloader(self) -> EpochLoader:
        return self._loader("val")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return to_float_images(batch)


def _where(url: str) -> str:
    """What names one shard whether the index or a pattern gives it: a local file's resolved path, a URL as it is."""
    return url if is_url(url) else str(Path(url).resolve())


class ImageShardsDataModule(ShardsDataModule):
    """Images in [0, 1] ({"image": float [B, C, H, W], "label": long [B]}) from webdataset shards."""

    def decoder(self, train: bool) -> ImageDecoder:
        c = self.config
        return ImageDecoder(c.image_size, c.channels, train=train, hflip=c.hflip)


class TokenShardsDataModule(ShardsDataModule):
    """Token sequences ({"tokens": long [B, K], "label": long [B]}) from pre-tokenized shards.

    `codebook_size` and `num_tokens` are what the generator expects; shards written by another
    tokenizer are refused before training starts.
    """

    HOLDS = "tokens"

    def __init__(self, config: DataConfig, codebook_size: int, num_tokens: int, seed: int = 0):
        super().__init__(config, seed)
        self.expected = {"codebook_size": codebook_size, "num_tokens": num_tokens}

    def check_index(self) -> None:
        super().check_index()
        found = (self.index.tokens or {}) if self.index is not None else {}
        for key, value in self.expected.items():
            if key in found and found[key] != value:
                raise DataError(
                    f"token shards {self.config.index} have {key} {found[key]} but generator.{key} is {value}"
                )

    def decoder(self, train: bool) -> CheckedTokenDecoder:
        return CheckedTokenDecoder(
            TokenDecoder(train=train, flip=self.config.hflip), num_classes=self.config.num_classes, **self.expected
        )


class CheckedTokenDecoder:
    """A token sample the generator cannot take (an id outside the codebook, another sequence length, a label
    outside the classes) raises ValueError here, so the stream skips and counts it (or stops under
    data.strict) instead of failing deep in torch, on a GPU as a device-side assert. Both the tokens and the
    flipped image's tokens are checked, so whether a sample is skipped never depends on the random flip."""

    def __init__(self, decode: TokenDecoder, codebook_size: int, num_tokens: int, num_classes: int):
        self.decode = decode
        self.codebook_size = codebook_size
        self.num_tokens = num_tokens
        self.num_classes = num_classes

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        for field in ("tokens.npy", "flip.npy"):
            if field in sample:
                self.check_ids(field, decode_ids(sample[field]))
        item = self.decode(sample, rng)
        if not 0 <= item["label"] < self.num_classes:
            raise ValueError(f"label {item['label']} is outside the {self.num_classes} classes of data.num_classes")
        return item

    def check_ids(self, field: str, ids: np.ndarray) -> None:
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{field} holds {ids.dtype} values, not integer token ids")
        if ids.shape != (self.num_tokens,):
            raise ValueError(f"{field} has shape {list(ids.shape)}, not the {self.num_tokens} tokens of a sequence")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.codebook_size:
            raise ValueError(f"{field} has ids from {low} to {high}, outside the codebook [0, {self.codebook_size})")
