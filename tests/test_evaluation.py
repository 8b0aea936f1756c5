"""Evaluation: offline Inception weights, FID/KID through torch-fidelity, cached statistics, token metrics."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from nativetok.eval.fid import folder_images, frechet_distance, kernel_inception_distance, real_features, real_images
from nativetok.eval.inception import InceptionFeatures, inception_weights, torchscript_inception
from nativetok.eval.token_metrics import dependency_report, marginal_entropy_bits
from nativetok.models import ARGenerator


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import os

    os.environ["NATIVETOK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return inception_weights()


@pytest.fixture(scope="module")
def extractor(weights):
    return InceptionFeatures(weights, batch_size=16)


@pytest.fixture(scope="module")
def images(fmnist_index):
    return real_images(str(fmnist_index), "val", 16)[0]


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_matches_a_direct_scipy_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (2000, 8))
    b = rng.normal(0.5, 1.5, (2000, 8)) @ rng.normal(size=(8, 8)) * 0.5
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(scipy_fid(a, b), rel=1e-6)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-8)


def test_kid_is_near_zero_for_the_same_distribution_and_positive_for_another():
    rng = np.random.default_rng(1)
    same = kernel_inception_distance(torch.from_numpy(rng.normal(size=(400, 16))),
                                     torch.from_numpy(rng.normal(size=(400, 16))))
    other = kernel_inception_distance(torch.from_numpy(rng.normal(size=(400, 16))),
                                      torch.from_numpy(rng.normal(1.0, 1.0, size=(400, 16))))
    assert abs(same["mean"]) < 0.05 < other["mean"] and same["subset_size"] == 200 and same["std"] > 0


def test_converted_weights_give_the_torchscript_features(weights, extractor, images):
    """torch-fidelity's InceptionV3 with the converted weights equals fid-helper's TorchScript model."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    assert not weights.has_classifier and "converted" in weights.label
    ours = extractor(images)["pool"]
    with warnings.catch_warnings():  # torch.jit.load is deprecated; the reference ships as TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(torchscript_inception()), map_location="cpu").eval()
    rgb = images.expand(-1, 3, -1, -1).float()
    resized = interpolate_bilinear_2d_like_tensorflow1x(rgb, size=(299, 299), align_corners=False)
    with torch.no_grad():
        theirs = scripted((resized - 128) / 128).double()
    assert ours.shape == (16, 2048)
    relative = float((ours - theirs).norm() / theirs.norm())
    assert relative < 1e-5, relative  # measured: about 1e-7
    half = len(images) // 2
    assert frechet_distance(ours[:half], ours[half:]) == pytest.approx(
        frechet_distance(theirs[:half], theirs[half:]), rel=1e-4
    )


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise_and_blur(extractor, images):
    clean = extractor(images)["pool"]
    generator = torch.Generator().manual_seed(0)
    noisy = (images.float() + 40 * torch.randn(images.shape, generator=generator)).clamp(0, 255).to(torch.uint8)
    blurred = torch.nn.functional.avg_pool2d(images.float(), 3, 1, 1).round().to(torch.uint8)
    very_blurred = torch.nn.functional.avg_pool2d(images.float(), 7, 1, 3).round().to(torch.uint8)
    assert frechet_distance(clean, clean) == pytest.approx(0.0, abs=1e-3)  # eigenvalues of a rank-15 product
    fid_noise = frechet_distance(extractor(noisy)["pool"], clean)
    fid_blur = frechet_distance(extractor(blurred)["pool"], clean)
    fid_more_blur = frechet_distance(extractor(very_blurred)["pool"], clean)
    assert 0 < fid_blur < fid_more_blur and fid_noise > 1.0


def test_real_statistics_are_cached_and_invalidated(tmp_path, extractor, fmnist_index, monkeypatch):
    calls = []
    original = extractor.__class__.__call__
    monkeypatch.setattr(extractor.__class__, "__call__", lambda self, x: calls.append(len(x)) or original(self, x))
    first = real_features(str(fmnist_index), "val", 4, extractor, cache=tmp_path)
    again = real_features(str(fmnist_index), "val", 4, extractor, cache=tmp_path)
    assert calls == [4] and torch.equal(first["pool"], again["pool"])
    real_features(str(fmnist_index), "val", 6, extractor, cache=tmp_path)  # another count
    real_features(str(fmnist_index), "train", 4, extractor, cache=tmp_path)  # another split
    assert calls == [4, 6, 4]
    # The same split re-sharded at another image size is another dataset: not reused.
    index = json.loads(fmnist_index.read_text())
    index["image_size"] = 28
    other = tmp_path / "other" / "index.json"
    other.parent.mkdir()
    for entry in index["splits"]["val"]["shards"][:1]:
        (other.parent / entry["file"]).symlink_to(fmnist_index.parent / entry["file"])
    index["splits"] = {"val": {"samples": 2000, "shards": index["splits"]["val"]["shards"][:1]}}
    other.write_text(json.dumps(index))
    real_features(str(other), "val", 4, extractor, cache=tmp_path)
    assert calls == [4, 6, 4, 4]
    assert len(list((tmp_path / "real-stats").glob("*.pt"))) == 4


def test_sample_folders_must_hold_enough_images_of_one_size(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    assert folder_images(tmp_path, range(3)).shape == (3, 1, 32, 32)
    with pytest.raises(ValueError, match="holds 3 images, fewer than the 5 needed"):
        folder_images(tmp_path, range(5))
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "3.png")
    with pytest.raises(ValueError, match="mixes image sizes: 0.png is 32x32, 3.png is 16x16"):
        folder_images(tmp_path, range(4))


def test_entropy_metrics_see_independent_and_copied_tokens():
    """Independent tokens: nothing learned from the prefix; a copied token: all of its entropy."""
    torch.manual_seed(0)
    vocab, n = 8, 4000
    independent = torch.randint(0, vocab, (n, 3))
    copied = independent.clone()
    copied[:, 1] = copied[:, 0]
    marginal = marginal_entropy_bits(independent, vocab)
    assert torch.allclose(marginal, torch.full((3,), 3.0, dtype=torch.float64), atol=0.01)
    reports = {}
    for name, tokens in (("independent", independent), ("copied", copied)):
        model = ARGenerator(vocab, 3, 1, width=32, depth=2, heads=2, class_dropout=0.5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        labels = torch.zeros(n, dtype=torch.long)
        for step in range(150):
            batch = tokens[(step * 256) % n:][:256]
            loss, _ = model.loss(batch, model.drop_labels(labels[: len(batch)]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        reports[name] = dependency_report(model.eval(), tokens, labels, vocab)
    independent_info = reports["independent"]["information_from_prefix_bits"]
    copied_info = reports["copied"]["information_from_prefix_bits"]
    assert all(abs(i) < 0.1 for i in independent_info)
    assert copied_info[1] > 2.7 and abs(copied_info[2]) < 0.1  # about log2(8) = 3 bits at the copy
    assert reports["copied"]["conditional_bits"][1] < 0.3
    assert reports["copied"]["codebook_usage"] == 1.0 and math.isclose(
        reports["copied"]["codebook_perplexity"], 8.0, rel_tol=0.01)
