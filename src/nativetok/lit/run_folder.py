"""One training run per run folder: a lock file, and a resume refused when the config changed.

**The lock.** `<run.dir>/run.lock` holds the pid, host and start time of the training run that owns the
folder (and its SLURM job, if any). A second `nativetok train` into the same folder would resume from the
first one's live `last.ckpt` and write checkpoints and TensorBoard files beside it, so it is refused
(ConfigError, exit code 2) before it writes anything. A lock whose process is dead on this host, or that an
earlier run of the same SLURM job left (a requeued job keeps its id, and may land on another node), is
stale: it is taken over with a warning. A lock from another host cannot be checked and is refused with the
host named; delete the file when that run is known to be over. Under DDP only rank 0 takes the lock. It is
released when fit ends, also on an exception. `nativetok tokenize` locks its output folder the same way.

**The config on resume.** A resumed run restores weights, optimizer, scheduler, the growth stage and the
data position, all of which assume the config they were made with. So the config saved with the checkpoint
(its `hyper_parameters["config"]`, else the run folder's `config.yaml`) is compared with the new one before
anything is written, and any changed key is refused with the keys listed (old -> new), unless every change
is one of `SAFE_TO_CHANGE`:

- `run.name`, `run.dir`, `run.resume`: where the run is and how it resumes, not what it trains;
- `trainer.max_steps` (train longer), the intervals of validation, logging, images and checkpoints,
  `trainer.progress_bar`, `trainer.max_nonfinite_steps`;
- `trainer.accelerator`, `devices`, `num_nodes`, `strategy`: `data.batch_size` is the global batch, so the
  optimisation and the batches per epoch stay the same on other hardware;
- `trainer.precision`, `compile`, `cuda_graphs`, `deterministic`: how the same computation runs;
- `data.num_workers`, `data.strict`, and validation's `data.val_samples` and `data.val_batch_size`;
- `growth.cache_gib`: the prefix cache returns what it would have computed;
- `sampling.*`: only the sample grids logged during training, and the defaults of `nativetok sample`;
- `generator.tokenizer`: a path; the file's sha256 is pinned in the checkpoint and a resume with another
  file is refused there (`GeneratorModule.on_load_checkpoint`), so only a moved file passes.

Everything else (the model's sizes and kind, the data and its order, the seed, the loss, the optimiser and
the growth schedule) is refused. Sections a stage does not read are not compared (`generator` and `sampling`
in stage 1; `tokenizer`, `loss` and `growth` in stage 2).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from nativetok.config.checks import ConfigError
from nativetok.config.loading import from_container, to_container
from nativetok.config.schema import UNUSED_SECTIONS, ExperimentConfig
from nativetok.lit.preemption import slurm_job_id

log = logging.getLogger(__name__)

LOCK = "run.lock"

SAFE_TO_CHANGE = (
    "run.name", "run.dir", "run.resume",
    "trainer.max_steps", "trainer.val_every_n_steps", "trainer.log_every_n_steps", "trainer.images_every_n_steps",
    "trainer.checkpoint_every_n_steps", "trainer.progress_bar", "trainer.max_nonfinite_steps",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.precision", "trainer.compile", "trainer.cuda_graphs", "trainer.deterministic",
    "trainer.logger", "trainer.wandb_project", "trainer.wandb_mode", "trainer.fast_dev_run",
    "trainer.limit_val_batches", "trainer.profiler",
    "data.num_workers", "data.strict", "data.val_samples", "data.val_batch_size",
    "growth.cache_gib",
    "sampling",
    "generator.tokenizer",
)
ABSENT = "(absent)"


# -- the lock ----------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock(pl.Callback):
    """`<run_dir>/run.lock`, taken by `acquire` (rank 0 only) and released when fit ends. `kind` names the
    runs it keeps apart in messages, `elsewhere` how to run into another folder."""

    def __init__(self, run_dir: Path, kind: str = "training run",
                 elsewhere: str = "train into another folder (run.name)"):
        self.path = Path(run_dir) / LOCK
        self.kind, self.elsewhere = kind, elsewhere
        self.held = False

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; ConfigError while another run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._create()
        except FileExistsError:
            self._refuse_unless_stale()
            self.path.unlink(missing_ok=True)
            try:
                self._create()
            except FileExistsError:
                raise ConfigError(f"run folder {self.path.parent}: another {self.kind} took {self.path} "
                                  f"at the same moment") from None

    def _create(self) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "slurm_job": slurm_job_id()}
        with open(self.path, "x") as f:
            self.held = True
            json.dump(owner, f)

    def _refuse_unless_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host, started, job = int(holder["pid"]), holder["host"], holder["started"], holder.get("slurm_job")
            if pid <= 0:  # os.kill would ask about a whole process group
                raise ValueError(f"pid {pid}")
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("taking over the unreadable lock %s (%s)", self.path, error)
            return
        who = f"pid {pid} on {host}, started {started}"
        if job and job == slurm_job_id():
            log.warning("taking over %s, left by an earlier run of SLURM job %s (%s)", self.path, job, who)
        elif host != socket.gethostname():
            raise ConfigError(
                f"run folder {self.path.parent} is locked by a {self.kind} on host {host} ({who}); this host "
                f"cannot tell whether it still runs. If it does not, delete {self.path} and run again"
            )
        elif pid != os.getpid() and _alive(pid):
            raise ConfigError(
                f"run folder {self.path.parent} is in use by another {self.kind} ({who}; lock {self.path}). "
                f"Wait for it or stop it, or {self.elsewhere}; if pid {pid} is not running there, delete "
                f"{self.path}"
            )
        else:
            log.warning("taking over the stale lock %s: %s is no longer running", self.path, who)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.release()

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        self.release()


# -- the config on resume ------------------------------------------------------------------------------
def _flat(value: Any, prefix: str = "") -> Dict[str, Any]:
    """Dotted key -> leaf value. Items of a list of sections are keyed by their index (growth.stages.1.step);
    a list of plain values (optim.betas) is one value."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat: Dict[str, Any] = {}
    for key, item in items:
        flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def saved_config(checkpoint: Path) -> Optional[dict]:
    """The config a checkpoint was trained with: its hyper-parameters, else its run folder's config.yaml."""
    hyper = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters") or {}
    if "config" in hyper:
        return hyper["config"]
    yaml = checkpoint.parent.parent / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(yaml)) if yaml.is_file() else None


