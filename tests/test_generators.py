"""Stage 2: pre-tokenized shards, AR and MaskGIT generators, guidance, sampling to files."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from nativetok import load_generator, load_tokenizer
from nativetok.checkpoints import CheckpointError
from nativetok.config import load_config
from nativetok.config.schema import GENERATOR_KINDS, GeneratorConfig, SamplingConfig
from nativetok.data import DatasetIndex, TokenShardsDataModule
from nativetok.data.stream import DataError, ShardSpec, ShardStream
from nativetok.data.tokens import decode_ids
from nativetok.data.transforms import ImageDecoder
from nativetok.lit.train import train_generator, train_tokenizer
from nativetok.models import GENERATORS, ARGenerator, Generator, MaskGITGenerator, build_generator
from nativetok.models.maskgit import masked_after_step
from nativetok.pipelines.sample import sample_to_folder
from nativetok.pipelines.tokenize import tokenize_shards

from .conftest import REPO, TINY
from .test_data import read_raw


def tiny_ar(**kw) -> ARGenerator:
    torch.manual_seed(0)
    return ARGenerator(codebook_size=32, num_tokens=12, num_classes=5, width=32, depth=2, heads=2, **kw).eval()


def tiny_maskgit(**kw) -> MaskGITGenerator:
    torch.manual_seed(0)
    return MaskGITGenerator(codebook_size=32, num_tokens=12, num_classes=5, width=32, depth=2, heads=2, **kw).eval()


LABELS = torch.tensor([0, 1, 2, 3, 4, 0])


@pytest.mark.parametrize("settings", [dict(cfg_scale=2.0), dict(cfg_scale=3.0, top_k=8, top_p=0.9, temperature=0.8),
                                      dict(cfg_scale=1.5, cfg_schedule="linear")])
def test_kv_cache_sampling_equals_recomputing_the_sequence(settings):
    model = tiny_ar()
    cached = model.sample(LABELS, seed=3, **settings)
    recomputed = model.sample(LABELS, seed=3, use_cache=False, **settings)
    assert cached.shape == (6, 12) and torch.equal(cached, recomputed)
    assert torch.equal(model.sample(LABELS, seed=3, **settings), cached)  # seeded: reproducible
    assert not torch.equal(model.sample(LABELS, seed=4, **settings), cached)


def test_guidance_scale_one_equals_plain_conditional_sampling():
    """With a schedule the guided batch (cond + null rows) runs; at scale 1 it must give the conditional tokens."""
    for model in (tiny_ar(), tiny_maskgit()):
        plain = model.sample(LABELS, cfg_scale=1.0, seed=1)
        guided = model.sample(LABELS, cfg_scale=1.0, cfg_schedule="linear", seed=1)
        assert torch.equal(plain, guided)
        assert not torch.equal(model.sample(LABELS, cfg_scale=4.0, seed=1), plain)


def test_the_unconditional_half_uses_the_null_class():
    for model in (tiny_ar(), tiny_maskgit()):
        seen: list = []
        model.class_embed.register_forward_hook(lambda module, args, out, seen=seen: seen.append(args[0].clone()))
        model.sample(LABELS, cfg_scale=2.0, seed=0)
        rows = seen[0]
        assert torch.equal(rows[:6], LABELS) and bool((rows[6:] == model.null_class).all())


def test_maskgit_unmasks_the_scheduled_number_each_step_and_ends_with_none_masked():
    model = tiny_maskgit(schedule="cosine")
    ids, history = model.sample(LABELS, steps=8, cfg_scale=2.0, seed=0, return_steps=True)
    counts = [int((h == model.mask_id).sum(1)[0]) for h in history]
    assert all(int((h == model.mask_id).sum(1).max()) == c for h, c in zip(history, counts))  # every row alike
    assert counts == masked_after_step(12, 8, "cosine") and counts[-1] == 0
    assert all(a > b for a, b in zip([12] + counts, counts))  # at least one token decided per step
    for before, after in zip(history, history[1:]):  # decided tokens stay decided
        known = before != model.mask_id
        assert torch.equal(after[known], before[known])
    assert int(ids.max()) < 32 and torch.equal(ids, history[-1])


def test_mask_schedules_are_monotone_and_reach_zero():
    for schedule in ("cosine", "arccos", "linear"):
        counts = masked_after_step(16, 8, schedule)
        assert counts == sorted(counts, reverse=True) and counts[-1] == 0 and len(set(counts)) == 8


def test_the_registry_builds_every_configured_kind_and_names_the_settings_it_samples_with():
    assert set(GENERATORS) == set(GENERATOR_KINDS)
    fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    for kind in GENERATOR_KINDS:
        config = GeneratorConfig(kind=kind, codebook_size=32, num_tokens=12, width=32, depth=2, heads=2,
                                 mask_schedule="arccos")
        model = build_generator(config, 5)
        assert type(model) is GENERATORS[kind] and model.kind == kind and isinstance(model, Generator)
        assert set(model.sampling_fields) <= fields
    assert build_generator(config, 5).schedule == "arccos"
    with pytest.raises(ValueError, match="unknown generator kind 'gpt': use ar or maskgit"):
        build_generator(GeneratorConfig(kind="gpt"), 5)
    with pytest.raises(ValueError, match="unknown mask schedule 'square'"):
        tiny_maskgit(schedule="square")


@pytest.mark.parametrize("make", [tiny_ar, tiny_maskgit])
def test_sample_reads_the_settings_of_its_kind_from_a_sampling_config_and_keywords_override_them(make):
    model = make()
    sampling = SamplingConfig(cfg_scale=3.0, cfg_schedule="linear", temperature=0.8, top_k=8, top_p=0.9, steps=5,
                              choice_temperature=2.0)
    chosen = {name: getattr(sampling, name) for name in model.sampling_fields}
    ids = model.sample(LABELS, sampling, 3)
    assert torch.equal(ids, model.sample(LABELS, seed=3, **chosen))
    unguided = model.sample(LABELS, sampling, 3, cfg_scale=1.0)
    assert torch.equal(unguided, model.sample(LABELS, seed=3, **{**chosen, "cfg_scale": 1.0}))


def test_state_dict_keys_are_those_checkpoints_hold():
    block = ["norm1.weight", "attn.qkv.weight", "attn.out.weight", "norm2.weight", "mlp.up.weight", "mlp.down.weight"]
    trunk = ["class_embed.weight", "token_embed.weight", *(f"blocks.{i}.{k}" for i in range(2) for k in block),
             "norm.weight", "head.weight"]
    assert list(tiny_ar().state_dict()) == trunk
    assert list(tiny_maskgit().state_dict()) == ["positions", *trunk]


@pytest.mark.parametrize("make", [tiny_ar, tiny_maskgit])
def test_a_generator_overfits_a_tiny_token_set(make):
    model = make(class_dropout=0.0).train()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (5, 12), generator=generator)
    labels = torch.arange(5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss, _ = model.loss(tokens, labels, generator)  # the shared interface: AR draws nothing
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    if isinstance(model, ARGenerator):
        assert torch.equal(model.eval().sample(labels, temperature=0.0), tokens)  # greedy decoding recalls them


def test_sampling_refuses_unknown_classes():
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\)"):
        tiny_ar().sample(torch.tensor([5]))
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\)"):
        tiny_maskgit().sample(torch.tensor([-1]))


# -- the pipeline on real data: a tiny tokenizer, its token shards, a generator -----------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, fmnist_index):
    """A tiny tokenizer trained for a few steps, one train and one val shard tokenized with --flip."""
    root = tmp_path_factory.mktemp("pipeline")
    images = root / "images"
    images.mkdir()
    index = DatasetIndex.load(fmnist_index)
    for split in ("train", "val"):
        shutil.copyfile(index.shard_paths(split)[0], images / f"fmnist-{split}-000000.tar")
    index.splits = {s: type(index.split(s))(index.split(s).shards[:1]) for s in ("train", "val")}
    index.root = images
    index.save(images)
    config = load_config(
        REPO / "experiments" / "fmnist_tiny.yaml",
        TINY + [f"data.index={images / 'index.json'}", f"run.dir={root / 'tok'}", "trainer.max_steps=3",
                "trainer.val_every_n_steps=3"],
    )
    train_tokenizer(config)
    checkpoint = root / "tok" / "checkpoints" / "last.ckpt"
    tokenize_shards(str(checkpoint), str(images / "index.json"), root / "tokens", batch_size=500, flip=True)
    return {"root": root, "images": images / "index.json", "tokenizer": checkpoint, "tokens": root / "tokens"}


def generator_config(pipeline, kind: str, *extra: str):
    """The generator sizes are left out: they are read from the tokenizer (32 codes, 8 tokens)."""
    return load_config(
        REPO / "experiments" / f"fmnist_tiny_{kind}.yaml",
        [f"data.index={pipeline['tokens'] / 'index.json'}", f"generator.tokenizer={pipeline['tokenizer']}",
         f"run.dir={pipeline['root'] / kind}", "generator.width=32", "generator.depth=1", "generator.heads=2",
         "data.batch_size=32",
         "data.num_workers=0", "data.val_samples=256", "trainer.max_steps=4", "trainer.val_every_n_steps=4",
         "trainer.progress_bar=false", "trainer.images_every_n_steps=0", "sampling.grid_per_class=2", *extra],
    )


def test_token_shards_round_trip_to_the_ids_the_tokenizer_gives(pipeline):
    tokenizer = load_tokenizer(pipeline["tokenizer"])
    meta = DatasetIndex.load(pipeline["tokens"] / "index.json")
    assert meta.tokens["codebook_size"] == 32 and meta.tokens["num_tokens"] == 8 and meta.tokens["flip"]
    assert meta.split("val").samples == 2000
    module = TokenShardsDataModule(load_config(REPO / "experiments" / "fmnist_tiny_ar.yaml",
                                               [f"data.index={pipeline['tokens'] / 'index.json'}",
                                                "data.num_workers=0", "data.hflip=false"]).data, 32, 8)
    module.check_index()
    tokens = {}
    for batch in DataLoader(module.make_stream(False), batch_size=None):
        tokens.update({k: t for k, t in zip(batch["key"], batch["tokens"])})
    images = ShardStream([ShardSpec(str(pipeline["images"].parent / "fmnist-val-000000.tar"))],
                         ImageDecoder(32, 1, train=False), 500)
    for batch in DataLoader(images, batch_size=None):
        pixels = batch["image"].float() / 255
        expected = tokenizer.encode(pixels)
        assert all(torch.equal(tokens[k], e) for k, e in zip(batch["key"], expected))
    assert len(tokens) == 2000
    first = next(iter(DataLoader(images, batch_size=None)))
    flipped = tokenizer.encode(first["image"].float().flip(-1) / 255)
    stored = [decode_ids(s["flip.npy"]) for s in read_raw(pipeline["tokens"] / "fmnist-tokens-val-000000.tar")[:500]]
    assert all(np.array_equal(s, f.numpy()) for s, f in zip(stored, flipped))


def test_mismatched_token_shards_and_tokenizers_are_refused(pipeline):
    config = generator_config(pipeline, "ar", "generator.codebook_size=64")
    with pytest.raises(DataError, match="have codebook_size 32 but generator.codebook_size is 64"):
        train_generator(config)
    module = TokenShardsDataModule(config.data, 32, 16)
    with pytest.raises(DataError, match="have num_tokens 8 but generator.num_tokens is 16"):
        module.check_index()
    images = TokenShardsDataModule(load_config(REPO / "experiments" / "fmnist_tiny_ar.yaml",
                                               [f"data.index={pipeline['images']}"]).data, 32, 8)
    with pytest.raises(DataError, match="indexes image shards, not token shards"):
        images.check_index()
    from nativetok.checkpoints import load_tokenizer
    from nativetok.config.schema import GeneratorConfig

    with pytest.raises(CheckpointError, match="has codebook_size 32 but the generator expects 256"):
        load_tokenizer(pipeline["tokenizer"], fits=GeneratorConfig(codebook_size=256, num_tokens=8))


def test_generator_sizes_left_out_need_a_tokenizer_to_read_them_from(tmp_path):
    from nativetok.checkpoints import with_tokenizer_sizes
    from nativetok.config import ConfigError

    missing = load_config(REPO / "experiments" / "fmnist_tiny_ar.yaml",
                          [f"generator.tokenizer={tmp_path / 'none.ckpt'}", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="generator.codebook_size and generator.num_tokens are left out"):
        train_generator(missing)
    sizes = dataclasses.replace(missing.generator, codebook_size=64, num_tokens=4)
    given = dataclasses.replace(missing, generator=sizes)
    assert with_tokenizer_sizes(given) is given  # given sizes: the tokenizer is not read


@pytest.mark.parametrize("kind", ["ar", "maskgit"])
def test_generators_train_through_lightning_and_sample_reproducibly(pipeline, kind):
    config = generator_config(pipeline, kind)
    assert (config.generator.codebook_size, config.generator.num_tokens) == (None, None)
    train_generator(config)
    run_dir = Path(config.run.dir)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert (run_dir / "samples.png").is_file()
    model = load_generator(checkpoint)
    assert isinstance(model, ARGenerator if kind == "ar" else MaskGITGenerator)
    assert (model.codebook_size, model.num_tokens) == (32, 8)  # the tokenizer's, read once and stored
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())["generator"]
    assert (stored["codebook_size"], stored["num_tokens"]) == (32, 8)
    first = sample_to_folder(str(checkpoint), pipeline["root"] / f"samples-{kind}-1", classes=[0, 3], per_class=3,
                             batch_size=4, device="cpu", cfg_scale=1.5)
    second = sample_to_folder(str(checkpoint), pipeline["root"] / f"samples-{kind}-2", classes=[0, 3], per_class=3,
                              batch_size=4, device="cpu", cfg_scale=1.5)
    a, b = np.load(first / "samples.npz"), np.load(second / "samples.npz")
    assert a["arr_0"].shape == (6, 32, 32, 3) and a["labels"].tolist() == [0, 0, 0, 3, 3, 3]
    assert np.array_equal(a["arr_0"], b["arr_0"])
    assert len(list((first / "images").glob("*.png"))) == 6 and (first / "grid.png").is_file()
    assert json.loads((first / "samples.json").read_text())["sampling"]["cfg_scale"] == 1.5
    with pytest.raises(ValueError, match="unknown class ids \\[10\\]"):
        sample_to_folder(str(checkpoint), pipeline["root"] / "bad", classes=[10], device="cpu")
    with pytest.raises(CheckpointError, match="is a generator checkpoint, not a tokenizer"):
        load_tokenizer(checkpoint)


def test_tokenize_sample_and_eval_fid_run_under_autocast(pipeline, tmp_path):
    """The inference commands' `--precision bf16-mixed` (and 16-mixed) paths, end to end on CPU."""
    from nativetok.eval.fid import evaluate_fid

    out = tmp_path / "tokens"
    tokenize_shards(str(pipeline["tokenizer"]), str(pipeline["images"]), out, splits=["val"], batch_size=500,
                    precision="bf16-mixed")
    stored = [decode_ids(s["tokens.npy"]) for s in read_raw(out / "fmnist-tokens-val-000000.tar")]
    assert len(stored) == 2000 and all(s.shape == (8,) and 0 <= s.min() and s.max() < 32 for s in stored)

    train_generator(generator_config(pipeline, "ar", f"run.dir={tmp_path / 'ar'}", "trainer.precision=bf16-mixed"))
    run_dir = tmp_path / "ar"
    checkpoint = str(run_dir / "checkpoints" / "last.ckpt")
    for precision in ("bf16-mixed", "16-mixed"):
        folder = sample_to_folder(checkpoint, tmp_path / precision, classes=[1], per_class=2, device="cpu",
                                  precision=precision)
        images = np.load(folder / "samples.npz")["arr_0"]
        assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8

    scores = evaluate_fid(tokenizer_path=str(pipeline["tokenizer"]), num=8, data=str(pipeline["images"]),
                          device="cpu", precision="bf16-mixed")
    assert np.isfinite(scores[0].fid) and scores[0].images == 8
