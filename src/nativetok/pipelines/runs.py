"""What `compare` and `ablate` share: presets found by name, and training runs reused once finished, so an
interrupted study continues where it stopped."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from nativetok.config.schema import ExperimentConfig
from nativetok.lit.callbacks import stopped_at_plateau


def preset_path(preset: str, group: str) -> Path:
    """A preset by name (experiments/<group>/<name>.yaml, from the repository root) or by path."""
    path = Path(preset)
    return path if path.suffix in (".yaml", ".yml") else Path("experiments") / group / f"{preset}.yaml"


def trained_steps(run_dir: Path) -> int:
    """The optimiser steps of a run's last checkpoint (0 without one): the last validation can come earlier."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return 0
    return int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])


def _finished(run_dir: Path, steps: int) -> bool:
    """Trained for `steps`, or ended at a plateau (trainer.plateau_min_gain_db) where its last checkpoint is."""
    step = trained_steps(run_dir)
    return step > 0 and (step >= steps or stopped_at_plateau(run_dir) == step)


def timed_training(run_dir: Path, train, config: ExperimentConfig) -> float:
    """Train (unless finished) and return the wall time of the training that produced the run."""
    record = run_dir / "timing.json"
    if _finished(run_dir, config.trainer.max_steps) and record.is_file():
        return json.loads(record.read_text())["seconds"]
    start = time.monotonic()
    train(config)
    seconds = time.monotonic() - start
    record.write_text(json.dumps({"seconds": seconds}) + "\n")
    return seconds
