"""Build the Trainer, callbacks and run folder from a config, and run stage-1 or stage-2 training.

A run folder is `run.dir` (default `runs/<run.name>`): `config.yaml` (the resolved config),
`checkpoints/` (`last.ckpt` and the best by validation loss), the logs (`tb/`, `csv/` or `wandb/`, per
`trainer.logger`), pictures, and while a run trains there `run.lock` (see `run_folder.py`: one run per
folder, a resume refused when the config changed). Running the same command again continues from
`last.ckpt` (`run.resume=auto`), so a killed or requeued job resumes without user action.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.plugins import MixedPrecision
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.profilers import AdvancedProfiler, Profiler, SimpleProfiler
from pytorch_lightning.strategies import DDPStrategy

from nativetok.checkpoints import with_tokenizer_sizes
from nativetok.config.checks import ConfigError, callback_class
from nativetok.config.loading import to_container, to_yaml
from nativetok.config.schema import ExperimentConfig
from nativetok.data import ImageShardsDataModule, TokenShardsDataModule
from nativetok.lit.callbacks import (
    DataSkips,
    ExpertGrowth,
    PlateauStop,
    ReconstructionGrid,
    SampleGrid,
    ValidationSummary,
)
from nativetok.lit.checkpoint_io import AtomicCheckpointIO, checkpoint_problem, remove_staged_leftovers
from nativetok.lit.console import progress
from nativetok.lit.generator_module import GeneratorModule
from nativetok.lit.optim import Optimization
from nativetok.lit.preemption import LAST, PREVIOUS, REQUEUE_SIGNAL, LastCheckpoint
from nativetok.lit.run_folder import RunLock, refuse_changed_config
from nativetok.lit.tokenizer_module import TokenizerModule
from nativetok.losses import TokenizerLoss
from nativetok.models import build_generator, build_tokenizer

log = logging.getLogger(__name__)


@contextmanager
def lightning_warnings_quieted(resuming: bool):
    """While a run trains, Lightning's warnings that do not apply to it are not shown: about every
    IterableDataset with a length (ours is exact), PyTree internals, and, when resuming, the checkpoint folder
    that holds the checkpoints resumed from. Scoped to the fit, so the process's own filters stay the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        if resuming:
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        yield


def checkpoint_to_resume(config: ExperimentConfig) -> Optional[str]:
    """The checkpoint a run continues from, per `run.resume`; None for a fresh start.

    With `auto`: last.ckpt, or where that is damaged previous.ckpt, then the newest best-*.ckpt; every
    file refused is named in the log. A folder whose checkpoints are all damaged is an error, not a
    silent fresh start.
    """
    folder = Path(config.run.dir) / "checkpoints"
    if config.run.resume == "never":
        if folder.is_dir() and any(folder.glob("*.ckpt")):
            raise ConfigError(
                f"run.resume: {folder} already holds checkpoints; use run.resume=auto to continue that run "
                f"or set another run.name"
            )
        return None
    if config.run.resume != "auto":
        problem = checkpoint_problem(Path(config.run.resume))
        if problem:
            raise ConfigError(f"run.resume: cannot resume from {config.run.resume}: {problem}")
        return config.run.resume
    best = sorted(folder.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    candidates = [p for p in [folder / LAST, folder / PREVIOUS, *best] if p.is_file()]
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        log.warning("refusing to resume from %s: %s", path, problem)
    if candidates:
        raise ConfigError(f"run.resume: no usable checkpoint in {folder} (all {len(candidates)} refused, see above)")
    return None


def make_strategy(config: ExperimentConfig):
    # Growth stages leave experts unused and the GAN's two backward passes touch different parameters:
    # DDP must tolerate parameters without gradients.
    if config.trainer.strategy == "ddp":
        return DDPStrategy(find_unused_parameters=True)
    return config.trainer.strategy


def wandb_settings(config: ExperimentConfig, run_dir: Path) -> Dict[str, Any]:
    """WandbLogger's arguments. The id follows the run folder, so a resumed or requeued run continues the same
    wandb run; without trainer.wandb_mode, wandb reads WANDB_MODE."""
    t = config.trainer
    folder = str(run_dir.resolve())
    settings: Dict[str, Any] = dict(
        project=t.wandb_project, name=config.run.name, save_dir=str(run_dir),
        id=f"{config.run.name}-{hashlib.sha1(folder.encode()).hexdigest()[:8]}",
    )
    if t.wandb_mode:
        settings["mode"] = t.wandb_mode
    return settings


def make_logger(config: ExperimentConfig, run_dir: Path) -> Logger:
    """The logger `trainer.logger` names, writing into the run folder."""
    kind = config.trainer.logger
    if kind == "csv":
        return CSVLogger(str(run_dir), name="csv", version="")
    if kind == "wandb":
        try:
            from pytorch_lightning.loggers import WandbLogger

            return WandbLogger(**wandb_settings(config, run_dir))
        except ModuleNotFoundError as error:  # checked with the config; here for a config built in code
            raise ConfigError(f"trainer.logger: wandb needs the wandb package (pip install wandb): {error}") from None
    return TensorBoardLogger(str(run_dir), name="tb", version="", default_hp_metric=False)


def make_profiler(config: ExperimentConfig, run_dir: Path) -> Optional[Profiler]:
    """`trainer.profiler`'s report goes to <run dir>/fit-profile.txt rather than into the log."""
    kind = {"simple": SimpleProfiler, "advanced": AdvancedProfiler}.get(config.trainer.profiler or "")
    return kind(dirpath=str(run_dir), filename="profile") if kind else None


def cluster_plugins() -> list:
    """Under SLURM, Lightning's SLURM environment (ranks from srun) without its own requeue handler:
    `LastCheckpoint` checkpoints at a step boundary and requeues on the same signal."""
    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False, requeue_signal=REQUEUE_SIGNAL)]
    return []


