"""Values that must be refused with a clear message: non-finite or impossible config values, sampling options,
images and ids given to the public tokenizer API, token shards the generator cannot take, malformed input."""

from __future__ import annotations

import io
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nativetok.cli import main
from nativetok.config import ConfigError, load_config
from nativetok.config.loading import from_container
from nativetok.config.schema import (
    DecoderConfig,
    ExperimentConfig,
    ExpertsConfig,
    QuantizerConfig,
    TokenizerConfig,
    TransformerConfig,
)
from nativetok.data import DatasetIndex, TokenShardsDataModule
from nativetok.data.shards import ShardEntry, SplitIndex, write_shard
from nativetok.data.stream import DataError
from nativetok.models.tokenizer import NativeTokenizer, build_tokenizer

from .conftest import REPO

STAGE1 = REPO / "experiments" / "fmnist_tiny.yaml"
STAGE2 = REPO / "experiments" / "fmnist_tiny_ar.yaml"


def float_keys(schema: type, prefix: str = "") -> typing.Iterator[str]:
    """The dotted keys of every float (or list of floats) the schema declares."""
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        hint, key = hints[f.name], f"{prefix}{f.name}"
        if is_dataclass(hint):
            yield from float_keys(hint, f"{key}.")
        elif float in (hint, *typing.get_args(hint)):
            yield key


FLOAT_KEYS = list(float_keys(ExperimentConfig))


