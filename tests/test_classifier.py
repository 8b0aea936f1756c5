"""FD-FMNIST: the Fashion-MNIST classifier metric on the real embedded data, and Inception in channels_last.

The classifier is trained once (a few minutes) into the cache, as `fmnist_classifier` does for any user, and
reused by later test sessions; every check below runs on real test images."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from nativetok.eval import classifier as fmnist
from nativetok.eval.classifier import (
    FEATURE_DIM,
    MIN_TEST_ACCURACY,
    TEST_SPLIT,
    fmnist_classifier,
    scores_of_features,
)
from nativetok.eval.fid import real_images
from nativetok.eval.inception import InceptionFeatures, inception_weights

SET_SIZE = 1000  # images per compared set


@pytest.fixture(scope="session")
def trained(fmnist_index):
    return fmnist_classifier(str(fmnist_index))


@pytest.fixture(scope="session")
def test_split(fmnist_index):
    return real_images(str(fmnist_index), TEST_SPLIT, 10000)


@pytest.fixture(scope="session")
def two_real_sets(trained, test_split):
    """Features of two disjoint sets of real test images, with their labels."""
    images, labels = test_split
    first, second = images[:SET_SIZE], images[SET_SIZE : 2 * SET_SIZE]
    return trained.features(first), trained.features(second), labels[:SET_SIZE]


def test_the_classifier_reaches_its_accuracy_on_the_real_test_split(trained, test_split):
    images, labels = test_split
    accuracy = trained.accuracy(images, labels)
    assert accuracy >= MIN_TEST_ACCURACY
    assert accuracy == pytest.approx(trained.provenance["test_accuracy"], abs=1e-3)
    features = trained.features(images[:8])
    assert features["features"].shape == (8, FEATURE_DIM) and features["logits"].shape == (8, 10)


def test_real_images_are_far_closer_to_real_images_than_noise_blur_or_shuffled_pixels(trained, test_split,
                                                                                       two_real_sets):
    first, second, _ = two_real_sets
    real = scores_of_features(first, second)
    images = test_split[0][:SET_SIZE]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=generator)
    blurred = F.avg_pool2d(images.float(), 5, stride=1, padding=2, count_include_pad=False).round().to(torch.uint8)
    order = torch.randperm(images[0].numel(), generator=generator)
    shuffled = images.flatten(1)[:, order].reshape(images.shape)
    for name, fake in (("noise", noise), ("blurred", blurred), ("shuffled pixels", shuffled)):
        score = scores_of_features(trained.features(fake), second)
        assert score.fd > 10 * real.fd, f"FD-FMNIST of {name} ({score.fd:.3f}) is not far above real's ({real.fd:.3f})"
        assert score.kid_mean > 20 * real.kid_std, f"KID of {name} ({score.kid_mean:.4f}) is within real's spread"


def test_a_set_against_itself_scores_zero_and_its_labels_are_checked(two_real_sets):
    first, _, labels = two_real_sets
    score = scores_of_features(first, first, labels)
    assert score.fd == pytest.approx(0.0, abs=1e-6)
    assert abs(score.kid_mean) < 0.01  # its subsets are drawn independently: ~0 within its spread (~0.002);
    # blurred real images score ~0.4, noise ~4
    assert score.images == score.reference_images == SET_SIZE
    assert score.class_accuracy >= MIN_TEST_ACCURACY - 0.02  # 1,000 of the test images
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert scores_of_features(first, first, shuffled).class_accuracy == pytest.approx(0.1, abs=0.03)
    assert scores_of_features(first, first).class_accuracy is None
    assert "FD-FMNIST" in score.header() and json.dumps(score.to_json())


def test_the_cached_classifier_is_reused_and_is_plain_safetensors(trained, fmnist_index, caplog):
    with caplog.at_level(logging.INFO, logger=fmnist.__name__):
        again = fmnist_classifier(str(fmnist_index))
    assert "training" not in caplog.text
    assert again.path == trained.path and again.provenance["sha256"] == trained.provenance["sha256"]
    assert trained.path.suffix == ".safetensors"
    with safe_open(str(trained.path), framework="pt") as weights:  # a header and raw tensors: no pickle
        assert len(list(weights.keys())) == len(trained.network.state_dict())


def test_a_corrupt_weights_file_is_refused_when_given_and_trained_again_when_cached(trained, fmnist_index,
                                                                                      tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(trained.path.parent, cache / trained.path.parent.name,
                    ignore=shutil.ignore_patterns("*.lock", "*.tmp"))
    monkeypatch.setenv("NATIVETOK_CACHE", str(cache))
    copy = cache / trained.path.parent.name / trained.path.name
    assert fmnist_classifier(str(fmnist_index), path=str(copy)).provenance == trained.provenance
    body = bytearray(copy.read_bytes())
    body[-1] ^= 0xFF  # one bit pattern in the last weight: still loadable, no longer what was trained
    copy.write_bytes(bytes(body))
    with pytest.raises(ValueError, match="corrupt or replaced"):
        fmnist_classifier(str(fmnist_index), path=str(copy))

    class Retrained(Exception):
        pass

    def retrain(index_path):
        raise Retrained(index_path)

    monkeypatch.setattr(fmnist, "train_classifier", retrain)  # the decision is tested; the 3-minute run is not
    with pytest.raises(Retrained):
        fmnist_classifier(str(fmnist_index))


def test_inception_in_channels_last_gives_the_default_layouts_features(fmnist_index):
    weights = inception_weights()
    images = real_images(str(fmnist_index), TEST_SPLIT, 4)[0]
    fast = InceptionFeatures(weights)  # channels_last by default on CPU
    assert fast.model.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    reference = InceptionFeatures(weights, channels_last=False)(images)["pool"]
    torch.testing.assert_close(fast(images)["pool"], reference, rtol=0, atol=1e-4 * reference.abs().max().item())
