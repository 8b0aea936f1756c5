"""CLI habits: experiments by name, `group=name` presets (with or without `+`), overrides anywhere among the
options, Lightning's Trainer flags (mapped to ours or refused with the reason), callbacks from the config (and never
from a stored one), the logger choice, the supported strategies, `--version` and a `--help` with the users' tasks."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

import nativetok
from nativetok.checkpoints import read_checkpoint
from nativetok.cli import main
from nativetok.config import ConfigError, load_config
from nativetok.config.loading import LIGHTNING_FLAGS, compose, from_container, to_container
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


def test_the_gpu_preset_serves_both_stages_and_replays_only_stage_one_as_cuda_graphs():
    assert load_config("fmnist_tiny", ["+trainer=gpu"]).trainer.cuda_graphs == "auto"
    assert load_config("fmnist_tiny_ar", ["+trainer=gpu"]).trainer.cuda_graphs == "auto"  # not refused
    for stage, value, problem in (("fmnist_tiny_ar", "true", "stage 2 training does not use it"),
                                  ("fmnist_tiny", "maybe", "must be true, false or auto")):
        with pytest.raises(ConfigError, match=f"trainer.cuda_graphs: .*{problem}"):
            load_config(stage, ["+trainer=gpu", f"trainer.cuda_graphs={value}"])
    assert load_config("fmnist_tiny", ["+trainer=gpu", "trainer.cuda_graphs=false"]).trainer.cuda_graphs is False


def test_group_equals_name_selects_the_preset_as_in_hydra(capsys):
    loaded = compose("fmnist_tiny", ["trainer=gpu", "trainer.precision=32-true"])
    assert loaded.config.trainer.accelerator == "gpu" and loaded.config.trainer.precision == "32-true"
    assert loaded.source_of("trainer.accelerator") == str(REPO / "experiments" / "trainer" / "gpu.yaml")
    assert main(["config", "fmnist_tiny", "trainer=ddp"]) == 0
    assert "strategy: ddp" in capsys.readouterr().out
    assert load_config("fmnist_tiny", ["trainer={max_steps: 7}"]).trainer.max_steps == 7  # a mapping sets keys


@pytest.mark.parametrize("item, message", [
    ("trainer=tpu", "'trainer=tpu': no preset 'tpu' in trainer/; available: cpu, ddp, gpu, multinode"),
    ("optim=adam", "'optim' is a section of keys, not a value ('adam'): set its keys, e.g. optim.lr=..."),
    ("tokenizer.mit=big", "'tokenizer.mit' is a section of keys, not a value ('big'): set its keys, e.g. "
                          "tokenizer.mit.width=..."),
    ("+trainer=tpu", "no preset 'tpu' in trainer/; available: cpu, ddp, gpu, multinode"),
    ("+trainers=gpu", "no preset group 'trainers'; groups: parts, trainer"),
    ("+trainer.devices=2", "not of the form +group=name"),
    ("extends=trainer/gpu.yaml", "on the command line a preset is composed with +group=name"),
])
def test_a_bad_preset_names_what_there_is(item, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("fmnist_tiny", [item])


def test_a_section_given_a_value_in_a_file_names_it_and_the_presets(tmp_path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(f"extends: {REPO / 'experiments' / 'fmnist_tiny.yaml'}\ntrainer: gpu\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: 'trainer' is a section of keys, not a value \('gpu'\): .*"
                                          r"choose a preset of experiments/trainer/ with trainer=<name>"):
        load_config(experiment)


# -- overrides anywhere -------------------------------------------------------------------------------
def test_overrides_may_follow_options_for_submit_train_and_config(tmp_path, capsys):
    code = main(["submit", "imagenet256_nativetok_l32", "optim.lr=2e-4", "--dry-run", "--nodes", "1",
                 f"run.dir={tmp_path / 'run'}", "--time", "90", "seed=7"])
    srun = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("srun"))
    assert code == 0 and f" optim.lr=2e-4 run.dir={tmp_path / 'run'} seed=7 trainer.accelerator=gpu" in srun
    assert main(["config", "fmnist_tiny", "-m", "data.batch_size=8,16"]) == 0
    out = capsys.readouterr().out
    assert "# combination 1 of 2: data.batch_size=16" in out and "batch_size: 8" in out
    assert main(["train", "fmnist_tiny", "-m", "--sweep-dir", str(tmp_path / "s"), "tokenizer.num_tokenz=3"]) == 2
    assert "unknown key 'tokenizer.num_tokenz'" in capsys.readouterr().err and not (tmp_path / "s").exists()
    with pytest.raises(SystemExit) as refused:
        main(["train", "fmnist_tiny", "--no-such-option", "seed=1"])
    assert refused.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err


# -- trainer flags ------------------------------------------------------------------------------------
# Lightning's Trainer arguments read as ours: flag=value -> (our key, its value).
LIGHTNING_MAPPED = {
    "trainer.gradient_clip_val=0.5": ("optim.grad_clip", 0.5),
    "trainer.gradient_clip_val=null": ("optim.grad_clip", 0.0),
    "trainer.gradient_clip_algorithm=norm": ("optim.grad_clip", 1.0),
    "trainer.val_check_interval=250": ("trainer.val_every_n_steps", 250),
    "trainer.limit_train_batches=10": ("data.train_samples_per_epoch", 10 * 32),
    "trainer.limit_train_batches=1.0": ("data.train_samples_per_epoch", None),
    "trainer.enable_progress_bar=false": ("trainer.progress_bar", False),
    "trainer.default_root_dir=/tmp/elsewhere": ("run.dir", "/tmp/elsewhere"),
    "trainer.max_epochs=-1": ("trainer.max_steps", 5000),
    "trainer.num_sanity_val_steps=0": ("trainer.val_every_n_steps", 1250),
    "trainer.enable_checkpointing=true": ("trainer.checkpoint_every_n_steps", 500),
}
# Those without an equivalent: flag=value -> what the refusal says.
LIGHTNING_REFUSED = {
    "trainer.max_epochs=10": "training runs exactly trainer.max_steps steps.*write trainer.max_steps=N",
    "trainer.min_epochs=1": "write trainer.max_steps=N",
    "trainer.min_steps=100": "write trainer.max_steps=N",
    "trainer.gradient_clip_algorithm=value": "clipping by value is not offered",
    "trainer.val_check_interval=0.25": "a fraction of an epoch has no equivalent.*trainer.val_every_n_steps=N",
    "trainer.limit_train_batches=0.1": "a fraction of the training split: write data.train_samples_per_epoch",
    "trainer.check_val_every_n_epoch=1": "validation is counted in steps: write trainer.val_every_n_steps=N",
    "trainer.num_sanity_val_steps=2": "no sanity validation runs",
    "trainer.enable_checkpointing=false": "write trainer.checkpoint_every_n_steps=0",
    "trainer.max_time=00:12:00:00": "nativetok submit --time",
    "trainer.overfit_batches=1": "no equivalent.*trainer.fast_dev_run=N",
    "trainer.limit_test_batches=5": "there is no test loop: measure with nativetok eval-fid",
    "trainer.limit_predict_batches=5": "there is no predict loop",
    "trainer.gpus=2": "write trainer.accelerator=gpu trainer.devices=N",
    "trainer.sync_batchnorm=true": "the models have no BatchNorm",
    "trainer.use_distributed_sampler=false": "the shard stream splits the data over ranks itself",
    "trainer.reload_dataloaders_every_n_epochs=1": "the shard stream reshuffles every epoch itself",
    "trainer.detect_anomaly=true": "non-finite losses are caught by the steps",
    "trainer.benchmark=true": "write trainer.deterministic=true",
    "trainer.inference_mode=false": "validation always runs under torch.inference_mode",
    "trainer.enable_model_summary=false": "the parameter counts are logged at start",
    "trainer.barebones=true": "not offered",
    "trainer.plugins=[x]": "write trainer.precision=",
}


def test_every_lightning_flag_is_either_mapped_or_refused_in_these_tests():
    flags = {item.split("=")[0].split(".")[1] for item in [*LIGHTNING_MAPPED, *LIGHTNING_REFUSED]}
    assert flags | {"callbacks"} == set(LIGHTNING_FLAGS)  # trainer.callbacks: see the callbacks tests


@pytest.mark.parametrize("item", LIGHTNING_MAPPED)
def test_lightning_trainer_flags_with_an_equivalent_set_ours(item):
    key, value = LIGHTNING_MAPPED[item]
    assert OmegaConf.select(OmegaConf.structured(load_config("fmnist_tiny", [item])), key) == value


@pytest.mark.parametrize("item", LIGHTNING_REFUSED)
def test_lightning_trainer_flags_without_one_are_refused_with_the_reason(item):
    flag = item.split("=")[0]
    with pytest.raises(ConfigError, match=f"command line: {flag} \\(a Lightning Trainer argument\\): "
                                          f".*{LIGHTNING_REFUSED[item]}"):
        load_config("fmnist_tiny", [item])


def test_lightning_flags_follow_the_layers_and_the_final_batch_size(tmp_path):
    assert load_config("fmnist_tiny", ["trainer.limit_train_batches=10", "data.batch_size=8"]
                       ).data.train_samples_per_epoch == 80  # the batch size the config ends with
    base = f"extends: {REPO / 'experiments' / 'fmnist_tiny.yaml'}\n"
    ours = tmp_path / "ours.yaml"
    ours.write_text(base + "optim: {grad_clip: 0.2}\ntrainer: {val_check_interval: 100}\n")
    loaded = compose(ours, ["trainer.gradient_clip_val=0.5"])
    assert loaded.config.optim.grad_clip == 0.5 and loaded.source_of("optim.grad_clip") == "command line"
    assert loaded.config.trainer.val_every_n_steps == 100
    assert loaded.source_of("trainer.val_every_n_steps") == str(ours)
    assert compose(ours, ["optim.grad_clip=0.1"]).config.optim.grad_clip == 0.1
    both = tmp_path / "both.yaml"
    both.write_text(base + "trainer: {gradient_clip_val: 0.3}\noptim: {grad_clip: 0.2}\n")
    with pytest.raises(ConfigError, match="both.yaml: trainer.gradient_clip_val and optim.grad_clip set the same "
                                          "thing here; keep optim.grad_clip"):
        load_config(both)


# -- callbacks from the config ------------------------------------------------------------------------
EARLY_STOPPING = "{class_path: pytorch_lightning.callbacks.EarlyStopping, init_args: {monitor: val/loss, patience: 7}}"


@pytest.mark.parametrize("key", ["callbacks", "trainer.callbacks"])
def test_a_config_callback_is_appended_to_the_trainers(key, tiny_config, tmp_path):
    config = tiny_config(f"{key}=[{EARLY_STOPPING}]")
    assert config.callbacks[0].init_args == {"monitor": "val/loss", "patience": 7}
    trainer = build_trainer(config, [], tmp_path)
    stopping = [c for c in trainer.callbacks if isinstance(c, pl.callbacks.EarlyStopping)]
    assert len(stopping) == 1 and stopping[0].patience == 7 and stopping[0].monitor == "val/loss"


def test_every_callback_of_a_trainer_and_of_a_training_run_comes_from_one_function(tiny_config, tmp_path):
    from nativetok.lit.callbacks import ExpertGrowth, ReconstructionGrid, SampleGrid
    from nativetok.lit.preemption import LastCheckpoint
    from nativetok.lit.run_folder import RunLock
    from nativetok.lit.train import training_callbacks

    def kinds(callbacks):
        return [type(c).__name__ for c in callbacks]

    probe = pl.Callback()
    config = tiny_config(f"callbacks=[{EARLY_STOPPING}]", "growth.stages=[{step: 0, experts: 8}]")
    plain = training_callbacks(config, tmp_path, [probe])
    assert kinds(plain) == ["ConsoleLog", "LearningRateMonitor", "Callback", "EarlyStopping", "LastCheckpoint"]
    run = training_callbacks(config, tmp_path, [probe], RunLock(tmp_path))
    assert kinds(run) == ["ConsoleLog", "LearningRateMonitor", "ModelCheckpoint", "DataSkips", "ValidationSummary",
                          "RunLock", "ReconstructionGrid", "Callback", "ExpertGrowth", "EarlyStopping",
                          "LastCheckpoint"]
    assert isinstance(run[6], ReconstructionGrid) and isinstance(run[8], ExpertGrowth)
    stopping = training_callbacks(tiny_config("trainer.plateau_min_gain_db=0.1"), tmp_path, (), RunLock(tmp_path))
    assert kinds(stopping)[4:8] == ["ValidationSummary", "RunLock", "ReconstructionGrid", "PlateauStop"]
    generator = tiny_generator_config(tmp_path, "ar", "trainer.fast_dev_run=true")  # no last.ckpt in a dev run
    stage2 = training_callbacks(generator, tmp_path, (), RunLock(tmp_path))
    assert any(isinstance(c, SampleGrid) for c in stage2) and not any(isinstance(c, LastCheckpoint) for c in stage2)
    trainer = build_trainer(config, [probe], tmp_path)  # what the trainer holds (Lightning may add its own)
    assert {"ConsoleLog", "LearningRateMonitor", "EarlyStopping", "LastCheckpoint"} <= set(kinds(trainer.callbacks))
    assert probe in trainer.callbacks and not any(isinstance(c, RunLock) for c in trainer.callbacks)


def test_the_lightning_modules_hold_the_config_sections_they_read_and_checkpoints_the_whole_config(tiny_config,
                                                                                                     tmp_path):
    """As lightning-hydra-template hands its module `net` and an optimizer: no module holds the experiment config,
    which reaches its checkpoints as a plain record (what the loaders rebuild the models from)."""
    from nativetok.lit.optim import Optimization, scaled_lr
    from nativetok.lit.train import tokenizer_module

    config = tiny_config(f"run.dir={tmp_path / 'tok'}", "trainer.max_steps=1", "trainer.val_every_n_steps=5")
    generator = tiny_generator_config(tmp_path / "gen")
    for built, module in ((config, tokenizer_module(config)), (generator, generator_module(generator))):
        held = [name for name, value in vars(module).items() if isinstance(value, ExperimentConfig)]
        assert held == [] and module.config_record == to_container(built)
        assert module.optimization == Optimization(built.optim, scaled_lr(built), built.trainer.max_steps)
    train_tokenizer(config)
    saved = read_checkpoint(tmp_path / "tok" / "checkpoints" / "last.ckpt", "tokenizer")
    assert from_container(saved["hyper_parameters"]["config"]) == config


@pytest.mark.parametrize("spec, message", [
    ("{class_path: collections.OrderedDict}", "callbacks.1.class_path: collections.OrderedDict is not a "
                                              "pytorch_lightning.Callback subclass"),
    ("{class_path: pytorch_lightning.callbacks.NoSuchCallback}", "callbacks.1.class_path: pytorch_lightning.callbacks "
                                                                 "has no NoSuchCallback"),
    ("{class_path: no_such_package.Callback}", "callbacks.1.class_path: cannot import no_such_package"),
    ("{class_path: 'os.system(\"touch x\")'}", "callbacks.1.class_path: must be the dotted name of a "
                                                "pytorch_lightning.Callback subclass"),
    ("{class_path: EarlyStopping}", "callbacks.1.class_path: must be the dotted name"),
    ("{class_path: pytorch_lightning.callbacks.EarlyStopping, init_args: {monitor: val/loss, patients: 3}}",
     "callbacks.1.init_args: pytorch_lightning.callbacks.EarlyStopping does not take them: got an unexpected "
     "keyword argument 'patients'"),
])
def test_a_bad_config_callback_stops_the_run_at_start_naming_it(spec, message, tmp_path, capsys):
    """The second of two callbacks is the bad one: the error names its index."""
    run_dir = tmp_path / "run"
    assert main(["train", "fmnist_tiny", f"run.dir={run_dir}", f"callbacks=[{EARLY_STOPPING}, {spec}]"]) == 2
    assert message in capsys.readouterr().err and not run_dir.exists()


def test_a_stored_config_never_imports_its_callbacks(tmp_path, monkeypatch, tiny_config):
    """A checkpoint (or export) is shared: its config may not make a loader import a module. `to_container`
    stores no callbacks; one a crafted checkpoint holds is dropped unread."""
    marker = tmp_path / "imported"
    (tmp_path / "planted_callback.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "import pytorch_lightning as pl\n\n\nclass Planted(pl.Callback):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "planted_callback", raising=False)
    planted = "callbacks=[{class_path: planted_callback.Planted}]"
    container = to_container(tiny_config(f"callbacks=[{EARLY_STOPPING}]"))
    assert "callbacks" not in container  # never stored
    container["callbacks"] = [{"class_path": "planted_callback.Planted", "init_args": {}}]
    checkpoint = tmp_path / "shared.ckpt"
    torch.save({"nativetok": {"kind": "tokenizer"}, "state_dict": {}, "hyper_parameters": {"config": container}},
               checkpoint)
    assert read_checkpoint(checkpoint, "tokenizer")["hyper_parameters"]["config"]["callbacks"]
    assert from_container(container).callbacks == []
    assert not marker.exists() and "planted_callback" not in sys.modules
    assert tiny_config(planted).callbacks[0].class_path == "planted_callback.Planted"
    assert marker.exists()  # the user's own command line does import it: the check above could fail


# -- trainer flags (ours) -----------------------------------------------------------------------------
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


def test_parsing_a_command_loads_no_lightning_so_lightnings_log_lines_take_our_format():
    """Lightning gives its logger a handler of its own when it is imported before logging is configured: the CLI
    parses its arguments (and configures logging) before any command imports Lightning."""
    import subprocess

    code = ("import sys; from nativetok.cli import parse_arguments; "
            "parse_arguments(['train', 'fmnist_tiny', 'optim.lr=1e-4']); parse_arguments(['--help'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "nativetok train" in done.stdout, done.stderr[-2000:]
    code = ("import sys; from nativetok.cli import parse_arguments; parse_arguments(['train', 'fmnist_tiny']); "
            "print(sorted(m for m in ('pytorch_lightning', 'torchvision', 'torch_fidelity') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert loaded.stdout.strip() == "[]", loaded.stderr[-2000:]
