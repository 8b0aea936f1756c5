"""One run per run folder: the lock, the config compared on resume, signals that checkpoint, and the
leftovers of killed saves; real processes wherever a process is the point."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nativetok.config import ConfigError, load_config
from nativetok.config.loading import to_container
from nativetok.lit.run_folder import LOCK, RunLock, config_changes, refuse_changed_config
from nativetok.lit.train import train_tokenizer

from .conftest import REPO, TINY
from .test_distributed import run_ddp
from .test_faults import checkpoint_step, clean_env, command

GROWTH = "growth.stages=[{step: 0, experts: 4}, {step: 8, experts: 8}]"
LONG = ("trainer.max_steps=5000", "trainer.checkpoint_every_n_steps=2")


def start(run_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`nativetok train` of the tiny experiment into run_dir, in the background, its output in `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(command(run_dir, *extra), env=clean_env(), stdout=out, stderr=subprocess.STDOUT)


def wait_for_checkpoint(path: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while checkpoint_step(path) < step:
        assert time.monotonic() < deadline, f"no checkpoint of step {step} in {path} after {timeout} s"
        time.sleep(0.05)


def snapshot(run_dir: Path) -> dict:
    """Every file of a run folder but the lock, with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK}


# -- the lock ----------------------------------------------------------------------------------------
def test_a_second_run_into_a_busy_folder_exits_2_and_a_killed_runs_lock_is_taken_over(tmp_path):
    """While a first process trains, a second one into the same folder (another seed) is refused with exit
    code 2 naming the lock and writes nothing; once the first is killed (SIGKILL), its lock is stale and the
    same command takes it over, resumes and releases it at the end."""
    run_dir = tmp_path / "run"
    first = start(run_dir, tmp_path / "first.log", *LONG)
    try:
        wait_for_checkpoint(run_dir / "checkpoints" / "last.ckpt", 2)
        events = sorted((run_dir / "tb").glob("events.*"))
        config_yaml = (run_dir / "config.yaml").stat().st_mtime_ns
        second = subprocess.run(command(run_dir, *LONG, "seed=1"), env=clean_env(), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by another training run (pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert str(run_dir / LOCK) in second.stderr
        assert sorted((run_dir / "tb").glob("events.*")) == events
        assert (run_dir / "config.yaml").stat().st_mtime_ns == config_yaml
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (run_dir / LOCK).is_file()  # left behind by the killed process
    third = subprocess.run(command(run_dir, "trainer.max_steps=4"), env=clean_env(), capture_output=True, text=True,
                           timeout=300)
    output = third.stdout + third.stderr
    assert third.returncode == 0, output[-2000:]
    assert f"taking over the stale lock {run_dir / LOCK}: pid {first.pid}" in output and "resuming from" in output
    assert not (run_dir / LOCK).exists()


def test_a_lock_from_another_host_is_refused_unless_left_by_the_same_slurm_job(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    lock = tmp_path / LOCK
    lock.write_text('{"pid": 4242, "host": "gpu-node-17", "started": "2026-01-01T00:00:00+00:00", "slurm_job": "77"}')
    with pytest.raises(ConfigError, match=f"on host gpu-node-17 .*delete {lock} and run again"):
        RunLock(tmp_path).acquire()
    assert "gpu-node-17" in lock.read_text()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job requeued onto another node
    taken = RunLock(tmp_path)
    taken.acquire()
    assert f'"pid": {os.getpid()}' in lock.read_text()
    taken.release()
    assert not lock.exists()


def test_under_ddp_only_rank_0_takes_the_lock(tmp_path, fmnist_index):
    """Rank 1 starts while rank 0 holds the lock (same host, live pid): it must not refuse."""
    overrides = TINY + [f"data.index={fmnist_index}", f"run.dir={tmp_path / 'run'}", "trainer.max_steps=2",
                        "trainer.val_every_n_steps=100"]
    records = run_ddp(tmp_path, REPO / "experiments" / "fmnist_tiny.yaml", overrides)
    assert [r["world"] for r in records] == [2, 2] and [r["steps"] for r in records] == [2, 2]
    assert not (tmp_path / "run" / LOCK).exists()


# -- the config on resume -------------------------------------------------------------------------------
@pytest.mark.parametrize("before, after, change", [
    ((), ("tokenizer.num_tokens=16",), "tokenizer.num_tokens: 8 -> 16"),
    ((), ("tokenizer.kind=parallel",), "tokenizer.kind: nativetok -> parallel"),
    ((GROWTH,), (GROWTH.replace("step: 8", "step: 4"),), "growth.stages.1.step: 8 -> 4"),
])
def test_a_resume_that_changes_the_model_or_schedule_is_refused_with_the_diff(tiny_config, before, after, change):
    first = tiny_config(*before, "trainer.max_steps=2", "trainer.val_every_n_steps=100")
    train_tokenizer(first)
    run_dir = Path(first.run.dir)
    config_yaml, files = (run_dir / "config.yaml").read_text(), snapshot(run_dir)
    with pytest.raises(ConfigError, match="trained with another config") as refused:
        train_tokenizer(tiny_config(*after, "trainer.max_steps=4", "trainer.val_every_n_steps=100"))
    assert change in str(refused.value) and "another run.name" in str(refused.value)
    assert "trainer.max_steps" not in str(refused.value)  # a safe change is not listed
    assert (run_dir / "config.yaml").read_text() == config_yaml and snapshot(run_dir) == files
    assert not (run_dir / LOCK).exists()


def test_a_resume_that_changes_only_safe_keys_continues(tiny_config, caplog):
    caplog.set_level(logging.INFO, logger="nativetok.lit.run_folder")
    train_tokenizer(tiny_config("trainer.max_steps=2", "trainer.val_every_n_steps=100"))
    config = tiny_config("trainer.max_steps=4", "trainer.val_every_n_steps=3", "data.val_samples=32")
    train_tokenizer(config)
    assert checkpoint_step(Path(config.run.dir) / "checkpoints" / "last.ckpt") == 4
    assert "resuming with trainer.max_steps: 2 -> 4" in caplog.text


def test_stage_2_compares_the_generator_and_ignores_what_it_does_not_read(tmp_path):
    experiment = REPO / "experiments" / "fmnist_tiny_ar.yaml"
    saved = to_container(load_config(experiment, [f"run.dir={tmp_path}"]))
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"hyper_parameters": {"config": saved}, "state_dict": {}, "global_step": 1}, checkpoint)
    maskgit = load_config(experiment, [f"run.dir={tmp_path}", "generator.kind=maskgit"])
    with pytest.raises(ConfigError, match="generator.kind: ar -> maskgit"):
        refuse_changed_config(maskgit, str(checkpoint))
    safe = load_config(experiment, [f"run.dir={tmp_path}", "tokenizer.num_tokens=32", "sampling.cfg_scale=4",
                                    "generator.tokenizer=moved/last.ckpt"])
    assert [key for key, _, _ in config_changes(saved, safe)] == ["generator.tokenizer", "sampling.cfg_scale"]
    refuse_changed_config(safe, str(checkpoint))  # tokenizer.* is not read in stage 2; the others are safe
    del saved["generator"]["mask_schedule"]  # as if added to the schema since: its default is no change
    assert config_changes(saved, load_config(experiment, [f"run.dir={tmp_path}"])) == []


# -- signals and leftovers ---------------------------------------------------------------------------------
def test_sigint_and_sighup_checkpoint_and_exit_cleanly_and_the_same_command_resumes(tmp_path):
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    steps = []
    for number, sig in enumerate((signal.SIGINT, signal.SIGHUP)):
        log = tmp_path / f"{sig.name}.log"
        process = start(run_dir, log, *LONG)
        reached = (steps[-1] if steps else 0) + 2  # a checkpoint of its own: training runs, handlers are set
        wait_for_checkpoint(last, reached)
        process.send_signal(sig)
        assert process.wait(timeout=120) == 0, log.read_text()[-2000:]
        output = log.read_text()
        steps.append(checkpoint_step(last))
        assert f"received {sig.name}: checkpointing" in output and f"pre-empted at step {steps[-1]}" in output
        assert ("resuming from" in output) == (number > 0)
        assert not (run_dir / LOCK).exists()
    assert 2 <= steps[0] < steps[1] < 5000


def test_staged_checkpoints_left_by_killed_saves_are_removed_at_start(tiny_config, caplog):
    config = tiny_config("trainer.max_steps=1", "trainer.val_every_n_steps=100")
    folder = Path(config.run.dir) / "checkpoints"
    folder.mkdir(parents=True)
    leftovers = [folder / ".last.ckpt.4242.tmp", folder / ".best-step000100.ckpt.77.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
    (folder / "notes.txt").write_text("not ours")
    train_tokenizer(config)
    assert not any(p.exists() for p in leftovers) and (folder / "notes.txt").exists()
    assert "removed 2 unfinished checkpoint files" in caplog.text and all(str(p) in caplog.text for p in leftovers)
