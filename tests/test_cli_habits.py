"""CLI habits: experiments by name, `+group=name` presets, Lightning's debugging flags, the logger choice,
the supported strategies, `--version` and a `--help` that shows the users' tasks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import pytorch_lightning as pl

import nativetok
from nativetok.cli import main
from nativetok.config import ConfigError, load_config
from nativetok.config.loading import compose
from nativetok.config.schema import ExperimentConfig
from nativetok.lit.train import build_trainer, generator_module, train_tokenizer, wandb_settings

from .conftest import REPO, random_token_batches, tiny_generator_config


class Counts(pl.Callback):
    """Training batches, validation batches and validations seen, and the step training ended at."""

    def __init__(self):
        self.train_batches = self.val_batches = self.validations = 0
        self.last_step = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.train_batches += 1

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val_batches += 1

    def on_validation_epoch_end(self, trainer, module):
        self.validations += 1

    def on_train_end(self, trainer, module):
        self.last_step = trainer.global_step


# -- experiments by name ------------------------------------------------------------------------------
def test_an_experiment_name_works_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no experiments/ here: the repository's
    assert main(["config", "fmnist_tiny", "data.batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 8" in out and "name: fmnist_tiny" in out


def test_the_current_directory_experiments_come_first(tmp_path, monkeypatch):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "fmnist_tiny.yaml").write_text(
        f"extends: {REPO / 'experiments' / 'fmnist_tiny.yaml'}\nrun:\n  name: local\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("fmnist_tiny").run.name == "local"


def test_an_unknown_name_lists_the_experiments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "fmnist_tinyy"]) == 2
    err = capsys.readouterr().err
    assert "no experiment named 'fmnist_tinyy'" in err and "available: fmnist_tiny, fmnist_tiny_ar" in err


def test_submit_takes_a_name_and_its_script_names_the_file(tmp_path, capsys):
    code = main(["submit", "imagenet256_nativetok_l32", f"run.dir={tmp_path / 'run'}", "--dry-run"])
    script = capsys.readouterr().out
    assert code == 0
    assert f"nativetok train {REPO / 'experiments' / 'imagenet256_nativetok_l32.yaml'} " in script


# -- presets ------------------------------------------------------------------------------------------
def test_a_preset_merges_over_the_experiment_before_the_key_values():
    loaded = compose("fmnist_tiny", ["trainer.precision=32-true", "+trainer=gpu"])
    t = loaded.config.trainer
    assert t.accelerator == "gpu" and t.precision == "32-true"  # key=value wins wherever it stands
    assert loaded.source_of("trainer.accelerator") == str(REPO / "experiments" / "trainer" / "gpu.yaml")
    assert load_config("fmnist_tiny", ["+trainer=ddp"]).trainer.strategy == "ddp"


@pytest.mark.parametrize("item, message", [
    ("+trainer=tpu", "no preset 'tpu' in trainer/; available: cpu, ddp, gpu, multinode"),
    ("+trainers=gpu", "no preset group 'trainers'; groups: parts, trainer"),
    ("+trainer.devices=2", "not of the form +group=name"),
    ("extends=trainer/gpu.yaml", "on the command line a preset is composed with +group=name"),
])
def test_a_bad_preset_names_what_there_is(item, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+").replace("(", r"\(")):
        load_config("fmnist_tiny", [item])


# -- trainer flags ------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed", "ddp_spawn"])
def test_unsupported_strategies_are_refused_naming_the_allowed_ones(strategy):
    with pytest.raises(ConfigError, match=f"trainer.strategy: must be one of auto, ddp .*got '{strategy}'"):
        load_config("fmnist_tiny", [f"trainer.strategy={strategy}"])


@pytest.mark.parametrize("override, message", [
    ("trainer.fast_dev_run=-1", "trainer.fast_dev_run: must be true, false or a batch count"),
    ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches: must be a batch count >= 0 or a fraction"),
    ("trainer.limit_val_batches=-2", "trainer.limit_val_batches: must be a batch count >= 0 or a fraction"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches: must be >= 1"),
    ("trainer.accumulate_grad_batches=2", "stage 1 steps its autoencoder and discriminator optimizers by hand"),
    ("trainer.profiler=pytorch", "trainer.profiler: must be null, simple or advanced"),
    ("trainer.logger=mlflow", "trainer.logger: must be one of tensorboard, csv, wandb"),
    ("trainer.wandb_mode=sometimes", "trainer.wandb_mode: must be null, online or offline"),
])
def test_bad_debugging_and_logger_settings_stop_before_the_run(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("fmnist_tiny", [override])


def test_good_debugging_settings_load():
    t = load_config("fmnist_tiny", ["trainer.fast_dev_run=3", "trainer.limit_val_batches=0.25",
                                    "trainer.profiler=simple", "trainer.logger=csv"]).trainer
    assert (t.fast_dev_run, t.limit_val_batches, t.profiler, t.logger) == (3, 0.25, "simple", "csv")
    assert load_config("fmnist_tiny_ar", ["trainer.accumulate_grad_batches=4"]).trainer.accumulate_grad_batches == 4


def test_wandb_without_the_package_is_an_error_at_start(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="trainer.logger: wandb needs the wandb package"):
        load_config("fmnist_tiny", ["trainer.logger=wandb"])


def test_wandb_settings_follow_the_run_folder_and_the_mode(tmp_path):
    config = ExperimentConfig()
    config.trainer.wandb_mode = "offline"
    offline = wandb_settings(config, tmp_path / "a")
    assert offline["mode"] == "offline" and offline["save_dir"] == str(tmp_path / "a")
    config.trainer.wandb_mode = None
    assert "mode" not in wandb_settings(config, tmp_path / "a")  # wandb reads WANDB_MODE
    assert wandb_settings(config, tmp_path / "a")["id"] == offline["id"] != wandb_settings(config, tmp_path / "b")["id"]


def test_csv_logger_profiler_and_limit_val_batches_then_a_fast_dev_run_leaves_the_run_alone(tiny_config, tmp_path):
    counts = Counts()
    config = tiny_config("trainer.max_steps=2", "trainer.val_every_n_steps=2", "trainer.logger=csv",
                         "trainer.profiler=simple", "trainer.limit_val_batches=1")
    train_tokenizer(config, [counts])
    run_dir = Path(config.run.dir)
    assert counts.validations >= 1 and counts.val_batches == counts.validations  # 1 of 4 batches each time
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/loss" in header and not (run_dir / "tb").exists()
    assert "Action" in (run_dir / "fit-profile.txt").read_text()

    last, saved = run_dir / "checkpoints" / "last.ckpt", (run_dir / "config.yaml").read_text()
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").glob("*.ckpt")}
    dev = Counts()
    train_tokenizer(tiny_config("trainer.fast_dev_run=1"), [dev])
    assert dev.last_step == 1 and dev.train_batches == 1  # a fresh start, not a resume from step 2
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").glob("*.ckpt")} == before and last.is_file()
    assert (run_dir / "config.yaml").read_text() == saved


def test_stage2_accumulates_gradients_over_batches(tmp_path):
    config = tiny_generator_config(tmp_path, "ar", "trainer.max_steps=2", "trainer.accumulate_grad_batches=3",
                                   "trainer.logger=csv")
    module = generator_module(config)
    counts = Counts()
    trainer = build_trainer(config, [counts], tmp_path)
    trainer.fit(module, train_dataloaders=random_token_batches())
    assert trainer.global_step == 2 and counts.train_batches == 6


# -- help and version ---------------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"nativetok {nativetok.__version__}"


def test_help_shows_the_tasks_and_the_experiments(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "tokenize", "sample", "eval-fid", "compare", "ablate", "submit", "export"):
        assert f"nativetok {command} " in out
    assert "experiments: fmnist_tiny, fmnist_tiny_ar" in out and "+trainer=cpu|ddp|gpu|multinode" in out
