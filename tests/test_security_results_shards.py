"""`nativetok shard folder` as a careless or unlucky user meets it: shards in a seeded shuffled order, 16-bit
images kept (not clipped white), a bad image named or skipped and counted, Ctrl-C stopping at once and cleanly,
a full disk naming the file."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nativetok.cli import main
from nativetok.data.folders import shard_folder
from nativetok.io import naming_the_file

from .test_data import read_raw


def class_tree(root: Path, classes=("cat", "dog", "fox"), per_class: int = 6, size: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for cls in classes:
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def labels_in_shard_order(out: Path) -> list:
    return [int(s["cls"]) for path in sorted(out.glob("*-train-*.tar")) for s in read_raw(path)]


def test_shards_are_written_in_a_seeded_shuffled_order_named_in_the_manifest(tmp_path):
    tree = class_tree(tmp_path / "tree")
    orders = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        index = shard_folder(tree, tmp_path / name, "toy", splits=["train"], size=8, per_shard=4, fmt="png",
                             workers=1, seed=seed)
        orders[name] = labels_in_shard_order(tmp_path / name)
        assert index.provenance["order_seed"] == seed
        assert json.loads((tmp_path / name / "manifest.json").read_text())["order_seed"] == seed
    assert sorted(orders["a"]) == [0] * 6 + [1] * 6 + [2] * 6 and orders["a"] != sorted(orders["a"])
    assert orders["a"] == orders["b"] and orders["a"] != orders["c"]
    assert len(set(orders["a"][:4])) > 1  # the first shard is not one class


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    folder = tmp_path / "tree" / "train" / "grey"
    folder.mkdir(parents=True)
    wide = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(wide).save(folder / "deep.png")
    shard_folder(tmp_path / "tree", tmp_path / "out", "deep", splits=["train"], size=16, fmt="png", channels=1,
                 workers=1)
    sample = read_raw(tmp_path / "out" / "deep-train-000000.tar")[0]
    stored = np.asarray(Image.open(io.BytesIO(sample["png"])))
    assert stored.dtype == np.uint8 and np.array_equal(stored, np.arange(256).reshape(16, 16))


def tree_with_bad_images(root: Path) -> Path:
    class_tree(root, classes=("cat", "dog"), per_class=4)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="JPEG")
    (root / "train" / "cat" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "train" / "dog" / "notes.png").write_bytes(b"not an image at all")
    return root


def test_an_undecodable_image_stops_the_run_naming_the_file(tmp_path, capsys):
    tree = tree_with_bad_images(tmp_path / "tree")
    code = main(["shard", "folder", "--root", str(tree), "--out", str(tmp_path / "out"), "--name", "toy",
                 "--splits", "train", "--size", "8", "--workers", "1", "--per-shard", "20"])
    error = capsys.readouterr().err
    assert code == 2 and "cannot decode image" in error and "truncated.jpg" in error
    assert not list((tmp_path / "out").glob("*.tar*"))  # no shard, not even a partial one


def test_skip_bad_leaves_undecodable_images_out_and_counts_them(tmp_path, caplog):
    tree = tree_with_bad_images(tmp_path / "tree")
    code = main(["shard", "folder", "--root", str(tree), "--out", str(tmp_path / "out"), "--name", "toy",
                 "--splits", "train", "--size", "8", "--workers", "2", "--per-shard", "3", "--skip-bad"])
    assert code == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["splits"]["train"]["samples"] == 8
    assert "skipped 2 undecodable images of 10" in caplog.text
    assert "truncated.jpg" in caplog.text and "notes.png" in caplog.text
    again = main(["shard", "folder", "--root", str(tree), "--out", str(tmp_path / "out"), "--name", "toy",
                  "--splits", "train", "--size", "8", "--workers", "2", "--per-shard", "3", "--skip-bad"])
    assert again == 0  # a re-run resumes: shards holding skipped images pass the count check


def test_ctrl_c_stops_the_workers_at_once_and_leaves_no_partial_shard(tmp_path):
    tree = class_tree(tmp_path / "tree", classes=("a", "b"), per_class=150, size=400)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nativetok.cli", "shard", "folder", "--root", str(tree), "--out", str(out),
               "--name", "big", "--splits", "train", "--size", "256", "--per-shard", "2", "--workers", "2"]
    # A terminal sends Ctrl-C to the whole foreground process group: the command and its workers. A command
    # started from a background job inherits SIGINT ignored (bash does that), so the child gets a terminal's
    # default disposition back, whatever ran this test.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while len(list(out.glob("big-train-*.tar"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 3, "kept writing after Ctrl-C"
    assert process.returncode == 130 and "Traceback" not in stderr and "interrupted" in stderr
    written = sorted(p.name for p in out.glob("big-train-*"))
    assert written and not [name for name in written if name.endswith(".tmp")] and len(written) < 150
    time.sleep(1)
    assert sorted(p.name for p in out.glob("big-train-*")) == written  # no worker left writing


def test_a_full_disk_names_the_file_being_written(tmp_path, capsys):
    """ENOSPC for real: the index's staging file is a link to /dev/full, which refuses every write."""
    tree = class_tree(tmp_path / "tree", classes=("cat", "dog"), per_class=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json.tmp").symlink_to("/dev/full")
    code = main(["shard", "folder", "--root", str(tree), "--out", str(out), "--name", "toy", "--splits", "train",
                 "--size", "8", "--workers", "1"])
    error = capsys.readouterr().err
    assert code == 2 and "No space left on device" in error and f"'{out / 'index.json'}'" in error
    assert not (out / "index.json").exists() and not (out / "index.json.tmp").exists()
    png = tmp_path / "image.png"
    png.symlink_to("/dev/full")
    with pytest.raises(OSError, match=f"No space left on device: '{png}'"):
        with naming_the_file(png):
            Image.fromarray(np.zeros((64, 64), np.uint8)).save(png)
