"""Render and submit the sbatch script of a training run (multi-node DDP, pre-emption, requeue).

The script launches one task per GPU with `srun`; Lightning reads ranks from SLURM's variables. The
experiment is loaded and checked before anything is rendered, so a bad config never reaches the queue.
Every value rendered into the script is either checked against what SLURM accepts (names, time, counts)
or quoted (paths and the command line): a job waits in the queue before it runs, so a space in a
folder or a newline in a partition must fail at submission, not hours later or as an injected line. For
the same reason `submit` checks every file the job will read (the data index and its shards, weights,
checkpoints, the virtual environment) before it calls sbatch.

Site settings: `Site.directives` become `#SBATCH` lines (qos, constraint, mem, gres...), `Site.setup`
shell lines run before the environment is activated (module loads), and `Site.template` replaces the
shipped sbatch.template; a template may use the placeholders in `PLACEHOLDERS` and must run ${command}.

Sweeps (`submit -m`, see pipelines/sweep.py) are one job array, `#SBATCH --array=0-<N-1>[%<max concurrent>]`:
every combination is checked (and its inputs) before the script is written, and each task runs `nativetok train
EXP --sweep-task <sweep dir>`, which reads its overrides from <sweep dir>/sweep.json (JSON, in Python) by
$SLURM_ARRAY_TASK_ID: no text from a file is ever run as shell code.
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
from typing import Iterator, List, Optional, Sequence, Tuple

from nativetok.config import load_config
from nativetok.config.schema import ExperimentConfig
from nativetok.pipelines.sweep import SWEEP_FILE, default_sweep_dir, plan_sweep, record_sweep

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("sbatch.template")
PLACEHOLDERS = {
    "job_name": "the run's name (run.name)",
    "nodes": "--nodes",
    "gpus": "--gpus: GPUs, and so tasks, per node",
    "cpus": "--cpus-per-task",
    "time": "--time, as [days-]hours:minutes:seconds or UNLIMITED",
    "optional_directives": "#SBATCH lines of --partition, --account, a sweep's --array and each --sbatch (empty or "
                           "newline-ended)",
    "output": "the quoted stdout file pattern, in <run dir>/slurm/ (a sweep's: <sweep dir>/slurm/)",
    "error": "the quoted stderr file pattern, in <run dir>/slurm/ (a sweep's: <sweep dir>/slurm/)",
    "workdir": "the quoted working directory",
    "setup": "the --setup lines (empty or newline-ended)",
    "activate": "the quoted path of the virtual environment's bin/activate",
    "command": "the training command (nativetok train ...)",
}
TIME_FORMATS = ("minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes, "
                "days-hours:minutes:seconds, or UNLIMITED (also INFINITE, -1 or 0: the partition's limit)")
# What sbatch reads as no time limit of the job's own (SLURM's time_str2secs; its man page: "a time limit of zero").
NO_LIMIT = ("unlimited", "infinite", "-1")
SIGNAL_SECONDS = 90  # the template's --signal=SIGUSR1@90: the checkpoint's warning before the time limit
SLURM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
SLURM_NAMES = re.compile(rf"{SLURM_NAME.pattern}(,{SLURM_NAME.pattern})*")
NAME_RULE = "letters, digits, '_', '-' and '.'"
# sbatch options the script sets itself, with the submit option or config key that sets each instead.
OWN_OPTIONS = {
    "job-name": "run.name", "J": "run.name", "nodes": "--nodes", "N": "--nodes", "ntasks-per-node": "--gpus",
    "gpus-per-node": "--gpus", "cpus-per-task": "--cpus-per-task", "c": "--cpus-per-task", "time": "--time",
    "t": "--time", "partition": "--partition", "p": "--partition", "account": "--account", "A": "--account",
    "output": "run.dir", "o": "run.dir", "error": "run.dir", "e": "run.dir", "signal": "the template",
    "requeue": "the template", "open-mode": "the template", "array": "-m and --max-concurrent",
    "a": "-m and --max-concurrent",
}


@dataclass
class Resources:
    nodes: int = 1
    gpus: int = 8
    cpus_per_task: int = 8
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None


@dataclass
class Site:
    """What a cluster needs beyond the resources: extra #SBATCH options, setup lines, its own template."""

    directives: Sequence[str] = ()
    setup: Sequence[str] = ()
    template: Optional[Path] = None


