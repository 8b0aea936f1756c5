"""Multirun sweeps: one experiment trained over the cartesian product of comma-separated override values
(`nativetok train EXP -m seed=0,1,2 optim.lr=1e-4,3e-4`), one run after another here or as one SLURM job array
(`nativetok submit EXP -m ...`, see cluster/slurm.py), and a table of the runs' final validation metrics.

A sweep folder (`--sweep-dir`, default runs/multirun/<experiment>/<date>_<time>, as Hydra's multirun/):

    sweep.json              the experiment, the overrides given, and each combination's overrides (run.dir included)
    <n>/                    combination n's run folder: config.yaml, checkpoints/, validation.jsonl, ...
    <n>/sweep-run.json      how it ended: finished, stopped (a stop signal; the same command resumes it) or failed
                            (with the error), the step reached and the seconds it took
    summary.md, summary.json  one row per combination: state, swept values, final validation metrics

Every combination is composed and checked before the first one runs (or the job is queued), so a wrong value in
the fifth fails at once, named. A failed run is recorded and the next one starts. The same command with the same
`--sweep-dir` continues a sweep: finished runs are kept, the others resume from their last.ckpt.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from nativetok.config.checks import ConfigError
from nativetok.config.loading import Combination, load_config, override_combinations, resolve_experiment
from nativetok.config.schema import ExperimentConfig
from nativetok.io import atomic_open

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
OUTCOME_FILE = "sweep-run.json"
FINISHED, STOPPED, FAILED, RUNNING, PENDING = "finished", "stopped", "failed", "running", "not run"
# (experiment, overrides) -> (the checked config, the overrides the run is given): how a sweep's runs are loaded.
Loader = Callable[[str, List[str]], Tuple[ExperimentConfig, List[str]]]


@dataclass
class Sweep:
    """What sweep.json records: the experiment file, the overrides as given, and one Combination per run."""

    experiment: str
    overrides: List[str]
    runs: List[Combination]

    @classmethod
    def read(cls, folder: Path) -> "Sweep":
        path = Path(folder) / SWEEP_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a sweep folder: it has no {SWEEP_FILE}")
        try:
            record = json.loads(path.read_text())
            return cls(record["experiment"], record["overrides"], [Combination(**run) for run in record["runs"]])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a sweep record ({type(error).__name__}: {error})") from None


def default_sweep_dir(experiment: str) -> Path:
    return Path("runs") / "multirun" / Path(experiment).stem / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def describe(combination: Combination) -> str:
    return " ".join(f"{key}={value}" for key, value in combination.swept.items()) or "nothing swept"


def _refuse_run_dir(overrides: Sequence[str]) -> None:
    if any(item.partition("=")[0].strip() == "run.dir" for item in overrides):
        raise ConfigError("run.dir: a sweep trains combination n in <sweep folder>/<n>; choose the sweep folder with "
                          "--sweep-dir")


def plan_sweep(experiment: str, overrides: Sequence[str], folder: Path, load: Loader) -> Tuple[Sweep, list]:
    """Every combination's overrides (its run.dir in `folder`) and checked config; a ConfigError names the first
    combination that fails and its swept values, before anything runs."""
    _refuse_run_dir(overrides)
    experiment = str(resolve_experiment(experiment).resolve())
    combinations = override_combinations(overrides, multirun=True)
    runs, configs = [], []
    for number, combination in enumerate(combinations):
        given = [*combination.overrides, f"run.dir={Path(folder).resolve() / str(number)}"]
        try:
            config, final = load(experiment, given)
        except ConfigError as error:
            raise ConfigError(f"combination {number} of {len(combinations)} ({describe(combination)}): "
                              f"{error}") from None
        runs.append(Combination(final, combination.swept))
        configs.append(config)
    return Sweep(experiment, list(overrides), runs), configs


def record_sweep(sweep: Sweep, folder: Path) -> None:
    """Write sweep.json; a folder holding another sweep's is refused (the same one is continued)."""
    folder = Path(folder)
    path = folder / SWEEP_FILE
    if path.is_file():
        if Sweep.read(folder) != sweep:
            raise ConfigError(f"{folder} holds another sweep ({path} differs); choose another --sweep-dir")
        log.info("continuing the sweep in %s", folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as file:
        json.dump(asdict(sweep), file, indent=1)


def _expected_steps(config: ExperimentConfig) -> int:
    fast = config.trainer.fast_dev_run
    return int(fast) if fast else config.trainer.max_steps


def _write_outcome(folder: Path, number: int, outcome: Dict[str, Any]) -> None:
    run_dir = Path(folder) / str(number)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(run_dir / OUTCOME_FILE, "w") as file:
        json.dump(outcome, file, indent=1)


def run_combination(folder: Path, number: int, config: ExperimentConfig) -> Dict[str, Any]:
    """Train one combination and record how it ended; any error is recorded as the run's failure, not raised, so
    that the sweep goes on (KeyboardInterrupt still stops it)."""
    from nativetok.data.stream import DataError
    from nativetok.lit.train import train_generator, train_tokenizer

    started = time.monotonic()
    try:
        trainer, _ = (train_tokenizer if config.stage == "tokenizer" else train_generator)(config)
        state = FINISHED if trainer.global_step >= _expected_steps(config) else STOPPED
        step, error = trainer.global_step, None
    except Exception as problem:  # the sweep records any failure of one run and goes on with the next
        log.error("sweep run %d failed: %s", number, problem, exc_info=not isinstance(problem, (ConfigError,
                                                                                                DataError)))
        state, step, error = FAILED, None, f"{type(problem).__name__}: {problem}"
    outcome = {"number": number, "state": state, "step": step, "seconds": round(time.monotonic() - started, 1),
               "error": error}
    _write_outcome(folder, number, outcome)
    return outcome


def _finished(folder: Path, number: int) -> Optional[Dict[str, Any]]:
    """The recorded outcome of a run that finished before (a continued sweep keeps it), else None."""
    path = Path(folder) / str(number) / OUTCOME_FILE
    outcome = json.loads(path.read_text()) if path.is_file() else {}
    return outcome if outcome.get("state") == FINISHED else None


def _local(experiment: str, overrides: List[str]) -> Tuple[ExperimentConfig, List[str]]:
    return load_config(experiment, overrides), overrides


def run_sweep(experiment: str, overrides: Sequence[str], folder: Optional[Path] = None) -> List[Dict[str, Any]]:
    """Check every combination, then train them one after another in `folder`; returns the summary's rows (also
    written as summary.md and summary.json). A run stopped by a signal (Ctrl-C) ends the sweep there."""
    folder = Path(folder) if folder else default_sweep_dir(experiment)
    sweep, configs = plan_sweep(experiment, overrides, folder, _local)
    record_sweep(sweep, folder)
    log.info("sweep of %d runs in %s", len(configs), folder)
    try:
        for number, (combination, config) in enumerate(zip(sweep.runs, configs)):
            if _finished(folder, number):
                log.info("sweep run %d (%s) finished before: kept", number, describe(combination))
                continue
            log.info("sweep run %d of %d: %s", number, len(configs), describe(combination))
            if run_combination(folder, number, config)["state"] == STOPPED:
                break
    finally:
        rows = write_summary(folder)
    return rows


def run_task(experiment: str, folder: Path, extra: Sequence[str], task_id: Optional[str]) -> Dict[str, Any]:
    """One task of a sweep's SLURM job array: the combination numbered `task_id` (SLURM_ARRAY_TASK_ID), with its
    overrides read from the sweep folder's sweep.json (as data: they go through every config check), then `extra`
    overrides; records the outcome and refreshes the summary."""
    sweep = Sweep.read(folder)
    if str(resolve_experiment(experiment).resolve()) != sweep.experiment:
        raise ConfigError(f"{folder / SWEEP_FILE} sweeps {sweep.experiment}, not {experiment}")
    if task_id is None or not task_id.isdigit() or int(task_id) >= len(sweep.runs):
        raise ConfigError(f"--sweep-task runs one task of a SLURM job array: SLURM_ARRAY_TASK_ID must be one of "
                          f"0-{len(sweep.runs) - 1}, got {task_id!r}")
    _refuse_run_dir(extra)
    number = int(task_id)
    combination = sweep.runs[number]
    log.info("sweep task %d of %d: %s", number, len(sweep.runs), describe(combination))
    outcome = _finished(folder, number)
    if outcome:
        log.info("sweep run %d finished before: kept", number)
        return outcome
    try:
        config = load_config(sweep.experiment, [*combination.overrides, *extra])
    except ConfigError as error:
        outcome = {"number": number, "state": FAILED, "step": None, "seconds": 0.0, "error": f"ConfigError: {error}"}
        _write_outcome(folder, number, outcome)
    else:
        outcome = run_combination(folder, number, config)
    write_summary(folder)
    return outcome


def summarize(folder: Path) -> List[Dict[str, Any]]:
    """One row per combination: its state (from its sweep-run.json, else running while its run.lock exists, else
    not run), swept values, and its last validation's step and metrics (validation.jsonl)."""
    from nativetok.lit.callbacks import validation_curve
    from nativetok.lit.run_folder import LOCK

    folder = Path(folder)
    rows = []
    for number, combination in enumerate(Sweep.read(folder).runs):
        run_dir = folder / str(number)
        outcome_path = run_dir / OUTCOME_FILE
        outcome = json.loads(outcome_path.read_text()) if outcome_path.is_file() else {}
        state = outcome.get("state") or (RUNNING if (run_dir / LOCK).is_file() else PENDING)
        curve = validation_curve(run_dir)
        final = dict(curve[-1]) if curve else {}
        rows.append({"run": number, "state": state, "swept": combination.swept, "step": final.pop("step", None),
                     "metrics": final, "error": outcome.get("error"), "dir": str(run_dir)})
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_table(rows: List[Dict[str, Any]]) -> str:
    """The rows as a Markdown table (the validation step and metrics of each run's last validation), with each
    failed run's error below it."""
    swept = list(dict.fromkeys(key for row in rows for key in row["swept"]))
    names = sorted({name for row in rows for name in row["metrics"]}, key=lambda name: (name != "loss", name))
    header = ["run", "state", *swept, "step", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["run"], row["state"], *(row["swept"].get(key) for key in swept), row["step"],
                 *(row["metrics"].get(name) for name in names)]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    lines += [f"\nrun {row['run']} failed: {row['error']}" for row in rows if row["state"] == FAILED]
    return "\n".join(lines) + "\n"


def write_summary(folder: Path) -> List[Dict[str, Any]]:
    """summary.json and summary.md in the sweep folder, each replaced whole (array tasks may write them at once)."""
    rows = summarize(folder)
    for name, text in (("summary.json", json.dumps(rows, indent=1) + "\n"), ("summary.md", summary_table(rows))):
        path = Path(folder) / name
        with atomic_open(path, "w", staging=path.with_name(f".{name}.{os.getpid()}.tmp")) as file:
            file.write(text)
    return rows
