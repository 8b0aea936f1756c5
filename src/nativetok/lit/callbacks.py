"""Callbacks: the Hierarchical Native Training schedule, reconstruction grids and sample grids, validation
summaries and the stop at a plateau."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from nativetok.config.schema import GrowthStage
from nativetok.models.tokenizer import prefix_lengths

log = logging.getLogger(__name__)

VALIDATION_LOG = "validation.jsonl"
PLATEAU_RECORD = "plateau.json"  # written by PlateauStop when it ends a run: the step and the gain it stopped at
PLATEAU_WINDOW = 0.2  # the plateau check looks at the validation PSNR gained over the last 20% of the steps
PLATEAU_DB = 0.1  # ... and counts a run as at a plateau below this gain (docs/study.md)
MAX_NAME = 24  # characters of a class name shown in a sample grid's label (ImageNet's run long)


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

    def console_note(self) -> str:
        """What the console line says of HNT (`ConsoleLog`)."""
        return f"HNT stage {self.stage}: {self.stages[self.stage].experts} experts"

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


def labelled_grid(rows: Sequence[torch.Tensor], labels: Sequence[str], min_size: int = 64,
                  padding: int = 2) -> torch.Tensor:
    """Rows of equally many images in [0, 1] as one picture [3, H, W] in [0, 1], each row named at its left
    (PIL's default font). Small images are enlarged by a whole factor with nearest neighbour, to at least
    `min_size` px: a 32 px grid is unreadable in TensorBoard, and smoothing would hide the pixels judged."""
    images = torch.cat([row.detach().float().cpu() for row in rows]).clamp(0, 1)
    scale = max(1, math.ceil(min_size / min(images.shape[-2:])))
    images = F.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=len(rows[0]), padding=padding, pad_value=1.0)
    font = ImageFont.load_default()
    boxes = [ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), label, font=font) for label in labels]
    margin = 2 * padding
    left = max(box[2] for box in boxes) + 2 * margin
    picture = Image.new("RGB", (left + grid.shape[2], grid.shape[1]), "white")
    picture.paste(Image.fromarray(_to_uint8(grid).permute(1, 2, 0).numpy()), (left, 0))
    draw = ImageDraw.Draw(picture)
    size = images.shape[-2]
    for i, (label, box) in enumerate(zip(labels, boxes)):
        top = padding + i * (size + padding) + (size - (box[3] - box[1])) // 2 - box[1]
        draw.text((margin, top), label, fill="black", font=font)
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255


def class_label(class_id: int, names: Sequence[str]) -> str:
    """A sample row's label: the class id and its name from the data index (the id alone where it has none)."""
    name = names[class_id] if class_id < len(names) else ""
    return f"{class_id} {name[:MAX_NAME]}" if name else str(class_id)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Rounded as `save_image` rounds, so the PNG holds the pixels TensorBoard shows."""
    return (images * 255 + 0.5).clamp(0, 255).to(torch.uint8)


class ImageGrid(pl.Callback):
    """A grid of images logged to TensorBoard every N steps and at the end, and written as a PNG at the end
    (rank 0). A grid is logged under `trainer.global_step`, the number of updates the weights shown have had,
    which is also the step the modules log an evaluation's scalars under, and at most once per step (the
    end of training often falls on a multiple of N)."""

    tag = "images"

    def __init__(self, every_n_steps: int, path: Optional[Path] = None):
        self.every_n_steps = every_n_steps
        self.path = path
        self.logged_step: Optional[int] = None

    def grid(self, pl_module) -> torch.Tensor:
        raise NotImplementedError

    def ready(self) -> bool:
        return True

    def _log(self, trainer: pl.Trainer, pl_module) -> torch.Tensor:
        grid = self.grid(pl_module)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image") and self.logged_step != trainer.global_step:
            experiment.add_image(self.tag, grid, trainer.global_step)
            self.logged_step = trainer.global_step
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
    """Originals above reconstructions from all active tokens and from prefixes of 1, 2, 4, ... of them:
    the rows of the scalars `val/psnr@k`, each labelled with its k."""

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
        prefixes = prefix_lengths(active)[:-1]  # beside all of them
        rows = [images, tokenizer.decode(ids)] + [tokenizer.decode(ids, k=k) for k in prefixes]
        tokenizer.train(was_training)
        labels = ["original", f"k={active} (all)"] + [f"k={k}" for k in prefixes]
        return labelled_grid(rows, labels)


class SampleGrid(ImageGrid):
    """Class-conditional samples decoded by the tokenizer, a row per class, labelled with the class names of
    the data index (`GeneratorModule.class_names`; class ids where it has none)."""

    tag = "samples"

    def __init__(self, every_n_steps: int, path: Optional[Path] = None, per_class: int = 8, max_classes: int = 10):
        super().__init__(every_n_steps, path)
        self.per_class = per_class
        self.max_classes = max_classes
        self.names: List[str] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.names = list(pl_module.class_names)

    def label(self, class_id: int) -> str:
        return class_label(class_id, self.names)

    def grid(self, pl_module) -> torch.Tensor:
        classes = min(self.max_classes, pl_module.generator.num_classes)
        labels = torch.arange(classes).repeat_interleave(self.per_class)
        images = pl_module.sample_images(labels, seed=0)
        return labelled_grid(images.split(self.per_class), [self.label(c) for c in range(classes)])


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
    """One log line of validation metrics per evaluation, so batch-job logs show progress without a bar, and
    the same metrics appended to <run dir>/validation.jsonl, the curve a study reads back (a plateau check).
    A resumed run appends again: readers keep the last record of each step."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not metrics:
            return
        shown = ", ".join(f"{k[4:]} {v:.4g}" for k, v in sorted(metrics.items()))
        log.info("validation at step %d: %s", trainer.global_step, shown)
        if not trainer.fast_dev_run:
            record = {"step": trainer.global_step, **{k[4:]: v for k, v in sorted(metrics.items())}}
            with open(Path(trainer.default_root_dir) / VALIDATION_LOG, "a") as file:
                file.write(json.dumps(record) + "\n")


