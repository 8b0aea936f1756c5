"""Shared fixtures: the real embedded Fashion-MNIST shards (built by `make data`) and small copies of them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FMNIST_INDEX = REPO / "data" / "fmnist" / "index.json"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def fmnist_index() -> Path:
    if not FMNIST_INDEX.is_file():
        pytest.fail(f"{FMNIST_INDEX} is missing: run `make data` (make test does it) before the tests")
    return FMNIST_INDEX


@pytest.fixture()
def shard_copy(tmp_path, fmnist_index):
    """Copy chosen shards of the real data into tmp_path; returns a function (split, numbers) -> paths."""

    def copy(split: str, numbers):
        paths = []
        for n in numbers:
            source = fmnist_index.parent / f"fmnist-{split}-{n:06d}.tar"
            target = tmp_path / source.name
            shutil.copyfile(source, target)
            paths.append(target)
        return paths

    return copy


@pytest.fixture()
def images(fmnist_index):
    """Six real validation images in [0, 1]."""
    from nativetok.config.schema import DataConfig
    from nativetok.data import ImageShardsDataModule

    module = ImageShardsDataModule(DataConfig(index=str(fmnist_index), batch_size=6, num_workers=0))
    batch = next(iter(module.make_stream(False)))
    return batch["image"].float() / 255


# A tokenizer small enough for a CPU test to train it for a few steps in seconds.
TINY = [
    "data.batch_size=16",
    "data.num_workers=0",
    "data.val_samples=64",
    "data.shuffle_buffer=64",
    "tokenizer.patch_size=8",
    "tokenizer.num_tokens=8",
    "tokenizer.mit.width=32",
    "tokenizer.mit.depth=1",
    "tokenizer.mit.heads=2",
    "tokenizer.latent_width=16",
    "tokenizer.experts.depth=2",
    "tokenizer.experts.heads=2",
    "tokenizer.decoder.width=32",
    "tokenizer.decoder.depth=1",
    "tokenizer.decoder.heads=2",
    "tokenizer.quantizer.codebook_size=32",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.images_every_n_steps=0",
    "optim.warmup_steps=2",
    "growth.stages=[]",
]


@pytest.fixture()
def tiny_config(tmp_path, fmnist_index):
    """The default experiment shrunk for tests, writing into tmp_path; extra key=value overrides apply last."""
    from nativetok.config import load_config

    def make(*overrides: str):
        return load_config(
            REPO / "experiments" / "fmnist_tiny.yaml",
            TINY + [f"data.index={fmnist_index}", f"run.dir={tmp_path / 'run'}", *overrides],
        )

    return make


# A tiny trained tokenizer (codebook 32, 8 tokens) checked in with tests/test_written_before.py's files: the one a
# stage-2 test decodes with unless it names another (a GeneratorModule loads its tokenizer in `setup`).
TINY_TOKENIZER = REPO / "tests" / "data" / "written_before" / "tok" / "checkpoints" / "last.ckpt"


def tiny_generator_config(tmp_path, kind: str = "ar", *overrides: str):
    """A stage-2 experiment small enough to train in seconds on `random_token_batches`, writing into tmp_path,
    decoding with TINY_TOKENIZER and reading no token shards unless the overrides say otherwise."""
    from nativetok.config import load_config

    return load_config(REPO / "experiments" / f"fmnist_tiny_{kind}.yaml", [
        "generator.codebook_size=32", "generator.num_tokens=8", "generator.width=32", "generator.depth=1",
        "generator.heads=2", f"run.dir={tmp_path}", "trainer.progress_bar=false", "trainer.val_every_n_steps=100",
        f"generator.tokenizer={TINY_TOKENIZER}", f"data.index={Path(tmp_path) / 'no_tokens' / 'index.json'}",
        *overrides])


def trained_tokenizer_and_generator(root: Path, fmnist_index: str):
    """A tiny tokenizer and an AR generator pinned to it, both with moving averages and trained two steps (the
    tokenizer validated on 16 images), under root/tok and root/gen: their last.ckpt paths."""
    from nativetok.config import load_config
    from nativetok.lit.train import build_trainer, generator_module, train_tokenizer

    train_tokenizer(load_config(REPO / "experiments" / "fmnist_tiny.yaml", TINY + [
        f"data.index={fmnist_index}", f"run.dir={root / 'tok'}", "trainer.max_steps=2", "trainer.val_every_n_steps=2",
        "data.val_samples=16", "optim.ema_decay=0.5"]))
    tokenizer = root / "tok" / "checkpoints" / "last.ckpt"
    config = tiny_generator_config(root / "gen", "ar", f"generator.tokenizer={tokenizer}", "optim.ema_decay=0.5",
                                   "trainer.max_steps=2", f"data.index={root / 'no_tokens' / 'index.json'}")
    module = generator_module(config)
    module.load_tokenizer()  # pins it
    build_trainer(config, [], root / "gen").fit(module, train_dataloaders=random_token_batches())
    return tokenizer, root / "gen" / "checkpoints" / "last.ckpt"


def random_token_batches():
    """Eight batches of eight random 8-token sequences over 32 codes, with labels cycling through 10 classes."""
    from torch.utils.data import DataLoader

    tokens = torch.randint(0, 32, (64, 8), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"tokens": t, "label": torch.tensor(i % 10)} for i, t in enumerate(tokens)], batch_size=8)
