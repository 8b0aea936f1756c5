"""Sweeps (`-m`): the comma rule, every combination checked first, a local multirun with its summary, a failing
run recorded without hiding the others, and a SLURM job array whose tasks each read their own overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nativetok.cli import main
from nativetok.config import ConfigError
from nativetok.config.loading import override_combinations, sweep_values

from .conftest import FMNIST_INDEX, REPO, TINY

EXPERIMENT = str(REPO / "experiments" / "fmnist_tiny.yaml")
# Two steps with a validation at the second: each run takes seconds on a CPU and ends with metrics.
QUICK = [*TINY, f"data.index={FMNIST_INDEX}", "trainer.max_steps=2", "trainer.val_every_n_steps=2"]


@pytest.mark.parametrize("item, values", [
    ("seed=0,1,2", ["seed=0", "seed=1", "seed=2"]),
    ("seed=3", ["seed=3"]),
    ("optim.betas=[0.9,0.95]", ["optim.betas=[0.9,0.95]"]),
    ("optim.betas=[0.9,0.95],[0.9,0.99]", ["optim.betas=[0.9,0.95]", "optim.betas=[0.9,0.99]"]),
    ("run.name='a,b'", ["run.name='a,b'"]),
    ("run.name='a,b',\"c,d\"", ["run.name='a,b'", "run.name=\"c,d\""]),
    ("run.name=it's,x", ["run.name=it's", "run.name=x"]),
    ("growth.stages=[{step: 0, experts: 4}, {step: 5, experts: 8}]",
     ["growth.stages=[{step: 0, experts: 4}, {step: 5, experts: 8}]"]),
    ("data.train_shards=x-{000..009}.tar", ["data.train_shards=x-{000..009}.tar"]),
    ("+trainer=cpu,gpu", ["+trainer=cpu", "+trainer=gpu"]),
])
def test_a_value_splits_at_commas_outside_quotes_and_brackets(item, values):
    assert sweep_values(item) == values


def test_combinations_are_the_product_the_last_override_varying_fastest():
    combinations = override_combinations(["seed=0,1", "data.batch_size=8", "optim.lr=1e-4,3e-4"], multirun=True)
    assert [c.overrides for c in combinations] == [
        ["seed=0", "data.batch_size=8", "optim.lr=1e-4"], ["seed=0", "data.batch_size=8", "optim.lr=3e-4"],
        ["seed=1", "data.batch_size=8", "optim.lr=1e-4"], ["seed=1", "data.batch_size=8", "optim.lr=3e-4"]]
    assert combinations[3].swept == {"seed": "1", "optim.lr": "3e-4"}
    with pytest.raises(ConfigError, match="'seed=0,1': commas outside quotes and brackets make a sweep; run it "
                                          "with -m"):
        override_combinations(["seed=0,1"], multirun=False)
    with pytest.raises(ConfigError, match="an empty value between commas"):
        override_combinations(["seed=0,,1"], multirun=True)


def test_every_combination_is_checked_before_any_runs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code = main(["train", EXPERIMENT, "-m", *QUICK, "trainer.max_steps=2,3,4,5,-5", "--sweep-dir", str(sweep)])
    err = capsys.readouterr().err
    assert code == 2 and "combination 4 of 5 (trainer.max_steps=-5)" in err and "trainer.max_steps: must be > 0" in err
    assert not sweep.exists()
    assert main(["train", EXPERIMENT, "-m", "seed=0,1", f"run.dir={tmp_path}", "--sweep-dir", str(sweep)]) == 2
    assert "choose the sweep folder with --sweep-dir" in capsys.readouterr().err and not sweep.exists()


def test_a_local_multirun_trains_each_seed_in_its_folder_and_summarises(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    command = ["train", EXPERIMENT, "-m", "seed=0,1,2", *QUICK, "--sweep-dir", str(sweep)]
    assert main(command) == 0
    table = capsys.readouterr().out
    record = json.loads((sweep / "sweep.json").read_text())
    assert [run["swept"] for run in record["runs"]] == [{"seed": "0"}, {"seed": "1"}, {"seed": "2"}]
    for seed in range(3):
        run = sweep / str(seed)
        assert f"seed={seed}" in record["runs"][seed]["overrides"]
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == seed
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((run / "sweep-run.json").read_text())["state"] == "finished"
    rows = json.loads((sweep / "summary.json").read_text())
    assert [(row["run"], row["state"], row["step"]) for row in rows] == [(n, "finished", 2) for n in range(3)]
    losses = [row["metrics"]["loss"] for row in rows]
    assert all(loss > 0 for loss in losses) and len(set(losses)) == 3  # three seeds, three different runs
    assert (sweep / "summary.md").read_text() == table
    assert table.splitlines()[0].startswith("| run | state | seed | step | loss |")
    assert main(["runs", str(sweep)]) == 0 and capsys.readouterr().out == table

    assert main(command) == 0  # the same command again continues the sweep: all finished, kept
    assert json.loads((sweep / "summary.json").read_text()) == rows
    assert main(["train", EXPERIMENT, "-m", "seed=5,6", *QUICK, "--sweep-dir", str(sweep)]) == 2
    assert "holds another sweep" in capsys.readouterr().err


def test_a_failing_run_is_recorded_and_the_next_ones_still_run(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code = main(["train", EXPERIMENT, "-m", *QUICK, "data.train_split=nosuch,train", "--sweep-dir", str(sweep)])
    out = capsys.readouterr().out
    assert code == 1
    failed, finished = json.loads((sweep / "summary.json").read_text())
    assert failed["state"] == "failed" and "nosuch" in failed["error"] and failed["swept"] == {
        "data.train_split": "nosuch"}
    assert finished["state"] == "finished" and finished["metrics"]["loss"] > 0
    assert "| 0 | failed | nosuch |" in out and "| 1 | finished | train | 2 |" in out
    assert "run 0 failed: " in out


@pytest.fixture()
def slurm_stand_ins(tmp_path, monkeypatch):
    """`sbatch` recording its arguments; `srun` dropping its own options and running the task on this CPU (no GPU
    here), recording what it ran; a venv whose activate puts this Python's scripts on PATH."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "sbatch-calls"}\necho "4242;cluster"\n')
    (folder / "srun").write_text(
        "#!/bin/sh\nwhile [ \"${1#--}\" != \"$1\" ]; do shift; done\n"
        f'echo "task $SLURM_ARRAY_TASK_ID: $*" >> {tmp_path / "srun-calls"}\n'
        'exec "$@" trainer.accelerator=cpu trainer.devices=1 trainer.strategy=auto\n')
    for name in ("sbatch", "srun"):
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    return venv


