"""gFID as papers compute it: a class-balanced (or whole-split) reference computed once and cached under a
content hash, ADM reference batches accepted, stable JSON keys and a warning at small sample counts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from nativetok.eval.fid import (
    ReferenceStats,
    class_balanced_positions,
    few_images_warning,
    frechet_distance,
    images_at,
    real_images,
    reference_stats,
    score_against,
    split_labels,
)
from nativetok.eval.inception import InceptionFeatures, inception_weights


class CountingExtractor:
    """Inception features, counting the images it is asked for (to see what the cache saves)."""

    def __init__(self):
        self.inner = InceptionFeatures(inception_weights(None), "cpu")
        self.weights = self.inner.weights
        self.images = 0

    def __call__(self, images):
        self.images += len(images)
        return self.inner(images)


@pytest.fixture(scope="module")
def extractor():
    return CountingExtractor()


def test_class_balanced_positions_cover_every_class_evenly_and_follow_the_seed():
    labels = [0] * 50 + [1] * 30 + [2] * 20  # class-ordered, as shards of a class-folder tree are
    chosen = class_balanced_positions(labels, 31, seed=0)
    counts = Counter(labels[p] for p in chosen)
    assert len(chosen) == len(set(chosen)) == 31 and sorted(counts.values()) == [10, 10, 11]
    assert chosen == class_balanced_positions(labels, 31, seed=0)
    assert chosen != class_balanced_positions(labels, 31, seed=1)
    assert labels[:31].count(0) == 31  # what the first 31 images in shard order would have been
    with pytest.raises(ValueError, match="class 2 has 20 images, fewer than its share 30"):
        class_balanced_positions(labels, 90, seed=0)


def test_labels_and_chosen_images_match_the_split_in_index_order(fmnist_index):
    labels = split_labels(str(fmnist_index), "val")
    whole, whole_labels = real_images(str(fmnist_index), "val", 10000)
    assert len(labels) == 10000 and labels == whole_labels.tolist()
    positions = [3, 17, 250, 299, 9999]
    assert torch.equal(images_at(str(fmnist_index), "val", positions), whole[positions])
    chosen, chosen_labels = real_images(str(fmnist_index), "val", 20, seed=0)
    balanced = class_balanced_positions(labels, 20, seed=0)
    assert torch.equal(chosen, whole[balanced]) and chosen_labels.tolist() == [labels[p] for p in balanced]


def test_reference_is_class_balanced_computed_once_and_keyed_by_content(fmnist_index, tmp_path, extractor):
    start = extractor.images
    stats = reference_stats(str(fmnist_index), "val", 20, seed=0, extractor=extractor, cache=tmp_path)
    assert stats.count == 20 and "class-balanced (seed 0)" in stats.source and extractor.images == start + 20
    labels = split_labels(str(fmnist_index), "val")
    assert Counter(labels[p] for p in class_balanced_positions(labels, 20, 0)) == {c: 2 for c in range(10)}
    again = reference_stats(str(fmnist_index), "val", 20, seed=0, extractor=extractor, cache=tmp_path)
    assert extractor.images == start + 20 and again.sha256 == stats.sha256  # from the cache, no Inception
    other = reference_stats(str(fmnist_index), "val", 20, seed=1, extractor=extractor, cache=tmp_path)
    assert extractor.images == start + 40 and other.sha256 != stats.sha256
    files = sorted((tmp_path / "reference-stats").glob("*.npz"))
    assert len(files) == 2
    for file in files:
        file.write_bytes(b"not an npz")  # a broken cache entry is rebuilt, never fatal
    rebuilt = reference_stats(str(fmnist_index), "val", 20, seed=0, extractor=extractor, cache=tmp_path)
    assert extractor.images == start + 60 and rebuilt.sha256 == stats.sha256


def test_saved_and_adm_reference_files_give_the_same_fid(fmnist_index, tmp_path, extractor):
    images, _ = real_images(str(fmnist_index), "val", 24)
    pool = extractor(images)["pool"]
    stats = ReferenceStats.of_features(pool[:12], "twelve val images")
    stats.save(tmp_path / "ours.npz")
    loaded = ReferenceStats.load(tmp_path / "ours.npz")
    assert loaded.sha256 == stats.sha256 and loaded.count == 12 and loaded.features.shape == (12, 2048)
    np.savez(tmp_path / "adm_stats.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma)
    adm = ReferenceStats.load(tmp_path / "adm_stats.npz")
    assert adm.features is None
    rgb = images[:12].repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()  # ADM batches: uint8 NHWC
    np.savez(tmp_path / "adm_batch.npz", arr_0=rgb)
    batch = ReferenceStats.load(tmp_path / "adm_batch.npz", extractor)
    weights = extractor.weights
    theirs = {"pool": pool[12:]}
    direct = frechet_distance(pool[12:], pool[:12])
    for reference in (loaded, adm, batch):
        result = score_against("gFID: test", theirs, reference, weights)
        assert result.fid == pytest.approx(direct, rel=1e-3)
    assert score_against("gFID: test", theirs, adm, weights).kid_mean is None
    assert score_against("gFID: test", theirs, loaded, weights).kid_mean is not None
    np.savez(tmp_path / "wrong.npz", pool=pool.numpy())
    with pytest.raises(ValueError, match="expected mu and sigma, or arr_0"):
        ReferenceStats.load(tmp_path / "wrong.npz")


def test_results_use_stable_keys_name_their_reference_and_warn_below_2048(tmp_path, capsys):
    from nativetok.cli import main
    from nativetok.eval.fid import Score, result_record

    assert few_images_warning(2048) == [] and "strongly biased" in few_images_warning(100)[0]
    scores = [Score("rFID: reconstructions of val", 100, 50.0, 0.01, 0.001, None, "w", "the same real images"),
              Score("gFID: 100 samples (cfg 2.0)", 100, 60.0, None, None, None, "w", "ref (10 images, sha256 ab)")]
    record = result_record(scores, seed=3, warnings=few_images_warning(100))
    assert record["rfid"] == 50.0 and record["gfid"] == 60.0 and record["gkid"] is None
    assert record["rimages"] == record["gimages"] == 100 and record["greference"].startswith("ref (10 images")
    assert record["seed"] == 3 and "strongly biased" in record["warnings"][0]
    assert main(["eval-fid", "--samples", str(tmp_path), "--ref-stats", str(tmp_path / "none.npz")]) == 2
