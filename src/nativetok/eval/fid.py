"""FID, KID and Inception Score through torch-fidelity, on features from offline Inception weights.

Reconstruction FID compares the tokenizer's reconstructions of N validation images with those images;
generation FID compares N generator samples with N real images. Real-set features are cached per
dataset, split, image size, count and weights, so a second evaluation only runs Inception on the
new images. KID (unbiased) is reported beside FID because it is meaningful at small sample counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from nativetok.data.shards import DatasetIndex
from nativetok.data.stream import ShardSpec, ShardStream, limit_samples
from nativetok.data.transforms import ImageDecoder
from nativetok.eval.inception import (
    InceptionFeatures,
    InceptionWeights,
    cache_dir,
    first_line,
    inception_weights,
)
from nativetok.eval.samples import balanced_labels, check_sample_folder, generate_images, to_uint8
from nativetok.precision import autocast

log = logging.getLogger(__name__)


def frechet_distance(features_1: Tensor, features_2: Tensor) -> float:
    """FID between two feature sets [N, D] (torch-fidelity's statistics and formula)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats_1 = fid_features_to_statistics(features_1.double().cpu())
    stats_2 = fid_features_to_statistics(features_2.double().cpu())
    return fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID]


def kernel_inception_distance(features_1: Tensor, features_2: Tensor, subsets: int = 100, seed: int = 0) -> Dict:
    """Unbiased KID (polynomial kernel) over random subsets of min(1000, N/2) images: its spread is meaningful."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = max(2, min(1000, len(features_1) // 2, len(features_2) // 2))
    out = kid_features_to_metric(
        features_1.double().cpu(), features_2.double().cpu(), kid_subsets=subsets, kid_subset_size=size,
        kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
        rng_seed=seed, verbose=False,
    )
    return {"mean": out[KEY_METRIC_KID_MEAN], "std": out[KEY_METRIC_KID_STD], "subset_size": size}


def inception_score(logits: Tensor, splits: int = 10) -> Dict:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits.double().cpu(), splits=splits)
    return {"mean": out[KEY_METRIC_ISC_MEAN], "std": out[KEY_METRIC_ISC_STD]}


@dataclass
class Score:
    """One comparison of a set of images against a reference set, labelled with what was used."""

    name: str
    images: int
    fid: float
    kid_mean: float
    kid_std: float
    inception_score: Optional[float]
    weights: str

    def row(self) -> str:
        is_text = f"{self.inception_score:.3f}" if self.inception_score is not None else "n/a"
        kid = f"{self.kid_mean:.5f} ± {self.kid_std:.5f}"
        return f"| {self.name} | {self.images} | {self.fid:.3f} | {kid} | {is_text} |"


def score(name: str, images: Dict[str, Tensor], reference: Dict[str, Tensor], weights: InceptionWeights) -> Score:
    kid = kernel_inception_distance(images["pool"], reference["pool"])
    isc = inception_score(images["logits"])["mean"] if "logits" in images else None
    return Score(name, len(images["pool"]), frechet_distance(images["pool"], reference["pool"]), kid["mean"],
                 kid["std"], isc, weights.label)


def table(scores: List[Score]) -> str:
    header = "| set | images | FID | KID | IS |\n| --- | ---: | ---: | ---: | ---: |"
    weights = sorted({s.weights for s in scores})
    return "\n".join([header, *(s.row() for s in scores), "", f"Inception weights: {'; '.join(weights)}"])


# -- image sources -----------------------------------------------------------------------------------


def real_images(index_path: str, split: str, count: int, batch_size: int = 250) -> tuple[Tensor, Tensor]:
    """The first `count` images (uint8 [N, C, H, W]) and labels of a split, in index order."""
    index = DatasetIndex.load(index_path)
    specs = [ShardSpec(p, s.samples) for p, s in zip(index.shard_paths(split), index.split(split).shards)]
    available = sum(s.samples for s in specs)
    if count > available:
        raise ValueError(f"{index_path} split '{split}' has {available} images, fewer than the {count} asked for")
    decoder = ImageDecoder(index.image_size, index.channels, train=False)
    stream = ShardStream(limit_samples(specs, count), decoder, batch_size, strict=True)
    images, labels = [], []
    for batch in stream:
        images.append(batch["image"])
        labels.append(batch["label"])
    return torch.cat(images), torch.cat(labels)


def folder_images(folder: Path, count: int) -> Tensor:
    """The first `count` PNG/JPEG images of a folder (or its images/ subfolder), sorted by name."""
    folder = Path(folder)
    if (folder / "images").is_dir():
        folder = folder / "images"
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < count:
        raise ValueError(f"{folder} holds {len(files)} images, fewer than the {count} needed")
    arrays, sizes = [], {}
    for path in files[:count]:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
        sizes.setdefault(array.shape[:2], path.name)
        if len(sizes) > 1:
            (a, first), (b, second) = list(sizes.items())[:2]
            raise ValueError(f"{folder} mixes image sizes: {first} is {a[1]}x{a[0]}, {second} is {b[1]}x{b[0]}")
        arrays.append(array.reshape(*array.shape[:2], -1).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


# -- cached real-set features ----------------------------------------------------------------------------


def real_features(
    index_path: str, split: str, count: int, extractor: InceptionFeatures, cache: Optional[Path] = None
) -> Dict[str, Tensor]:
    """Inception features of a real split, computed once per (dataset, split, size, count, weights)."""
    index = DatasetIndex.load(index_path)
    shards = [(e.file, e.samples) for e in index.split(split).shards]
    identity = {
        "dataset": index.name, "index": str(Path(index_path).resolve()), "split": split, "count": count,
        "image_size": index.image_size, "channels": index.channels, "shards": shards,
        "weights": extractor.weights.label, "weights_file": str(extractor.weights.path),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = (cache or cache_dir()) / "real-stats"
    path = folder / f"{index.name}-{split}-{index.image_size}px-{count}-{key}.pt"
    cached = _cached_features(path, count) if path.is_file() else None
    if cached is not None:
        return cached
    images, _ = real_images(index_path, split, count)
    features = extractor(images)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(features, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    path.with_suffix(".json").write_text(json.dumps(identity, indent=1) + "\n")
    return features


def _cached_features(path: Path, count: int) -> Optional[Dict[str, Tensor]]:
    """The features cached in `path`, or None after removing an entry that is unreadable or incomplete."""
    try:
        features = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(features, dict) and "pool" in features and all(
                isinstance(value, Tensor) and len(value) == count for value in features.values())):
            raise ValueError(f"not the features of {count} images")
    except Exception as error:  # a broken cache entry, whatever torch.load raised: rebuilt, never fatal
        log.warning("real-set features cache %s is unusable (%s): removed, computing them again", path,
                    first_line(error))
        path.unlink(missing_ok=True)
        return None
    log.info("real-set features from cache %s", path)
    return features


@torch.no_grad()
def reconstructions(tokenizer, images: Tensor, batch_size: int = 250, precision: str = "32-true") -> Tensor:
    device = next(tokenizer.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device).float() / 255
        with autocast(device, precision):
            out.append(to_uint8(tokenizer.decode(tokenizer.encode(batch))).cpu())
    return torch.cat(out)


def save_results(path: Path, scores: List[Score], extra: Optional[dict] = None) -> None:
    body = {s.name: asdict(s) for s in scores}
    body.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1) + "\n")


def evaluate_fid(
    tokenizer_path: Optional[str] = None,
    generator_path: Optional[str] = None,
    samples: Optional[Path] = None,
    num: int = 1000,
    data: Optional[str] = None,
    real_split: str = "val",
    reference_split: str = "train",
    inception: Optional[str] = None,
    device: Optional[str] = None,
    seed: int = 0,
    out: Optional[Path] = None,
    precision: str = "32-true",
    tokenizer_mismatch_ok: bool = False,
) -> List[Score]:
    """rFID of a tokenizer and/or gFID of a generator (or a folder of samples); results as JSON and a table.

    The image data defaults to the tokenizer's training data (for a generator: its tokenizer's).
    `precision` applies to the tokenizer and generator (autocast); Inception always runs in fp32.
    A generator decodes with the tokenizer it was trained with (pinned by sha256; another one only with
    `tokenizer_mismatch_ok`); a sample folder must be a complete `nativetok sample` folder (its manifest).
    """
    from nativetok.checkpoints import (
        generator_config,
        load_generator,
        load_generator_tokenizer,
        load_tokenizer,
        tokenizer_config,
    )

    if not (tokenizer_path or generator_path or samples):
        raise ValueError("nothing to evaluate: give a tokenizer checkpoint, a generator checkpoint or a sample folder")
    if samples and not generator_path:
        check_sample_folder(samples)  # before any work: a killed, partial or unknown folder is refused
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = inception_weights(inception)
    extractor = InceptionFeatures(weights, device)
    scores: List[Score] = []
    if tokenizer_path:
        index = data or tokenizer_config(tokenizer_path).data.index
        tokenizer = load_tokenizer(tokenizer_path, device)
        images, _ = real_images(index, real_split, num)
        reference = real_features(index, real_split, num, extractor)
        rebuilt = extractor(reconstructions(tokenizer, images, precision=precision))
        scores.append(score(f"rFID: reconstructions of {real_split}", rebuilt, reference, weights))
    if generator_path or samples:
        if generator_path:
            config = generator_config(generator_path)
            tokenizer, tokenizer_file = load_generator_tokenizer(generator_path, device,
                                                                 mismatch_ok=tokenizer_mismatch_ok)
            index = data or tokenizer_config(tokenizer_file).data.index
            labels = balanced_labels(config.data.num_classes, num)
            generated = generate_images(load_generator(generator_path, device), tokenizer, labels, config.sampling,
                                        seed, batch_size=100, precision=precision)
            name = f"gFID: {num} samples (cfg {config.sampling.cfg_scale}) vs {reference_split}"
        else:
            if data is None and tokenizer_path is None:
                raise ValueError("a sample folder needs --data (the real images' index) or --tokenizer")
            index = data or tokenizer_config(tokenizer_path).data.index
            generated = folder_images(samples, num)
            name = f"gFID: {samples} vs {reference_split}"
        reference = real_features(index, reference_split, num, extractor)
        scores.append(score(name, extractor(generated), reference, weights))
    print(table(scores))
    if out is not None:
        save_results(out, scores, {"num": num, "seed": seed})
        log.info("results -> %s", out)
    return scores