def test_the_schema_walk_finds_the_floats_the_issue_names():
    assert {"optim.lr", "optim.weight_decay", "optim.grad_clip", "optim.betas", "sampling.cfg_scale"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_of_the_schema_must_be_finite(key, value):
    override = f"{key}=[{value}, 0.9]" if key == "optim.betas" else f"{key}={value}"
    with pytest.raises(ConfigError) as error:
        load_config(STAGE1, [override])
    lines = [line for line in str(error.value).splitlines() if line.strip().startswith(f"{key}:")]
    assert len(lines) == 1 and "finite number" in lines[0] and "command line" in lines[0]  # one message, not two


@pytest.mark.parametrize("experiment, overrides, problem", [
    (STAGE1, ["trainer.plateau_min_gain_db=0"], "trainer.plateau_min_gain_db: must be a gain in dB > 0"),
    (STAGE1, ["trainer.plateau_min_gain_db=0.1", "trainer.limit_val_batches=0"],
     "trainer.plateau_min_gain_db: needs validation"),
    (STAGE1, ["trainer.plateau_min_gain_db=0.1", "trainer.plateau_min_steps=6000"],
     "trainer.plateau_min_steps: 6000 is beyond trainer.max_steps 5000"),
    (STAGE1, ["trainer.plateau_min_steps=-1"], "trainer.plateau_min_steps: must be a step count >= 0"),
    (STAGE1, ["trainer.plateau_patience=0"], "trainer.plateau_patience: must be a count of validations >= 1"),
    (STAGE2, ["trainer.plateau_min_gain_db=0.1"], "trainer.plateau_min_gain_db: watches stage 1's validation PSNR"),
])
def test_a_plateau_stop_that_cannot_act_is_refused_naming_its_key(experiment, overrides, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_config(experiment, overrides)


@pytest.mark.parametrize("devices", ["0", "'0'", "[]", "-2", "[-1]", "true"])
def test_trainer_devices_must_name_at_least_one_device(devices):
    with pytest.raises(ConfigError, match="trainer.devices: must be auto, a positive count or a non-empty list"):
        load_config(STAGE1, [f"trainer.devices={devices}", "trainer.accelerator=cpu"])


@pytest.mark.parametrize("devices", ["auto", "1", "[0]", "'2'"])
def test_trainer_devices_accepts_auto_counts_and_id_lists(devices):
    load_config(STAGE1, [f"trainer.devices={devices}"])


# -- one code path for sampling.* in a config and the `sample` command's options ----------------------------

SAMPLING_CASES = [
    ("--temperature", "-1", "sampling.temperature", "must be >= 0, got -1.0"),
    ("--top-p", "0", "sampling.top_p", "must be in (0, 1], got 0.0"),
    ("--top-p", "1.5", "sampling.top_p", "must be in (0, 1], got 1.5"),
    ("--cfg", "nan", "sampling.cfg_scale", "must be a finite number, got nan"),
    ("--cfg", "inf", "sampling.cfg_scale", "must be a finite number, got inf"),
    ("--top-k", "-3", "sampling.top_k", "must be >= 0, got -3"),
    ("--steps", "0", "sampling.steps", "must be > 0, got 0"),
]


@pytest.mark.parametrize("option, value, key, problem", SAMPLING_CASES)
def test_sample_options_are_refused_like_the_config_keys_they_override(tmp_path, capsys, option, value, key, problem):
    with pytest.raises(ConfigError, match=re.escape(f"{key}: {problem}")):
        load_config(STAGE2, [f"{key}={value}"])
    # The option is checked before the (here missing) checkpoint is read, with the config's words.
    code = main(["sample", "--generator", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path), option, value])
    assert code == 2 and f"nativetok sample: error: {option}: {problem}\n" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--per-class", "--batch-size"])
def test_sample_counts_must_be_positive(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--generator", str(tmp_path / "g.ckpt"), "--out", str(tmp_path), option, "0"])
    assert exit_.value.code == 2 and f"{option}: must be at least 1, got 0" in capsys.readouterr().err


# -- the public tokenizer API --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> NativeTokenizer:
    torch.manual_seed(0)
    config = TokenizerConfig(
        patch_size=8, num_tokens=4, mit=TransformerConfig(width=32, depth=1, heads=2), latent_width=16,
        experts=ExpertsConfig(depth=1, heads=2), quantizer=QuantizerConfig(codebook_size=32),
        decoder=DecoderConfig(width=32, depth=1, heads=2),
    )
    return build_tokenizer(config, image_size=32, channels=1).eval()


def test_encode_refuses_pixels_outside_0_1_and_names_the_fix(tokenizer):
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match=r"in \[0, 1\], got values from 0 to 255 \(images in 0..255: divide them by"):
        tokenizer.encode(images * 255)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got values from -1 to 1$"):
        tokenizer.encode(images * 2 - 1)
    for bad in (float("nan"), float("inf")):
        poisoned = images.clone()
        poisoned[1, 0, 3, 4] = bad
        with pytest.raises(ValueError, match="images must be finite"):
            tokenizer.encode(poisoned)
    rounded = images.clone()
    rounded[0, 0, 0, 0], rounded[1, 0, 0, 0] = 1 + 1e-5, -1e-5  # rounding in the caller's resize: tolerated
    assert tokenizer.encode(rounded).shape == (2, 4)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_encode_refuses_images_that_are_not_float_naming_the_dtype(tokenizer, dtype):
    with pytest.raises(ValueError, match=rf"images must be float in \[0, 1\], got dtype {dtype}"):
        tokenizer.encode(torch.zeros(2, 1, 32, 32, dtype=dtype))


def test_decode_refuses_ids_that_are_not_integers_and_takes_any_integer_dtype(tokenizer):
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with pytest.raises(ValueError, match="ids must be an integer tensor of token ids, got dtype torch.float32"):
        tokenizer.decode(ids.float())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 32\)"):
        tokenizer.decode(ids + 30)
    torch.testing.assert_close(tokenizer.decode(ids.int()), tokenizer.decode(ids))


# -- token shards ---------------------------------------------------------------------------------------------


def npy(values, dtype=np.uint16) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(values, dtype=dtype))
    return buffer.getvalue()


