"""SLURM: the rendered sbatch script, ranks from srun's variables, pre-emption with requeue; ImageNet layouts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nativetok.cluster.slurm import Resources, Site, parse_time, render, slurm_time, submit
from nativetok.config import ConfigError
from nativetok.data.folders import read_flat_labels, shard_folder
from nativetok.lit.train import build_trainer

from .conftest import FMNIST_INDEX, REPO, TINY

EXPERIMENT = str(REPO / "experiments" / "imagenet256_nativetok_l32.yaml")
TINY_EXPERIMENT = str(REPO / "experiments" / "fmnist_tiny.yaml")


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


@pytest.mark.parametrize("text, seconds", [
    ("90", 90 * 60), ("90:30", 90 * 60 + 30), ("36:00:00", 36 * 3600), ("1:02:03", 3723),
    ("2-12", (2 * 24 + 12) * 3600), ("2-12:30", (2 * 24 + 12) * 3600 + 1800), ("1-00:00:05", 86405),
])
def test_time_limits_are_read_as_sbatch_reads_them(text, seconds):
    assert parse_time(text) == seconds
    assert parse_time(slurm_time(seconds)) == seconds  # what is rendered means the same to SLURM


@pytest.mark.parametrize("text", ["UNLIMITED", "unlimited", "INFINITE", "Infinite", "-1", "0", "0:00", "0-0"])
def test_no_time_limit_is_read_as_sbatch_reads_it_and_rendered_unlimited(text, tmp_path):
    assert parse_time(text) is None and slurm_time(None) == "UNLIMITED"
    script = render(EXPERIMENT, [], Resources(time=text), venv=tmp_path, workdir=tmp_path)
    assert "#SBATCH --time=UNLIMITED\n" in script


@pytest.mark.parametrize("text, problem", [
    ("two days", "is not one of minutes"), ("1:2:3:4", "is not one of"), ("-5", "is not one of"),
    ("2-", "is not one of"), ("1.5", "is not one of"), ("1", "ends before the SIGUSR1"), ("0:30", "ends before"),
    ("UNLIMITED2", "is not one of"), ("forever", "is not one of"), ("-1:00", "is not one of"), ("", "is not one of"),
    (" 90", "is not one of"), ("1-2-3", "is not one of"),
])
def test_time_limits_sbatch_would_refuse_or_that_leave_no_time_to_checkpoint_are_refused(text, problem):
    with pytest.raises(ValueError, match=f"--time: .*{problem}"):
        parse_time(text)


def test_site_directives_and_setup_lines_are_rendered(tmp_path):
    site = Site(directives=["--qos=high", "constraint=a100", "#SBATCH --mem=0"],
                setup=["module load cuda/12.1", "export NCCL_IB_DISABLE=1"])
    script = render(EXPERIMENT, [], Resources(time="90"), venv=tmp_path / "venv", workdir=tmp_path, site=site)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    lines = script.splitlines()
    assert "#SBATCH --time=01:30:00" in lines
    header = lines[:lines.index("set -euo pipefail")]
    for line in ("#SBATCH --qos=high", "#SBATCH --constraint=a100", "#SBATCH --mem=0"):
        assert line in header, line
    setup = lines.index("module load cuda/12.1")
    assert lines[setup - 1:setup + 3] == ["set +u", "module load cuda/12.1", "export NCCL_IB_DISABLE=1", "set -u"]
    assert lines[setup + 3].startswith("source ")
    for site, message in ((Site(directives=["--nodes=3"]), "sets --nodes from --nodes"),
                          (Site(directives=["-t 5"]), "sets -t from --time"),
                          (Site(directives=["--qos=a\n#SBATCH --nodes=9"]), "--sbatch: .* must be one non-empty line"),
                          (Site(setup=["module load a\rrm -rf /"]), "--setup: .* must be one non-empty line")):
        with pytest.raises(ValueError, match=message):
            render(EXPERIMENT, [], Resources(), venv=tmp_path, workdir=tmp_path, site=site)


def test_a_site_template_uses_the_same_placeholders_and_is_checked(tmp_path):
    template = tmp_path / "site.template"
    template.write_text("#!/bin/bash\n#SBATCH --job-name=${job_name}\n#SBATCH --time=${time}\n#SBATCH --qos=site\n"
                        "${optional_directives}cd ${workdir}\n${setup}source ${activate}\nsrun ${command}\n")
    site = Site(directives=["--mem=0"], setup=["module load nccl"], template=template)
    script = render(EXPERIMENT, [], Resources(time="2-0"), venv=tmp_path, workdir=tmp_path, site=site)
    assert script.splitlines()[1:5] == ["#SBATCH --job-name=imagenet256_nativetok_l32", "#SBATCH --time=2-00:00:00",
                                        "#SBATCH --qos=site", "#SBATCH --mem=0"]
    assert "module load nccl" in script and "srun nativetok train" in script
    for text, site, message in (
        ("srun ${command} ${gpu_count}\n", Site(), "unknown placeholders gpu_count"),
        ("srun $ command\n", Site(), "a '\\$' that starts no placeholder"),
        ("#SBATCH --time=${time}\n", Site(), "no \\$\\{command\\}"),
        ("srun ${command}\n", Site(directives=["--mem=0"]), "no \\$\\{optional_directives\\} for the --partition"),
        ("srun ${command}\n", Site(setup=["module load x"]), "no \\$\\{setup\\} for the --setup"),
        ("cd ${workdir}\n${optional_directives}srun ${command}\n", Site(directives=["--mem=0"]),
         "sbatch ignores #SBATCH lines after the first command: #SBATCH --mem=0"),
    ):
        template.write_text(text)
        with pytest.raises(ValueError, match=message):
            render(EXPERIMENT, [], Resources(), venv=tmp_path, workdir=tmp_path,
                   site=Site(site.directives, site.setup, template))


@pytest.fixture()
def fake_sbatch(tmp_path, monkeypatch):
    """An `sbatch` on PATH that records its arguments and answers with a job id; returns the record file."""
    folder, record = tmp_path / "bin", tmp_path / "sbatch-calls"
    folder.mkdir()
    (folder / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {record}\necho "4242;cluster"\n')
    (folder / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")
    return record


def test_submit_names_every_missing_input_and_queues_nothing(tmp_path, fake_sbatch):
    index = tmp_path / "data" / "index.json"  # the real index without its shards beside it
    index.parent.mkdir()
    shutil.copyfile(FMNIST_INDEX, index)
    shutil.copyfile(FMNIST_INDEX.parent / "fmnist-val-000001.tar", index.parent / "fmnist-val-000001.tar")
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"not a checkpoint")
    overrides = [f"run.dir={tmp_path / 'run'}", f"data.index={index}", "loss.perceptual_weight=1",
                 "loss.perceptual.vgg_weights=weights/vgg16.pth", "loss.perceptual.lin_weights=weights/vgg.pth",
                 f"run.resume={damaged}"]
    resources = Resources(gpus=2, time="10")
    with pytest.raises(FileNotFoundError) as error:
        submit(TINY_EXPERIMENT, overrides, resources, venv=tmp_path / "no-venv", workdir=tmp_path)
    message = str(error.value)
    shards = json.loads(index.read_text())["splits"]
    expected = [f"data.index {split} shard: {index.parent / s['file']}" for split in ("train", "val")
                for s in shards[split]["shards"] if s["file"] != "fmnist-val-000001.tar"]
    expected += [f"loss.perceptual.vgg_weights: {tmp_path / 'weights' / 'vgg16.pth'}",
                 f"loss.perceptual.lin_weights: {tmp_path / 'weights' / 'vgg.pth'}",
                 f"--venv: {tmp_path / 'no-venv' / 'bin' / 'activate'}", f"run.resume: {damaged}: unreadable"]
    for line in expected:
        assert f"\n  {line}" in message, line
    assert message.startswith(f"nothing submitted: {len(expected)} input(s)") and "val-000001" not in message
    assert not fake_sbatch.exists() and not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError, match=f"generator.tokenizer: {tmp_path / 'runs' / 'none.ckpt'}"):
        submit(str(REPO / "experiments" / "fmnist_tiny_ar.yaml"), [f"run.dir={tmp_path / 'g'}",
               f"data.index={FMNIST_INDEX}", "generator.tokenizer=runs/none.ckpt"], resources,
               venv=tmp_path / "venv", workdir=tmp_path)
    with pytest.raises(FileNotFoundError, match=f"data.index: {tmp_path / 'nowhere.json'}"):
        submit(TINY_EXPERIMENT, [f"run.dir={tmp_path / 'run'}", "data.index=nowhere.json"], resources,
               venv=tmp_path / "venv", workdir=tmp_path)
    assert not fake_sbatch.exists()


def test_submit_queues_a_job_whose_inputs_are_all_there(tmp_path, fake_sbatch):
    overrides = [f"run.dir={tmp_path / 'run'}", "data.index=data/fmnist/index.json"]  # relative to the workdir
    job = submit(TINY_EXPERIMENT, overrides, Resources(gpus=2, time="1-0"), venv=tmp_path / "venv", workdir=REPO,
                 site=Site(directives=["qos=high"]))
    script = tmp_path / "run" / "slurm" / "fmnist_tiny.sbatch"
    assert job == "4242" and fake_sbatch.read_text() == f"--parsable {script}\n"
    assert "#SBATCH --qos=high" in script.read_text() and "#SBATCH --time=1-00:00:00" in script.read_text()


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


def test_the_submit_command_passes_site_options_and_dry_runs_despite_missing_inputs(tmp_path, capsys, caplog):
    from nativetok.cli import main

    code = main(["submit", EXPERIMENT, f"run.dir={tmp_path / 'run'}", "--dry-run", "--time", "2-12",
                 "--sbatch=--qos=high", "--sbatch", "constraint=a100", "--setup", "module load cuda/12.1"])
    script = capsys.readouterr().out
    assert code == 0 and "#SBATCH --time=2-12:00:00" in script and "module load cuda/12.1\n" in script
    assert "#SBATCH --qos=high\n#SBATCH --constraint=a100\n" in script
    assert f"data.index: {REPO / 'data' / 'imagenet256' / 'index.json'}" in caplog.text  # warned, not refused
    assert main(["submit", EXPERIMENT, f"run.dir={tmp_path / 'run'}", "--time", "2-12"]) == 2
    assert "nothing submitted" in capsys.readouterr().err and not (tmp_path / "run").exists()