def precision_settings(config: ExperimentConfig) -> Tuple[Optional[str], list]:
    """Lightning's `precision` flag and plugins. fp16 autocast gets an explicit plugin with a GradScaler for
    the device in use, so that it runs (and is tested) on a CPU too: Lightning's flag would quietly turn
    it into bf16 there. Clipping is the steps' own (`StepGuard`), for every precision."""
    t = config.trainer
    if t.precision != "16-mixed":
        return t.precision, []
    cuda = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    return None, [MixedPrecision("16-mixed", device, torch.amp.GradScaler(device))]


def configured_callbacks(config: ExperimentConfig) -> List[pl.Callback]:
    """The config's `callbacks` (Lightning CLI's class_path/init_args, checked when the config was loaded), built."""
    return [callback_class(spec.class_path)(**spec.init_args) for spec in config.callbacks]


def training_callbacks(config: ExperimentConfig, run_dir: Path, extra: Sequence[pl.Callback] = (),
                       lock: Optional[RunLock] = None) -> List[pl.Callback]:
    """Every callback of a Trainer, built here, in the order they act.

    Any trainer: the console (a bar on a terminal, else log lines), the learning rate of every optimizer, `extra`,
    the config's `callbacks`, and last.ckpt with pre-emption (none in a fast dev run, which leaves the run's
    checkpoints alone). A training run (given its folder's `lock`) adds the best checkpoint by validation loss,
    the data skips and validation summaries, the lock, and its stage's own: the reconstruction grid, the stop at
    a plateau and HNT's growth in stage 1, the sample grid in stage 2.
    """
    t = config.trainer
    run: List[pl.Callback] = []
    growth: List[pl.Callback] = []  # after `extra`: a probe among them sees a stage change's work
    if lock is not None:
        run = [checkpoint_callback(run_dir), DataSkips(t.log_every_n_steps), ValidationSummary(), lock]
        if config.stage == "tokenizer":
            run.append(ReconstructionGrid(t.images_every_n_steps, run_dir / "reconstructions.png"))
            if t.plateau_min_gain_db is not None:  # after ValidationSummary, whose curve it reads
                run.append(PlateauStop(run_dir, t.plateau_min_gain_db, t.plateau_min_steps, t.plateau_patience))
            growth = [ExpertGrowth(config.growth.stages)] if config.growth.stages else []
        else:
            run.append(SampleGrid(t.images_every_n_steps, run_dir / "samples.png", config.sampling.grid_per_class))
    last = [] if t.fast_dev_run else [
        LastCheckpoint(run_dir / "checkpoints", t.checkpoint_every_n_steps, run_dir / "requeue.log")
    ]
    return [progress(t.progress_bar, t.log_every_n_steps), pl.callbacks.LearningRateMonitor(),
            *run, *extra, *growth, *configured_callbacks(config), *last]


def build_trainer(config: ExperimentConfig, extra_callbacks: Sequence[pl.Callback], run_dir: Path,
                  lock: Optional[RunLock] = None) -> pl.Trainer:
    """The Trainer of a config, with `training_callbacks` (a training run's too when given its `lock`)."""
    t = config.trainer
    precision, precision_plugins = precision_settings(config)
    callbacks = training_callbacks(config, run_dir, extra_callbacks, lock)
    return pl.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(config),
        precision=precision,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=any(isinstance(callback, ProgressBar) for callback in callbacks),
        deterministic=t.deterministic,
        logger=make_logger(config, run_dir),
        fast_dev_run=t.fast_dev_run,
        limit_val_batches=t.limit_val_batches,
        accumulate_grad_batches=t.accumulate_grad_batches,
        profiler=make_profiler(config, run_dir),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *precision_plugins, *cluster_plugins()],
        default_root_dir=str(run_dir),
    )


