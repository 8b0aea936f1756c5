"""FID, KID and Inception Score through torch-fidelity, on features from offline Inception weights.

Every subset evaluated is a seeded, class-balanced one (every class in proportion), never the first N
images in shard or file order: shards and sample folders are often written class by class. Reconstruction
FID compares the tokenizer's reconstructions of N such validation images with those images. Generation FID
compares N generator samples (or N of a sample folder's, by the labels of its manifest) with reference
statistics as papers compute them: the whole training split or a class-balanced subset of it, computed once
and cached under a content hash; or a given file (`--ref-stats`): our own `.npz`, or an ADM reference batch
(`mu`/`sigma`, or `arr_0` images), checked to hold finite Inception pool statistics. KID (unbiased) is reported
beside FID where the reference keeps features, because it is meaningful at small sample counts; below
MIN_IMAGES images FID is strongly biased, and a warning says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from nativetok.checkpoints import (
    generator_config,
    load_generator,
    load_generator_tokenizer,
    load_tokenizer,
    local_model_path,
    named_data,
    tokenizer_config,
)
from nativetok.data.shards import DatasetIndex
from nativetok.data.stream import ShardSpec, ShardStream, read_shard
from nativetok.data.transforms import ImageDecoder
from nativetok.eval.inception import (
    InceptionFeatures,
    InceptionWeights,
    cache_dir,
    first_line,
    inception_weights,
    sha256_file,
)
from nativetok.eval.samples import balanced_labels, check_sample_folder, generate_images, to_uint8
from nativetok.io import atomic_open
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
    kid_mean: Optional[float]
    kid_std: Optional[float]
    inception_score: Optional[float]
    weights: str
    reference: str = ""

    def row(self) -> str:
        is_text = f"{self.inception_score:.3f}" if self.inception_score is not None else "n/a"
        kid = f"{self.kid_mean:.5f} ± {self.kid_std:.5f}" if self.kid_mean is not None else "n/a"
        return f"| {self.name} | {self.images} | {self.fid:.3f} | {kid} | {is_text} |"


def score(name: str, images: Dict[str, Tensor], reference: Dict[str, Tensor], weights: InceptionWeights) -> Score:
    kid = kernel_inception_distance(images["pool"], reference["pool"])
    isc = inception_score(images["logits"])["mean"] if "logits" in images else None
    return Score(name, len(images["pool"]), frechet_distance(images["pool"], reference["pool"]), kid["mean"],
                 kid["std"], isc, weights.label, "the same real images")


def score_against(name: str, images: Dict[str, Tensor], reference: "ReferenceStats",
                  weights: InceptionWeights) -> Score:
    """FID against reference statistics; KID too where the reference keeps features."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats = fid_features_to_statistics(images["pool"].double().cpu())
    if reference.mu.shape != stats["mu"].shape:
        raise ValueError(f"the reference {reference.describe()} has {len(reference.mu)}-d statistics, but {name}'s "
                         f"features are {len(stats['mu'])}-d")
    fid = fid_statistics_to_metric(stats, {"mu": reference.mu, "sigma": reference.sigma}, verbose=False)
    kid = (kernel_inception_distance(images["pool"], reference.features) if reference.features is not None
           else {"mean": None, "std": None})
    isc = inception_score(images["logits"])["mean"] if "logits" in images else None
    return Score(name, len(images["pool"]), fid[KEY_METRIC_FID], kid["mean"], kid["std"], isc, weights.label,
                 reference.describe())


def table(scores: List[Score]) -> str:
    header = "| set | images | FID | KID | IS |\n| --- | ---: | ---: | ---: | ---: |"
    weights = sorted({s.weights for s in scores})
    return "\n".join([header, *(s.row() for s in scores), "", f"Inception weights: {'; '.join(weights)}"])


# -- image sources -----------------------------------------------------------------------------------


def real_images(index_path: str, split: str, count: int, seed: int = 0, batch_size: int = 250
                ) -> tuple[Tensor, Tensor]:
    """`count` images (uint8 [N, C, H, W]) of a split and their labels, in index order: the whole split, or a
    subset chosen by `class_balanced_positions` with `seed` (the first N would be a few classes wherever the
    shards were written class by class)."""
    index = DatasetIndex.load(index_path, holds="images")
    specs = [ShardSpec(p, s.samples) for p, s in zip(index.shard_paths(split), index.split(split).shards)]
    available = sum(s.samples for s in specs)
    if count > available:
        raise ValueError(f"{index_path} split '{split}' has {available} images, fewer than the {count} asked for")
    if count < available:
        labels = split_labels(index_path, split)
        positions = class_balanced_positions(labels, count, seed)
        return images_at(index_path, split, positions), torch.tensor([labels[p] for p in positions])
    decoder = ImageDecoder(index.image_size, index.channels, train=False)
    stream = ShardStream(specs, decoder, batch_size, strict=True)
    images, labels = [], []
    for batch in stream:
        images.append(batch["image"])
        labels.append(batch["label"])
    return torch.cat(images), torch.cat(labels)


