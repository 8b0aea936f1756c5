"""Progress as a batch job's log sees it: the long commands, run for real without a terminal, log timed lines
and never a bar's carriage returns; on a terminal a bar shows and log records are written above it. Also the
grid `nativetok sample` writes: enlarged and named like the training grids."""

from __future__ import annotations

import gzip
import io
import logging
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nativetok.config import load_config
from nativetok.data.fmnist import CLASSES
from nativetok.lit.callbacks import labelled_grid
from nativetok.lit.train import train_generator, train_tokenizer
from nativetok.progress import Bar, LogProgress, duration, per_second, track

from .conftest import REPO, TINY, tiny_generator_config

LINE = r"\S+ nativetok\.progress: {desc}: (\d+)/(\d+) \(\d+\.\d%\) \| \S+ {unit}/s \| (ETA|done in) \d\d:\d\d:\d\d"


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as Fashion-MNIST ships them (gzip, unsigned bytes)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.tobytes())


def nativetok(*args: str, cache: Path) -> str:
    """A command's whole log, run as a batch job runs it: stdout and stderr are pipes, no SLURM terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(NATIVETOK_CACHE=str(cache), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "nativetok", *args], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def finished(log: str, desc: str, unit: str) -> list:
    """(done, total) of the final progress lines of the loops named `desc`; none may hold a carriage return."""
    assert "\r" not in log, log[-2000:]
    pattern = re.compile(LINE.format(desc=re.escape(desc), unit=unit))
    return [(int(m.group(1)), int(m.group(2))) for m in pattern.finditer(log) if m.group(3) == "done in"]


def tiny_inputs(root: Path) -> None:
    """Fashion-MNIST IDX files of 48 + 32 random images in `root/raw`, an image folder tree of 2 classes x 3
    images per split in `root/tree`."""
    rng = np.random.default_rng(0)
    (root / "raw").mkdir()
    for prefix, count in (("train", 48), ("t10k", 32)):
        write_idx(root / "raw" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28), np.uint8))
        write_idx(root / "raw" / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(count) % 10).astype(np.uint8))
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = root / "tree" / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 40), np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """Every long command run once, chained on tiny inputs: the IDX files and the folder tree sharded, a
    tokenizer trained for 2 steps tokenizes the shards, a generator trained on its tokens samples and is
    evaluated."""
    root = tmp_path_factory.mktemp("commands")
    cache, images = root / "cache", root / "images" / "index.json"
    tokenizer = root / "tok" / "checkpoints" / "last.ckpt"
    tiny_inputs(root)
    found = {
        "shard fmnist": nativetok("shard", "fmnist", "--raw", str(root / "raw"), "--out", str(images.parent),
                                  "--per-shard", "16", cache=cache),
        "shard folder": nativetok("shard", "folder", "--root", str(root / "tree"), "--out", str(root / "folder"),
                                  "--name", "tree", "--size", "32", "--per-shard", "2", "--format", "png",
                                  "--channels", "1", "--workers", "1", cache=cache),
    }
    train_tokenizer(load_config(REPO / "experiments" / "fmnist_tiny.yaml", TINY + [
        f"data.index={images}", f"run.dir={root / 'tok'}", "trainer.max_steps=2", "trainer.val_every_n_steps=2",
        "data.val_samples=32"]))
    found["tokenize"] = nativetok("tokenize", "--tokenizer", str(tokenizer), "--data", str(images), "--out",
                                  str(root / "tokens"), "--batch-size", "16", cache=cache)
    train_generator(tiny_generator_config(
        root / "gen", "ar", f"generator.tokenizer={tokenizer}", f"data.index={root / 'tokens' / 'index.json'}",
        "trainer.max_steps=2", "data.batch_size=16", "data.num_workers=0", "trainer.images_every_n_steps=0",
        "sampling.grid_per_class=1"))
    generator = str(root / "gen" / "checkpoints" / "last.ckpt")
    found["sample"] = nativetok("sample", "--generator", generator, "--out", str(root / "samples"), "--classes", "0",
                                "3", "--per-class", "3", "--batch-size", "4", "--device", "cpu", cache=cache)
    found["eval-fid"] = nativetok("eval-fid", "--generator", generator, "--num", "4", "--reference-images", "8",
                                  "--data", str(images), "--device", "cpu", "--out", str(root / "fid.json"),
                                  cache=cache)
    found["samples"] = root / "samples"
    return found


def test_shard_logs_timed_lines_per_split(logs):
    assert finished(logs["shard fmnist"], "fmnist train", "shard") == [(3, 3)]
    assert finished(logs["shard fmnist"], "fmnist val", "shard") == [(2, 2)]
    assert finished(logs["shard folder"], "tree train", "shard") == [(3, 3)]
    assert finished(logs["shard folder"], "tree val", "shard") == [(3, 3)]


def test_tokenize_logs_timed_lines(logs):
    assert finished(logs["tokenize"], "tokenize (rank 0)", "img") == [(80, 80)]


def test_sample_and_eval_fid_log_timed_lines(logs):
    assert finished(logs["sample"], "sampling", "batch") == [(2, 2)]
    assert finished(logs["eval-fid"], "sampling", "batch") == [(1, 1)]
    assert "\r" not in logs["eval-fid"]  # Inception's loop too (it reports from 3 batches of 50 images on)


def test_the_sample_grid_is_enlarged_and_its_rows_named_by_class(logs):
    folder = logs["samples"]
    files = sorted((folder / "images").glob("*.png"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(f))) for f in files]).unsqueeze(1).float() / 255
    expected = labelled_grid(images.split(3), [f"0 {CLASSES[0]}", f"3 {CLASSES[3]}"])
    grid = torch.from_numpy(np.array(Image.open(folder / "grid.png").convert("RGB"))).permute(2, 0, 1).float() / 255
    assert grid.shape == expected.shape and grid.shape[1] == 2 * (64 + 2) + 2  # 32 px images shown at 64 px
    assert (grid - expected).abs().max() <= 0.5 / 255 + 1e-6
    left = grid.shape[2] - (3 * (64 + 2) + 2)
    for row in range(2):  # black text in each row's band of the label column
        assert grid[:, 2 + row * 66: (row + 1) * 66, :left].min() < 0.3


def test_on_a_terminal_a_bar_shows_and_log_records_go_above_it(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [console])
    bar = track(range(4), desc="sampling", unit="batch")
    assert isinstance(bar, Bar)
    for number in bar:
        if number == 1:
            logging.getLogger("nativetok.test").warning("halfway")
    shown = terminal.getvalue()
    (line,) = [line for line in shown.split("\n") if "halfway" in line]
    assert line.split("\r")[-1] == "halfway"  # on a line of its own, the bar cleared first
    assert "4/4" in shown.split("\n")[-2]  # the bar goes on below it to the end
    assert root.handlers == [console]  # the console is the console again once the bar is closed


def test_without_a_terminal_a_loop_logs_lines_and_a_last_one(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(track(range(3)), LogProgress)
    assert isinstance(track(range(3), disable=True), Bar)  # other ranks: nothing at all
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(track(range(3)), LogProgress)  # a batch job that a site gave a pty
    with caplog.at_level(logging.INFO, logger="nativetok.progress"):
        list(LogProgress(range(4), desc="every step", unit="batch", every=0))
        list(LogProgress(range(4), desc="quiet", unit="batch", every=3600))
        with LogProgress(total=None, desc="open", unit="img") as progress:
            progress.update(5)
    lines = [r.getMessage() for r in caplog.records]
    assert [re.sub(r"\| \S+ batch/s", "| R batch/s", line) for line in lines[:4]] == [
        "every step: 1/4 (25.0%) | R batch/s | ETA 00:00:00",
        "every step: 2/4 (50.0%) | R batch/s | ETA 00:00:00",
        "every step: 3/4 (75.0%) | R batch/s | ETA 00:00:00",
        "every step: 4/4 (100.0%) | R batch/s | done in 00:00:00",  # the end once, not also as a timed line
    ]
    assert re.fullmatch(r"quiet: 4/4 \(100\.0%\) \| \S+ batch/s \| done in 00:00:00", lines[4])
    assert re.fullmatch(r"open: 5 img \| \S+ img/s \| done in 00:00:00", lines[5]) and len(lines) == 6


def test_rates_and_durations_read_plainly():
    assert per_second(1843, 1.0, "img") == "1843 img/s" and per_second(18430, 10.0, "img") == "1843 img/s"
    assert per_second(1, 2.0, "batch") == "0.5 batch/s" and per_second(2, 3.0, "batch") == "0.667 batch/s"
    assert per_second(5, 0.0, "img").endswith(" img/s")  # no division by zero on the first instant
    assert duration(0) == "00:00:00" and duration(3725.9) == "01:02:05" and duration(2 * 86400 + 61) == "2d 00:01:01"
