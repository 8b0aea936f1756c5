"""FID subsets are class-balanced, never the first N files or images (written class by class), and bad
reference statistics or counts stop with our own message instead of a NaN result or a raw assertion."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nativetok.cli import main
from nativetok.data.shards import DatasetIndex, Manifest, ShardEntry, SplitIndex, encode_image, write_shard
from nativetok.eval import fid
from nativetok.eval.samples import SAMPLE_MANIFEST

CLASSES, PER_CLASS = 10, 3


def shade(label: int) -> int:
    """The grey level of every pixel of a class-`label` test image: the class can be read back from pixels."""
    return 20 * label + 10


def sample_folder(folder: Path) -> Path:
    """A complete `nativetok sample` folder written as it writes one: images numbered class by class."""
    (folder / "images").mkdir(parents=True)
    for i in range(CLASSES * PER_CLASS):
        label = i // PER_CLASS
        image = Image.fromarray(np.full((32, 32), shade(label), np.uint8))
        image.save(folder / "images" / f"{i:06d}_class{label:04d}.png")
    Manifest("sample", {"classes": list(range(CLASSES)), "per_class": PER_CLASS, "png": True, "npz": False,
                        "count": CLASSES * PER_CLASS}).save(folder, SAMPLE_MANIFEST)
    return folder


def reference_file(path: Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    np.savez(path, mu=mu, sigma=sigma)
    return path


@pytest.fixture()
def seen_classes(monkeypatch):
    """The classes (read from the pixels) of every image given to Inception."""
    seen = []
    original = fid.InceptionFeatures.__call__

    def recording(self, images):
        seen.extend((int(image.float().mean().round()) - 10) // 20 for image in images)
        return original(self, images)

    monkeypatch.setattr(fid.InceptionFeatures, "__call__", recording)
    return seen


def test_eval_fid_of_a_sample_folder_scores_a_class_balanced_subset(tmp_path, seen_classes):
    folder = sample_folder(tmp_path / "samples")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4096, 2048))
    reference = reference_file(tmp_path / "ref.npz", features.mean(0), np.cov(features, rowvar=False))
    out = tmp_path / "fid.json"
    assert main(["eval-fid", "--samples", str(folder), "--num", "10", "--ref-stats", str(reference), "--device", "cpu",
                 "--out", str(out)]) == 0
    assert Counter(seen_classes) == {c: 1 for c in range(CLASSES)}  # the first 10 files are classes 0-3
    assert json.loads(out.read_text())["gimages"] == 10


def test_eval_fid_answers_num_1_with_its_own_message(tmp_path, capsys):
    folder = sample_folder(tmp_path / "samples")
    reference = reference_file(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    assert main(["eval-fid", "--samples", str(folder), "--num", "1", "--ref-stats", str(reference), "--device", "cpu",
                 "--out", str(tmp_path / "fid.json")]) == 2
    error = capsys.readouterr().err
    assert "--num 1: FID and KID need at least 2 images" in error and "kid_subset_size" not in error
    assert not (tmp_path / "fid.json").exists()


@pytest.mark.parametrize("mu, sigma, message", [
    (np.full(2048, np.nan), np.eye(2048), "mu and sigma must be finite"),
    (np.zeros(10), np.eye(10), r"mu must be \[2048\] and sigma \[2048, 2048\]"),
])
def test_bad_reference_statistics_stop_with_a_message_naming_the_file(tmp_path, capsys, mu, sigma, message):
    folder = sample_folder(tmp_path / "samples")
    reference = reference_file(tmp_path / "bad.npz", mu, sigma)
    out = tmp_path / "fid.json"
    assert main(["eval-fid", "--samples", str(folder), "--num", "10", "--ref-stats", str(reference), "--device", "cpu",
                 "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "bad.npz" in error and message.replace("\\", "") in error
    assert not out.exists()  # never a JSON with "gfid": NaN


def class_ordered_index(folder: Path, per_class: int = 10, classes: int = 3) -> Path:
    """A val split whose shards hold the images class by class, as a class-folder tree gives them."""
    folder.mkdir()
    samples = []
    for i in range(per_class * classes):
        pixels = np.full((8, 8), shade(i // per_class), np.uint8)
        pixels[0, 0] = i  # the image's position in the split
        samples.append({"__key__": f"val{i:08d}", "png": encode_image(pixels), "cls": str(i // per_class).encode()})
    write_shard(folder / "ordered-val-000000.tar", samples)
    split = SplitIndex([ShardEntry("ordered-val-000000.tar", len(samples))])
    DatasetIndex("ordered", 8, 1, [str(c) for c in range(classes)], {"val": split}, root=folder).save(folder)
    return folder / "index.json"


def test_rfid_and_prefix_images_are_a_seeded_class_balanced_subset(tmp_path):
    index = str(class_ordered_index(tmp_path / "data"))
    images, labels = fid.real_images(index, "val", 6, seed=0)
    positions = images[:, 0, 0, 0].tolist()
    assert Counter(labels.tolist()) == {0: 2, 1: 2, 2: 2} and [p // 10 for p in positions] == labels.tolist()
    assert positions == sorted(positions)
    again, _ = fid.real_images(index, "val", 6, seed=0)
    other, _ = fid.real_images(index, "val", 6, seed=1)
    assert torch.equal(images, again) and other[:, 0, 0, 0].tolist() != positions
    whole, whole_labels = fid.real_images(index, "val", 30)
    assert whole_labels.tolist() == [i // 10 for i in range(30)]  # the whole split, in index order
