"""Two `nativetok tokenize` runs into one folder at the same time: the second is refused while the first
holds the folder's lock, the first completes untouched and releases it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from nativetok.cli import main
from nativetok.config import load_config
from nativetok.data.shards import DatasetIndex, ShardEntry, SplitIndex, shard_name, write_shard
from nativetok.lit.train import train_tokenizer

from .conftest import REPO, TINY
from .test_data import read_raw


def small_world(root: Path, fmnist_index: Path) -> tuple:
    """(image index of 4 train shards and one val shard of 250 real images each, a tokenizer trained one step)."""
    images = root / "images"
    images.mkdir()
    source = read_raw(Path(DatasetIndex.load(fmnist_index).shard_paths("val")[0]))
    splits = {}
    for split, numbers in (("train", range(4)), ("val", range(4, 5))):
        files = [shard_name("mini", split, n - numbers[0]) for n in numbers]
        splits[split] = SplitIndex([ShardEntry(file, write_shard(images / file, source[250 * n : 250 * (n + 1)]))
                                    for file, n in zip(files, numbers)])
    index = DatasetIndex.load(fmnist_index)
    DatasetIndex("mini", index.image_size, index.channels, index.classes, splits, root=images).save(images)
    config = load_config(REPO / "experiments" / "fmnist_tiny.yaml", TINY + [
        f"data.index={images / 'index.json'}", f"run.dir={root / 'tok'}", "trainer.max_steps=1",
        "trainer.val_every_n_steps=100"])
    train_tokenizer(config)
    return images / "index.json", root / "tok" / "checkpoints" / "last.ckpt"


def test_a_second_tokenize_into_a_busy_folder_is_refused_and_the_first_completes(tmp_path, fmnist_index, capsys):
    images, tokenizer = small_world(tmp_path, fmnist_index)
    out = tmp_path / "tokens"
    args = ["tokenize", "--tokenizer", str(tokenizer), "--data", str(images), "--out", str(out), "--splits", "train",
            "--batch-size", "10"]
    first = subprocess.Popen([sys.executable, "-m", "nativetok", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "run.lock").is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert main(args) == 2
    assert first.poll() is None, "the first run ended before the second was tried: the test proves nothing"
    error = capsys.readouterr().err
    assert "in use by another tokenize run" in error and f"pid {first.pid}" in error
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-2000:]
    assert DatasetIndex.load(out / "index.json").split("train").samples == 1000
    assert not (out / "run.lock").exists()
