"""Files a user could have written are never unpickled, broken cache entries are rebuilt, and sbatch
scripts quote every path and check every SLURM value they render."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from nativetok.cluster.slurm import Resources, render, submit
from nativetok.eval.fid import real_features
from nativetok.eval.inception import (
    CONVERTED_NAME,
    InceptionFeatures,
    inception_weights,
    load_inception_state,
    sha256_file,
)

from .conftest import REPO

EXPERIMENT = str(REPO / "experiments" / "imagenet256_nativetok_l32.yaml")


class RunsCommand:
    """Unpickling this runs a shell command that creates `evidence`: what a crafted weights file can do."""

    def __init__(self, evidence):
        self.evidence = evidence

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.evidence))}",)


def craft(path, evidence) -> None:
    """A torch.save file shaped like a state dict whose unpickling runs a command."""
    torch.save({"fc.weight": RunsCommand(evidence)}, path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A cache holding the converted Inception weights, made once; tests break copies of it."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NATIVETOK_CACHE", str(cache))
        weights = inception_weights()
    return cache, weights


@pytest.fixture()
def cache(tmp_path, converted, monkeypatch):
    """A private copy of the converted cache, used as $NATIVETOK_CACHE."""
    copy = tmp_path / "cache"
    shutil.copytree(converted[0], copy)
    monkeypatch.setenv("NATIVETOK_CACHE", str(copy))
    return copy


@pytest.fixture(scope="module")
def extractor(converted):
    return InceptionFeatures(converted[1])


def assert_same_state(path, reference_path) -> None:
    state, reference = load_inception_state(path), load_inception_state(reference_path)
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)


def test_a_crafted_inception_file_is_refused_by_eval_fid_without_running_it(tmp_path, fmnist_index):
    """`nativetok eval-fid --inception FILE` in its own process: the file's code never runs, the error names it."""
    evidence = tmp_path / "code-ran"
    crafted = tmp_path / "inception weights.pth"
    craft(crafted, evidence)
    command = [sys.executable, "-m", "nativetok.cli", "eval-fid", "--inception", str(crafted), "--tokenizer",
               str(tmp_path / "tokenizer.ckpt"), "--data", str(fmnist_index), "--num", "2", "--device", "cpu",
               "--out", str(tmp_path / "fid.json")]
    env = {**os.environ, "NATIVETOK_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert not evidence.exists()
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"Inception weights {crafted} cannot be loaded as plain tensors" in result.stderr


def test_a_crafted_file_planted_as_the_cached_weights_never_runs(cache, converted, tmp_path, caplog):
    """Planted with the marker the old check trusted (right source hash): rebuilt with a warning. Planted
    with a forged marker that records its own sha256: refused with an error naming it. Never run."""
    target = cache / "inception" / CONVERTED_NAME
    marker = target.with_suffix(".json")
    recorded = json.loads(marker.read_text())
    evidence = tmp_path / "code-ran"
    craft(target, evidence)
    marker.write_text(json.dumps({k: recorded[k] for k in ("source", "source_sha256", "classifier")}))
    with caplog.at_level(logging.WARNING, logger="nativetok.eval.inception"):
        weights = inception_weights()
    InceptionFeatures(weights)
    assert not evidence.exists()
    assert f"{target} has no marker {marker.name} recording its sha256" in caplog.text
    assert_same_state(target, converted[0] / "inception" / CONVERTED_NAME)

    craft(target, evidence)
    marker.write_text(json.dumps({**recorded, "sha256": sha256_file(target)}))
    with pytest.raises(ValueError, match=f"Inception weights {target} cannot be loaded as plain tensors"):
        InceptionFeatures(inception_weights())
    assert not evidence.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_cached_weights_are_removed_and_converted_again(cache, converted, caplog, damage):
    target = cache / "inception" / CONVERTED_NAME
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    with caplog.at_level(logging.WARNING, logger="nativetok.eval.inception"):
        weights = inception_weights()
    assert f"{target} does not match the sha256 in {target.with_suffix('.json').name}" in caplog.text
    InceptionFeatures(weights)
    assert_same_state(target, converted[0] / "inception" / CONVERTED_NAME)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nativetok.eval.inception"):
        inception_weights()
    assert "convert" not in caplog.text  # the rebuilt entry is used as it is


@pytest.mark.parametrize("damage", ["truncated", "garbage", "incomplete", "crafted"])
def test_a_broken_real_statistics_file_is_removed_and_computed_again(tmp_path, extractor, fmnist_index, caplog,
                                                                     damage):
    first = real_features(str(fmnist_index), "val", 2, extractor, cache=tmp_path)
    [path] = (tmp_path / "real-stats").glob("*.pt")
    data = path.read_bytes()
    evidence = tmp_path / "code-ran"
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file\n" * 64)
    elif damage == "incomplete":
        torch.save({"pool": first["pool"][:1]}, path)
    else:
        torch.save({"pool": RunsCommand(evidence)}, path)
    with caplog.at_level(logging.WARNING, logger="nativetok.eval.fid"):
        again = real_features(str(fmnist_index), "val", 2, extractor, cache=tmp_path)
    assert f"real-set features cache {path} is unusable" in caplog.text and not evidence.exists()
    assert torch.equal(again["pool"], first["pool"])
    assert torch.equal(torch.load(path, weights_only=True)["pool"], first["pool"])  # the entry is whole again


def test_a_project_folder_with_spaces_and_quotes_runs_the_right_command(tmp_path, capsys):
    """The dry-run script passes `bash -n`, and run by bash (a stand-in srun records its arguments) it
    enters the project folder and runs exactly the experiment and overrides asked for."""
    project = tmp_path.resolve() / "my project's $HOME"
    (project / "experiments").mkdir(parents=True)
    experiment = project / "experiments" / "l32 run.yaml"
    experiment.write_text(f"extends: {EXPERIMENT}\n")
    activate = project / "venv" / "bin" / "activate"
    activate.parent.mkdir(parents=True)
    activate.write_text('export PATH="$(dirname "${BASH_SOURCE[0]}"):$PATH"\n')
    srun = activate.with_name("srun")
    srun.write_text('#!/bin/bash\nprintf "%s\\0" "$PWD" "$@" > "$SRUN_RECORD"\n')
    srun.chmod(0o755)
    run_dir = project / "runs" / "l32"
    overrides = [f"run.dir={run_dir}", "run.name=l32", "optim.lr=2e-4"]
    submit(str(experiment), overrides, Resources(nodes=1, gpus=8, partition="gpu,gpu-long", account="vision"),
           venv=project / "venv", workdir=project, dry_run=True)
    script = capsys.readouterr().out
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)

    output = next(line for line in script.splitlines() if line.startswith("#SBATCH --output="))
    assert shlex.split(output.removeprefix("#SBATCH ")) == [f"--output={run_dir / 'slurm'}/%x-%j.out"]
    record = tmp_path / "srun-arguments"
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1",
           "SRUN_RECORD": str(record)}
    subprocess.run(["bash", str(path)], env=env, cwd=tmp_path, check=True)
    trainer = ["trainer.accelerator=gpu", "trainer.devices=8", "trainer.num_nodes=1", "trainer.strategy=ddp"]
    assert record.read_text().split("\0")[:-1] == [
        str(project), "--kill-on-bad-exit=1", "nativetok", "train", str(experiment), *overrides, *trainer]


@pytest.mark.parametrize("overrides, resources, option", [
    ([], Resources(partition="gpu\ntouch injected"), "--partition"),
    ([], Resources(partition="gpu long"), "--partition"),
    ([], Resources(account="vision\n#SBATCH --exclusive"), "--account"),
    ([], Resources(time="24:00:00\n"), "--time"),
    ([], Resources(nodes=0), "--nodes"),
    ([], Resources(gpus="8\ntouch injected"), "--gpus"),
    ([], Resources(cpus_per_task=-1), "--cpus-per-task"),
    (["run.name=my run"], Resources(), "--job-name"),
])
def test_slurm_values_that_would_break_or_inject_script_lines_are_refused(tmp_path, overrides, resources, option):
    with pytest.raises(ValueError, match=f"^{option}"):
        render(EXPERIMENT, overrides, resources, venv=tmp_path, workdir=tmp_path)