def test_a_submitted_sweep_is_one_job_array_whose_tasks_read_their_own_overrides(tmp_path, slurm_stand_ins,
                                                                                   capsys):
    sweep = tmp_path / "sweep"
    code = main(["submit", EXPERIMENT, "-m", "seed=0,1", *QUICK, "--gpus", "1", "--cpus-per-task", "1",
                 "--time", "UNLIMITED", "--max-concurrent", "1", "--sweep-dir", str(sweep), "--venv",
                 str(slurm_stand_ins)])
    assert code == 0 and capsys.readouterr().out.strip() == "4242"
    script = sweep / "fmnist_tiny.sbatch"
    assert (tmp_path / "sbatch-calls").read_text() == f"--parsable {script}\n"
    text = script.read_text()
    assert "#SBATCH --array=0-1%1\n" in text and "#SBATCH --time=UNLIMITED\n" in text
    assert f'#SBATCH --output="{sweep}/slurm/%x-%A_%a.out"' in text
    assert f"nativetok train {EXPERIMENT} --sweep-task {sweep}\n" in text
    subprocess.run(["bash", "-n", str(script)], check=True)

    for task in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(SLURM_JOB_ID=f"424{task}", SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID=task,
                   SLURM_JOB_NODELIST="node1", SLURM_NNODES="1")
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        config = yaml.safe_load((sweep / task / "config.yaml").read_text())
        assert config["seed"] == int(task) and config["run"]["dir"] == str(sweep / task)
    calls = (tmp_path / "srun-calls").read_text().splitlines()
    assert [call.split(":")[0] for call in calls] == ["task 0", "task 1"]
    assert all(call.endswith(f"nativetok train {EXPERIMENT} --sweep-task {sweep}") for call in calls)

    assert main(["runs", str(sweep)]) == 0
    table = capsys.readouterr().out
    assert "| 0 | finished | 0 | 2 |" in table and "| 1 | finished | 1 | 2 |" in table
    assert (sweep / "summary.md").read_text() == table  # the last task to end wrote the whole table


def test_a_sweep_task_outside_its_array_is_refused(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"experiment": EXPERIMENT, "overrides": ["seed=0,1"], "runs": [
        {"overrides": ["seed=0"], "swept": {"seed": "0"}}, {"overrides": ["seed=1"], "swept": {"seed": "1"}}]}))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert main(["train", EXPERIMENT, "--sweep-task", str(sweep)]) == 2
    assert "SLURM_ARRAY_TASK_ID must be one of 0-1, got '2'" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert main(["train", str(REPO / "experiments" / "fmnist_tiny_ar.yaml"), "--sweep-task", str(sweep)]) == 2
    assert f"sweeps {EXPERIMENT}, not" in capsys.readouterr().err
