"""`GeneratorModule`: stage-2 training of an AR or MaskGIT generator on token sequences.

Validation reports cross-entropy and bits per token (for the AR model an estimate of the code length
of a token given the ones before it) and the loss at each position as a curve. The stage-1 tokenizer
is loaded only to decode sample grids; it is not part of this module's state, but its sha256 and
paths are (`checkpoints.tokenizer_pin`): sampling later decodes with that very file, and training
refuses token shards, or a resumed run, made with another one.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor

from nativetok.checkpoints import CheckpointError, load_tokenizer, tokenizer_pin
from nativetok.config.schema import GeneratorConfig, SamplingConfig, TrainerConfig
from nativetok.data.shards import DatasetIndex
from nativetok.data.stream import DataError
from nativetok.lit.ema import EMA
from nativetok.lit.figures import position_curves
from nativetok.lit.guards import StepGuard, grad_scaler, logs_this_batch
from nativetok.lit.metrics import PositionLoss
from nativetok.lit.optim import Optimization, decay_split, step_generator
from nativetok.models.generator import Generator
from nativetok.models.tokenizer import NativeTokenizer
from nativetok.version import __version__

log = logging.getLogger(__name__)

NO_DECAY = ("embed", "positions")


class GeneratorModule(pl.LightningModule):
    """Training and validation around a built generator; the model itself knows its loss and sampler."""

    def __init__(self, generator: Generator, settings: GeneratorConfig, sampling: SamplingConfig,
                 optimization: Optimization, trainer: TrainerConfig, seed: int, token_index: str, run_dir: str,
                 config_record: Dict):
        """Given the built generator, and of the config the sections it reads: its own (`settings`: the tokenizer
        it decodes with, and the sizes that tokenizer must have), sampling, optimization, trainer, the seed, the
        token shards' index (checked against the tokenizer) and the run folder (the tokenizer's pin is relative
        to it). `config_record` is the whole experiment config as a plain container, written into every
        checkpoint for the loaders and never read here."""
        super().__init__()
        self.generator = generator
        self.settings, self.sampling, self.optimization = settings, sampling, optimization
        self.trainer_config, self.seed, self.token_index, self.run_dir = trainer, seed, token_index, run_dir
        self.config_record = config_record
        ema_decay = optimization.optim.ema_decay
        self.ema = EMA(self.generator, ema_decay) if ema_decay > 0 else None
        self._stepped = False  # an optimizer step happened in the current batch
        self.val_positions = PositionLoss(generator.num_tokens)
        self._tokenizer: List[NativeTokenizer] = []  # loaded by load_tokenizer, kept out of the state dict
        self.tokenizer_pin: Optional[dict] = None  # set when the tokenizer is loaded, saved in every checkpoint
        self.loss_guard = StepGuard(trainer.max_nonfinite_steps)
        self.writing_logs = False  # whether this batch's step is logged (`logs_this_batch`)
        self._step_loss: Optional[Tensor] = None  # the loss the guard judges before the optimizer step
        self.class_names: List[str] = []  # the data index's; checkpoints keep them for `nativetok sample`'s grid

    def setup(self, stage: str) -> None:
        """The pinned tokenizer (before a resumed checkpoint is compared with it) and the class names of the data
        index trained on, where the data module has one."""
        self.load_tokenizer()
        index = getattr(getattr(self.trainer, "datamodule", None), "index", None)
        self.class_names = list(getattr(index, "classes", None) or [])

    def configure_model(self) -> None:
        """trainer.compile: compile the generator's training forward (sampling stays eager)."""
        if self.trainer_config.compile:
            self.generator.compile()

    @property
    def eval_generator(self) -> Generator:
        return self.ema.shadow if self.ema is not None else self.generator

    def load_tokenizer(self) -> NativeTokenizer:
        """generator.tokenizer, loaded and pinned once (by `setup`, or earlier by `train_generator` to refuse a
        tokenizer that does not fit before any training); token shards that another tokenizer made are refused."""
        if not self._tokenizer:
            g = self.settings
            tokenizer = load_tokenizer(g.tokenizer, fits=g)
            self.tokenizer_pin = tokenizer_pin(g.tokenizer, self.run_dir)
            self._check_token_shards(self.tokenizer_pin["sha256"])
            self._tokenizer.append(tokenizer)
        return self._tokenizer[0].to(self.device)

    def _check_token_shards(self, tokenizer_sha256: str) -> None:
        index = Path(self.token_index)
        if not index.is_file():
            return
        recorded = (DatasetIndex.load(index).tokens or {}).get("tokenizer_sha256")
        if recorded is None:
            log.warning("token shards %s do not record their tokenizer's sha256: cannot check that %s made them",
                        index, self.settings.tokenizer)
        elif recorded != tokenizer_sha256:
            raise DataError(
                f"token shards {index} were made by a tokenizer with sha256 {recorded[:12]} but generator.tokenizer "
                f"{self.settings.tokenizer} has sha256 {tokenizer_sha256[:12]}: tokenize with it again, or point "
                f"generator.tokenizer at the one that made them"
            )

    def _generator_for_step(self, batch_idx: int) -> torch.Generator:
        """Label dropout and masks drawn from (seed, step, rank, micro-batch): a resumed run draws what an
        unbroken one would, and the batches accumulated into one step draw different patterns."""
        micro = batch_idx % self.trainer.accumulate_grad_batches
        return step_generator(self.seed, self.global_step, self.global_rank, self.device, micro)

    # -- optimization -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer, schedule = self.optimization.adamw_with_schedule(
            decay_split(self.generator.named_parameters(), NO_DECAY), self.device
        )
        return [optimizer], [schedule]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.writing_logs = logs_this_batch(self.trainer)

    def training_step(self, batch: Dict[str, Tensor], batch_idx: int) -> Tensor:
        """No host sync: a non-finite loss is skipped on the device (`on_before_optimizer_step`), and the
        scalars are built only on steps whose logs are written."""
        generator = self._generator_for_step(batch_idx)
        labels = self.generator.drop_labels(batch["label"], generator)
        loss, _ = self.generator.loss(batch["tokens"], labels, generator)
        self._step_loss = loss.detach()
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        if self.writing_logs:
            self.log_dict({
                "train/loss": loss.detach(),
                "train/bits_per_token": loss.detach() / math.log(2),
                "train/nonfinite_steps": float(self.loss_guard.check()),
            }, on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip (Lightning would refuse to with a fused optimizer under mixed precision) and skip on the device."""
        norm = self.loss_guard.before_step(
            optimizer, self._step_loss, self.optimization.optim.grad_clip, grad_scaler(self.trainer), self.global_step
        )
        if self.writing_logs:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self._stepped = True

    def on_train_end(self) -> None:
        self.loss_guard.check()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """The average moves once per optimizer step, however many batches are accumulated into it."""
        if self.ema is not None and self._stepped:
            self.ema.update(self.generator)
        self._stepped = False

    # -- evaluation -------------------------------------------------------------------------------------
    def validation_step(self, batch: Dict[str, Tensor], batch_idx: int) -> None:
        tokens = batch["tokens"]
        generator = torch.Generator(device=self.device).manual_seed(self.seed + batch_idx)  # same masks each time
        loss, per_position = self.eval_generator.loss(tokens, batch["label"], generator)
        self.val_positions.update(per_position, tokens.shape[0])
        size = tokens.shape[0]
        self.log("val/loss", loss, sync_dist=True, batch_size=size, prog_bar=True)
        self.log("val/bits_per_token", loss / math.log(2), sync_dist=True, batch_size=size)

    def on_validation_epoch_end(self) -> None:
        bits = (self.val_positions.compute() / math.log(2)).float()
        self.val_positions.reset()
        self.log_dict({f"val_position/bits_{i + 1:03d}": b for i, b in enumerate(bits)})
        # Under the number of updates evaluated, as the figure below and the sample grids (Lightning's own
        # logger step is one behind during validation).
        self.log("step", float(self.global_step), sync_dist=True)
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_figure"):
            figure = position_curves({"validation": bits.tolist()}, "bits per token", "loss at each position")
            experiment.add_figure("val/bits_per_position", figure, self.global_step)

    @torch.no_grad()
    def sample_images(self, labels: Tensor, seed: int = 0) -> Tensor:
        """Images in [0, 1] for class `labels`, sampled with the config's settings and decoded by the tokenizer."""
        model = self.eval_generator
        was_training = model.training
        model.eval()
        ids = model.sample(labels.to(self.device), self.sampling, seed)
        model.train(was_training)
        return self.load_tokenizer().decode(ids)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The config as a plain container (what loading a checkpoint reads), the kind, the tokenizer pin and
        the class names (sampling reads no data index: a checkpoint's stored path is never read on its own)."""
        checkpoint["hyper_parameters"] = {"config": self.config_record}
        checkpoint["nativetok"] = {"kind": "generator", "version": __version__}
        if self.tokenizer_pin is not None:
            checkpoint["nativetok"]["tokenizer"] = self.tokenizer_pin
        if self.class_names:
            checkpoint["nativetok"]["classes"] = self.class_names

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run continues only with the tokenizer it started with."""
        pinned = checkpoint.get("nativetok", {}).get("tokenizer")
        if pinned is None or self.tokenizer_pin is None or pinned["sha256"] == self.tokenizer_pin["sha256"]:
            return
        raise CheckpointError(
            f"this run was trained with tokenizer sha256 {pinned['sha256'][:12]} ({pinned['path']}) but "
            f"generator.tokenizer {self.settings.tokenizer} now has sha256 {self.tokenizer_pin['sha256'][:12]}: "
            f"resume with that tokenizer, or start a new run"
        )
