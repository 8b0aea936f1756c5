"""The command line and the Makefile: targets exist, dry runs work, errors exit 2 with the key named."""

from __future__ import annotations

import subprocess

import pytest

from nativetok.cli import main

from .conftest import REPO

TARGETS = ["setup", "data", "train-stage1", "tokenize", "train-stage2", "sample", "test", "test-all", "lint", "clean"]


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(REPO), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("target", TARGETS)
def test_makefile_targets_exist(target):
    result = make("-n", target)
    assert result.returncode == 0, result.stderr


def test_train_stage1_dry_run_trains_the_default_experiment():
    result = make("-n", "train-stage1", "ARGS=trainer.max_steps=5")
    assert "nativetok train experiments/fmnist_tiny.yaml trainer.max_steps=5" in result.stdout


def test_stage2_targets_name_their_checkpoints(tmp_path):
    result = make("-n", "sample", f"GEN={tmp_path}/g.ckpt", f"TOKENS={tmp_path}/t", f"TOKENIZER={tmp_path}/k.ckpt")
    assert "nativetok train experiments/fmnist_tiny.yaml" in result.stdout  # the tokenizer first, when missing
    assert f"nativetok tokenize --tokenizer {tmp_path}/k.ckpt" in result.stdout
    assert "nativetok train experiments/fmnist_tiny_ar.yaml" in result.stdout
    assert f"nativetok sample --generator {tmp_path}/g.ckpt --out runs/samples/fmnist_tiny_ar" in result.stdout


def test_help_lists_the_targets():
    out = make("help").stdout
    assert all(target in out for target in ("setup", "data", "train-stage1", "test"))


def test_config_command_prints_the_resolved_config(capsys):
    assert main(["config", str(REPO / "experiments" / "fmnist_tiny.yaml"), "data.batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 8" in out and "dir: runs/fmnist_tiny" in out


def test_bad_config_exits_2_naming_the_key(capsys):
    code = main(["train", str(REPO / "experiments" / "fmnist_tiny.yaml"), "tokenizer.num_tokenz=3"])
    assert code == 2
    assert "unknown key 'tokenizer.num_tokenz'" in capsys.readouterr().err