def parse_time(text: str) -> Optional[int]:
    """Seconds of a `--time` limit in any format sbatch takes (see TIME_FORMATS), None for no limit of the job's
    own (the partition's applies); a ValueError otherwise."""
    if isinstance(text, str) and text.lower() in NO_LIMIT:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"--time: time limit {text!r} is not one of {TIME_FORMATS}")
    days, *fields = match.groups()
    numbers = [int(f) for f in fields if f is not None]
    if days is not None:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = numbers + [0] * (3 - len(numbers))
    elif len(numbers) == 3:  # hours:minutes:seconds
        hours, minutes, seconds = numbers
    else:  # minutes[:seconds]
        hours, (minutes, seconds) = 0, numbers + [0] * (2 - len(numbers))
    total = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    if total == 0:  # "A time limit of zero requests that no time limit be imposed" (sbatch)
        return None
    if -(-total // 60) * 60 <= SIGNAL_SECONDS:  # SLURM rounds a limit up to whole minutes
        raise ValueError(f"--time: a limit of {text!r} ends before the SIGUSR1 the job asks for "
                         f"{SIGNAL_SECONDS} s ahead of it; give at least 2 minutes")
    return total


def slurm_time(seconds: Optional[int]) -> str:
    """`[days-]hours:minutes:seconds` (UNLIMITED for None), forms every SLURM version reads the same way."""
    if seconds is None:
        return "UNLIMITED"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}-" if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


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
    if resources.partition is not None:
        _checked("partition", "partition", resources.partition, SLURM_NAMES, f"{NAME_RULE} (commas between several)")
    if resources.account is not None:
        _checked("account", "account", resources.account, SLURM_NAME, NAME_RULE)


def _one_line(option: str, line: str) -> str:
    if not isinstance(line, str) or not line.strip() or any(c in line for c in "\n\r\0"):
        raise ValueError(f"{option}: {line!r} must be one non-empty line")
    return line.strip()


def _directive(line: str) -> str:
    """`#SBATCH <line>`, from `--qos=high`, `qos=high` or a pasted `#SBATCH --qos=high`; options the script
    sets from other settings are refused, since a second value would silently win over them."""
    text = _one_line("--sbatch", line)
    text = text[len("#SBATCH"):].strip() if text.startswith("#SBATCH") else text
    text = text if text.startswith("-") else f"--{text}"
    name = re.split(r"[=\s]", text.lstrip("-"), maxsplit=1)[0]
    if name in OWN_OPTIONS:
        raise ValueError(f"--sbatch {line!r}: the script sets {text.split('=')[0].split()[0]} from "
                         f"{OWN_OPTIONS[name]}; set it there")
    return f"#SBATCH {text}"


def _setup(lines: Sequence[str]) -> str:
    """The setup lines, with `set -u` off around them: module and conda scripts read unset variables."""
    if not lines:
        return ""
    body = "".join(f"{_one_line('--setup', line)}\n" for line in lines)
    return f"set +u\n{body}set -u\n"