def write_token_shards(folder: Path) -> tuple[Path, set[str], set[str]]:
    """One token shard (codebook 32, 8 tokens, 10 classes) holding good samples and one bad sample of each kind;
    returns the index and the keys of the good and the bad samples."""
    good = [{"__key__": f"good{i:02d}", "tokens.npy": npy(np.arange(8) + i), "flip.npy": npy(np.arange(8)),
             "cls": str(i % 10).encode()} for i in range(12)]
    bad = [
        {"__key__": "id_too_big", "tokens.npy": npy([0, 1, 2, 3, 4, 5, 6, 32]), "cls": b"1"},
        {"__key__": "id_negative", "tokens.npy": npy([0, 1, 2, -1, 4, 5, 6, 7], np.int32), "cls": b"1"},
        {"__key__": "flip_too_big", "tokens.npy": npy(range(8)), "flip.npy": npy([99] * 8), "cls": b"1"},
        {"__key__": "too_short", "tokens.npy": npy(range(7)), "cls": b"1"},
        {"__key__": "two_rows", "tokens.npy": npy([range(8), range(8)]), "cls": b"1"},
        {"__key__": "float_ids", "tokens.npy": npy(range(8), np.float32), "cls": b"1"},
        {"__key__": "label_too_big", "tokens.npy": npy(range(8)), "cls": b"10"},
        {"__key__": "label_negative", "tokens.npy": npy(range(8)), "cls": b"-1"},
    ]
    samples = good[:6] + bad + good[6:]
    write_shard(folder / "tok-val-000000.tar", samples)
    index = DatasetIndex(
        name="tok", image_size=32, channels=1, classes=[str(c) for c in range(10)],
        splits={split: SplitIndex([ShardEntry("tok-val-000000.tar", len(samples))]) for split in ("train", "val")},
        tokens={"codebook_size": 32, "num_tokens": 8, "flip": True},
    )
    return index.save(folder), {s["__key__"] for s in good}, {s["__key__"] for s in bad}


def token_module(index: Path, **data) -> TokenShardsDataModule:
    config = load_config(STAGE2, [f"data.index={index}", "data.num_workers=0", "data.batch_size=4",
                                  "data.shuffle_buffer=0"] + [f"data.{k}={v}" for k, v in data.items()]).data
    return TokenShardsDataModule(config, codebook_size=32, num_tokens=8)


@pytest.mark.parametrize("train", [False, True])
def test_bad_token_samples_are_skipped_and_counted(tmp_path, train):
    index, good, bad = write_token_shards(tmp_path)
    module = token_module(index, train_samples_per_epoch=12)
    seen = set()
    for batch in DataLoader(module.make_stream(train), batch_size=None):
        assert batch["tokens"].shape[1] == 8 and int(batch["tokens"].max()) < 32 and int(batch["label"].max()) < 10
        seen.update(batch["key"])
    assert seen == good and module.skips.samples == len(bad)


def test_a_bad_token_sample_stops_a_strict_run_naming_the_problem(tmp_path):
    index, _, _ = write_token_shards(tmp_path)
    stream = token_module(index, strict="true").make_stream(False)
    with pytest.raises(DataError, match=r"key id_too_big: tokens.npy has ids from 0 to 32, outside the codebook"):
        list(DataLoader(stream, batch_size=None))


# -- malformed input reaches the user as a message, not a traceback ---------------------------------------------


def test_a_split_the_index_lacks_is_named_with_its_config_key(tmp_path):
    index, _, _ = write_token_shards(tmp_path)
    with pytest.raises(DataError, match="data.val_split 'test' is not a split of .* \\(it has train, val\\)"):
        token_module(index, val_split="test").shard_specs(train=False)


@pytest.mark.parametrize("override", ["growth.stages=[{step: 0, experts: 4}", "run.name=${oops"])
def test_an_override_that_does_not_parse_is_a_config_error(capsys, override):
    assert main(["config", str(STAGE1), override]) == 2
    assert f"command line: override '{override}' does not parse" in capsys.readouterr().err


def test_a_saved_config_with_a_key_this_version_lacks_is_a_config_error():
    with pytest.raises(ConfigError, match="the config saved in the checkpoint: unknown key 'optim.lr_typo'"):
        from_container({"optim": {"lr_typo": 1.0}})
    with pytest.raises(ConfigError, match="the config saved in the checkpoint: optim.lr: Value 'fast'"):
        from_container({"optim": {"lr": "fast"}})


def test_an_unknown_split_and_a_checkpoint_without_weights_are_clear_errors(fmnist_index, tmp_path, capsys):
    with pytest.raises(ValueError, match="split 'tets' is not in the index of 'fmnist' \\(has train, val\\)"):
        DatasetIndex.load(fmnist_index).split("tets")
    stripped = tmp_path / "stripped.ckpt"
    torch.save({"nativetok": {"kind": "tokenizer"}, "hyper_parameters": {}}, stripped)
    assert main(["eval-fid", "--tokenizer", str(stripped), "--num", "2"]) == 2
    assert "without its weights or config" in capsys.readouterr().err
