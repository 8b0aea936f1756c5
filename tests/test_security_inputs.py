"""Files a user did not write are data, never instructions: a shard index, a checkpoint's stored config and an
export's config.json never run a command, never reach outside their folder, never vouch for themselves, and
never overwrite or allocate what the user did not ask for. Each case is a crafted file whose command would
create a marker in tmp_path; the marker never appears and the command fails naming the file and what to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nativetok.checkpoints import CheckpointError, load_generator_tokenizer, load_tokenizer, tokenizer_pin
from nativetok.cli import main
from nativetok.config import ConfigError, load_config
from nativetok.config.loading import to_container
from nativetok.config.schema import DataConfig
from nativetok.data import DatasetIndex, ImageShardsDataModule
from nativetok.data.stream import DataError, ShardSpec, read_shard
from nativetok.models import build_generator, build_tokenizer
from nativetok.pipelines.export import export

from .conftest import REPO, TINY, tiny_generator_config

TINY_EXPERIMENT = REPO / "experiments" / "fmnist_tiny.yaml"


@pytest.fixture()
def marker(tmp_path) -> Path:
    """The file every crafted command would create; a test passes only if it never appears."""
    path = tmp_path / "marker"
    yield path
    assert not path.exists(), "a command from a data file ran"


def crafted_index(folder: Path, fmnist_index: Path, base=None, first_file=None, tokens=None, name=None) -> Path:
    """A copy of the embedded index in `folder`, pointing at the real shards by a base subfolder, with its
    first validation shard's name, its base or its dataset name replaced."""
    body = json.loads(fmnist_index.read_text())
    body["name"] = name or body["name"]
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "shards").exists():
        (folder / "shards").symlink_to(fmnist_index.parent)
    body["base"] = "shards" if base is None else base
    if first_file is not None:
        body["splits"]["val"]["shards"][0]["file"] = first_file
    if tokens is not None:
        body["tokens"] = tokens
    path = folder / "index.json"
    path.write_text(json.dumps(body))
    return path


def pipe(marker: Path, fmnist_index: Path) -> str:
    return f"pipe:touch {marker}; cat {fmnist_index.parent / 'fmnist-val-000000.tar'}"


def tiny_overrides(tmp_path: Path, *extra: str) -> list:
    return [*TINY, f"run.dir={tmp_path / 'run'}", "trainer.max_steps=1", *extra]


