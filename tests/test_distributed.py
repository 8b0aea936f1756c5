"""Real multi-process DDP on CPU (2 processes, gloo) for stage 1 and stage 2 on uneven real shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nativetok.config import load_config
from nativetok.data import DatasetIndex
from nativetok.data.shards import ShardEntry, SplitIndex, write_shard
from nativetok.lit.train import train_tokenizer
from nativetok.pipelines.tokenize import tokenize_shards

from .conftest import REPO, TINY
from .test_data import read_raw

SCRIPT = '''
import hashlib, json, sys
from pathlib import Path
import pytorch_lightning as pl
from nativetok.config import load_config
from nativetok.lit.train import train_generator, train_tokenizer

experiment, out, overrides = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])


class Record(pl.Callback):
    """Keys of the samples each rank trains and validates on, and a digest of its final weights."""

    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.train += list(batch["key"])

    def on_validation_epoch_start(self, trainer, module):
        self.val.append([])

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.val[-1] += list(batch["key"])

    def on_train_end(self, trainer, module):
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in module.parameters())
        record = {"train": self.train, "val": self.val, "world": trainer.world_size, "steps": trainer.global_step,
                  "digest": hashlib.sha256(weights).hexdigest()}
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


config = load_config(experiment, overrides)
(train_tokenizer if config.stage == "tokenizer" else train_generator)(config, [Record()])
'''


@pytest.fixture(scope="module")
def uneven(tmp_path_factory, fmnist_index):
    """Training shards of 700, 300 and 100 real images and one validation shard, with their index."""
    root = tmp_path_factory.mktemp("uneven")
    index = DatasetIndex.load(fmnist_index)
    raw = read_raw(Path(index.shard_paths("train")[0]))
    entries, start = [], 0
    for number, size in enumerate((700, 300, 100)):
        write_shard(root / f"fmnist-train-{number:06d}.tar", raw[start : start + size])
        entries.append(ShardEntry(f"fmnist-train-{number:06d}.tar", size))
        start += size
    (root / "fmnist-val-000000.tar").symlink_to(index.shard_paths("val")[0])
    index.splits = {"train": SplitIndex(entries), "val": SplitIndex([ShardEntry("fmnist-val-000000.tar", 2000)])}
    index.root = root
    index.save(root)
    return root / "index.json"


def run_ddp(tmp_path: Path, experiment: Path, overrides: list, script_text: str = SCRIPT) -> list:
    """Train on 2 CPU processes; each rank writes rank<r>.json (or another record `script_text` chooses)."""
    script = tmp_path / "ddp_run.py"
    script.write_text(script_text)
    out = tmp_path / "records"
    out.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    result = subprocess.run(
        [sys.executable, str(script), str(experiment), str(out), json.dumps(overrides + ddp)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]


def check_ranks(records: list, run_dir: Path, steps: int, val_count: int) -> None:
    rank0, rank1 = records
    assert rank0["world"] == rank1["world"] == 2 and rank0["steps"] == rank1["steps"] == steps
    assert len(rank0["train"]) == len(rank1["train"]) == steps * 8  # 16 global = 8 per device, no hang
    assert not set(rank0["train"]) & set(rank1["train"])  # each rank sees different samples
    assert len(rank0["val"]) == len(rank1["val"]) >= 1
    for val0, val1 in zip(rank0["val"], rank1["val"]):  # evaluation: each sample exactly once
        assert len(val0) + len(val1) == val_count and not set(val0) & set(val1)
    assert rank0["digest"] == rank1["digest"]  # identical weights after training
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(files) == 2 and files[1] == "last.ckpt" and files[0].startswith("best-"), files


def test_stage1_ddp_with_growth_on_uneven_shards(tmp_path, uneven):
    overrides = TINY + [
        f"data.index={uneven}", "data.batch_size=16", "data.val_samples=100", f"run.dir={tmp_path / 'run'}",
        "trainer.max_steps=6", "trainer.val_every_n_steps=3", "tokenizer.quantizer.restart_dead_after=2",
        "growth.stages=[{step: 0, experts: 4}, {step: 3, experts: 8, train: [decoder]}]",
    ]
    records = run_ddp(tmp_path, REPO / "experiments" / "fmnist_tiny.yaml", overrides)
    check_ranks(records, tmp_path / "run", steps=6, val_count=100)


def test_stage2_ddp_on_uneven_token_shards(tmp_path, uneven):
    tokenizer = load_config(REPO / "experiments" / "fmnist_tiny.yaml", TINY + [
        f"data.index={uneven}", f"run.dir={tmp_path / 'tok'}", "trainer.max_steps=2", "trainer.val_every_n_steps=2",
    ])
    train_tokenizer(tokenizer)
    checkpoint = tmp_path / "tok" / "checkpoints" / "last.ckpt"
    tokenize_shards(str(checkpoint), str(uneven), tmp_path / "tokens", batch_size=500)
    overrides = [
        f"data.index={tmp_path / 'tokens' / 'index.json'}", f"generator.tokenizer={checkpoint}",
        "generator.codebook_size=32", "generator.num_tokens=8", "generator.width=32", "generator.depth=1",
        "generator.heads=2", "data.batch_size=16", "data.num_workers=0", "data.val_samples=100", "data.hflip=false",
        f"run.dir={tmp_path / 'gen'}", "trainer.max_steps=4", "trainer.val_every_n_steps=2",
        "trainer.images_every_n_steps=0", "trainer.progress_bar=false", "sampling.grid_per_class=1",
        "optim.ema_decay=0.9",
    ]
    records = run_ddp(tmp_path, REPO / "experiments" / "fmnist_tiny_ar.yaml", overrides)
    check_ranks(records, tmp_path / "gen", steps=4, val_count=100)
