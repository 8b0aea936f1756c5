"""Derived outputs never mix runs: manifests on token shards, image shards and sample folders, and
generators pinned to their tokenizer by sha256. Each test provokes the mix on real files (and real
processes where a kill is the point)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nativetok import load_tokenizer
from nativetok.checkpoints import CheckpointError, file_sha256, load_generator_tokenizer
from nativetok.cli import build_parser, main
from nativetok.config import load_config
from nativetok.data import DatasetIndex
from nativetok.data.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    SplitIndex,
    shard_name,
    write_shard,
)
from nativetok.data.stream import DataError, ShardSpec, ShardStream
from nativetok.data.tokens import decode_ids
from nativetok.data.transforms import ImageDecoder
from nativetok.eval.samples import SAMPLE_MANIFEST, check_sample_folder
from nativetok.lit.train import train_generator, train_tokenizer
from nativetok.pipelines.sample import sample_to_folder
from nativetok.pipelines.tokenize import tokenize_shards

from .conftest import REPO, TINY
from .test_data import read_raw

SHARDS = {"train": 3, "val": 1}  # 500 real images each
SRC = str(REPO / "src")


@pytest.fixture(scope="module")
def world(tmp_path_factory, fmnist_index):
    """Small image shards, tokenizer A (trained a few steps) and B (A with its codebook rolled by one:
    another file whose every token is A's plus one), and A's token shards."""
    root = tmp_path_factory.mktemp("provenance")
    images = root / "images"
    images.mkdir()
    source = read_raw(Path(DatasetIndex.load(fmnist_index).shard_paths("val")[0]))
    splits, start = {}, 0
    for split, count in SHARDS.items():
        entries = []
        for number in range(count):
            file = shard_name("mini", split, number)
            entries.append(ShardEntry(file, write_shard(images / file, source[start : start + 500])))
            start += 500
        splits[split] = SplitIndex(entries)
    index = DatasetIndex.load(fmnist_index)
    DatasetIndex("mini", index.image_size, index.channels, index.classes, splits, root=images).save(images)
    config = load_config(
        REPO / "experiments" / "fmnist_tiny.yaml",
        TINY + [f"data.index={images / 'index.json'}", f"run.dir={root / 'tok'}", "trainer.max_steps=3",
                "trainer.val_every_n_steps=3"],
    )
    train_tokenizer(config)
    tokenizer_a = root / "tok" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(tokenizer_a, map_location="cpu", weights_only=True)
    for key, value in checkpoint["state_dict"].items():
        if key.endswith("quantizer.codebook"):
            checkpoint["state_dict"][key] = torch.roll(value, 1, dims=0)
    tokenizer_b = root / "tokenizer_b.ckpt"
    torch.save(checkpoint, tokenizer_b)
    tokens_a = root / "tokens_a"
    tokenize_shards(str(tokenizer_a), str(images / "index.json"), tokens_a, batch_size=250)
    return {"root": root, "images": images / "index.json", "a": tokenizer_a, "b": tokenizer_b, "tokens_a": tokens_a}


def encoded(tokenizer: Path, images: Path) -> dict:
    """key -> the ids `tokenizer` gives each image of every split."""
    model, index = load_tokenizer(tokenizer), DatasetIndex.load(images)
    specs = [ShardSpec(path) for split in SHARDS for path in index.shard_paths(split)]
    ids = {}
    for batch in DataLoader(ShardStream(specs, ImageDecoder(32, 1, train=False), 500), batch_size=None):
        ids.update(zip(batch["key"], model.encode(batch["image"].float() / 255).numpy()))
    return ids


def stored(tokens: Path) -> dict:
    index = DatasetIndex.load(tokens / "index.json")
    return {s["__key__"]: decode_ids(s["tokens.npy"]) for split in SHARDS
            for path in index.shard_paths(split) for s in read_raw(Path(path))}


def run_until(command: list, ready, cwd: Path) -> None:
    """Start `command`, SIGKILL it as soon as `ready()` holds (a run killed half way), and wait for it."""
    log = cwd / "killed.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=cwd, env={**os.environ, "PYTHONPATH": SRC}, stdout=stderr,
                                   stderr=stderr)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert process.poll() is None, f"finished before it could be killed: {log.read_text()}"
            assert time.monotonic() < deadline, "never got half way"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()


def test_tokenize_refuses_another_tokenizer_over_a_killed_run_force_rebuilds_and_same_inputs_resume(
    world, tmp_path, capsys
):
    out = tmp_path / "tokens"
    first = out / "mini-tokens-train-000000.tar"
    run_until([sys.executable, "-m", "nativetok", "tokenize", "--tokenizer", str(world["a"]), "--data",
               str(world["images"]), "--out", str(out), "--batch-size", "50"], first.is_file, tmp_path)
    assert not (out / "index.json").exists() and not (out / "mini-tokens-val-000000.tar").exists()
    left = {p.name: p.read_bytes() for p in out.glob("*.tar")}

    args = ["tokenize", "--tokenizer", str(world["b"]), "--data", str(world["images"]), "--out", str(out)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "refusing to mix" in error and "tokenizer_sha256" in error and "--force" in error
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == left and not (out / "index.json").exists()

    assert main(args + ["--force"]) == 0
    index = DatasetIndex.load(out / "index.json")
    assert index.tokens["tokenizer_sha256"] == file_sha256(world["b"]) == index.provenance["tokenizer_sha256"]
    tokens, expected = stored(out), encoded(world["b"], world["images"])
    assert len(tokens) == 2000 and all(np.array_equal(tokens[k], expected[k]) for k in expected)

    # The same inputs again after losing a shard: only that shard is written, the others are kept.
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "mini-tokens-train-000001.tar"}
    (out / "mini-tokens-train-000001.tar").unlink()
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in kept} == kept
    tokens = stored(out)
    assert all(np.array_equal(tokens[k], expected[k]) for k in expected)
    assert main(args + ["--flip"]) == 2  # --flip is another input too
    assert "flip false -> true" in capsys.readouterr().err


def test_two_ranks_replace_another_tokenizers_shards_together(world, tmp_path):
    """torchrun-style ranks with --force: rank 0 clears the folder and claims it, rank 1 waits for that
    before writing its shards, so every shard is the new tokenizer's."""
    out = tmp_path / "tokens"
    shutil.copytree(world["tokens_a"], out)
    command = [sys.executable, "-m", "nativetok", "tokenize", "--tokenizer", str(world["b"]), "--data",
               str(world["images"]), "--out", str(out), "--batch-size", "250", "--force"]
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    ranks = []
    for rank, log in enumerate(logs):
        with open(log, "w") as stderr:
            env = {**os.environ, "PYTHONPATH": SRC, "RANK": str(rank), "WORLD_SIZE": "2"}
            ranks.append(subprocess.Popen(command, env=env, stdout=stderr, stderr=stderr))
    for process, log in zip(ranks, logs):
        assert process.wait(timeout=600) == 0, log.read_text()
    expected = encoded(world["b"], world["images"])
    tokens = stored(out)
    assert len(tokens) == 2000 and all(np.array_equal(t, expected[k]) for k, t in tokens.items())


def class_tree(root: Path) -> Path:
    for split, count in (("train", 5), ("val", 2)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((20, 24), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_shard_folder_refuses_another_size_and_force_rebuilds_every_shard(tmp_path, capsys):
    root, out = class_tree(tmp_path / "tree"), tmp_path / "shards"
    args = ["shard", "folder", "--root", str(root), "--out", str(out), "--name", "tiny", "--per-shard", "2",
            "--format", "png", "--channels", "1", "--workers", "1"]
    assert main(args + ["--size", "16"]) == 0
    (out / "tiny-train-000004.tar").unlink()  # a killed run: the last shard and the index missing
    (out / "index.json").unlink()
    sixteen = {p.name: p.read_bytes() for p in out.glob("*.tar")}

    assert main(args + ["--size", "8"]) == 2
    assert "size 16 -> 8" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == sixteen

    assert main(args + ["--size", "8", "--force"]) == 0
    index = DatasetIndex.load(out / "index.json")
    assert index.image_size == 8 and index.provenance["size"] == 8
    for split in ("train", "val"):
        for path in index.shard_paths(split):
            for sample in read_raw(Path(path)):
                assert Image.open(io.BytesIO(sample["png"])).size == (8, 8)
    assert index.split("train").samples == 10 and index.split("val").samples == 4

    (out / MANIFEST_NAME).unlink()  # shards without a manifest: of unknown inputs, refused as well
    assert main(args + ["--size", "8"]) == 2
    assert f"no {MANIFEST_NAME}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def generator_run(world):
    """A generator trained on A's tokens, its tokenizer given as a path relative to the working directory."""
    work = world["root"] / "work"
    work.mkdir()
    shutil.copyfile(world["a"], work / "tok.ckpt")
    config = stage2_config(world["tokens_a"], "tok.ckpt", "gen")
    previous = Path.cwd()
    os.chdir(work)
    try:
        run_dir = Path(train_generator(config)[1].run_dir)
    finally:
        os.chdir(previous)
    return work / run_dir / "checkpoints" / "last.ckpt"


def stage2_config(tokens: Path, tokenizer: str, run_dir: str):
    return load_config(
        REPO / "experiments" / "fmnist_tiny_ar.yaml",
        [f"data.index={tokens / 'index.json'}", f"generator.tokenizer={tokenizer}", f"run.dir={run_dir}",
         "generator.codebook_size=32", "generator.num_tokens=8", "generator.width=32", "generator.depth=1",
         "generator.heads=2", "data.batch_size=32", "data.num_workers=0", "data.val_samples=64",
         "trainer.max_steps=2", "trainer.val_every_n_steps=2", "trainer.progress_bar=false",
         "trainer.images_every_n_steps=0"],
    )


def test_a_generator_finds_its_tokenizer_from_anywhere_and_refuses_another_file_at_its_path(
    world, generator_run, tmp_path, monkeypatch
):
    work = generator_run.parents[2]
    monkeypatch.chdir(tmp_path)  # not where the generator was trained: "tok.ckpt" means nothing here
    folder = sample_to_folder(str(generator_run), tmp_path / "s", classes=[0], per_class=2, device="cpu")
    assert Manifest.load(folder, SAMPLE_MANIFEST).inputs["tokenizer_sha256"] == file_sha256(world["a"])

    moved = tmp_path / "moved"
    shutil.copytree(work, moved)
    shutil.copyfile(world["b"], work / "tok.ckpt")  # retrained at the same path: same sizes, other tokens
    try:
        with pytest.raises(CheckpointError, match="was trained with sha256"):
            sample_to_folder(str(generator_run), tmp_path / "s2", classes=[0], per_class=2, device="cpu")
        with pytest.raises(CheckpointError, match="--tokenizer-mismatch-ok"):
            load_generator_tokenizer(generator_run)
        assert build_parser().parse_args(["eval-fid", "--tokenizer-mismatch-ok"]).tokenizer_mismatch_ok
        _, path = load_generator_tokenizer(generator_run, mismatch_ok=True)
        assert path == (work / "tok.ckpt").resolve()
        sample_to_folder(str(generator_run), tmp_path / "s3", classes=[0], per_class=2, device="cpu",
                         tokenizer_mismatch_ok=True)
        # A moved run folder: its absolute path holds B, the path relative to the run folder still A.
        _, path = load_generator_tokenizer(moved / "gen" / "checkpoints" / "last.ckpt")
        assert path == (moved / "tok.ckpt").resolve()
    finally:
        shutil.copyfile(world["a"], work / "tok.ckpt")


def test_stage2_refuses_token_shards_of_another_tokenizer(world, tmp_path):
    tokens_b = tmp_path / "tokens_b"
    tokenize_shards(str(world["b"]), str(world["images"]), tokens_b, batch_size=250)
    with pytest.raises(DataError, match="were made by a tokenizer with sha256"):
        train_generator(stage2_config(tokens_b, str(world["a"]), str(tmp_path / "gen")))
    assert not (tmp_path / "gen" / "checkpoints").exists()


def test_make_tokenize_remakes_the_tokens_when_the_tokenizer_content_changes(world, tmp_path):
    tokenizer, tokens = tmp_path / "tok.ckpt", tmp_path / "tokens"
    shutil.copyfile(world["a"], tokenizer)

    def make() -> None:
        result = subprocess.run(
            ["make", "-C", str(REPO), "tokenize", f"TOKENIZER={tokenizer}", f"TOKENS={tokens}",
             f"FMNIST={world['images']}"], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr

    make()
    assert DatasetIndex.load(tokens / "index.json").tokens["tokenizer_sha256"] == file_sha256(world["a"])
    shutil.copyfile(world["b"], tokenizer)
    make()
    assert DatasetIndex.load(tokens / "index.json").tokens["tokenizer_sha256"] == file_sha256(world["b"])
    expected = encoded(world["b"], world["images"])
    assert all(np.array_equal(t, expected[k]) for k, t in stored(tokens).items())
    before = (tokens / "index.json").stat().st_mtime_ns
    make()  # unchanged: nothing is made again
    assert (tokens / "index.json").stat().st_mtime_ns == before


def test_killed_repeated_and_unknown_sample_folders_are_refused_by_eval_fid(world, generator_run, tmp_path, capsys):
    out = tmp_path / "samples"
    written = [out / "images", out.with_name(out.name + ".partial") / "images"]
    run_until([sys.executable, "-m", "nativetok", "sample", "--generator", str(generator_run), "--out", str(out),
               "--per-class", "300", "--batch-size", "50", "--device", "cpu"],
              lambda: any(next(folder.glob("*.png"), None) for folder in written if folder.is_dir()), tmp_path)
    fid = ["eval-fid", "--samples", str(out), "--data", str(world["images"]), "--num", "2"]
    assert main(fid) == 2
    assert "not a complete `nativetok sample` folder" in capsys.readouterr().err

    # Complete, then sampled again with fewer images: the folder holds exactly the new run's images.
    sample_to_folder(str(generator_run), out, classes=[0, 1], per_class=3, device="cpu")
    sample_to_folder(str(generator_run), out, classes=[0, 1], per_class=2, device="cpu")
    assert check_sample_folder(out).inputs["count"] == 4 and len(list((out / "images").glob("*.png"))) == 4
    assert not out.with_name(out.name + ".partial").exists()
    shutil.copyfile(out / "images" / "000000_class0000.png", out / "images" / "000009_class0001.png")
    with pytest.raises(ValueError, match="holds 5 images but its manifest lists 4"):
        check_sample_folder(out)
    with pytest.raises(ValueError, match="is not a sample folder"):
        sample_to_folder(str(generator_run), tmp_path, classes=[0], per_class=1, device="cpu")
