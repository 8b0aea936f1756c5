"""Training runs as SLURM and the export card see them: only the time-limit signal requeues, a stop exits
without a validation first, and `last.ckpt`'s best-checkpoint record is the one of the final validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from nativetok.cli import main
from nativetok.lit.train import train_tokenizer

from .conftest import REPO, TINY


def slurm_job(tmp_path: Path) -> dict:
    """The environment of a one-task SLURM job whose `scontrol` is a stand-in recording its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "nativetok", "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"})
    return env


def signalled_run(run_dir: Path, env: dict, signum: int) -> str:
    """Train until step 5 has passed, send `signum`, and return the whole output of a run that exited 0."""
    overrides = TINY + [
        f"run.dir={run_dir}", "trainer.max_steps=400", "trainer.val_every_n_steps=1000",
        "growth.stages=[{step: 0, experts: 4}, {step: 5, experts: 8}]",
        f"data.index={REPO / 'data' / 'fmnist' / 'index.json'}",
    ]
    command = [sys.executable, "-m", "nativetok.cli", "train", str(REPO / "experiments" / "fmnist_tiny.yaml"),
               *overrides]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "HNT stage 1" in line:
            process.send_signal(signum)
            break
    output = "".join(lines) + process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    assert "pre-empted at step" in output
    return output


def test_the_time_limit_signal_requeues_through_scontrol_and_exits_without_validating(tmp_path):
    run_dir = tmp_path / "run"
    output = signalled_run(run_dir, slurm_job(tmp_path), signal.SIGUSR1)
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 4242"]
    assert "validation at step" not in output  # checkpoint and exit inside the grace time, no evaluation first
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 5 <= saved["global_step"] < 400


def test_a_cancelled_job_sigterm_is_checkpointed_but_never_requeued(tmp_path):
    run_dir = tmp_path / "run"
    output = signalled_run(run_dir, slurm_job(tmp_path), signal.SIGTERM)
    assert not (tmp_path / "scontrol.calls").exists() and not (run_dir / "requeue.log").exists()
    assert "validation at step" not in output
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_last_checkpoint_records_the_best_of_the_final_validation(tiny_config):
    """Validation falls on the last step, after last.ckpt's periodic save there: the export card reads the
    best score from last.ckpt, so it must include that validation."""
    config = tiny_config("trainer.max_steps=6", "trainer.val_every_n_steps=3", "trainer.checkpoint_every_n_steps=3")
    trainer, _ = train_tokenizer(config)
    final_loss = float(trainer.callback_metrics["val/loss"])
    folder = Path(config.run.dir) / "checkpoints"
    saved = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    record = next(v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert saved["global_step"] == 6
    assert float(record["best_model_score"]) <= final_loss + 1e-6
    assert Path(record["best_model_path"]).is_file()
    assert [p.name for p in folder.glob("best-*.ckpt")] == [Path(record["best_model_path"]).name]


def test_a_validation_split_without_a_readable_shard_stops_training_with_a_clear_error(tmp_path, fmnist_index, capsys):
    index = json.loads(fmnist_index.read_text())
    train = index["splits"]["train"]["shards"][:1]
    (tmp_path / train[0]["file"]).symlink_to(fmnist_index.parent / train[0]["file"])
    index["splits"]["train"] = {"samples": train[0]["samples"], "shards": train}
    for entry in index["splits"]["val"]["shards"]:
        (tmp_path / entry["file"]).write_bytes(b"not a tar: a download cut short")
    (tmp_path / "index.json").write_text(json.dumps(index))
    code = main(["train", str(REPO / "experiments" / "fmnist_tiny.yaml"), *TINY,
                 f"data.index={tmp_path / 'index.json'}", f"run.dir={tmp_path / 'run'}", "trainer.max_steps=2"])
    error = capsys.readouterr().err
    assert code == 2 and "no readable validation samples" in error and "fmnist-val-000000.tar" in error
    assert "StopIteration" not in error
