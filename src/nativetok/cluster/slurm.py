"""Render and submit the sbatch script of a training run (multi-node DDP, pre-emption, requeue).

The script launches one task per GPU with `srun`; Lightning reads ranks from SLURM's variables. The
experiment is loaded and checked before anything is rendered, so a bad config never reaches the queue.
Every value rendered into the script is either checked against what SLURM accepts (names, time, counts)
or quoted (paths and the command line): a job waits in the queue before it runs, so a space in a
folder or a newline in a partition must fail at submission, not hours later or as an injected line.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import List, Optional, Sequence

from nativetok.config import load_config

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("sbatch.template")
TIME_FORMAT = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}")
SLURM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
SLURM_NAMES = re.compile(rf"{SLURM_NAME.pattern}(,{SLURM_NAME.pattern})*")
NAME_RULE = "letters, digits, '_', '-' and '.'"


@dataclass
class Resources:
    nodes: int = 1
    gpus: int = 8
    cpus_per_task: int = 8
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None


def _checked(option: str, what: str, value: str, pattern: re.Pattern, rule: str) -> str:
    """`value` when SLURM accepts it for `option`, else a ValueError naming the option."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"--{option}: {what} {value!r} is not {rule}")
    return value


def _check_count(option: str, value: int) -> None:
    """A ValueError naming the option unless `value` is a count SLURM accepts (a positive integer)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--{option} must be a positive integer, got {value!r}")


def _check_resources(resources: Resources) -> None:
    for option, value in (("nodes", resources.nodes), ("gpus", resources.gpus),
                          ("cpus-per-task", resources.cpus_per_task)):
        _check_count(option, value)
    _checked("time", "time limit", resources.time, TIME_FORMAT, "[days-]hours[:minutes[:seconds]]")
    if resources.partition is not None:
        _checked("partition", "partition", resources.partition, SLURM_NAMES, f"{NAME_RULE} (commas between several)")
    if resources.account is not None:
        _checked("account", "account", resources.account, SLURM_NAME, NAME_RULE)


def _log_pattern(log_dir: Path, suffix: str) -> str:
    """The --output/--error value for files in `log_dir`, in double quotes for sbatch's own #SBATCH parser
    (quotes group words, a backslash escapes, an unquoted # starts a comment); a literal % is written %%."""
    folder = str(log_dir)
    if "\n" in folder or "\\" in folder:  # a backslash would also turn off SLURM's %x/%j replacement
        raise ValueError(f"run.dir: the job's log folder {folder!r} holds a newline or a backslash, which SLURM "
                         "cannot take in --output")
    pattern = folder.replace("%", "%%") + f"/%x-%j.{suffix}"
    return '"' + pattern.replace('"', '\\"') + '"'


def render(experiment: str, overrides: Sequence[str], resources: Resources, venv: Path, workdir: Path) -> str:
    """The sbatch script for training `experiment` on the given resources."""
    _check_resources(resources)
    trainer = [
        "trainer.accelerator=gpu", f"trainer.devices={resources.gpus}", f"trainer.num_nodes={resources.nodes}",
        "trainer.strategy=ddp",
    ]
    all_overrides: List[str] = [*overrides, *trainer]
    config = load_config(experiment, all_overrides)  # refuses a bad config (e.g. an indivisible batch) now
    job_name = _checked("job-name", "job name (run.name)", config.run.name, SLURM_NAME, NAME_RULE)
    optional = "".join(
        f"#SBATCH --{name}={value}\n"
        for name, value in (("partition", resources.partition), ("account", resources.account))
        if value
    )
    log_dir = Path(config.run.dir).resolve() / "slurm"
    return Template(TEMPLATE.read_text()).substitute(
        job_name=job_name,
        nodes=resources.nodes,
        gpus=resources.gpus,
        cpus=resources.cpus_per_task,
        time=resources.time,
        optional_directives=optional,
        output=_log_pattern(log_dir, "out"),
        error=_log_pattern(log_dir, "err"),
        workdir=shlex.quote(str(Path(workdir).resolve())),
        activate=shlex.quote(str(Path(venv).resolve() / "bin" / "activate")),
        command=shlex.join(["nativetok", "train", experiment, *all_overrides]),
    )


def submit(
    experiment: str,
    overrides: Sequence[str],
    resources: Resources,
    venv: Path = Path(".venv"),
    workdir: Path = Path("."),
    dry_run: bool = False,
) -> Optional[str]:
    """Write the script to <run dir>/slurm/ and `sbatch` it (or print it); returns the job id."""
    script = render(experiment, overrides, resources, venv, workdir)
    if dry_run:
        print(script, end="")
        return None
    config = load_config(experiment, overrides)
    folder = Path(config.run.dir) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config.run.name}.sbatch"
    path.write_text(script)
    if shutil.which("sbatch") is None:
        raise FileNotFoundError(f"sbatch not found; the script is in {path} (use --dry-run to print it)")
    result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=True)
    job = result.stdout.strip().split(";")[0]
    log.info("submitted %s as job %s", path, job)
    return job
