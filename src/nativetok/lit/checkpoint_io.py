"""Checkpoint files that are whole or absent: written beside the target, fsynced, renamed over it.

Lightning's default writer stages files in the system temp folder and moves them, which across file
systems (local /tmp, checkpoints on a shared disk) is a copy that a kill can leave half done.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous file is untouched."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise CheckpointWriteError(
                error.errno, f"could not write checkpoint {path}: {error.strerror or error}; "
                f"the previous file at that path, if any, is untouched"
            ) from error
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


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