def config_changes(saved: dict, config: ExperimentConfig) -> List[Tuple[str, Any, Any]]:
    """(key, old, new) for every key that differs and that the stage reads; the saved config is first filled
    with the schema's defaults, so that a key added to the schema since is no change."""
    try:
        saved = to_container(from_container(saved))
    except Exception:  # a key since removed from the schema: compare as saved
        pass
    old, new = _flat(saved), _flat(to_container(config))
    unused = UNUSED_SECTIONS.get(config.stage, ())
    return [
        (key, old.get(key, ABSENT), new.get(key, ABSENT))
        for key in sorted(old.keys() | new.keys())
        if old.get(key, ABSENT) != new.get(key, ABSENT) and key.split(".")[0] not in unused
    ]


def _safe(key: str) -> bool:
    return any(key == safe or key.startswith(safe + ".") for safe in SAFE_TO_CHANGE)


def refuse_changed_config(config: ExperimentConfig, checkpoint: str) -> None:
    """ConfigError listing the changed keys when resuming `checkpoint` with `config` would mix two runs."""
    saved = saved_config(Path(checkpoint))
    if saved is None:
        log.warning("cannot compare configs: %s holds none and its run folder has no config.yaml", checkpoint)
        return
    changes = config_changes(saved, config)
    refused = [(key, old, new) for key, old, new in changes if not _safe(key)]
    if not refused:
        for key, old, new in changes:
            log.info("resuming with %s: %s -> %s", key, old, new)
        return
    lines = "\n".join(f"  {key}: {old} -> {new}" for key, old, new in refused)
    raise ConfigError(
        f"run.resume: cannot resume {checkpoint}: it was trained with another config (old -> new):\n{lines}\n"
        f"To continue that run, set these keys back. To start fresh, train into a new folder: another run.name "
        f"or run.dir (run.resume=never there refuses any checkpoint). The keys that may change on resume are "
        f"listed in nativetok/lit/run_folder.py"
    )
