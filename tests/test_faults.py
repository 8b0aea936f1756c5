"""The fault matrix: each fault provoked for real; the framework recovers exactly or stops with a clear message."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from nativetok.cli import main
from nativetok.config import ConfigError
from nativetok.data.shards import write_shard
from nativetok.data.stream import DataError
from nativetok.lit import checkpoint_io
from nativetok.lit.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from nativetok.lit.guards import NonFiniteLossError
from nativetok.lit.train import build_trainer, checkpoint_to_resume, generator_module, train_tokenizer

from .conftest import REPO, TINY, random_token_batches, tiny_generator_config

EXPERIMENT = REPO / "experiments" / "fmnist_tiny.yaml"
GROWTH = "growth.stages=[{step: 0, experts: 4}, {step: 8, experts: 8, train: [decoder]}, {step: 16, experts: 8}]"


def scalars(run_dir: Path, tag: str) -> dict:
    """Step -> value of a TensorBoard scalar; where a resumed run wrote a step again, its value wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted((run_dir / "tb").glob("events.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({e.step: e.value for e in accumulator.Scalars(tag)})
    return values


def command(run_dir: Path, *extra: str) -> list:
    overrides = TINY + [f"data.index={REPO / 'data' / 'fmnist' / 'index.json'}", f"run.dir={run_dir}",
                        "trainer.val_every_n_steps=1000", *extra]
    return [sys.executable, "-m", "nativetok.cli", "train", str(EXPERIMENT), *overrides]


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def checkpoint_step(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    except Exception:  # not there yet
        return -1


def test_sigkill_in_a_growth_stage_then_the_same_command_resumes_exactly(tmp_path):
    """Killed with SIGKILL between checkpoints in HNT stage 1; the restart redoes the lost steps and from
    the checkpoint on every loss and learning rate equals the uninterrupted run's (tolerance 1e-6, rel)."""
    extra = (GROWTH, "trainer.max_steps=24", "trainer.checkpoint_every_n_steps=4",
             "tokenizer.decoder.random_prefix=0.5")
    subprocess.run(command(tmp_path / "whole", *extra), env=clean_env(), check=True, capture_output=True,
                   timeout=600)
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(command(run_dir, *extra), env=clean_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while checkpoint_step(run_dir / "checkpoints" / "last.ckpt") < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    saved = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert 12 <= saved < 24, saved  # killed in stage 1 (steps 8..15) or soon after
    result = subprocess.run(command(run_dir, *extra), env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert "resuming from" in log and "last.ckpt" in log
    assert f"HNT stage {1 if saved < 16 else 2}" in log  # the stage, its expert count and frozen set reapplied
    whole_loss, resumed_loss = scalars(tmp_path / "whole", "train/loss"), scalars(run_dir, "train/loss")
    whole_lr, resumed_lr = scalars(tmp_path / "whole", "train/lr/decay"), scalars(run_dir, "train/lr/decay")
    later = [step for step in whole_loss if step >= saved]
    assert later and all(resumed_loss[s] == pytest.approx(whole_loss[s], rel=1e-6) for s in later)
    assert all(resumed_lr[s] == pytest.approx(whole_lr[s], rel=1e-6) for s in later)
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 24


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(run_dir, "trainer.max_steps=5000", "trainer.checkpoint_every_n_steps=0"),
                               env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "HNT stage" in line or "Restored" in line or "model_summary" in line:
            break
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-2000:]
    assert "pre-empted at step" in output and not (run_dir / "requeue.log").exists()
    assert 0 < checkpoint_step(run_dir / "checkpoints" / "last.ckpt") < 5000


@pytest.fixture()
def finished_run(tiny_config):
    config = tiny_config("trainer.max_steps=6", "trainer.val_every_n_steps=100", "trainer.checkpoint_every_n_steps=2")
    train_tokenizer(config)
    return config


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(finished_run, caplog):
    folder = Path(finished_run.run.dir) / "checkpoints"
    assert checkpoint_step(folder / "last.ckpt") == 6 and checkpoint_step(folder / "previous.ckpt") == 4
    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    assert checkpoint_to_resume(finished_run) == str(folder / "previous.ckpt")
    assert "refusing to resume from" in caplog.text and "last.ckpt: unreadable" in caplog.text
    (folder / "last.ckpt").write_text("not a checkpoint at all")
    assert checkpoint_to_resume(finished_run) == str(folder / "previous.ckpt")
    (folder / "previous.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        checkpoint_to_resume(finished_run)
    explicit = type(finished_run.run)(name="x", dir=finished_run.run.dir, resume=str(folder / "last.ckpt"))
    with pytest.raises(ConfigError, match="cannot resume from .*last.ckpt: unreadable"):
        checkpoint_to_resume(type(finished_run)(**{**finished_run.__dict__, "run": explicit}))


class WritingTrainer:
    """What LastCheckpoint.save asks of a Trainer: a step, rank zero, and a checkpoint writer (atomic, as
    AtomicCheckpointIO writes) that records whether last.ckpt was whole while it wrote, or fails."""

    def __init__(self, step: int, fail: bool = False):
        self.global_step, self.is_global_zero, self.fail, self.last_while_writing = step, True, fail, None

    def save_checkpoint(self, path: Path, weights_only: bool = False) -> None:
        self.last_while_writing = checkpoint_step(path)
        if self.fail:
            raise CheckpointWriteError(errno.ENOSPC, "no space left on device")
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": self.global_step}, path)


def test_last_checkpoint_stays_whole_while_the_next_one_is_written(tmp_path):
    """A kill while the new last.ckpt is written (the sigkill test's race) must leave a last.ckpt to resume from."""
    from nativetok.lit.preemption import LastCheckpoint

    folder = tmp_path / "checkpoints"
    saver = LastCheckpoint(folder, 2, tmp_path / "requeue.log")
    saver.save(WritingTrainer(2))
    second = WritingTrainer(4)
    saver.save(second)
    assert second.last_while_writing == 2  # the old one was in place all along
    assert checkpoint_step(folder / "last.ckpt") == 4 and checkpoint_step(folder / "previous.ckpt") == 2
    with pytest.raises(CheckpointWriteError):
        saver.save(WritingTrainer(6, fail=True))
    assert checkpoint_step(folder / "last.ckpt") == 4 and checkpoint_step(folder / "previous.ckpt") == 4
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "previous.ckpt"]  # nothing staged is left


def test_checkpoint_writes_are_atomic_and_a_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)
    before = target.read_bytes()

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match="could not write checkpoint .*last.ckpt: No space left on device"):
        io.save_checkpoint({"state_dict": {}, "global_step": 2}, target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_full_disk_while_writing_a_shard_is_a_clear_error(tmp_path, monkeypatch):
    import webdataset

    def disk_full(self, sample):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(webdataset.TarWriter, "write", disk_full)
    with pytest.raises(OSError, match="could not write shard .*x-train-000000.tar: No space left on device"):
        write_shard(tmp_path / "x-train-000000.tar", [{"__key__": "a", "cls": b"1"}])
    assert list(tmp_path.iterdir()) == []


def test_shards_listed_but_absent_are_skipped_and_an_empty_dataset_fails_before_training(tiny_config, tmp_path):
    import json

    from nativetok.data import ImageShardsDataModule

    index = json.loads(Path(tiny_config().data.index).read_text())
    source = Path(tiny_config().data.index).parent
    for entry in index["splits"]["train"]["shards"][:2] + index["splits"]["val"]["shards"][:1]:
        (tmp_path / entry["file"]).symlink_to(source / entry["file"])
    (tmp_path / "index.json").write_text(json.dumps(index))  # lists 30 + 5 shards; 2 + 1 exist
    module = ImageShardsDataModule(tiny_config(f"data.index={tmp_path / 'index.json'}").data)
    assert len(module.shard_specs(train=True)) == 2 and module.skips.shards == 28
    strict = ImageShardsDataModule(tiny_config(f"data.index={tmp_path / 'index.json'}", "data.strict=true").data)
    with pytest.raises(DataError, match="28 of 30 shards .* are missing"):
        strict.shard_specs(train=True)
    for link in tmp_path.glob("*.tar"):
        link.unlink()
    empty = tiny_config(f"data.index={tmp_path / 'index.json'}", f"run.dir={tmp_path / 'run'}")
    with pytest.raises(DataError, match="30 of 30 shards"):
        train_tokenizer(empty)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written


class Poison(pl.Callback):
    """Makes the images of the given training batches (counted from 0) NaN."""

    def __init__(self, batches):
        self.batches, self.calls = set(batches), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.calls in self.batches:
            batch["image"].fill_(float("nan"))
        self.calls += 1


def test_nan_losses_skip_their_steps_and_too_many_in_a_row_stop_with_the_step(tiny_config, tmp_path):
    from nativetok.lit.tokenizer_module import TokenizerModule

    from .test_stage1_training import fit

    settings = ("trainer.max_steps=6", "trainer.val_every_n_steps=100", "trainer.max_nonfinite_steps=3")
    trainer, module = fit(tiny_config(*settings, f"run.dir={tmp_path / 'some'}"), [Poison({2, 3})])
    # Decided on the device: the two poisoned steps count as steps, but update nothing.
    assert trainer.global_step == 6 and module.loss_guard.total == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert trainer.callback_metrics["train/nonfinite_steps"] == 2
    expected = "3 non-finite values of the autoencoder loss in a row, the last at step 4"
    with pytest.raises(NonFiniteLossError, match=expected):
        fit(tiny_config(*settings, f"run.dir={tmp_path / 'all'}"), [Poison(range(2, 100))])
    assert isinstance(module, TokenizerModule)


def poisoned_generator(config, calls):
    """Stage 2's module whose generator returns a NaN training loss at the given calls (counted from 0)."""
    module = generator_module(config)
    loss, count = module.generator.loss, iter(range(10**9))

    def poisoned(tokens, labels, generator=None):
        value, per_position = loss(tokens, labels, generator)
        if module.training and next(count) in calls:
            value = value * float("nan")
        return value, per_position

    module.generator.loss = poisoned
    return module


def test_nan_losses_in_stage2_skip_their_steps_and_too_many_stop(tmp_path):
    config = tiny_generator_config(tmp_path, "ar", "trainer.max_steps=3", "trainer.max_nonfinite_steps=2")
    loader = random_token_batches()
    module = poisoned_generator(config, {1})
    trainer = build_trainer(config, [], tmp_path / "one")
    trainer.fit(module, train_dataloaders=loader)
    # Lightning's automatic optimization still counts a step whose loss was skipped: no update was made.
    assert module.loss_guard.total == 1 and trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())
    with pytest.raises(NonFiniteLossError, match="2 non-finite values of the loss in a row, the last at step 2"):
        build_trainer(config, [], tmp_path / "all").fit(
            poisoned_generator(config, range(1, 100)), train_dataloaders=loader)


@pytest.mark.parametrize("override, key", [
    ("data.batch_sise=8", "data.batch_sise"),
    ("optim.lr=fast", "optim.lr"),
    ("growth.stages=[{step: 0, experts: 4}, {step: 5, experts: 32}]", "growth.stages.1.experts"),
    ("tokenizer.patch_size=5", "tokenizer.patch_size"),
    ("trainer.devices=3", "data.batch_size"),
    ("growth.cache_gib=-1", "growth.cache_gib"),
])
def test_bad_configs_stop_before_any_work_naming_the_key(tmp_path, capsys, override, key):
    code = main(["train", str(EXPERIMENT), f"run.dir={tmp_path / 'run'}", "trainer.accelerator=cpu", override])
    assert code == 2 and key in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_evaluation_and_sampling_refuse_missing_or_mismatched_inputs(finished_run, tmp_path, capsys):
    tokenizer = str(Path(finished_run.run.dir) / "checkpoints" / "last.ckpt")
    assert main(["eval-fid", "--tokenizer", str(tmp_path / "missing.ckpt"), "--num", "2"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["sample", "--generator", tokenizer, "--out", str(tmp_path / "s")]) == 2
    assert "is a tokenizer checkpoint, not a generator" in capsys.readouterr().err
    (tmp_path / "few").mkdir()
    assert main(["eval-fid", "--samples", str(tmp_path / "few"), "--tokenizer", tokenizer, "--num", "5",
                 "--out", str(tmp_path / "fid.json")]) == 2
    assert "has no sample manifest (samples.json): not a complete `nativetok sample` folder" in capsys.readouterr().err


def losses_of_a_run(config) -> dict:
    from .test_stage1_training import Recorder, fit

    recorder = Recorder()
    fit(config, [recorder])
    return recorder.losses


def test_two_runs_with_the_same_seed_give_identical_losses(tiny_config, tmp_path):
    overrides = (GROWTH, "trainer.max_steps=20", "trainer.val_every_n_steps=100", "tokenizer.decoder.random_prefix=0.5")
    first = losses_of_a_run(tiny_config(*overrides, f"run.dir={tmp_path / 'a'}"))
    second = losses_of_a_run(tiny_config(*overrides, f"run.dir={tmp_path / 'b'}"))
    assert len(first) == 20 and first == second


@pytest.mark.slow
def test_the_default_experiment_is_deterministic_for_300_steps(tmp_path):
    """Two runs of experiments/fmnist_tiny.yaml (its own sizes and 2 data workers), 300 steps each."""
    runs = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        subprocess.run([sys.executable, "-m", "nativetok.cli", "train", str(EXPERIMENT), f"run.dir={run_dir}",
                        f"data.index={REPO / 'data' / 'fmnist' / 'index.json'}", "trainer.max_steps=300",
                        "trainer.val_every_n_steps=1000", "trainer.progress_bar=false", "trainer.log_every_n_steps=1"],
                       env=clean_env(), check=True, capture_output=True, timeout=1200)
        runs.append(scalars(run_dir, "train/loss"))
    assert len(runs[0]) >= 299 and runs[0] == runs[1]