def validation_curve(run_dir: Path) -> List[dict]:
    """The validation records of a run, one per step (the last written wins), in step order."""
    path = Path(run_dir) / VALIDATION_LOG
    if not path.is_file():
        return []
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["step"]] = record
    return [records[step] for step in sorted(records)]


def psnr_curve(run_dir: Path) -> List[Tuple[int, float]]:
    """(step, validation PSNR) of a stage-1 run, in step order."""
    return [(r["step"], r["psnr"]) for r in validation_curve(run_dir) if "psnr" in r]


def plateau_gain(curve: Sequence[Tuple[int, float]]) -> Optional[float]:
    """The plateau check's gain: the last PSNR of the curve minus the last one at or before 80% of its last step
    (the first point when there is none); None for an empty curve."""
    if not curve:
        return None
    earlier = [point for point in curve if point[0] <= (1 - PLATEAU_WINDOW) * curve[-1][0]]
    return curve[-1][1] - (earlier[-1] if earlier else curve[0])[1]


def plateau_reached(curve: Sequence[Tuple[int, float]], min_gain_db: float, min_steps: int, patience: int) -> bool:
    """Whether the plateau check passes at each of the last `patience` validations of `curve`, each from
    `min_steps` on. A lone first validation has nothing to gain over: it never counts."""
    if len(curve) <= patience:
        return False
    return all(curve[-1 - back][0] >= min_steps and plateau_gain(curve[:len(curve) - back]) < min_gain_db
               for back in range(patience))


def stopped_at_plateau(run_dir: Path) -> Optional[int]:
    """The step at which PlateauStop ended the run in `run_dir`, or None if it did not."""
    record = Path(run_dir) / PLATEAU_RECORD
    return int(json.loads(record.read_text())["step"]) if record.is_file() else None


class PlateauStop(pl.Callback):
    """Ends stage 1 once validation PSNR gains less than `min_gain_db` over the last 20% of the steps so far
    at `patience` validations in a row (the plateau check, applied at every validation from `min_steps` on);
    trainer.max_steps stays the cap.

    It reads the curve ValidationSummary writes (so it comes after it) and the run keeps across resumes, so a
    resumed run that had stopped stops again at once. The stop is recorded in plateau.json: a study takes the
    run as finished, not as interrupted. Every rank follows rank zero's decision.
    """

    def __init__(self, run_dir: Path, min_gain_db: float, min_steps: int, patience: int):
        self.run_dir, self.min_gain_db, self.min_steps = Path(run_dir), min_gain_db, min_steps
        self.patience = patience

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._decide(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._decide(trainer)

    def _decide(self, trainer: pl.Trainer) -> None:
        curve = psnr_curve(self.run_dir) if trainer.is_global_zero else []
        stop = (bool(curve) and curve[-1][0] == trainer.global_step
                and plateau_reached(curve, self.min_gain_db, self.min_steps, self.patience))
        if trainer.strategy.broadcast(stop):
            trainer.should_stop = True
            if trainer.is_global_zero:
                gain = plateau_gain(curve)
                log.info("plateau at step %d: validation PSNR gained %.3f dB over the last %d%% of the steps "
                         "(< %g, at %d validation(s) in a row): training stops", trainer.global_step, gain,
                         round(PLATEAU_WINDOW * 100), self.min_gain_db, self.patience)
                (self.run_dir / PLATEAU_RECORD).write_text(json.dumps(
                    {"step": trainer.global_step, "gain_db": gain, "min_gain_db": self.min_gain_db,
                     "patience": self.patience}) + "\n")
