"""SLURM: the rendered sbatch script, ranks from srun's variables, pre-emption with requeue; ImageNet layouts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nativetok.cluster.slurm import Resources, render
from nativetok.config import ConfigError
from nativetok.data.folders import read_flat_labels, shard_folder
from nativetok.lit.train import build_trainer

from .conftest import REPO, TINY

EXPERIMENT = str(REPO / "experiments" / "imagenet256_nativetok_l32.yaml")


def test_rendered_script_is_valid_bash_with_the_resources(tmp_path):
    resources = Resources(nodes=4, gpus=8, cpus_per_task=10, time="2-00:00:00", partition="gpu", account="vision")
    script = render(EXPERIMENT, ["optim.lr=2e-4"], resources, venv=tmp_path / "venv", workdir=tmp_path)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --time=2-00:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=vision", "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue",
                 f"source {tmp_path / 'venv'}/bin/activate"):
        assert line in script, line
    srun = next(line for line in script.splitlines() if line.startswith("srun"))
    assert f"nativetok train {EXPERIMENT} optim.lr=2e-4 trainer.accelerator=gpu trainer.devices=8" in srun
    assert "trainer.num_nodes=4 trainer.strategy=ddp" in srun
    no_account = render(EXPERIMENT, [], Resources(nodes=1, gpus=2), venv=tmp_path, workdir=tmp_path)
    assert "--account" not in no_account and "--partition" not in no_account


def test_bad_jobs_are_refused_before_rendering(tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size: the global batch size 256 must be divisible by .* 24"):
        render(EXPERIMENT, [], Resources(nodes=3, gpus=8), venv=tmp_path, workdir=tmp_path)
    with pytest.raises(ValueError, match="time limit 'two days'"):
        render(EXPERIMENT, [], Resources(time="two days"), venv=tmp_path, workdir=tmp_path)


def test_the_trainer_takes_ranks_from_srun_variables(tmp_path, monkeypatch, tiny_config):
    variables = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "nativetok", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
        "SLURM_NODELIST": "node[1-2]", "SLURM_JOB_NODELIST": "node[1-2]",
    }
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    # Building the trainer sets the process-wide rank_zero_only.rank to 3: put it back afterwards.
    from lightning_utilities.core.rank_zero import rank_zero_only as utilities_rank_zero
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    for flag in {id(f): f for f in (rank_zero_only, utilities_rank_zero)}.values():
        monkeypatch.setattr(flag, "rank", getattr(flag, "rank", 0))
    config = tiny_config("trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=2",
                         "trainer.strategy=ddp")
    trainer = build_trainer(config, [], tmp_path)
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue
    assert (trainer.world_size, trainer.global_rank, trainer.node_rank, trainer.local_rank) == (4, 3, 1, 1)


def start_training(run_dir: Path, env: dict) -> subprocess.Popen:
    overrides = TINY + [
        f"run.dir={run_dir}", "trainer.max_steps=400", "trainer.val_every_n_steps=1000",
        "growth.stages=[{step: 0, experts: 4}, {step: 5, experts: 8, train: [decoder]}]",
    ]
    command = [sys.executable, "-m", "nativetok.cli", "train", str(REPO / "experiments" / "fmnist_tiny.yaml"),
               *overrides, f"data.index={REPO / 'data' / 'fmnist' / 'index.json'}"]
    return subprocess.Popen(command, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_sigusr1_checkpoints_requeues_and_the_same_command_resumes(tmp_path):
    """A signalled run checkpoints at a step boundary, records the requeue (no scontrol here), exits 0;
    running the same command again resumes from that checkpoint, HNT stage included, and finishes."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"SLURM_JOB_ID": "4242", "PATH": "/usr/bin:/bin"})  # SLURM's job id, but no scontrol on PATH
    process = start_training(run_dir, env)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "HNT stage 1" in line:  # past step 5: well into training
            process.send_signal(signal.SIGUSR1)
            break
    output = "".join(lines) + process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-2000:]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stopped = checkpoint["global_step"]
    assert 5 <= stopped < 400 and "pre-empted at step" in output
    assert (run_dir / "requeue.log").read_text().strip() == "scontrol requeue 4242"
    assert next(iter(v for k, v in checkpoint["callbacks"].items() if "ExpertGrowth" in k)) == {"stage": 1}

    started = time.monotonic()
    resumed = start_training(run_dir, env)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-2000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in output
    assert "HNT stage 1 (step 5)" in output and time.monotonic() - started < 600
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 400


def make_tree(root: Path, flat_val: bool) -> None:
    rng = np.random.default_rng(0)
    for cls in ("n01440764", "n01443537"):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / f"{cls}_{i}.JPEG")
    (root / "val").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8)).save(
            root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")


def test_flat_imagenet_validation_with_each_label_format(tmp_path):
    make_tree(tmp_path / "ILSVRC" / "Data" / "CLS-LOC", flat_val=True)
    classes = ["n01440764", "n01443537"]
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i + 1:08d},{classes[i % 2]} 1 2 3 4\n" for i in range(4)))
    two_columns = tmp_path / "val.txt"
    two_columns.write_text("".join(f"ILSVRC2012_val_{i + 1:08d}.JPEG {i % 2}\n" for i in range(4)))
    devkit = tmp_path / "ground_truth.txt"
    devkit.write_text("".join(f"{[7, 3][i % 2]}\n" for i in range(4)))  # devkit IDs, not sorted positions
    from scipy.io import savemat

    synsets = np.zeros(2, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    synsets[0] = (7, "n01440764")
    synsets[1] = (3, "n01443537")
    savemat(tmp_path / "meta.mat", {"synsets": synsets})
    expected = {f"ILSVRC2012_val_{i + 1:08d}": i % 2 for i in range(4)}
    assert read_flat_labels(kaggle, classes) == expected
    assert read_flat_labels(two_columns, classes) == expected
    assert read_flat_labels(devkit, classes, tmp_path / "meta.mat") == expected
    index = shard_folder(tmp_path / "ILSVRC", tmp_path / "shards", "imagenet", size=16, per_shard=3,
                         fmt="jpg", workers=2, val_labels=kaggle)
    assert index.classes == classes and index.split("train").samples == 6 and index.split("val").samples == 4
    with pytest.raises(ValueError, match="give its label file"):
        shard_folder(tmp_path / "ILSVRC", tmp_path / "other", "imagenet", size=16, workers=1)
