"""Callbacks: the Hierarchical Native Training schedule, reconstruction grids and sample grids."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from nativetok.config.schema import GrowthStage

log = logging.getLogger(__name__)


class ExpertGrowth(pl.Callback):
    """Hierarchical Native Training: grow the experts and change what trains at the scheduled steps.

    Stage i begins at `stages[i].step`: experts beyond the previous count are created (copied from the
    last expert or freshly initialised), and only they and the parts listed in `stages[i].train` keep
    training. The stage index is saved in checkpoints; a resumed run re-applies it (without re-growing:
    the weights come from the checkpoint) before the optimizer state is loaded, so the optimizer holds
    the same parameters it was saved with.
    """

    def __init__(self, stages: Sequence[GrowthStage]):
        if not stages:
            raise ValueError("ExpertGrowth needs at least one stage")
        self.stages = list(stages)
        self.stage = 0
        self._restored = False

    def new_experts(self, index: int) -> range:
        start = self.stages[index - 1].experts if index > 0 else 0
        return range(start, self.stages[index].experts)

    def state_dict(self) -> dict:
        return {"stage": self.stage}

    def load_state_dict(self, state_dict: dict) -> None:
        self.stage = int(state_dict["stage"])
        self._restored = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        # After the DDP wrapper is built (every parameter still trainable, so every one is registered
        # with it) and before a resumed optimizer state is loaded.
        if not self._restored:
            pl_module.tokenizer.set_active(self.stages[0].experts)
        pl_module.enter_growth_stage(self.stage, self.stages[self.stage], self.new_experts(self.stage), grow=False)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        while self.stage + 1 < len(self.stages) and trainer.global_step >= self.stages[self.stage + 1].step:
            self.stage += 1
            pl_module.enter_growth_stage(self.stage, self.stages[self.stage], self.new_experts(self.stage), grow=True)


class ImageGrid(pl.Callback):
    """A grid of images logged to TensorBoard every N steps and written as a PNG at the end (rank 0)."""

    tag = "images"

    def __init__(self, every_n_steps: int, path: Optional[Path] = None):
        self.every_n_steps = every_n_steps
        self.path = path

    def grid(self, pl_module) -> torch.Tensor:
        raise NotImplementedError

    def ready(self) -> bool:
        return True

    def _log(self, trainer: pl.Trainer, pl_module) -> torch.Tensor:
        grid = self.grid(pl_module)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(self.tag, grid, trainer.global_step)
        return grid

    @rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and self.ready():
            self._log(trainer, pl_module)

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not self.ready():
            return
        grid = self._log(trainer, pl_module)
        if self.path is not None:
            save_image(grid, self.path)
            log.info("%s grid -> %s", self.tag, self.path)


class ReconstructionGrid(ImageGrid):
    """Originals beside reconstructions from all tokens and from short prefixes.

    Rows: originals, reconstructions from all active tokens, then from prefixes of 1, 1/4 and 1/2 of them.
    """

    tag = "reconstructions"

    def __init__(self, every_n_steps: int, path: Optional[Path] = None, count: int = 8):
        super().__init__(every_n_steps, path)
        self.count = count
        self.images: Optional[torch.Tensor] = None

    def ready(self) -> bool:
        return self.images is not None

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        batch = next(iter(trainer.datamodule.val_dataloader()))
        self.images = trainer.datamodule.on_after_batch_transfer(batch, 0)["image"][: self.count]

    @torch.no_grad()
    def grid(self, pl_module) -> torch.Tensor:
        tokenizer = pl_module.eval_tokenizer
        was_training = tokenizer.training
        tokenizer.eval()
        images = self.images.to(pl_module.device)
        ids = tokenizer.encode(images)
        active = ids.shape[1]
        prefixes = sorted({k for k in (1, active // 4, active // 2) if 0 < k < active})
        rows: List[torch.Tensor] = [images, tokenizer.decode(ids)] + [tokenizer.decode(ids, k=k) for k in prefixes]
        tokenizer.train(was_training)
        return make_grid(torch.cat(rows).float().cpu(), nrow=len(images), padding=1, pad_value=1.0)


class SampleGrid(ImageGrid):
    """Class-conditional samples (a row per class), decoded by the tokenizer."""

    tag = "samples"

    def __init__(self, every_n_steps: int, path: Optional[Path] = None, per_class: int = 8, max_classes: int = 10):
        super().__init__(every_n_steps, path)
        self.per_class = per_class
        self.max_classes = max_classes

    def grid(self, pl_module) -> torch.Tensor:
        classes = min(self.max_classes, pl_module.cfg.data.num_classes)
        labels = torch.arange(classes).repeat_interleave(self.per_class)
        images = pl_module.sample_images(labels, seed=0)
        return make_grid(images.float().cpu(), nrow=self.per_class, padding=1, pad_value=1.0)


class DataSkips(pl.Callback):
    """Logs how many shards and samples the data pipeline skipped as unreadable (see `data.strict`)."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        skips = getattr(trainer.datamodule, "skips", None)
        if skips is not None and trainer.global_step % self.every_n_steps == 0:
            counts = {f"data/{k}": float(v) for k, v in skips.as_dict().items()}
            pl_module.log_dict(counts, on_step=True, on_epoch=False)


class ValidationSummary(pl.Callback):
    """One log line of validation metrics per evaluation, so batch-job logs show progress without a bar."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            shown = ", ".join(f"{k[4:]} {float(v):.4g}" for k, v in sorted(metrics.items()))
            log.info("validation at step %d: %s", trainer.global_step, shown)
