"""The data path is exact: every sample once with its label, disjoint and complete splits, fixed epochs."""

from __future__ import annotations

import io
import itertools
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from nativetok.config.schema import DataConfig
from nativetok.data import DatasetIndex, ImageShardsDataModule
from nativetok.data.fmnist import DEBIAN_DIR, load_split, locate_files, pad_to
from nativetok.data.folders import shard_folder
from nativetok.data.shards import encode_image, write_shard
from nativetok.data.stream import DataError, ShardSpec, ShardStream, SkipCounts
from nativetok.data.tokens import decode_ids, encode_ids
from nativetok.data.transforms import ImageDecoder


def read_raw(path: Path):
    """The samples of a tar as dicts of bytes, in order."""
    samples, current = [], None
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            if current is None or current["__key__"] != key:
                current = {"__key__": key}
                samples.append(current)
            current[ext] = tar.extractfile(member).read()
    return samples


def stream(shards, train=False, batch_size=50, rank=0, world_size=1, workers=0, **kw):
    specs = [p if isinstance(p, ShardSpec) else ShardSpec(str(p)) for p in shards]
    return ShardStream(
        specs, ImageDecoder(32, 1, train=train, hflip=False), batch_size,
        rank=rank, world_size=world_size, num_workers=workers, train=train, **kw,
    )


def keys_of(dataset, workers=0):
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    batches = list(loader)
    return [k for b in batches for k in b["key"]], batches


def test_shard_round_trip_matches_idx_source(fmnist_index):
    """Every validation sample comes back once, pixel-exact and with its label, from the real shards."""
    index = DatasetIndex.load(fmnist_index)
    assert index.split("train").samples == 60000 and index.split("val").samples == 10000
    images, labels = load_split(locate_files(None, fmnist_index.parent / "raw"), "val")
    expected = pad_to(images, 32)
    specs = [ShardSpec(p, s.samples) for p, s in zip(index.shard_paths("val"), index.split("val").shards)]
    seen = Counter()
    for batch in DataLoader(stream(specs, batch_size=500), batch_size=None):
        for key, image, label in zip(batch["key"], batch["image"], batch["label"]):
            row = int(key[len("val"):])
            seen[row] += 1
            assert int(label) == labels[row]
            assert np.array_equal(image[0].numpy(), expected[row])
    assert len(seen) == 10000 and set(seen.values()) == {1}


def test_debian_files_are_the_default_source():
    if not DEBIAN_DIR.is_dir():
        pytest.fail("dataset-fashion-mnist is not installed (make data installs it when run as root)")
    assert locate_files(None, Path("/nonexistent")) == DEBIAN_DIR


@pytest.mark.parametrize("numbers", [[0, 1, 2, 3, 4], [2]])
def test_eval_split_over_two_ranks_and_two_workers_is_disjoint_and_complete(fmnist_index, numbers):
    """5 shards (dealt out) and 1 shard (split by sample) over 2 ranks x 2 workers: each sample once."""
    index = DatasetIndex.load(fmnist_index)
    specs = [ShardSpec(index.shard_paths("val")[n], 2000) for n in numbers]
    everything = []
    for rank in range(2):
        dataset = stream(specs, batch_size=64, rank=rank, world_size=2, workers=2)
        keys, batches = keys_of(dataset, workers=2)
        assert len(batches) == len(dataset)  # __len__ is exact, so Lightning's progress is too
        everything += keys
    assert len(everything) == 2000 * len(numbers)
    assert len(set(everything)) == len(everything)


def test_val_samples_limit_takes_an_exact_prefix(fmnist_index):
    config = DataConfig(index=str(fmnist_index), val_samples=2500, num_workers=0)
    module = ImageShardsDataModule(config)
    keys = []
    for rank in range(2):
        keys += keys_of(module.make_stream(False, rank, 2))[0]
    assert sorted(keys) == [f"val{i:07d}" for i in range(2500)]