def folder_images(folder: Path, positions: Sequence[int]) -> Tensor:
    """The PNG/JPEG images at `positions` of a folder (or its images/ subfolder) sorted by name; a sample
    folder written with `--format npz` gives those of its `samples.npz` (ADM's `arr_0`)."""
    folder, positions = Path(folder), list(positions)
    needed = max(positions, default=-1) + 1
    if not (folder / "images").is_dir() and (folder / "samples.npz").is_file():
        with np.load(folder / "samples.npz", allow_pickle=False) as data:
            images = data["arr_0"]
        if len(images) < needed:
            raise ValueError(f"{folder}/samples.npz holds {len(images)} images, fewer than the {needed} needed")
        return torch.from_numpy(np.ascontiguousarray(images[positions].transpose(0, 3, 1, 2)))
    if (folder / "images").is_dir():
        folder = folder / "images"
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < needed:
        raise ValueError(f"{folder} holds {len(files)} images, fewer than the {needed} needed")
    arrays, sizes = [], {}
    for path in (files[p] for p in positions):
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
    index_path: str, split: str, count: int, extractor: InceptionFeatures, cache: Optional[Path] = None, seed: int = 0
) -> Dict[str, Tensor]:
    """Inception features of `real_images(index_path, split, count, seed)`, computed once per (dataset, split,
    size, count, subset seed, weights)."""
    index = DatasetIndex.load(index_path, holds="images")
    shards = [(e.file, e.samples) for e in index.split(split).shards]
    identity = {
        "dataset": index.name, "index": str(Path(index_path).resolve()), "split": split, "count": count,
        "image_size": index.image_size, "channels": index.channels, "shards": shards,
        "weights": extractor.weights.label, "weights_file": str(extractor.weights.path),
        "seed": seed if count < index.split(split).samples else None,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = (cache or cache_dir()) / "real-stats"
    path = folder / f"{index.name}-{split}-{index.image_size}px-{count}-{key}.pt"
    cached = _cached_features(path, count) if path.is_file() else None
    if cached is not None:
        return cached
    images, _ = real_images(index_path, split, count, seed)
    features = extractor(images)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as file:
        torch.save(features, file)
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


# -- gFID reference statistics ----------------------------------------------------------------------------

POOL_FEATURES = 2048  # Inception's pool features: what every statistic here is of
MIN_IMAGES = 2048  # below this, FID's bias dominates differences between models (and 2048 > feature dim)
KID_FEATURES = 10000  # features a reference keeps for KID (a seeded subset when it has more)


@dataclass
class ReferenceStats:
    """The statistics gFID compares against: Inception mean and covariance, features for KID if kept."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    source: str  # what the statistics are of, in words
    features: Optional[Tensor] = None

    @property
    def sha256(self) -> str:
        """Content hash of the statistics themselves: results name exactly what they compared against."""
        return hashlib.sha256(self.mu.astype(np.float64).tobytes() + self.sigma.astype(np.float64).tobytes()
                              ).hexdigest()

    def describe(self) -> str:
        return f"{self.source} ({self.count} images, sha256 {self.sha256[:16]})"

    def save(self, path: Path) -> None:
        """An `.npz` with ADM's keys (`mu`, `sigma`) plus what KID and provenance need; written atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {"kid_features": self.features.numpy()} if self.features is not None else {}
        with atomic_open(path) as file:
            np.savez(file, mu=self.mu, sigma=self.sigma, count=np.array(self.count), source=np.array(self.source),
                     **extra)

    @classmethod
    def load(cls, path: Path, extractor: Optional[InceptionFeatures] = None) -> "ReferenceStats":
        """Our `.npz`, or an ADM reference batch: `mu`/`sigma` as given, else `arr_0` (uint8 NHWC) run
        through Inception (needs `extractor`). Never unpickles."""
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if {"mu", "sigma"} <= keys:
                features = torch.from_numpy(data["kid_features"]) if "kid_features" in keys else None
                count = int(data["count"]) if "count" in keys else 0
                source = str(data["source"]) if "source" in keys else f"reference statistics {Path(path).name}"
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                if mu.shape != (POOL_FEATURES,) or sigma.shape != (POOL_FEATURES, POOL_FEATURES):
                    raise ValueError(f"{path}: mu must be [{POOL_FEATURES}] and sigma [{POOL_FEATURES}, "
                                     f"{POOL_FEATURES}] (Inception pool features), got {mu.shape} and {sigma.shape}")
                if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                    raise ValueError(f"{path}: mu and sigma must be finite, found NaN or infinite values")
                return cls(mu, sigma, count, source, features)
            if "arr_0" not in keys:
                raise ValueError(f"{path} holds {sorted(keys)}: expected mu and sigma, or arr_0 (uint8 NHWC images)")
            images = data["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if extractor is None:
            raise ValueError(f"{path} holds images: computing their statistics needs Inception")
        features = extractor(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
        return cls.of_features(features["pool"], f"reference batch {Path(path).name}")

    @classmethod
    def of_features(cls, pool: Tensor, source: str, seed: int = 0) -> "ReferenceStats":
        from torch_fidelity.metric_fid import fid_features_to_statistics

        stats = fid_features_to_statistics(pool.double().cpu())
        kept = pool
        if len(pool) > KID_FEATURES:
            order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:KID_FEATURES]
            kept = pool[order.sort().values]
        return cls(stats["mu"], stats["sigma"], len(pool), source, kept.float().cpu())


def split_labels(index_path: str, split: str) -> List[int]:
    """The label of every sample of a split, in index order (reads the tar members, decodes no image)."""
    index = DatasetIndex.load(index_path, holds="images")
    labels: List[int] = []
    for path, shard in zip(index.shard_paths(split), index.split(split).shards):
        labels += [int(sample["cls"]) for sample in read_shard(ShardSpec(path, shard.samples))]
    return labels


def class_balanced_positions(labels: Sequence[int], count: int, seed: int) -> List[int]:
    """`count` positions drawn without replacement (seeded) so each class gets count / classes of them (the
    remainder to randomly chosen classes); a class with too few images is an error, not a silent skew."""
    by_class: Dict[int, List[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    classes = sorted(by_class)
    generator = torch.Generator().manual_seed(seed)
    quota = {c: count // len(classes) for c in classes}
    for i in torch.randperm(len(classes), generator=generator)[: count % len(classes)].tolist():
        quota[classes[i]] += 1
    chosen: List[int] = []
    for c in classes:
        if quota[c] > len(by_class[c]):
            raise ValueError(f"class {c} has {len(by_class[c])} images, fewer than its share {quota[c]} of {count}")
        picks = torch.randperm(len(by_class[c]), generator=generator)[: quota[c]].tolist()
        chosen += [by_class[c][i] for i in picks]
    return sorted(chosen)


def images_at(index_path: str, split: str, positions: Sequence[int]) -> Tensor:
    """The images (uint8 [N, C, H, W]) at the given positions of a split, in position order."""
    index = DatasetIndex.load(index_path, holds="images")
    decoder = ImageDecoder(index.image_size, index.channels, train=False)
    wanted, images, position = set(positions), [], 0
    rng = random.Random(0)
    for path, shard in zip(index.shard_paths(split), index.split(split).shards):
        if not wanted.intersection(range(position, position + shard.samples)):
            position += shard.samples
            continue
        for sample in read_shard(ShardSpec(path, shard.samples)):
            if position in wanted:
                images.append(decoder(sample, rng)["image"])
            position += 1
    return torch.stack(images)


def reference_stats(index_path: str, split: str, count: int, seed: int, extractor: InceptionFeatures,
                    cache: Optional[Path] = None) -> ReferenceStats:
    """Statistics of a whole split (`count` 0 or at least its size) or of a seeded class-balanced subset,
    computed once: cached under a hash of the index file's content, split, count, seed and the weights."""
    index = DatasetIndex.load(index_path, holds="images")
    available = index.split(split).samples
    whole = count <= 0 or count >= available
    identity = {
        "index_sha256": sha256_file(Path(index_path)), "split": split, "count": available if whole else count,
        "seed": None if whole else seed, "weights_sha256": sha256_file(extractor.weights.path),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = (cache or cache_dir()) / "reference-stats" / f"{index.name}-{split}-{identity['count']}-{key}.npz"
    if path.is_file():
        try:
            stats = ReferenceStats.load(path)
            log.info("gFID reference statistics from cache %s", path)
            return stats
        except Exception as error:  # a broken cache entry: rebuilt, never fatal
            log.warning("reference statistics %s are unusable (%s): computing them again", path, first_line(error))
    images, _ = real_images(index_path, split, identity["count"], seed)
    source = (f"{index.name} {split}, all {available} images" if whole
              else f"{index.name} {split}, {count} images class-balanced (seed {seed})")
    log.info("gFID reference: Inception features of %s", source)
    stats = ReferenceStats.of_features(extractor(images)["pool"], source, seed)
    stats.save(path)
    return stats


@torch.no_grad()
def reconstructions(tokenizer, images: Tensor, batch_size: int = 250, precision: str = "32-true") -> Tensor:
    device = next(tokenizer.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device).float() / 255
        with autocast(device, precision):
            out.append(to_uint8(tokenizer.decode(tokenizer.encode(batch))).cpu())
    return torch.cat(out)


def result_record(scores: List[Score], seed: int, warnings: List[str]) -> dict:
    """The JSON of an evaluation under stable keys (rfid, rkid, gfid, gkid, ...), whatever the set names."""
    record: dict = {"seed": seed, "warnings": warnings}
    for s in scores:
        prefix = "r" if s.name.startswith("rFID") else "g"
        record.update({f"{prefix}fid": s.fid, f"{prefix}kid": s.kid_mean, f"{prefix}kid_std": s.kid_std,
                       f"{prefix}images": s.images, f"{prefix}reference": s.reference})
        if s.inception_score is not None:
            record[f"{prefix}is"] = s.inception_score
        record["inception"] = s.weights
    record["sets"] = {s.name: asdict(s) for s in scores}
    return record


def few_images_warning(count: int) -> List[str]:
    if count >= MIN_IMAGES:
        return []
    message = (f"FID on {count} images (< {MIN_IMAGES}) is strongly biased upwards: compare it only with FIDs "
               f"on the same number of images, never with published 50k numbers")
    log.warning(message)
    return [message]


def evaluate_fid(
    tokenizer_path: Optional[str] = None,
    generator_path: Optional[str] = None,
    samples: Optional[Path] = None,
    num: Optional[int] = None,
    data: Optional[str] = None,
    real_split: str = "val",
    reference_split: str = "train",
    inception: Optional[str] = None,
    device: Optional[str] = None,
    seed: int = 0,
    out: Optional[Path] = None,
    precision: str = "32-true",
    tokenizer_mismatch_ok: bool = False,
    reference_images: Optional[int] = None,
    ref_stats: Optional[Path] = None,
    tokenizer_revision: Optional[str] = None,
    generator_revision: Optional[str] = None,
) -> List[Score]:
    """rFID of a tokenizer and/or gFID of a generator (or a folder of samples); results as JSON and a table.

    The real images are those of `data`, which the user names (`_named_real_data`); `num` and
    `reference_images` default to the config's `evaluation` section. gFID compares with `ref_stats` when
    given, else with the reference split's statistics (see `reference_stats`). `precision` applies to the
    tokenizer and generator (autocast); Inception always runs in fp32. A generator decodes with the
    tokenizer it was trained with (pinned by sha256; another one only with `tokenizer_mismatch_ok`); a
    sample folder must be a complete `nativetok sample` folder (its manifest). Either model may be a Hub repo
    id at its revision, resolved once.
    """
    tokenizer_path = local_model_path(tokenizer_path, tokenizer_revision)
    generator_path = local_model_path(generator_path, generator_revision)
    if not (tokenizer_path or generator_path or samples):
        raise ValueError("nothing to evaluate: give a tokenizer checkpoint, a generator checkpoint or a sample folder")
    if samples and not generator_path:
        check_sample_folder(samples)  # before any work: a killed, partial or unknown folder is refused
    if ref_stats is not None and not Path(ref_stats).is_file():
        raise FileNotFoundError(f"reference statistics not found: {ref_stats}")
    data = _named_real_data(data, tokenizer_path, generator_path, ref_stats)  # before any work
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = inception_weights(inception)  # loaded first: a file that is not plain tensors is refused at once
    extractor = InceptionFeatures(weights, device)
    num, reference_images = _image_counts(tokenizer_path, generator_path, num, reference_images)
    print(f"FID/KID on {num} images per set")
    warnings = few_images_warning(num)
    scores: List[Score] = []
    if tokenizer_path:
        scores.append(_reconstruction_score(tokenizer_path, data, real_split, num, extractor, device, precision,
                                            seed))
    if generator_path or samples:
        name, generated, index = (
            _generated_images(generator_path, data, num, device, seed, precision, tokenizer_mismatch_ok)
            if generator_path else _sample_folder_images(samples, data, num, ref_stats, seed))
        reference = (ReferenceStats.load(Path(ref_stats), extractor) if ref_stats is not None
                     else reference_stats(index, reference_split, reference_images, seed=0, extractor=extractor))
        scores.append(score_against(name, extractor(generated), reference, weights))
    _report(scores, seed, warnings, out)
    return scores


def _report(scores: List[Score], seed: int, warnings: List[str], out: Optional[Path]) -> None:
    """The table, and the JSON at `out`: a FID that is not a number is an error, never a NaN in the results."""
    for s in scores:
        if not math.isfinite(s.fid):
            raise ValueError(f"{s.name}: FID came out {s.fid} against {s.reference}: degenerate statistics")
    print(table(scores))
    print("\n".join(f"reference of {s.name}: {s.reference}" for s in scores))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out, "w") as file:  # allow_nan=False: a NaN that got this far is an error, not JSON
            file.write(json.dumps(result_record(scores, seed, warnings), indent=1, allow_nan=False) + "\n")
        log.info("results -> %s", out)


def _named_real_data(data: Optional[str], tokenizer_path: Optional[str], generator_path: Optional[str],
                     ref_stats: Optional[Path]) -> Optional[str]:
    """The real images' index, needed for rFID and for gFID without `ref_stats`: the one the user names, never
    the data.index a checkpoint stored (`checkpoints.named_data`)."""
    if tokenizer_path or (generator_path and ref_stats is None):
        return named_data(data, tokenizer_path or generator_path)
    return data


def _image_counts(tokenizer_path: Optional[str], generator_path: Optional[str], num: Optional[int],
                  reference_images: Optional[int]) -> Tuple[int, int]:
    """(images per set, reference images): as given, else the evaluated checkpoint's `evaluation` settings. Fewer
    than 2 images per set is refused here, in our words, rather than by torch-fidelity in its options' names."""
    settings = (generator_config(generator_path) if generator_path
                else tokenizer_config(tokenizer_path) if tokenizer_path else None)
    num = num if num is not None else (settings.evaluation.images if settings else 5000)
    if num < 2:
        raise ValueError(f"--num {num}: FID and KID need at least 2 images per set (a covariance and a pair)")
    if reference_images is None:
        reference_images = settings.evaluation.reference_images if settings else 10000
    return num, reference_images


def _reconstruction_score(tokenizer_path: str, data: Optional[str], split: str, num: int,
                          extractor: InceptionFeatures, device: str, precision: str, seed: int) -> Score:
    """rFID: the tokenizer's reconstructions of `num` class-balanced images of `split` against those images."""
    tokenizer = load_tokenizer(tokenizer_path, device)
    images, _ = real_images(data, split, num, seed)
    reference = real_features(data, split, num, extractor, seed=seed)
    rebuilt = extractor(reconstructions(tokenizer, images, precision=precision))
    return score(f"rFID: reconstructions of {split}", rebuilt, reference, extractor.weights)


def _generated_images(generator_path: str, data: Optional[str], num: int, device: str, seed: int, precision: str,
                      tokenizer_mismatch_ok: bool) -> Tuple[str, Tensor, str]:
    """(set name, `num` class-balanced samples of the generator, the real images' index as given) for gFID."""
    config = generator_config(generator_path)
    tokenizer, _ = load_generator_tokenizer(generator_path, device, mismatch_ok=tokenizer_mismatch_ok)
    labels = balanced_labels(config.data.num_classes, num)
    generated = generate_images(load_generator(generator_path, device), tokenizer, labels, config.sampling, seed,
                                batch_size=100, precision=precision)
    return f"gFID: {num} samples (cfg {config.sampling.cfg_scale})", generated, data


def _sample_folder_images(samples: Path, data: Optional[str], num: int, ref_stats: Optional[Path],
                          seed: int) -> Tuple[str, Tensor, Optional[str]]:
    """(set name, `num` class-balanced images of a sample folder, the real images' index if known) for gFID.
    The labels are the manifest's: image n has class `classes[n // per_class]`."""
    if data is None and ref_stats is None:
        raise ValueError("a sample folder needs --ref-stats or --data (the real images' index)")
    settings = check_sample_folder(samples).inputs
    labels = [c for c in settings["classes"] for _ in range(settings["per_class"])]
    if num > len(labels):
        raise ValueError(f"{samples} holds {len(labels)} samples, fewer than the {num} asked for (--num)")
    positions = class_balanced_positions(labels, num, seed)
    return f"gFID: {num} of {samples} (class-balanced)", folder_images(samples, positions), data