def _template(path: Optional[Path]) -> Template:
    """The shipped template, or a site's, checked for what `substitute` would only find out by failing."""
    path = TEMPLATE if path is None else Path(path)
    template = Template(path.read_text())
    if not template.is_valid():
        raise ValueError(f"--template {path}: a '$' that starts no placeholder (write $$ for a literal $)")
    unknown = sorted(set(template.get_identifiers()) - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(f"--template {path}: unknown placeholders {', '.join(unknown)} "
                         f"(known: {', '.join(PLACEHOLDERS)})")
    if "command" not in template.get_identifiers():
        raise ValueError(f"--template {path}: no ${{command}}, so the job would not train")
    return template


def _late_directives(script: str) -> List[str]:
    """#SBATCH lines after the first command: sbatch ignores them without a word."""
    late, commands = [], False
    for line in script.splitlines():
        text = line.strip()
        if text.startswith("#SBATCH") and commands:
            late.append(text)
        commands = commands or bool(text and not text.startswith("#"))
    return late


def _log_pattern(log_dir: Path, name: str, suffix: str) -> str:
    """The --output/--error value for files in `log_dir`, in double quotes for sbatch's own #SBATCH parser
    (quotes group words, a backslash escapes, an unquoted # starts a comment); a literal % is written %%."""
    folder = str(log_dir)
    if "\n" in folder or "\\" in folder:  # a backslash would also turn off SLURM's %x/%j replacement
        raise ValueError(f"run.dir: the job's log folder {folder!r} holds a newline or a backslash, which SLURM "
                         "cannot take in --output")
    pattern = folder.replace("%", "%%") + f"/{name}.{suffix}"
    return '"' + pattern.replace('"', '\\"') + '"'


@dataclass
class Job:
    """What a script runs: the job's name, its command, where its logs go, and #SBATCH lines of its own."""

    name: str
    command: List[str]
    log_dir: Path
    log_name: str = "%x-%j"  # an array's tasks: %x-%A_%a (job name, array job id, task id)
    directives: Sequence[str] = ()


def job_config(experiment: str, overrides: Sequence[str], resources: Resources) -> Tuple[ExperimentConfig, List[str]]:
    """The experiment as the job will run it (GPUs, nodes and DDP from the resources), and its overrides."""
    _check_resources(resources)
    trainer = [
        "trainer.accelerator=gpu", f"trainer.devices={resources.gpus}", f"trainer.num_nodes={resources.nodes}",
        "trainer.strategy=ddp",
    ]
    all_overrides = [*overrides, *trainer]
    return load_config(experiment, all_overrides), all_overrides  # refuses a bad config (an indivisible batch)


def _training_job(experiment: str, config: ExperimentConfig, all_overrides: List[str]) -> Job:
    return Job(config.run.name, ["nativetok", "train", experiment, *all_overrides],
               Path(config.run.dir).resolve() / "slurm")


def render(experiment: str, overrides: Sequence[str], resources: Resources, venv: Path, workdir: Path,
           site: Optional[Site] = None) -> str:
    """The sbatch script for training `experiment` on the given resources."""
    config, all_overrides = job_config(experiment, overrides, resources)
    return _script(_training_job(experiment, config, all_overrides), resources, venv, workdir, site or Site())


def _script(job: Job, resources: Resources, venv: Path, workdir: Path, site: Site) -> str:
    time = slurm_time(parse_time(resources.time))
    job_name = _checked("job-name", "job name (run.name)", job.name, SLURM_NAME, NAME_RULE)
    directives = [f"#SBATCH --{name}={value}" for name, value in
                  (("partition", resources.partition), ("account", resources.account)) if value]
    directives += [*job.directives, *(_directive(line) for line in site.directives)]
    setup = _setup(site.setup)
    template = _template(site.template)
    for placeholder, option, used in (("optional_directives", "--partition, --account, --array, --sbatch",
                                       directives), ("setup", "--setup", setup)):
        if used and placeholder not in template.get_identifiers():
            raise ValueError(f"--template {site.template}: no ${{{placeholder}}} for the {option} lines given")
    script = template.substitute(
        job_name=job_name,
        nodes=resources.nodes,
        gpus=resources.gpus,
        cpus=resources.cpus_per_task,
        time=time,
        optional_directives="".join(f"{line}\n" for line in directives),
        output=_log_pattern(job.log_dir, job.log_name, "out"),
        error=_log_pattern(job.log_dir, job.log_name, "err"),
        workdir=shlex.quote(str(Path(workdir).resolve())),
        setup=setup,
        activate=shlex.quote(str(Path(venv).resolve() / "bin" / "activate")),
        command=shlex.join(job.command),
    )
    late = _late_directives(script)
    if late:
        raise ValueError(f"--template {site.template}: sbatch ignores #SBATCH lines after the first command: "
                         + "; ".join(late))
    return script


def render_sweep(experiment: str, overrides: Sequence[str], resources: Resources, folder: Path, venv: Path,
                 workdir: Path, site: Optional[Site] = None, max_concurrent: Optional[int] = None):
    """The job array's script for a sweep (`-m` overrides) in `folder`, the sweep and its checked configs."""
    if max_concurrent is not None:
        _check_count("max-concurrent", max_concurrent)
    folder = Path(folder).resolve()
    sweep, configs = plan_sweep(experiment, overrides, folder, lambda exp, given: job_config(exp, given, resources))
    array = f"0-{len(sweep.runs) - 1}" + (f"%{max_concurrent}" if max_concurrent else "")
    job = Job(configs[0].run.name, ["nativetok", "train", sweep.experiment, "--sweep-task", str(folder)],
              folder / "slurm", "%x-%A_%a", [f"#SBATCH --array={array}"])
    return _script(job, resources, venv, workdir, site or Site()), sweep, configs


def missing_inputs(config: ExperimentConfig, workdir: Path, venv: Path) -> List[str]:
    """`what: path` for each file the job reads that is missing or unreadable from here, relative paths taken
    from `workdir` (where the job runs). URLs, `pipe:` shards and Hub repo ids are not checked."""
    workdir = Path(workdir).resolve()
    activate = Path(venv).resolve() / "bin" / "activate"
    problems = [] if activate.is_file() else [f"--venv: {activate}"]
    problems += [f"{key}: {problem}" for key, problem in _input_problems(config, lambda p: workdir / Path(p))]
    return problems


def _input_problems(config: ExperimentConfig, local) -> Iterator[Tuple[str, str]]:
    from nativetok.data.shards import is_url

    d = config.data
    index = None
    if d.index and not is_url(d.index):
        index = yield from _index(local(d.index))
    for side, pattern, split in (("train", d.train_shards, d.train_split), ("val", d.val_shards, d.val_split)):
        yield from _shards(side, pattern, split, index, local)
    if config.stage == "tokenizer" and config.loss.perceptual_weight > 0:
        for name in ("vgg_weights", "lin_weights"):
            path = getattr(config.loss.perceptual, name)
            if path and not local(path).is_file():
                yield f"loss.perceptual.{name}", str(local(path))
    if config.stage == "generator":
        yield from _checkpoint("generator.tokenizer", config.generator.tokenizer, local, "tokenizer")
    if config.run.resume not in ("auto", "never"):
        from nativetok.lit.checkpoint_io import checkpoint_problem

        path = local(config.run.resume)
        problem = checkpoint_problem(path)
        if problem:
            yield "run.resume", str(path) if problem == "missing" else f"{path}: {problem}"


def _index(path: Path):
    """Yields the index's problem, if any; returns the index when it loads."""
    from nativetok.data.shards import DatasetIndex

    if not path.is_file():
        yield "data.index", str(path)
        return None
    try:
        return DatasetIndex.load(path)
    except (OSError, ValueError) as error:
        yield "data.index", f"{path}: {error}"
    return None


def _shards(side: str, pattern: Optional[str], split: str, index, local) -> Iterator[Tuple[str, str]]:
    from braceexpand import braceexpand

    from nativetok.data.shards import is_url

    if pattern:
        key, names = f"data.{side}_shards", [str(local(n)) for n in braceexpand(pattern) if not is_url(n)]
    elif index is None:
        return
    elif split not in index.splits:
        yield f"data.{side}_split", f"'{split}' is not a split of the index (it has {', '.join(index.splits)})"
        return
    else:
        key, names = f"data.index {split} shard", [n for n in index.shard_paths(split) if not is_url(n)]
    yield from ((key, name) for name in names if not Path(name).is_file())


def _checkpoint(key: str, name: str, local, kind: str) -> Iterator[Tuple[str, str]]:
    from nativetok.checkpoints import HUB_ID, CheckpointError, read_checkpoint

    path = local(name)
    if not path.exists():
        if not HUB_ID.match(name):
            yield key, str(path)
        return
    try:
        read_checkpoint(path, kind)
    except (CheckpointError, OSError) as error:
        yield key, str(error)


def _refuse_missing(configs: Sequence[ExperimentConfig], workdir: Path, venv: Path, dry_run: bool) -> None:
    """Every missing input of the job's runs named at once: refused, or for a dry run only warned about."""
    missing = list(dict.fromkeys(line for config in configs for line in missing_inputs(config, workdir, venv)))
    if not missing:
        return
    message = (f"{len(missing)} input(s) of the job are missing or unreadable (relative paths are taken from "
               f"{Path(workdir).resolve()}):\n  " + "\n  ".join(missing))
    if not dry_run:
        raise FileNotFoundError(f"nothing submitted: {message}")
    log.warning("%s", message)


def _queue(path: Path) -> str:
    """`sbatch` the script at `path`; returns the job id."""
    if shutil.which("sbatch") is None:
        raise FileNotFoundError(f"sbatch not found; the script is in {path} (use --dry-run to print it)")
    result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=True)
    job = result.stdout.strip().split(";")[0]
    log.info("submitted %s as job %s", path, job)
    return job