def make_uneven_shards(tmp_path, source: Path, sizes):
    raw = read_raw(source)
    paths, start = [], 0
    for n, size in enumerate(sizes):
        path = tmp_path / f"uneven-train-{n:06d}.tar"
        write_shard(path, raw[start : start + size])
        paths.append(ShardSpec(str(path), size))
        start += size
    return paths


def test_training_gives_every_rank_the_same_batch_count_with_uneven_shards(tmp_path, fmnist_index):
    specs = make_uneven_shards(tmp_path, fmnist_index.parent / "fmnist-train-000000.tar", [700, 300, 100])
    counts = []
    for rank, workers in itertools.product(range(2), (0, 2)):
        dataset = stream(specs, train=True, batch_size=32, rank=rank, world_size=2, workers=workers,
                         batches_per_rank=1100 // 64, shuffle_buffer=100)
        keys, batches = keys_of(dataset, workers=workers)
        assert all(len(b["key"]) == 32 for b in batches)
        counts.append(len(batches))
    assert counts == [1100 // 64] * 4


def test_training_ranks_see_disjoint_samples_and_epochs_reshuffle(shard_copy):
    specs = [ShardSpec(str(p), 2000) for p in shard_copy("train", range(4))]

    def epoch_keys(rank, epoch):
        dataset = stream(specs, train=True, batch_size=50, rank=rank, world_size=2, workers=2,
                         batches_per_rank=80, shuffle_buffer=500, seed=7)
        dataset.set_position(epoch)
        return keys_of(dataset, workers=2)[0]

    rank0, rank1 = epoch_keys(0, 0), epoch_keys(1, 0)
    assert len(rank0) == len(rank1) == 4000
    assert len(set(rank0)) == 4000 and not set(rank0) & set(rank1)
    assert epoch_keys(0, 0) == rank0  # the same epoch and seed repeat exactly (resume)
    assert epoch_keys(0, 1) != rank0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_resumed_mid_epoch_continues_with_the_same_batches(shard_copy, workers):
    specs = [ShardSpec(str(p), 2000) for p in shard_copy("train", range(3))]

    def run(skip):
        dataset = stream(specs, train=True, batch_size=20, workers=workers, batches_per_rank=25,
                         shuffle_buffer=300, seed=3)
        dataset.set_position(2, skip)
        return [b["key"] for b in DataLoader(dataset, batch_size=None, num_workers=workers)]

    whole = run(0)
    assert len(whole) == 25
    assert run(7) == whole[7:] and run(24) == whole[24:]


def corrupt_shards(tmp_path, source: Path):
    """A good shard, a truncated one, and one with an undecodable image and a sample without a label."""
    raw = read_raw(source)
    good = tmp_path / "bad-train-000000.tar"
    write_shard(good, raw[:100])
    truncated = tmp_path / "bad-train-000001.tar"
    write_shard(truncated, raw[100:200])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    broken = [dict(s) for s in raw[200:300]]
    broken[10]["png"] = b"not a png at all"
    del broken[20]["cls"]
    mixed = tmp_path / "bad-train-000002.tar"
    write_shard(mixed, broken)
    labels = {s["__key__"]: int(s["cls"]) for s in raw[:300] if "cls" in s}
    return [good, truncated, mixed], labels, {broken[10]["__key__"], broken[20]["__key__"]}


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_data_is_skipped_counted_and_never_mislabelled(tmp_path, fmnist_index, workers):
    paths, labels, bad_keys = corrupt_shards(tmp_path, fmnist_index.parent / "fmnist-train-000000.tar")
    skips = SkipCounts()
    dataset = stream([ShardSpec(str(p)) for p in paths], batch_size=16, workers=workers, skips=skips)
    seen = {}
    for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
        for key, label in zip(batch["key"], batch["label"]):
            seen[key] = int(label)
    assert all(labels[k] == v for k, v in seen.items())
    assert not bad_keys & set(seen)
    assert 100 + 98 <= len(seen) < 300  # the good shard, the readable part of the truncated one, all but 2
    assert skips.shards == 1 and skips.samples == 2


def test_strict_mode_stops_at_the_first_bad_sample(tmp_path, fmnist_index):
    paths, _, _ = corrupt_shards(tmp_path, fmnist_index.parent / "fmnist-train-000000.tar")
    dataset = stream([ShardSpec(str(paths[2]))], batch_size=16, strict=True)
    with pytest.raises(DataError, match="strict"):
        list(DataLoader(dataset, batch_size=None))


def test_missing_shards_and_empty_patterns_name_themselves(tmp_path, shard_copy, fmnist_index):
    shard_copy("train", [0, 1])
    config = DataConfig(index=None, train_shards=str(tmp_path / "fmnist-train-{000000..000002}.tar"),
                        val_shards=str(tmp_path / "nothing-{0..3}.tar"), train_samples_per_epoch=1000)
    module = ImageShardsDataModule(config)
    assert len(module.shard_specs(train=True)) == 2 and module.skips.shards == 1
    with pytest.raises(DataError, match="nothing-0.tar"):
        module.shard_specs(train=False)
    strict = ImageShardsDataModule(DataConfig(**{**config.__dict__, "strict": True}))
    with pytest.raises(DataError, match="fmnist-train-000002.tar"):
        strict.shard_specs(train=True)


def test_training_stream_without_readable_data_fails_clearly(tmp_path):
    empty = tmp_path / "empty-train-000000.tar"
    empty.write_bytes(b"\0" * 10)
    dataset = stream([ShardSpec(str(empty), 10)], train=True, batches_per_rank=3)
    with pytest.raises(DataError, match="no readable samples"):
        list(DataLoader(dataset, batch_size=None))


def test_datamodule_yields_float_images_through_lightning_transfer_hook(fmnist_index):
    module = ImageShardsDataModule(DataConfig(index=str(fmnist_index), batch_size=32, num_workers=0))
    module.setup("fit")
    batch = module.on_after_batch_transfer(next(iter(module.train_dataloader())), 0)
    assert batch["image"].shape == (32, 1, 32, 32) and batch["image"].dtype.is_floating_point
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert len(module.train_dataloader()) == 60000 // 32
    assert len(module.val_dataloader()) == -(-10000 // 32)  # one consumer: one final partial batch


def test_index_mismatch_is_refused(fmnist_index):
    module = ImageShardsDataModule(DataConfig(index=str(fmnist_index), channels=3))
    with pytest.raises(DataError, match="data.channels"):
        module.check_index()


def test_folder_sharding_resizes_resumes_and_counts(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 7), ("val", 3)):
        for cls in ("cat", "dog"):
            folder = tmp_path / "tree" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                array = rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)
                Image.fromarray(array).save(folder / f"{i}.jpg")
    out = tmp_path / "shards"
    index = shard_folder(tmp_path / "tree", out, "toy", size=16, per_shard=4, fmt="png", workers=2)
    assert index.classes == ["cat", "dog"] and index.split("train").samples == 14
    assert [s.samples for s in index.split("train").shards] == [4, 4, 4, 2]
    first = out / "toy-train-000000.tar"
    stamp = first.stat().st_mtime_ns
    (out / "toy-train-000003.tar").unlink()  # as if killed before the last shard was complete
    shard_folder(tmp_path / "tree", out, "toy", size=16, per_shard=4, fmt="png", workers=2)
    assert first.stat().st_mtime_ns == stamp and (out / "toy-train-000003.tar").is_file()
    sample = read_raw(out / "toy-val-000001.tar")[0]
    assert Image.open(io.BytesIO(sample["png"])).size == (16, 16)
    labels = [int(s["cls"]) for p in sorted(out.glob("toy-train-*.tar")) for s in read_raw(p)]
    assert sorted(labels) == [0] * 7 + [1] * 7 and labels != sorted(labels)  # written in a shuffled order


def test_random_training_transforms_keep_size_and_label():
    decoder = ImageDecoder(24, 3, train=True, hflip=True)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
    out = decoder({"__key__": "k", "png": buffer.getvalue(), "cls": b"3"}, random.Random(0))
    assert out["image"].shape == (3, 24, 24) and out["label"] == 3


def test_a_view_names_the_pixels_after_the_random_crop_and_flip(fmnist_index):
    """Equal views are equal pixels and different views different ones: what a prefix cache keys on."""
    real = read_raw(fmnist_index.parent / "fmnist-train-000000.tar")[0]
    wide = dict(real, __key__="wide", png=encode_image(np.random.default_rng(0).integers(0, 256, (32, 48), np.uint8)))
    decoder, rng = ImageDecoder(32, 1, train=True, hflip=True), random.Random(0)
    pixels = {}
    for sample in [real] * 10 + [wide] * 60:
        out = decoder(sample, rng)
        pixels.setdefault(out["view"], set()).add(out["image"].numpy().tobytes())
    assert all(len(images) == 1 for images in pixels.values())
    assert len({image for images in pixels.values() for image in images}) == len(pixels)
    key = real["__key__"]
    assert {view for view in pixels if view.startswith(key)} == {f"{key}@0,0", f"{key}@0,0~"}
    assert len(pixels) > 10  # the wide image gives crops at several corners, flipped or not
    assert ImageDecoder(32, 1, train=False)(wide, rng)["view"] == "wide@8,0"  # evaluation: the centre crop


def test_a_killed_fmnist_rebuild_leaves_no_index_to_vouch_for_mixed_shards(tmp_path, monkeypatch):
    """Built at 32 px, rebuilt at 40 px and killed after two shards: the next 32 px build rewrites every
    shard, since the old index no longer claims the folder is up to date."""
    from nativetok.data import fmnist, shards

    monkeypatch.setattr(fmnist, "load_split", lambda folder, split: tuple(a[:300] for a in load_split(folder, split)))
    out = tmp_path / "fmnist"
    fmnist.write_fmnist(out, per_shard=100)
    real_write, written = shards.write_shard, []

    def killed_after_two(path, samples):
        if len(written) == 2:
            raise KeyboardInterrupt  # the process dies here
        written.append(path)
        return real_write(path, samples)

    monkeypatch.setattr(fmnist, "write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        fmnist.write_fmnist(out, size=40, per_shard=100)
    assert not (out / "index.json").exists()
    monkeypatch.setattr(fmnist, "write_shard", real_write)
    index = fmnist.write_fmnist(out, per_shard=100)
    for split in index.splits:
        for path in index.shard_paths(split):
            with tarfile.open(path) as tar:
                png = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png"))
            assert Image.open(io.BytesIO(png)).size == (32, 32), path


def npy_bytes(array, **options) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array), **options)
    return buffer.getvalue()


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_token_ids_decode_as_numpy_loads_them_in_every_npy_version(version):
    arrays = [np.arange(16, dtype=np.uint16), np.arange(12, dtype=np.int32).reshape(3, 4),
              np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)), np.zeros(0, np.uint16)]
    for array in arrays:
        data = npy_bytes(array, version=version)
        decoded, loaded = decode_ids(data), np.load(io.BytesIO(data), allow_pickle=False)
        assert decoded.dtype == loaded.dtype and decoded.shape == loaded.shape
        assert np.array_equal(decoded, loaded)
    assert np.array_equal(decode_ids(encode_ids(np.array([3, 70000]))), [3, 70000])


def test_token_ids_that_need_pickle_are_cut_short_or_are_not_npy_are_refused():
    objects = npy_bytes(np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="without pickle"):
        decode_ids(objects)
    with pytest.raises(ValueError, match="smaller"):
        decode_ids(npy_bytes(np.arange(16, dtype=np.uint16))[:-2])
    for junk in (b"", b"PK\x03\x04 a zip, not an array"):
        with pytest.raises(ValueError, match="magic"):
            decode_ids(junk)