def save_checkpoint(path: Path, kind: str, config, model: torch.nn.Module, **nativetok) -> Path:
    """A checkpoint as `nativetok train` writes it, as far as the loaders read it."""
    torch.save({"nativetok": {"kind": kind, **nativetok}, "global_step": 1, "hyper_parameters": {"config": config},
                "state_dict": {f"{kind}.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture()
def models(tmp_path, fmnist_index):
    """A tiny tokenizer checkpoint and a generator checkpoint pinned to it (random weights), each with a stored
    data.index that is a command (and pipes allowed), as a crafted shared checkpoint would hold."""
    folder = tmp_path / "models"
    folder.mkdir()
    command = f"pipe:touch {tmp_path / 'marker'}"
    config = load_config(TINY_EXPERIMENT, tiny_overrides(tmp_path))
    torch.manual_seed(0)
    tokenizer = build_tokenizer(config.tokenizer, config.data.image_size, config.data.channels)
    stored = to_container(config)
    stored["data"].update(index=command, allow_pipes=True)
    tok = save_checkpoint(folder / "tok.ckpt", "tokenizer", stored, tokenizer)
    other = folder / "other.ckpt"
    tokenizer.quantizer.codebook.data = tokenizer.quantizer.codebook.data.roll(1, dims=0)
    save_checkpoint(other, "tokenizer", stored, tokenizer)
    g = tiny_generator_config(tmp_path / "gen", "ar", f"generator.tokenizer={tok}")
    generator = build_generator(g.generator, g.data.num_classes)
    stored = to_container(g)
    stored["data"].update(index=command, allow_pipes=True)
    gen = save_checkpoint(folder / "gen.ckpt", "generator", stored, generator, tokenizer=tokenizer_pin(tok, folder))
    return {"tok": tok, "other": other, "gen": gen}


# -- item 2 and 3: an index names no command and nothing outside its folder -----------------------------------


@pytest.mark.parametrize("field, value", [
    ("first_file", "PIPE"),
    ("base", "PIPE {}"),
    ("first_file", "../../../../etc/passwd"),
    ("first_file", "/etc/passwd"),
    ("first_file", "shards/../../index.json"),
    ("first_file", "https://elsewhere.example/x.tar"),
    ("first_file", "x'$(touch MARKER)'.tar"),
    ("base", "/etc"),
    ("base", ".."),
    ("base", "file:///etc/"),
    ("base", "ftp://host/data/"),
    ("base", "https://host/'`touch MARKER`'/"),
    ("name", "../../../tmp/evil"),  # it names the token shards and cached statistics written for the index
])
def test_an_index_naming_a_command_or_a_place_outside_its_folder_is_refused(tmp_path, fmnist_index, marker,
                                                                              field, value):
    value = value.replace("PIPE", pipe(marker, fmnist_index)).replace("MARKER", str(marker))
    index = crafted_index(tmp_path / "downloaded", fmnist_index, **{field: value})
    with pytest.raises(DataError, match=f"{index}: (shard|base|dataset name) .*(refused|pipe: command)"):
        DatasetIndex.load(index)
    with pytest.raises(DataError, match=str(index)):
        ImageShardsDataModule(DataConfig(index=str(index), num_workers=0, allow_pipes=True)).make_stream(False)


def test_the_same_index_with_plain_names_reads_the_shards(tmp_path, fmnist_index):
    index = DatasetIndex.load(crafted_index(tmp_path / "downloaded", fmnist_index))
    assert index.shard_paths("val")[0] == str(tmp_path / "downloaded" / "shards" / "fmnist-val-000000.tar")
    module = ImageShardsDataModule(DataConfig(index=str(tmp_path / "downloaded" / "index.json"), batch_size=8,
                                              num_workers=0, val_samples=8))
    assert len(next(iter(module.make_stream(False)))["label"]) == 8


def test_train_with_a_downloaded_index_that_names_a_command_fails_in_its_own_process(tmp_path, fmnist_index, marker):
    """`nativetok train data.index=downloaded/index.json`, even with data.allow_pipes=true: the index's command
    never runs; exit code 2 and the message names the index and the key to use instead."""
    index = crafted_index(tmp_path / "downloaded", fmnist_index, first_file=pipe(marker, fmnist_index))
    command = [sys.executable, "-m", "nativetok", "train", str(TINY_EXPERIMENT),
               *tiny_overrides(tmp_path, f"data.index={index}", "data.allow_pipes=true")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(index) in done.stderr and "data.allow_pipes=true" in done.stderr and "Traceback" not in done.stderr


def test_tokenize_and_ref_stats_refuse_an_index_with_a_command(tmp_path, fmnist_index, marker, models, capsys):
    index = crafted_index(tmp_path / "downloaded", fmnist_index, base=pipe(marker, fmnist_index) + " {}")
    assert main(["tokenize", "--tokenizer", str(models["tok"]), "--data", str(index), "--out",
                 str(tmp_path / "tokens"), "--device", "cpu"]) == 2
    assert f"{index}: base" in capsys.readouterr().err
    assert main(["ref-stats", "--data", str(index), "--out", str(tmp_path / "ref.npz"), "--device", "cpu"]) == 2
    assert f"{index}: base" in capsys.readouterr().err


def test_pipes_run_only_from_the_users_own_patterns_when_opted_in(tmp_path, fmnist_index, marker):
    shard = fmnist_index.parent / "fmnist-val-000000.tar"
    users = dict(index=str(fmnist_index), val_shards=f"pipe:touch {marker}; cat {shard}", batch_size=8,
                 num_workers=0)
    with pytest.raises(DataError, match="data.val_shards .* data.allow_pipes=true"):
        ImageShardsDataModule(DataConfig(**users)).make_stream(False)
    with pytest.raises(DataError, match="data.allow_pipes=true"):
        ImageShardsDataModule(DataConfig(**{**users, "index": f"pipe:touch {marker}; cat {fmnist_index}"}))
    with pytest.raises(DataError, match="pipe: command"):  # a spec not marked as the user's never runs either
        next(read_shard(ShardSpec(f"pipe:touch {marker}; cat {shard}")))
    assert not marker.exists()
    opted_in = ImageShardsDataModule(DataConfig(**users, allow_pipes=True)).make_stream(False)
    assert len(next(iter(opted_in))["label"]) == 8 and marker.exists()
    marker.unlink()


def test_a_stored_data_index_is_not_followed_without_the_user_naming_the_data(tmp_path, models, marker, capsys):
    """eval-fid --tokenizer / --generator and token-metrics --generator with a crafted checkpoint, and with
    an export of it: refused before any work, naming the checkpoint and --data."""
    tokenizer_export = export(models["tok"], tmp_path / "tok_export")
    for argv in (["eval-fid", "--tokenizer", str(models["tok"]), "--num", "2"],
                 ["eval-fid", "--tokenizer", str(tokenizer_export), "--num", "2"],
                 ["eval-fid", "--generator", str(models["gen"]), "--num", "2"],
                 ["token-metrics", "--generator", str(models["gen"]), "--out", str(tmp_path / "tm")]):
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert "--data is needed" in error and f"pipe:touch {marker}" in error, error
    command = [sys.executable, "-m", "nativetok", "eval-fid", "--tokenizer", str(models["tok"]), "--num", "2",
               "--out", str(tmp_path / "fid.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 2 and "--data is needed" in done.stderr, done.stderr[-2000:]


# -- item 3 and 4: an export's tokenizer is the one inside it, checked by its weights' bytes ------------------------


def test_a_generator_exports_tokenizer_pin_stays_inside_the_export(tmp_path, models):
    gen = export(models["gen"], tmp_path / "gen_export")
    load_generator_tokenizer(gen)  # the bundled tokenizer, found and checked
    outside = export(models["tok"], tmp_path / "outside_tok")
    body = json.loads((gen / "config.json").read_text())
    body["nativetok"]["tokenizer"]["run_path"] = "../outside_tok"
    (gen / "config.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match="outside the export"):
        load_generator_tokenizer(gen)
    body["nativetok"]["tokenizer"]["run_path"] = "tokenizer"
    (gen / "config.json").write_text(json.dumps(body))
    shutil.rmtree(gen / "tokenizer")
    (gen / "tokenizer").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the export"):
        load_generator_tokenizer(gen)


def test_a_tokenizer_export_claiming_the_pinned_sha256_is_refused_by_its_bytes(tmp_path, models, capsys):
    gen = export(models["gen"], tmp_path / "gen_export")
    pinned = json.loads((gen / "config.json").read_text())["nativetok"]["tokenizer"]
    impostor = export(models["other"], tmp_path / "impostor")
    body = json.loads((impostor / "config.json").read_text())
    body["nativetok"]["source"]["sha256"] = pinned["sha256"]  # the claim the pin used to trust
    (impostor / "config.json").write_text(json.dumps(body))
    shutil.rmtree(gen / "tokenizer")
    shutil.copytree(impostor, gen / "tokenizer")
    with pytest.raises(CheckpointError, match="has weights sha256 .* was trained with sha256"):
        load_generator_tokenizer(gen)
    assert main(["sample", "--generator", str(gen), "--out", str(tmp_path / "samples"), "--classes", "0",
                 "--per-class", "1", "--device", "cpu"]) == 2
    assert "weights sha256" in capsys.readouterr().err and not (tmp_path / "samples").exists()


# -- item 5: export never deletes what it did not write ------------------------------------------------------------


def test_export_refuses_a_folder_that_is_not_an_earlier_export_and_replaces_one_only_with_force(tmp_path, models,
                                                                                                   capsys):
    user = tmp_path / "my_model"
    user.mkdir()
    (user / "config.json").write_text('{"architectures": ["Bert"]}')  # someone else's model folder
    (user / "notes.txt").write_text("keep")
    for force in ([], ["--force"]):
        assert main(["export", str(models["tok"]), str(user), *force]) == 2
        assert "is not an earlier export" in capsys.readouterr().err
    assert sorted(p.name for p in user.iterdir()) == ["config.json", "notes.txt"]

    out = tmp_path / "export"
    assert main(["export", str(models["tok"]), str(out)]) == 0
    assert main(["export", str(models["other"]), str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["export", str(models["other"]), str(out), "--force"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(models["tok"]), str(out), "--force"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"


# -- item 6: a stored config passes the command line's checks, and its shapes are checked before any allocation ----


@pytest.mark.parametrize("key, value, message", [
    ("mit.width", -32, "tokenizer.mit.width: must be > 0"),
    ("mit.heads", 0, "tokenizer.mit.heads: must divide"),
    ("num_tokens", 10**9, "tokenizer.num_tokens 1e\\+09 exceed"),
    ("latent_width", 1 << 20, "tokenizer.latent_width 1.04858e\\+06 exceed"),
])
def test_a_stored_config_is_checked_and_fitted_to_its_weights_before_any_module_is_built(tmp_path, models, key,
                                                                                           value, message):
    exported = export(models["tok"], tmp_path / "export")
    body = json.loads((exported / "config.json").read_text())
    section, _, name = key.rpartition(".")
    (body["config"]["tokenizer"][section] if section else body["config"]["tokenizer"])[name] = value
    (exported / "config.json").write_text(json.dumps(body))
    saved = torch.load(models["tok"], weights_only=True)
    part = saved["hyper_parameters"]["config"]["tokenizer"]
    (part[section] if section else part)[name] = value
    torch.save(saved, tmp_path / "crafted.ckpt")
    for path in (exported, tmp_path / "crafted.ckpt"):
        started = time.monotonic()
        with pytest.raises(CheckpointError, match=message):
            load_tokenizer(path)
        assert time.monotonic() - started < 20  # refused, not allocated


# -- item 7: what the command line says is what runs; image commands refuse token data --------------------------


def test_a_hash_in_an_override_is_part_of_the_value(tmp_path, capsys):
    config = load_config(TINY_EXPERIMENT, ["run.dir=/x/run #1", "run.name=#2", "run.resume='never'"])
    assert (config.run.dir, config.run.name, config.run.resume) == ("/x/run #1", "#2", "never")
    assert main(["config", str(TINY_EXPERIMENT), "run.dir=/x/run #1"]) == 0
    assert "dir: '/x/run #1'" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="quote the item"):
        load_config(TINY_EXPERIMENT, ["optim.betas=[0.9, 0.99] # comment"])


def test_a_token_index_given_as_image_data_is_refused_naming_it(tmp_path, fmnist_index, models, capsys):
    tokens = crafted_index(tmp_path / "tokens", fmnist_index, tokens={"codebook_size": 32, "num_tokens": 8})
    assert main(["train", str(TINY_EXPERIMENT), *tiny_overrides(tmp_path, f"data.index={tokens}")]) == 2
    assert f"{tokens} indexes token shards" in capsys.readouterr().err
    assert main(["tokenize", "--tokenizer", str(models["tok"]), "--data", str(tokens), "--out",
                 str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert f"{tokens} indexes token shards" in capsys.readouterr().err
    assert main(["ref-stats", "--data", str(tokens), "--out", str(tmp_path / "ref.npz"), "--device", "cpu"]) == 2
    assert f"{tokens} indexes token shards" in capsys.readouterr().err


# -- item 10: an `extends` is an experiment file, and no error quotes a file ------------------------------------------


def test_extends_names_only_yaml_files_and_errors_never_quote_a_files_content(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("user: me\npassword: 'hunter2\n")  # an unclosed quote: YAML's own message would quote it
    (tmp_path / "exp.yaml").write_text(f"extends: {secret}\n")
    with pytest.raises(ConfigError, match="is not an experiment file") as refused:
        load_config(tmp_path / "exp.yaml")
    (tmp_path / "exp.yaml").write_text("extends: /etc/passwd\n")
    with pytest.raises(ConfigError, match="is not an experiment file"):
        load_config(tmp_path / "exp.yaml")
    shutil.copyfile(secret, tmp_path / "broken.yaml")
    (tmp_path / "exp.yaml").write_text("extends: broken.yaml\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML at line 3") as broken:
        load_config(tmp_path / "exp.yaml")
    assert "hunter2" not in str(refused.value) + str(broken.value)