def checkpoint_callback(run_dir: Path) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="best-step{step:06d}",
        auto_insert_metric_name=False,
        monitor="val/loss",
        mode="min",
        save_top_k=1,
        save_last=False,  # last.ckpt belongs to LastCheckpoint
    )


def _prepare_run(config: ExperimentConfig, extra_callbacks: Sequence[pl.Callback]):
    """Build the trainer (with the run's callbacks), take the run folder (rank 0), resolve the checkpoint to
    resume from and refuse it when the config changed, then clear killed saves' leftovers and write the resolved
    config. Nothing is written before the lock is taken and the config accepted. A fast dev run starts fresh and
    leaves the folder's checkpoints and config.yaml as they were."""
    run_dir = Path(config.run.dir)
    lock = RunLock(run_dir)
    trainer = build_trainer(config, extra_callbacks, run_dir, lock)
    if trainer.is_global_zero:
        lock.acquire()
    try:
        resume = None if config.trainer.fast_dev_run else checkpoint_to_resume(config)
        if resume:
            refuse_changed_config(config, resume)
        if trainer.is_global_zero and not config.trainer.fast_dev_run:
            remove_staged_leftovers(run_dir / "checkpoints")
            (run_dir / "config.yaml").write_text(to_yaml(config))
            log.info("run folder %s%s", run_dir, f"; resuming from {resume}" if resume else "")
    except BaseException:
        lock.release()
        raise
    return trainer, resume


def tokenizer_module(config: ExperimentConfig) -> TokenizerModule:
    """Stage 1's LightningModule around a tokenizer and its loss, built from the config once."""
    d = config.data
    return TokenizerModule(build_tokenizer(config.tokenizer, d.image_size, d.channels),
                           TokenizerLoss(config.loss, d.channels), Optimization.of(config), config.growth,
                           config.trainer, config.seed, to_container(config))


def generator_module(config: ExperimentConfig) -> GeneratorModule:
    """Stage 2's LightningModule around a generator of `generator.kind`, built from the config once (the sizes
    it leaves out read from its tokenizer)."""
    config = with_tokenizer_sizes(config)
    return GeneratorModule(build_generator(config.generator, config.data.num_classes), config.generator,
                           config.sampling, Optimization.of(config), config.trainer, config.seed, config.data.index,
                           config.run.dir, to_container(config))


def _warn_late_stages(config: ExperimentConfig) -> None:
    late = [s for s in config.growth.stages if s.step >= config.trainer.max_steps]
    if late:
        log.warning(
            "growth stages beginning at steps %s come after trainer.max_steps=%d: training ends with %d experts",
            [s.step for s in late], config.trainer.max_steps,
            max(s.experts for s in config.growth.stages if s.step < config.trainer.max_steps),
        )


def train_tokenizer(
    config: ExperimentConfig, extra_callbacks: Sequence[pl.Callback] = ()
) -> Tuple[pl.Trainer, TokenizerModule]:
    """Stage 1 on the configured image shards, into `run.dir`; returns the trainer and the trained module."""
    pl.seed_everything(config.seed, workers=True)
    module = tokenizer_module(config)
    _warn_late_stages(config)
    trainer, resume = _prepare_run(config, extra_callbacks)
    if trainer.is_global_zero:
        sizes = ", ".join(f"{k} {v:,}" for k, v in module.tokenizer.parameter_counts().items())
        log.info("tokenizer '%s': %s parameters", config.tokenizer.kind, sizes)
    with lightning_warnings_quieted(bool(resume)):
        trainer.fit(module, datamodule=ImageShardsDataModule(config.data, seed=config.seed), ckpt_path=resume)
    return trainer, module


def train_generator(
    config: ExperimentConfig, extra_callbacks: Sequence[pl.Callback] = ()
) -> Tuple[pl.Trainer, GeneratorModule]:
    """Stage 2 on the configured token shards, into `run.dir`; returns the trainer and the trained module."""
    pl.seed_everything(config.seed, workers=True)
    config = with_tokenizer_sizes(config)  # before anything reads them, and so the run's config.yaml holds them
    g = config.generator
    datamodule = TokenShardsDataModule(config.data, g.codebook_size, g.num_tokens, seed=config.seed)
    datamodule.check_index()
    module = generator_module(config)
    module.load_tokenizer()  # refuses a tokenizer that does not match, before any training
    trainer, resume = _prepare_run(config, extra_callbacks)
    if trainer.is_global_zero:
        count = sum(p.numel() for p in module.generator.parameters())
        log.info("generator '%s': %s parameters", g.kind, f"{count:,}")
    with lightning_warnings_quieted(bool(resume)):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    return trainer, module
