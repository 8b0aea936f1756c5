"""`TokenizerModule`: stage-1 training of a NativeTokenizer (autoencoder + optional PatchGAN) in Lightning.

The models and the loss come built (`build_tokenizer`, `TokenizerLoss`); this module holds only what is
Lightning's: optimizers, manual optimization, non-finite guards, EMA, growth stages, logging and validation
metrics. Manual optimization (the Lightning 2 GAN pattern): one autoencoder step per batch, which is what
`global_step` counts, and a discriminator step that goes through the strategy (precision plugin
included) without counting as a step of its own. Hierarchical Native Training changes which parameters
train; `enter_growth_stage` applies a stage and retargets the optimizer in place, so parameters that
keep training keep their Adam state.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from nativetok.config.schema import GrowthConfig, GrowthStage, TrainerConfig
from nativetok.lit.ema import EMA
from nativetok.lit.guards import StepGuard, fused_adamw, grad_scaler, logs_this_batch
from nativetok.lit.metrics import CodeUsage
from nativetok.lit.optim import Optimization, decay_split, step_generator
from nativetok.losses.tokenizer_loss import TokenizerLoss
from nativetok.models.graphs import EncoderGraph, encoder_key
from nativetok.models.prefix_cache import FrozenPrefixCache
from nativetok.models.quantizer import code_statistics
from nativetok.models.tokenizer import NativeTokenizer, TokenizerOutput, prefix_lengths
from nativetok.version import __version__

log = logging.getLogger(__name__)

# Parameters that are positions, queries or codes: no weight decay.
NO_DECAY = ("positions", "query", "missing", "mask_token", "codebook", "latents.tokens")
# State-dict prefixes of checkpoints written before the discriminator and LeCam moved into `loss`.
MOVED_INTO_LOSS = ("discriminator.", "lecam.")


def migrate_state_dict(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """An older checkpoint's state dict under today's keys (`discriminator.*` -> `loss.discriminator.*`,
    likewise LeCam); key order and every other key kept."""
    return {("loss." + k if k.startswith(MOVED_INTO_LOSS) else k): v for k, v in state.items()}


class TokenizerModule(pl.LightningModule):
    """Given the built tokenizer and loss, and of the config only the sections it reads (the tokenizer's own
    settings travel with the model as `tokenizer.config`); `config_record` is the whole experiment config as a
    plain container, written into every checkpoint for the loaders and never read here."""

    def __init__(self, tokenizer: NativeTokenizer, loss: TokenizerLoss, optimization: Optimization,
                 growth: GrowthConfig, trainer: TrainerConfig, seed: int, config_record: Dict):
        super().__init__()
        self.automatic_optimization = False
        self.tokenizer = tokenizer
        self.loss = loss
        self.optimization, self.growth, self.trainer_config, self.seed = optimization, growth, trainer, seed
        self.config_record = config_record
        ema_decay = optimization.optim.ema_decay
        self.ema = EMA(self.tokenizer, ema_decay) if ema_decay > 0 else None
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_codes = CodeUsage(tokenizer.quantizer.codebook_size)
        # PSNR from the first k tokens (`val/psnr@k`), for every k validation can meet: the prefixes of every
        # active count the growth schedule passes through, and those counts themselves (k = all active).
        counts = {tokenizer.num_tokens, *(stage.experts for stage in growth.stages)}
        prefixes = counts.union(*(prefix_lengths(n) for n in counts))
        self.val_prefix_psnr = torch.nn.ModuleDict(
            {str(k): PeakSignalNoiseRatio(data_range=1.0) for k in sorted(prefixes)}
        )
        self.growth_stage = 0
        # Z and frozen experts' outputs per image view, used in growth stages that freeze the MIT.
        self.prefix_cache = FrozenPrefixCache(int(growth.cache_gib * 2**30)) if growth.cache_gib > 0 else None
        self.caching = False
        self.loss_guard = StepGuard(trainer.max_nonfinite_steps, "autoencoder loss")
        self.disc_guard = StepGuard(trainer.max_nonfinite_steps, "discriminator loss")
        self.writing_logs = False  # whether this batch's step is logged (`logs_this_batch`)
        self.restarted: Optional[Tensor] = None  # codes moved by the last dead-code restart (device count)
        # The encoder (MIT, token producer, quantizer) captured as CUDA graphs for the current HNT stage.
        self.encoder_graph: Optional[EncoderGraph] = None

    def configure_model(self) -> None:
        """trainer.compile: compile the MIT and the decoder (fixed shapes); the experts' growing contexts
        and the discriminator stay eager."""
        if self.trainer_config.compile:
            self.tokenizer.mit.compile()
            self.tokenizer.decoder.compile()

    @property
    def eval_tokenizer(self) -> NativeTokenizer:
        """The weights evaluation uses: the moving average when there is one."""
        return self.ema.shadow if self.ema is not None else self.tokenizer

    def _random_decode_lengths(self, batch: int) -> Optional[Tensor]:
        """Per sample, all active tokens, or with probability random_prefix a uniform prefix length.

        Drawn from a generator seeded by (seed, step, rank): a resumed run draws what an unbroken one would.
        """
        p = self.tokenizer.config.decoder.random_prefix
        if p <= 0:
            return None
        active = self.tokenizer.num_active
        generator = step_generator(self.seed, self.global_step, self.global_rank, self.device)
        lengths = torch.randint(1, active + 1, (batch,), device=self.device, generator=generator)
        use_prefix = torch.rand(batch, device=self.device, generator=generator) < p
        return torch.where(use_prefix, lengths, torch.full_like(lengths, active))

    # -- optimizers ------------------------------------------------------------------------------------
    def _autoencoder_groups(self):
        """The tokenizer's trainable parameters, with and without weight decay."""
        return decay_split(self.tokenizer.named_parameters(), NO_DECAY)

    def configure_optimizers(self):
        autoencoder, schedule = self.optimization.adamw_with_schedule(self._autoencoder_groups(), self.device)
        optimizers = [autoencoder]
        if self.loss.discriminator is not None:
            discriminator = [{"params": self.loss.discriminator.parameters(), "name": "discriminator"}]
            lr = self.optimization.optim.disc_lr
            optimizers.append(fused_adamw(discriminator, self.device, lr=lr, betas=(0.5, 0.9), weight_decay=0.0))
        return optimizers, [schedule]

    def retarget_optimizer(self) -> None:
        """Make the autoencoder optimizer hold exactly the trainable parameters (state kept for those that stay)."""
        if self._trainer is None or not self.trainer.optimizers:
            return
        optimizer = self.trainer.optimizers[0]
        groups = self._autoencoder_groups()
        keep = {id(p) for group in groups for p in group}
        for p in [p for p in optimizer.state if id(p) not in keep]:
            del optimizer.state[p]
        for group, params in zip(optimizer.param_groups, groups):
            group["params"] = params

    # -- Hierarchical Native Training -----------------------------------------------------------------
    def enter_growth_stage(self, index: int, stage: GrowthStage, new_experts: range, grow: bool) -> List[str]:
        """Apply a stage of the schedule: grow the experts (on a transition), freeze, retarget the optimizer."""
        if grow:
            generator = torch.Generator(device=self.device).manual_seed(self.seed * 7919 + index)
            self.tokenizer.grow(stage.experts, self.growth.init, generator)
            if self.ema is not None:
                live, shadow = self.tokenizer.experts.experts, self.ema.shadow.experts.experts
                self.ema.reset((shadow[i], live[i]) for i in new_experts)
                self.ema.shadow.set_extra_state(self.tokenizer.get_extra_state())
        frozen = self.tokenizer.set_trainable(new_experts, stage.train)
        if grow and self.ema is not None:
            self._freeze_at_average(frozen)
        self.retarget_optimizer()
        self.growth_stage = index
        trained = [name for name in self.tokenizer.parts() if name not in frozen]
        log.info(
            "HNT stage %d (step %d): %d experts; training %s; frozen: %s",
            index, stage.step, stage.experts, _summarise(trained), _summarise(frozen) or "nothing",
        )
        self._reset_prefix_cache()
        return frozen

    @torch.no_grad()
    def _freeze_at_average(self, frozen: List[str]) -> None:
        """Frozen parts take the averaged weights evaluation has used so far: the evaluated tokens of frozen
        experts then stay bitwise fixed (the average of a constant is that constant)."""
        live, shadow = self.tokenizer.parts(), self.ema.shadow.parts()
        for name in frozen:
            for mine, average in zip(live[name], shadow[name]):
                mine.copy_(average)

    def _reset_prefix_cache(self) -> None:
        """A new stage invalidates every cached view; cache what this stage keeps fixed, if anything."""
        if self.prefix_cache is None:
            return
        prefix = self.tokenizer.frozen_prefix()
        self.caching = prefix is not None
        self.prefix_cache.reset(prefix or 0)
        if self.caching:
            log.info("prefix cache: Z and %d experts' outputs per image view, up to %.1f GiB",
                     prefix, self.prefix_cache.max_bytes / 2**30)

    # -- training ----------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.writing_logs = logs_this_batch(self.trainer)

    def training_step(self, batch: Dict[str, Tensor], batch_idx: int) -> Tensor:
        """One autoencoder step (and a discriminator step once the GAN is on), with no host sync:
        non-finite steps are skipped on the device (`StepGuard`), and logs are built only when written."""
        optimizers = self.optimizers()
        autoencoder, discriminator = optimizers if isinstance(optimizers, list) else (optimizers, None)
        step = self.global_step
        images = batch["image"]
        cache = self.prefix_cache if self.caching else None
        with self.toggled_optimizer(autoencoder):  # the discriminator's weights take no gradient here
            out = self._forward(images, cache, batch.get("view"))
            loss, logs = self.loss.autoencoder_loss(images, out, self.tokenizer.decoder.last_layer, step)
            autoencoder.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            grad_norm = self.loss_guard.before_step(
                autoencoder.optimizer, loss, self.optimization.optim.grad_clip, grad_scaler(self.trainer), step
            )
            autoencoder.step()
        self.lr_schedulers().step()
        if self.ema is not None:
            self.ema.update(self.tokenizer)
        if self.loss.gan_active(step):
            logs.update(self._discriminator_step(discriminator, images, out))
        self._maintain_codebook(out, step)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        if self.writing_logs:
            self._log_step(logs, out, grad_norm, cache)
        return loss.detach()

    def _forward(self, images: Tensor, cache: Optional[FrozenPrefixCache], views) -> TokenizerOutput:
        """The tokenizer's forward; the encoder replays a CUDA graph when `trainer.cuda_graphs` is on (or auto) and
        the images are on a CUDA device."""
        lengths = self._random_decode_lengths(images.shape[0])
        if not (self.trainer_config.cuda_graphs in (True, "auto") and images.is_cuda and cache is None):
            return self.tokenizer(images, lengths, cache, views)
        if self.encoder_graph is None or self.encoder_graph.key != encoder_key(self.tokenizer, images):
            self.encoder_graph = None  # free the old capture's memory before the new one takes its own
            self.encoder_graph = EncoderGraph(self.tokenizer, images)
            log.info("encoder captured as CUDA graphs (%d experts active)", self.tokenizer.num_active)
        return self.tokenizer(images, lengths, encoder=self.encoder_graph)

    def _log_step(self, logs, out, grad_norm, cache) -> None:
        """The step's scalars, built only on steps whose logs are written (each costs a device read there)."""
        stats = code_statistics(out.ids, self.tokenizer.quantizer.codebook_size)
        logs.update({
            "train/grad_norm": grad_norm,
            "train/codebook_usage": stats["usage"],
            "train/perplexity": stats["perplexity"],
            "train/nonfinite_steps": float(self.loss_guard.check()),
            "growth/experts": float(self.tokenizer.num_active),
            "growth/stage": float(self.growth_stage),
        })
        if self.loss.discriminator is not None:
            logs["train/d_nonfinite_steps"] = float(self.disc_guard.check())
        if self.restarted is not None:
            logs["train/restarted_codes"] = self.restarted.float()
        if cache is not None:
            logs.update({"growth/cache_hit_rate": cache.hit_rate, "growth/cache_gib": cache.bytes / 2**30})
        self.log_dict(logs, on_step=True, on_epoch=False)

    def on_train_end(self) -> None:
        self.loss_guard.check()
        self.disc_guard.check()

    def _discriminator_step(self, optimizer, images: Tensor, out: TokenizerOutput) -> Dict[str, Tensor]:
        with self.toggled_optimizer(optimizer):
            d_loss, logs = self.loss.discriminator_loss(images, out)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self.disc_guard.before_step(optimizer.optimizer, d_loss, 0.0, grad_scaler(self.trainer), self.global_step)
            # Through the strategy, not LightningOptimizer.step: a discriminator update is not a training step.
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)
        return logs

    def _maintain_codebook(self, out: TokenizerOutput, step: int) -> None:
        """Dead-code restart (`VectorQuantizer.maintain`) over the codes of every rank; vetoed on steps
        whose update was skipped as non-finite."""
        finite = None if self.loss_guard.skipped is None else self.loss_guard.skipped == 0
        after = self.tokenizer.config.quantizer.restart_dead_after
        restarted = self.tokenizer.quantizer.maintain(
            out.ids, out.vectors, step, after, self.seed, self.all_gather, allowed=finite
        )
        if restarted is not None:
            self.restarted = restarted

    # -- evaluation ----------------------------------------------------------------------------------------
    def validation_step(self, batch: Dict[str, Tensor], batch_idx: int) -> None:
        images = batch["image"]
        tokenizer = self.eval_tokenizer
        out = tokenizer(images)
        loss, rec = self.loss.validation_loss(images, out)
        reconstruction = out.reconstruction.clamp(0, 1)
        self.val_psnr(reconstruction, images)
        self.val_ssim(reconstruction, images)
        self.val_codes(out.ids)
        size = images.shape[0]
        self.log("val/loss", loss, sync_dist=True, batch_size=size, prog_bar=True)
        self.log("val/rec_loss", rec, sync_dist=True, batch_size=size)
        self.log("val/psnr", self.val_psnr, batch_size=size, prog_bar=True)
        self.log("val/ssim", self.val_ssim, batch_size=size)
        active = out.ids.shape[1]
        for k in prefix_lengths(active):  # psnr@<all active> is val/psnr
            if str(k) not in self.val_prefix_psnr:  # only where set_active was called off the growth schedule
                continue
            metric = self.val_prefix_psnr[str(k)]
            metric.update(reconstruction if k == active else tokenizer.decode(out.ids, k=k), images)
            self.log(f"val/psnr@{k}", metric, batch_size=size)

    def on_validation_epoch_end(self) -> None:
        stats = self.val_codes.compute()
        self.log_dict({"val/codebook_usage": stats["usage"], "val/perplexity": stats["perplexity"]})
        self.val_codes.reset()
        # Lightning would log this evaluation under the step before (its logger step advances only after
        # validation); under a logged "step" it is the number of updates the weights evaluated have had, as the
        # image grids, the validation log line and best-step*.ckpt count.
        self.log("step", float(self.global_step), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The config as `hyper_parameters["config"]` (what loaders rebuild the models from) and the kind."""
        checkpoint["hyper_parameters"] = {"config": self.config_record}
        checkpoint["nativetok"] = {"kind": "tokenizer", "version": __version__}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume checkpoints written before the discriminator and LeCam moved into `loss`."""
        checkpoint["state_dict"] = migrate_state_dict(checkpoint["state_dict"])


def _summarise(names: List[str]) -> str:
    """'expert.0', ..., 'expert.7' -> 'experts 0-7' (runs of experts folded)."""
    experts = sorted(int(n.split(".")[1]) for n in names if n.startswith("expert."))
    others = [n for n in names if not n.startswith("expert.")]
    runs, start = [], None
    for i, index in enumerate(experts):
        start = index if start is None else start
        if i + 1 == len(experts) or experts[i + 1] != index + 1:
            runs.append(f"{start}-{index}" if start != index else f"{start}")
            start = None
    return ", ".join(others + ([f"experts {', '.join(runs)}"] if runs else []))
