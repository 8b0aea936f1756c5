"""Checkpoint files that are whole or absent: written beside the target, fsynced, renamed over it.

Lightning's default writer stages files in the system temp folder and moves them, which across file
systems (local /tmp, checkpoints on a shared disk) is a copy that a kill can leave half done. A kill while
staging leaves the staged file behind (gigabytes at L-32 sizes): a run removes those of its folder at start.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from nativetok.io import atomic_open

log = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous file is untouched."""


def staging_path(path: Path) -> Path:
    """Where a checkpoint is written before it is renamed to `path`: hidden, beside it, named by the writer."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_staged_leftovers(folder: Path) -> None:
    """Delete the staged checkpoints that killed writers left in `folder`. Only while no other process writes
    there: the run folder's lock makes sure of it."""
    leftovers = sorted(folder.glob(".*.ckpt.*.tmp"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        log.warning("removed %d unfinished checkpoint files left by killed saves: %s",
                    len(leftovers), ", ".join(str(p) for p in leftovers))


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_open(path, staging=staging_path(path)) as f:
                torch.save(checkpoint, f)
        except OSError as error:
            raise CheckpointWriteError(
                error.errno, f"could not write checkpoint {path}: {error.strerror or error}; "
                f"the previous file at that path, if any, is untouched"
            ) from error


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why a checkpoint file cannot be resumed from (None when it can): missing, truncated, not one of ours."""
    if not path.is_file():
        return "missing"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated zip, not a torch file, ...
        return f"unreadable ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        return "not a training checkpoint"
    return None
