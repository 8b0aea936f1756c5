"""Configs: composition, overrides, and errors that name the key and where its value came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from nativetok.config import ConfigError, load_config, to_yaml
from nativetok.config.loading import compose

from .conftest import REPO

EXPERIMENTS = sorted(p for p in (REPO / "experiments").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture()
def base(tmp_path) -> Path:
    write(tmp_path / "base.yaml", "data:\n  batch_size: 32\n  image_size: 32\nrun:\n  name: base\n")
    return write(tmp_path / "child.yaml", "extends: base.yaml\nrun:\n  name: child\ntrainer:\n  max_steps: 10\n")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_file_loads(path):
    config = load_config(path)
    assert config.run.name


def test_extends_composes_and_the_command_line_wins(base):
    config = load_config(base, ["data.batch_size=16"])
    assert config.run.name == "child" and config.data.batch_size == 16 and config.trainer.max_steps == 10
    assert config.data.image_size == 32
    assert compose(base, ["data.batch_size=16"]).source_of("data.batch_size") == "command line"
    assert compose(base).source_of("data.batch_size").endswith("base.yaml")


def test_interpolation_resolves_and_the_saved_yaml_reloads(tmp_path, base):
    config = load_config(base)
    assert config.run.dir == "runs/child"
    saved = write(tmp_path / "saved.yaml", to_yaml(config))
    assert load_config(saved) == config


def test_unknown_key_in_a_file_names_key_file_and_suggestion(tmp_path):
    bad = write(tmp_path / "bad.yaml", "data:\n  batch_sise: 32\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'data.batch_sise' \(did you mean 'batch_size'\?\)"):
        load_config(bad)


def test_unknown_key_on_the_command_line(base):
    with pytest.raises(ConfigError, match="command line: unknown key 'trainer.max_step'"):
        load_config(base, ["trainer.max_step=5"])


def test_wrong_type_names_the_key(base):
    with pytest.raises(ConfigError, match="command line: data.batch_size: Value 'many'"):
        load_config(base, ["data.batch_size=many"])


def test_override_without_equals_sign(base):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(base, ["trainer.max_steps"])


def test_impossible_values_name_the_key_and_the_source(base):
    with pytest.raises(ConfigError) as error:
        load_config(base, ["tokenizer.patch_size=5", "optim.lr=-1", "tokenizer.kind=vqgan"])
    message = str(error.value)
    expected = "tokenizer.patch_size: must divide data.image_size 32, got 5 (tokenizer.patch_size from command line; "
    assert expected in message
    assert "data.image_size from" in message and "base.yaml" in message
    assert "optim.lr: must be > 0, got -1.0" in message
    assert "tokenizer.kind: must be one of nativetok, parallel, causal_mask; got 'vqgan'" in message


def test_image_size_not_divisible_by_patch_size_from_a_file(tmp_path):
    bad = write(tmp_path / "odd.yaml", "data:\n  image_size: 30\n")
    expected = r"tokenizer.patch_size: must divide data.image_size 30.*data.image_size from .*odd.yaml"
    with pytest.raises(ConfigError, match=expected):
        load_config(bad)


def test_batch_size_must_divide_over_devices(base):
    with pytest.raises(ConfigError, match="data.batch_size: the global batch size 32 must be divisible by .* 3"):
        load_config(base, ["trainer.devices=3", "trainer.accelerator=cpu"])
    assert load_config(base, ["trainer.devices=2", "trainer.num_nodes=2"]).trainer.num_nodes == 2


def test_growth_schedule_must_fit_the_token_count(base):
    stages = "growth.stages=[{step: 0, experts: 4}, {step: 5, experts: 32}]"
    with pytest.raises(ConfigError, match=r"growth.stages.1.experts: must be between 1 and tokenizer.num_tokens 16"):
        load_config(base, ["tokenizer.num_tokens=16", stages])
    short = "growth.stages=[{step: 0, experts: 4}, {step: 5, experts: 8}]"
    with pytest.raises(ConfigError, match=r"growth.stages.1.experts: the last stage must reach tokenizer.num_tokens"):
        load_config(base, ["tokenizer.num_tokens=16", short])
    shrink = "growth.stages=[{step: 0, experts: 8}, {step: 5, experts: 4}, {step: 6, experts: 16}]"
    with pytest.raises(ConfigError, match="experts can only grow"):
        load_config(base, ["tokenizer.num_tokens=16", shrink])
    parts = "growth.stages=[{step: 0, experts: 16, train: [encoder]}]"
    with pytest.raises(ConfigError, match="'encoder' is not one of"):
        load_config(base, ["tokenizer.num_tokens=16", parts])
    baseline = "growth.stages=[{step: 0, experts: 16}]"
    with pytest.raises(ConfigError, match="tokenizer.kind 'parallel' does not have"):
        load_config(base, ["tokenizer.num_tokens=16", "tokenizer.kind=parallel", baseline])


def test_perceptual_loss_needs_its_weight_files(base):
    with pytest.raises(ConfigError, match="loss.perceptual.vgg_weights: loss.perceptual_weight > 0 needs"):
        load_config(base, ["loss.perceptual_weight=1.0"])


def test_missing_and_looping_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")


def test_an_installed_package_finds_experiments_through_the_environment(tmp_path, monkeypatch):
    import shutil

    from nativetok.config import loading

    installed = tmp_path / "site-packages" / "nativetok" / "config" / "loading.py"
    installed.parent.mkdir(parents=True)
    installed.touch()
    assert loading.checkout_experiments(installed) is None  # a wheel lies in no checkout
    assert loading.checkout_experiments(Path(loading.__file__)) == (REPO / "experiments").resolve()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "checkout_experiments", lambda module=None: None)  # as installed
    with pytest.raises(ConfigError, match="finds them through NATIVETOK_EXPERIMENTS"):
        loading.resolve_experiment("fmnist_tiny")
    mine = tmp_path / "mine"
    shutil.copytree(REPO / "experiments", mine)
    monkeypatch.setenv("NATIVETOK_EXPERIMENTS", str(mine))
    assert loading.resolve_experiment("fmnist_tiny") == mine.resolve() / "fmnist_tiny.yaml"
    assert load_config(loading.resolve_experiment("fmnist_tiny")).run.name == "fmnist_tiny"
    monkeypatch.setenv("NATIVETOK_EXPERIMENTS", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="is not a folder of experiments"):
        loading.resolve_experiment("fmnist_tiny")