def submit(
    experiment: str,
    overrides: Sequence[str],
    resources: Resources,
    venv: Path = Path(".venv"),
    workdir: Path = Path("."),
    dry_run: bool = False,
    site: Optional[Site] = None,
) -> Optional[str]:
    """Check the job's inputs, write the script to <run dir>/slurm/ and `sbatch` it; returns the job id.
    A dry run prints the script instead, and only warns about missing inputs."""
    config, all_overrides = job_config(experiment, overrides, resources)
    script = _script(_training_job(experiment, config, all_overrides), resources, venv, workdir, site or Site())
    _refuse_missing([config], workdir, venv, dry_run)
    if dry_run:
        print(script, end="")
        return None
    folder = Path(config.run.dir) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config.run.name}.sbatch"
    path.write_text(script)
    return _queue(path)


def submit_sweep(
    experiment: str,
    overrides: Sequence[str],
    resources: Resources,
    folder: Optional[Path] = None,
    venv: Path = Path(".venv"),
    workdir: Path = Path("."),
    dry_run: bool = False,
    site: Optional[Site] = None,
    max_concurrent: Optional[int] = None,
) -> Optional[str]:
    """A sweep as one job array: every combination and its inputs checked, then sweep.json and the script written
    to the sweep folder (default runs/multirun/<experiment>/<date>_<time>) and `sbatch`ed; returns the job id.
    A dry run prints the script and writes nothing."""
    folder = Path(folder) if folder else default_sweep_dir(experiment)
    script, sweep, configs = render_sweep(experiment, overrides, resources, folder, venv, workdir, site,
                                          max_concurrent)
    _refuse_missing(configs, workdir, venv, dry_run)
    if dry_run:
        print(script, end="")
        return None
    record_sweep(sweep, folder)
    path = folder / f"{configs[0].run.name}.sbatch"
    path.write_text(script)
    log.info("%d tasks, overrides in %s", len(sweep.runs), folder / SWEEP_FILE)
    return _queue(path)
