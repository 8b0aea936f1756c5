"""Value checks of an experiment config: each check yields (key, problem), and `check_values` runs the checks of
the config's stage. `loading.py` runs them on every config it composes (files and command line) and on every
config read from a checkpoint or an export (`check_stored_values`), so a wrong value fails before any work
starts, naming its key, from every source."""

from __future__ import annotations

import importlib
import inspect
import math
import re
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, List, Mapping, Sequence, Tuple

from nativetok.config.schema import (
    GENERATOR_KINDS,
    GROWTH_INITS,
    GUIDANCE_SCHEDULES,
    LOGGERS,
    MASK_SCHEDULES,
    PIXEL_LOSSES,
    PRECISIONS,
    PROFILERS,
    STRATEGIES,
    TOKEN_ORDERS,
    TOKENIZER_KINDS,
    TRAINABLE_PARTS,
    WANDB_MODES,
    ExperimentConfig,
    GrowthStage,
    SamplingConfig,
)


class ConfigError(ValueError):
    """A config that cannot run: an unknown key, a wrong type or an impossible value."""


# A Python dotted name (`package.module.Class`): the only form a callback's class_path may take.
DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
Check = Iterable[Tuple[str, str]]


def _not_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def check_finite(obj: Any, prefix: str = "") -> Check:
    """Every float of a schema dataclass (in lists and nested sections too) must be finite: NaN fails every
    comparison, so the range checks would let it through (a NaN optim.grad_clip silently turns clipping off)."""
    for f in fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if is_dataclass(value):
            yield from check_finite(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if is_dataclass(item):
                    yield from check_finite(item, f"{key}.{i}.")
            if any(_not_finite(item) for item in value):
                yield key, f"must hold finite numbers, got {value}"
        elif _not_finite(value):
            yield key, f"must be a finite number, got {value}"


def _finite_first(non_finite: Check, checks: Iterable[Check]) -> Check:
    """The non-finite values, then the other problems of the remaining keys (a range check would only repeat
    a NaN less clearly)."""
    bad = dict(non_finite)
    yield from bad.items()
    for check in checks:
        yield from ((key, problem) for key, problem in check if key not in bad)


def _positive(prefix: str, obj: Any, *names: str) -> Check:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            yield f"{prefix}.{name}", f"must be > 0, got {value}"


def _non_negative(prefix: str, obj: Any, *names: str) -> Check:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 0:
            yield f"{prefix}.{name}", f"must be >= 0, got {value}"


def _choice(key: str, value: Any, choices: Sequence[Any]) -> Check:
    if value not in choices:
        yield key, f"must be one of {', '.join(map(str, choices))}; got '{value}'"


def _heads_divide(prefix: str, width: int, heads: int) -> Check:
    if heads <= 0 or width % heads:
        yield f"{prefix}.heads", f"must divide the width {width}, got {heads}"


def _device_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def device_count(devices: Any) -> int | None:
    """How many devices `trainer.devices` names (a count, a digit string or a list of ids); None when it is
    decided at run time (auto) or is none of these."""
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices
    if isinstance(devices, (list, tuple)) and all(_device_id(d) for d in devices):
        return len(devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    return None


def world_size(trainer) -> int | None:
    """Devices times nodes when the device count is a number; None when it is decided at run time."""
    count = device_count(trainer.devices)
    return None if count is None else count * trainer.num_nodes


def check_run(c: ExperimentConfig) -> Check:
    if c.run.resume not in ("auto", "never") and not Path(c.run.resume).is_file():
        yield "run.resume", f"must be auto, never or an existing checkpoint file; '{c.run.resume}' is none"
    if not c.run.name:
        yield "run.name", "must not be empty"


def check_data(c: ExperimentConfig) -> Check:
    d = c.data
    yield from _positive("data", d, "image_size", "num_classes", "batch_size", "val_batch_size")
    yield from _positive("data", d, "train_samples_per_epoch", "val_samples")
    yield from _non_negative("data", d, "num_workers", "shuffle_buffer")
    yield from _choice("data.channels", d.channels, (1, 3))
    if d.index is None and not (d.train_shards and d.val_shards):
        yield "data.index", "is needed unless both data.train_shards and data.val_shards are given"


def check_trainer(c: ExperimentConfig) -> Check:
    t = c.trainer
    yield from _positive("trainer", t, "max_steps", "val_every_n_steps", "log_every_n_steps", "num_nodes")
    yield from _positive("trainer", t, "max_nonfinite_steps")
    yield from _non_negative("trainer", t, "images_every_n_steps", "checkpoint_every_n_steps")
    yield from _choice("trainer.precision", str(t.precision), PRECISIONS)
    if not (isinstance(t.progress_bar, bool) or t.progress_bar == "auto"):
        yield "trainer.progress_bar", f"must be true, false or auto; got {t.progress_bar!r}"
    if not (isinstance(t.cuda_graphs, bool) or t.cuda_graphs == "auto"):
        yield "trainer.cuda_graphs", f"must be true, false or auto; got {t.cuda_graphs!r}"
    if t.cuda_graphs is True and t.accelerator == "cpu":
        yield "trainer.cuda_graphs", "needs a CUDA device (trainer.accelerator gpu or auto; or cuda_graphs=auto)"
    if t.cuda_graphs is True and c.stage != "tokenizer":
        yield "trainer.cuda_graphs", ("captures the stage-1 encoder; stage 2 training does not use it "
                                      "(cuda_graphs=auto: wherever it can act)")
    yield from _plateau_stop(c)
    if t.strategy not in STRATEGIES:
        yield "trainer.strategy", (
            f"must be one of {', '.join(STRATEGIES)} (what this project sets up and tests); got '{t.strategy}'"
        )
    yield from _choice("trainer.logger", t.logger, LOGGERS)
    if t.logger == "wandb" and importlib.util.find_spec("wandb") is None:
        yield "trainer.logger", "wandb needs the wandb package (pip install wandb); or use tensorboard or csv"
    if t.wandb_mode not in WANDB_MODES:
        yield "trainer.wandb_mode", f"must be null, online or offline; got '{t.wandb_mode}'"
    if t.profiler not in PROFILERS:
        yield "trainer.profiler", f"must be null, simple or advanced; got '{t.profiler}'"
    yield from _trainer_debugging(c)
    count = device_count(t.devices)
    if t.devices != "auto" and not (count is not None and count >= 1):
        yield "trainer.devices", f"must be auto, a positive count or a non-empty list of device ids; got {t.devices!r}"
    world = world_size(t)
    if world is not None and world >= 1 and c.data.batch_size % world:
        yield "data.batch_size", (
            f"the global batch size {c.data.batch_size} must be divisible by devices x nodes = {world}"
        )


def is_count(value: Any) -> bool:
    """A whole number of steps or batches (not a bool, not a fraction)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _plateau_stop(c: ExperimentConfig) -> Check:
    t = c.trainer
    if not is_count(t.plateau_min_steps):
        yield "trainer.plateau_min_steps", f"must be a step count >= 0; got {t.plateau_min_steps!r}"
    if not (is_count(t.plateau_patience) and t.plateau_patience >= 1):
        yield "trainer.plateau_patience", f"must be a count of validations >= 1; got {t.plateau_patience!r}"
    if t.plateau_min_gain_db is None:
        return
    if not t.plateau_min_gain_db > 0:
        yield "trainer.plateau_min_gain_db", f"must be a gain in dB > 0 (or null: no stop); got {t.plateau_min_gain_db}"
    if c.stage != "tokenizer":
        yield "trainer.plateau_min_gain_db", "watches stage 1's validation PSNR; stage 2 trains for max_steps"
    if t.limit_val_batches == 0:
        yield "trainer.plateau_min_gain_db", "needs validation (trainer.limit_val_batches is 0)"
    if is_count(t.plateau_min_steps) and t.plateau_min_steps > t.max_steps:
        yield "trainer.plateau_min_steps", f"{t.plateau_min_steps} is beyond trainer.max_steps {t.max_steps}"


def _trainer_debugging(c: ExperimentConfig) -> Check:
    """Lightning's debugging flags, checked here so that a bad one stops before the run starts."""
    t = c.trainer
    if not (isinstance(t.fast_dev_run, bool) or is_count(t.fast_dev_run)):
        yield "trainer.fast_dev_run", f"must be true, false or a batch count >= 0; got {t.fast_dev_run!r}"
    limit = t.limit_val_batches
    if not (is_count(limit) or (isinstance(limit, float) and 0.0 <= limit <= 1.0)):
        yield "trainer.limit_val_batches", f"must be a batch count >= 0 or a fraction in [0.0, 1.0]; got {limit!r}"
    if t.accumulate_grad_batches < 1:
        yield "trainer.accumulate_grad_batches", f"must be >= 1, got {t.accumulate_grad_batches}"
    elif t.accumulate_grad_batches > 1 and c.stage == "tokenizer":
        yield "trainer.accumulate_grad_batches", (
            "stage 1 steps its autoencoder and discriminator optimizers by hand, which Lightning cannot accumulate; "
            "raise data.batch_size (or trainer.devices) instead"
        )


def check_tokenizer(c: ExperimentConfig) -> Check:
    t = c.tokenizer
    yield from _choice("tokenizer.kind", t.kind, TOKENIZER_KINDS)
    yield from _positive("tokenizer", t, "patch_size", "num_tokens", "latent_width")
    if t.patch_size > 0 and c.data.image_size % t.patch_size:
        yield "tokenizer.patch_size", (
            f"must divide data.image_size {c.data.image_size}, got {t.patch_size}"
        )
    for section in ("mit", "decoder"):
        part = getattr(t, section)
        yield from _positive(f"tokenizer.{section}", part, "width", "depth", "mlp_ratio")
        yield from _heads_divide(f"tokenizer.{section}", part.width, part.heads)
    yield from _positive("tokenizer.experts", t.experts, "depth", "mlp_ratio")
    yield from _heads_divide("tokenizer.experts", t.latent_width, t.experts.heads)
    q = t.quantizer
    yield from _positive("tokenizer.quantizer", q, "code_dim")
    if q.codebook_size < 2:
        yield "tokenizer.quantizer.codebook_size", f"must be >= 2, got {q.codebook_size}"
    yield from _non_negative("tokenizer.quantizer", q, "commitment", "restart_dead_after")
    if not 0.0 <= t.decoder.random_prefix <= 1.0:
        yield "tokenizer.decoder.random_prefix", f"is a probability, got {t.decoder.random_prefix}"


def check_loss(c: ExperimentConfig) -> Check:
    loss = c.loss
    yield from _choice("loss.pixel", loss.pixel, PIXEL_LOSSES)
    yield from _non_negative(
        "loss", loss, "pixel_weight", "perceptual_weight", "quantizer_weight", "disc_weight",
        "disc_start", "lecam_weight",
    )
    # The files themselves are checked when the loss is built; unset lin_weights are the lpips package's.
    if loss.perceptual_weight > 0 and not loss.perceptual.vgg_weights:
        yield "loss.perceptual.vgg_weights", (
            "loss.perceptual_weight > 0 needs this weights file (torchvision's vgg16-397923af.pth, see data/README.md)"
        )
    yield from _positive("loss.discriminator", loss.discriminator, "channels", "layers")


def check_optim(c: ExperimentConfig) -> Check:
    o = c.optim
    yield from _positive("optim", o, "lr", "disc_lr", "base_batch_size")
    yield from _non_negative("optim", o, "weight_decay", "warmup_steps", "grad_clip")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        yield "optim.betas", f"must be two numbers in [0, 1), got {list(o.betas)}"
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        yield "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}"
    if not 0.0 <= o.ema_decay < 1.0:
        yield "optim.ema_decay", f"must be in [0, 1), got {o.ema_decay}"


def check_growth(c: ExperimentConfig) -> Check:
    g = c.growth
    yield from _choice("growth.init", g.init, GROWTH_INITS)
    yield from _non_negative("growth", g, "cache_gib")
    if g.cache_gib > 0 and c.tokenizer.kind != "nativetok":
        yield "growth.cache_gib", f"caches the experts' inputs, which tokenizer.kind '{c.tokenizer.kind}' does not have"
    if not g.stages:
        return
    if c.tokenizer.kind != "nativetok":
        yield "growth.stages", f"grows experts, which tokenizer.kind '{c.tokenizer.kind}' does not have"
        return
    tokens = c.tokenizer.num_tokens
    previous = None
    for i, stage in enumerate(g.stages):
        key = f"growth.stages.{i}"
        if i == 0 and stage.step != 0:
            yield f"{key}.step", f"the first stage must begin at step 0, got {stage.step}"
        if previous is not None and stage.step <= previous.step:
            yield f"{key}.step", f"stages must begin at increasing steps, {stage.step} <= {previous.step}"
        if not 1 <= stage.experts <= tokens:
            yield f"{key}.experts", f"must be between 1 and tokenizer.num_tokens {tokens}, got {stage.experts}"
        if previous is not None and stage.experts < previous.experts:
            yield f"{key}.experts", f"experts can only grow, {stage.experts} < {previous.experts}"
        for part in stage.train:
            if part not in TRAINABLE_PARTS:
                yield f"{key}.train", f"'{part}' is not one of {', '.join(TRAINABLE_PARTS)}"
        if previous is not None and not g.allow_moving_frozen_tokens:
            yield from _frozen_tokens_move(key, stage, previous.experts)
        previous = stage
    if previous is not None and previous.experts != tokens:
        yield f"growth.stages.{len(g.stages) - 1}.experts", (
            f"the last stage must reach tokenizer.num_tokens {tokens}, got {previous.experts}"
        )


def _frozen_tokens_move(key: str, stage: GrowthStage, frozen: int) -> Check:
    """HNT's promise: a growth stage leaves the tokens of the experts it freezes bitwise unchanged."""
    if "all" in stage.train or "old_experts" in stage.train:
        return
    for part in ("mit", "codebook"):
        if part in stage.train:
            yield f"{key}.train", (
                f"trains '{part}' while experts 0-{frozen - 1} are frozen, which changes their tokens; "
                "drop it, or set growth.allow_moving_frozen_tokens=true to accept that"
            )


def check_generator(c: ExperimentConfig) -> Check:
    g = c.generator
    yield from _choice("generator.kind", g.kind, GENERATOR_KINDS)
    yield from _positive("generator", g, "codebook_size", "num_tokens", "width", "depth", "mlp_ratio")
    yield from _heads_divide("generator", g.width, g.heads)
    if g.heads > 0 and g.width % g.heads == 0 and (g.width // g.heads) % 2:
        yield "generator.heads", f"width / heads must be even for rotary embeddings, got {g.width // g.heads}"
    if not 0.0 <= g.class_dropout < 1.0:
        yield "generator.class_dropout", f"is a probability below 1, got {g.class_dropout}"
    yield from _choice("generator.mask_schedule", g.mask_schedule, MASK_SCHEDULES)
    yield from _choice("generator.token_order", g.token_order, TOKEN_ORDERS)
    if not g.tokenizer:
        yield "generator.tokenizer", "must name the stage-1 checkpoint that made the tokens"


def check_evaluation(c: ExperimentConfig) -> Check:
    if c.evaluation.images < 2:
        yield "evaluation.images", f"FID and KID need at least 2 images, got {c.evaluation.images}"
    yield from _non_negative("evaluation", c.evaluation, "reference_images")


def check_sampling(c: ExperimentConfig) -> Check:
    """sampling.* in a config, and the `sample` command's options (check_sampling_options)."""
    s = c.sampling
    yield from _choice("sampling.cfg_schedule", s.cfg_schedule, GUIDANCE_SCHEDULES)
    yield from _non_negative("sampling", s, "cfg_scale", "temperature", "top_k", "choice_temperature")
    yield from _positive("sampling", s, "steps", "grid_per_class")
    if not 0.0 < s.top_p <= 1.0:
        yield "sampling.top_p", f"must be in (0, 1], got {s.top_p}"


STAGE_CHECKS: dict[str, List[Callable[[ExperimentConfig], Check]]] = {
    "tokenizer": [check_run, check_data, check_trainer, check_tokenizer, check_loss, check_optim, check_growth,
                  check_evaluation],
    "generator": [check_run, check_data, check_trainer, check_optim, check_generator, check_sampling,
                  check_evaluation],
}


def callback_class(class_path: str) -> type:
    """The pytorch_lightning.Callback subclass a config's `callbacks` item names; a ValueError saying why not. Only
    a dotted name is imported (its module, then the attribute): no other text is evaluated."""
    if not isinstance(class_path, str) or not DOTTED_NAME.fullmatch(class_path):
        raise ValueError(f"must be the dotted name of a pytorch_lightning.Callback subclass (e.g. "
                         f"pytorch_lightning.callbacks.LearningRateMonitor), got {class_path!r}")
    import pytorch_lightning as pl

    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # whatever an import raises, it is this config item's problem
        raise ValueError(f"cannot import {module_name} ({type(error).__name__}: {error})") from None
    found = getattr(module, name, None)
    if found is None:
        raise ValueError(f"{module_name} has no {name}")
    if not (isinstance(found, type) and issubclass(found, pl.Callback)):
        other_copy = str(getattr(found, "__module__", "")).startswith("lightning.")
        raise ValueError(f"{class_path} is not a pytorch_lightning.Callback subclass" + (
            " (lightning.pytorch's classes are other objects than pytorch_lightning's: use pytorch_lightning's)"
            if other_copy else ""))
    return found


def check_callbacks(c: ExperimentConfig) -> Check:
    """Each configured callback's class imports, is a Callback, and accepts its init_args, before the run starts."""
    for i, spec in enumerate(c.callbacks):
        try:
            signature = inspect.signature(callback_class(spec.class_path))
        except ValueError as problem:
            yield f"callbacks.{i}.class_path", str(problem)
            continue
        try:
            signature.bind(**spec.init_args)
        except TypeError as problem:
            yield f"callbacks.{i}.init_args", f"{spec.class_path} does not take them: {problem}"


def check_values(c: ExperimentConfig) -> Check:
    if c.stage not in STAGE_CHECKS:
        yield "stage", f"must be one of {', '.join(STAGE_CHECKS)}; got '{c.stage}'"
        return
    checks = [*(check(c) for check in STAGE_CHECKS[c.stage]), check_callbacks(c)]
    yield from _finite_first(check_finite(c), checks)


def check_stored_values(c: ExperimentConfig) -> Check:
    """`check_values` for a config read from a checkpoint or export: every check but those of where the run was
    and the hardware it ran on (run.*, trainer.*), which describe another machine, not this one's limits."""
    if c.stage not in STAGE_CHECKS:
        yield "stage", f"must be one of {', '.join(STAGE_CHECKS)}; got '{c.stage}'"
        return
    checks = [check for check in STAGE_CHECKS[c.stage] if check not in (check_run, check_trainer)]
    yield from _finite_first(check_finite(c), (check(c) for check in checks))


def check_sampling_options(values: Mapping[str, Any], options: Mapping[str, str]) -> None:
    """Sampling settings given outside a config (sampling field -> value, None where not given), checked by
    the same code as sampling.* in a config; the ConfigError names the option (`options`: field -> option)."""
    given = {name: value for name, value in values.items() if value is not None}
    config = ExperimentConfig(sampling=replace(SamplingConfig(), **given))
    prefix = "sampling."
    problems = _finite_first(check_finite(config.sampling, prefix), [check_sampling(config)])
    lines = [f"{options[key[len(prefix):]]}: {problem}" for key, problem in problems if key[len(prefix):] in given]
    if lines:
        raise ConfigError("; ".join(lines))
