"""Render and submit the sbatch script of a training run (multi-node DDP, pre-emption, requeue).

The script launches one task per GPU with `srun`; Lightning reads ranks from SLURM's variables. The
experiment is loaded and checked before anything is rendered, so a bad config never reaches the queue.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import List, Optional, Sequence

from nativetok.config import load_config

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("sbatch.template")
TIME_FORMAT = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


@dataclass
class Resources:
    nodes: int = 1
    gpus: int = 8
    cpus_per_task: int = 8
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None


def render(experiment: str, overrides: Sequence[str], resources: Resources, venv: Path, workdir: Path) -> str:
    """The sbatch script for training `experiment` on the given resources."""
    if resources.nodes < 1 or resources.gpus < 1 or resources.cpus_per_task < 1:
        raise ValueError(f"nodes, GPUs and CPUs per task must be positive: {resources}")
    if not TIME_FORMAT.match(resources.time):
        raise ValueError(f"time limit '{resources.time}' is not [days-]hours[:minutes[:seconds]]")
    trainer = [
        "trainer.accelerator=gpu", f"trainer.devices={resources.gpus}", f"trainer.num_nodes={resources.nodes}",
        "trainer.strategy=ddp",
    ]
    all_overrides: List[str] = [*overrides, *trainer]
    config = load_config(experiment, all_overrides)  # refuses a bad config (e.g. an indivisible batch) now
    optional = "".join(
        f"#SBATCH --{name}={value}\n"
        for name, value in (("partition", resources.partition), ("account", resources.account))
        if value
    )
    return Template(TEMPLATE.read_text()).substitute(
        job_name=config.run.name,
        nodes=resources.nodes,
        gpus=resources.gpus,
        cpus=resources.cpus_per_task,
        time=resources.time,
        optional_directives=optional,
        log_dir=Path(config.run.dir).resolve() / "slurm",
        workdir=Path(workdir).resolve(),
        venv=Path(venv).resolve(),
        experiment=experiment,
        overrides=" ".join(_quote(o) for o in all_overrides),
    )


def _quote(value: str) -> str:
    return value if re.fullmatch(r"[\w.=/:,+-]+", value) else "'" + value.replace("'", "'\\''") + "'"


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
