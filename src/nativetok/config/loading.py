"""Load an experiment: YAML files composed with `extends`, `key=value` overrides, schema and value checks.

An experiment is a path or a name (`fmnist_tiny`: experiments/fmnist_tiny.yaml under the current directory,
else under the repository). `group=name` (or `+group=name`, as in Hydra) on the command line merges
experiments/<group>/<name>.yaml (e.g. `trainer=gpu`) over the experiment, before the `key=value` overrides.
A value with commas outside quotes and brackets is a sweep (`seed=0,1,2`, `-m`: `override_combinations`).
Lightning's names for trainer settings (`trainer.gradient_clip_val`, ...) are read as ours or refused with the
reason (`LIGHTNING_FLAGS`). `callbacks` (Lightning CLI's class_path/init_args) are checked here and honoured only
from the user's own files and command line: a stored config neither keeps nor reads them. Every error names the
offending key and where its value came from (a file or the command line), and is raised before any work starts.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import itertools
import logging
import math
import os
import re
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException

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
    AblationPreset,
    ComparePreset,
    ExperimentConfig,
    GrowthStage,
    SamplingConfig,
)

COMMAND_LINE = "command line"
KEY_PATTERN = re.compile(r"\b[a-z_]+(?:\.[a-z_0-9]+)+\b")
SCHEMA_DEFAULT = "schema default"
SAVED_CONFIG = "the config saved in the checkpoint"
# The key a stored config (checkpoint, export) never holds and from_container never reads: it names code to import.
STORED_NEVER = "callbacks"
# A Python dotted name (`package.module.Class`): the only form a callback's class_path may take.
DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
# A folder of experiments for an installed package (a wheel holds no experiments/), looked in after the current
# directory's experiments/ and before the source checkout's.
EXPERIMENTS_ENV = "NATIVETOK_EXPERIMENTS"
# Folders of experiments/ that hold the presets of `nativetok compare` and `ablate`, not config layers.
NOT_GROUPS = ("ablation", "compare")
YAML_SUFFIXES = (".yaml", ".yml")
# Where YAML would start a comment in an override's value: at its start or after a space.
YAML_COMMENT = re.compile(r"(^|\s)#")
# A preset's name in `group=name`: a file stem under experiments/<group>/.
PRESET_NAME = re.compile(r"[\w.-]+")
ONE_VALUE_WITH_COMMAS = "for one value holding commas quote it (key='a,b') or give a list (key=[a,b])"


log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot run: an unknown key, a wrong type or an impossible value."""


def _read_yaml(path: Path, chain: Tuple[Path, ...] = ()) -> List[Tuple[str, DictConfig]]:
    """The file and the files it `extends` (depth first, parents before children) as (source, layer). A file
    named by `extends` must be a .yaml/.yml file; no error quotes a file's content (it may be any file)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: `extends` loops back to itself via {' -> '.join(map(str, chain))}")
    if chain and path.suffix not in YAML_SUFFIXES:
        raise ConfigError(f"{chain[-1]}: `extends: {path}` is not an experiment file (.yaml or .yml)")
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        layer = OmegaConf.load(path)
    except Exception as error:
        raise ConfigError(f"{path}: not valid YAML{_yaml_position(error)}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: an experiment file must be a mapping of keys, not {type(layer).__name__}")
    parents = layer.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    layers: List[Tuple[str, DictConfig]] = []
    for parent in parents:
        layers += _read_yaml(path.parent / str(parent), chain + (path,))
    return layers + [(str(path), layer)]


def _yaml_position(error: Exception) -> str:
    """Where and what a YAML error is (line, column, the parser's problem), without the snippet of the file that
    PyYAML's own message quotes."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None)
    return where + (f": {problem}" if problem else f" ({type(error).__name__})")


def _describe(error: OmegaConfBaseException) -> str:
    message = str(getattr(error, "msg", error)).splitlines()[0]
    return message


def _suggest(key: str, node_type: Any) -> str:
    if node_type is None or not is_dataclass(node_type):
        return ""
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, [f.name for f in fields(node_type)], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def checkout_experiments(module: Path = Path(__file__)) -> Optional[Path]:
    """The experiments/ of the source checkout this package runs from (`module` is its
    src/nativetok/config/loading.py); None for an installed package, which lies in no checkout."""
    module = module.resolve()
    root = module.parents[3] if len(module.parents) > 3 else None
    if root is None or module.parent.parent.parent.name != "src" or not (root / "experiments").is_dir():
        return None
    return root / "experiments"


def experiment_roots() -> List[Path]:
    """Where experiments are looked up, each once: experiments/ under the current directory, the folder named by
    $NATIVETOK_EXPERIMENTS (refused when it is no folder), then the source checkout's experiments/."""
    named = os.environ.get(EXPERIMENTS_ENV)
    if named and not Path(named).is_dir():
        raise ConfigError(f"{EXPERIMENTS_ENV}={named} is not a folder of experiments")
    roots: List[Path] = []
    for folder in (Path.cwd() / "experiments", Path(named) if named else None, checkout_experiments()):
        if folder is not None and folder.is_dir() and folder.resolve() not in roots:
            roots.append(folder.resolve())
    return roots


def available_experiments() -> List[str]:
    """The names `nativetok train NAME` accepts."""
    return sorted({path.stem for root in experiment_roots() for path in root.glob("*.yaml")})


def resolve_experiment(experiment: str | os.PathLike) -> Path:
    """A path as given; a bare name (no folder, no .yaml) is experiments/<name>.yaml, looked up under the current
    directory, then under the repository."""
    path = Path(experiment)
    if path.is_file() or len(path.parts) != 1 or path.suffix in (".yaml", ".yml"):
        return path
    roots = experiment_roots()
    for root in roots:
        if (root / f"{path}.yaml").is_file():
            return root / f"{path}.yaml"
    where = " or ".join(str(root) for root in roots) or (
        f"experiments/ (none in {Path.cwd()}; an installed package finds them through {EXPERIMENTS_ENV})")
    raise ConfigError(f"no experiment named '{experiment}' in {where}; "
                      f"available: {', '.join(available_experiments()) or 'none'}")


def preset_groups() -> Dict[str, Dict[str, Path]]:
    """group -> name -> file for `+group=name`: the folders of experiments/ (the current directory's first)."""
    groups: Dict[str, Dict[str, Path]] = {}
    for root in experiment_roots():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in NOT_GROUPS):
            names = groups.setdefault(folder.name, {})
            for file in sorted(folder.glob("*.yaml")):
                names.setdefault(file.stem, file)
    return groups


def preset_file(group: str, name: str) -> Path:
    """experiments/<group>/<name>.yaml for `group=name`; an unknown group or name names the available ones."""
    groups = preset_groups()
    if group not in groups:
        raise ConfigError(f"{COMMAND_LINE}: '+{group}={name}': no preset group '{group}'; "
                          f"groups: {', '.join(groups) or 'none'}")
    if name not in groups[group]:
        raise ConfigError(f"{COMMAND_LINE}: '{group}={name}': no preset '{name}' in {group}/; "
                          f"available: {', '.join(groups[group]) or 'none'}")
    return groups[group][name]


def split_presets(overrides: Sequence[str]) -> Tuple[List[Path], List[str]]:
    """The files of the preset items, in order, and the other overrides. As in Hydra, `group=name` (e.g.
    `trainer=gpu`, where experiments/trainer/ is a group) and `+group=name` both select experiments/<group>/<name>.yaml;
    `trainer={max_steps: 5}` or `trainer.max_steps=5` still set keys."""
    groups = preset_groups()
    files, rest = [], []
    for item in overrides:
        key, _, name = item.partition("=")
        if key.startswith("+"):
            group = key[1:]
            if not group or not name or "." in group or "/" in name:
                raise ConfigError(f"{COMMAND_LINE}: '{item}' is not of the form +group=name (e.g. +trainer=gpu); "
                                  "a key is set without the '+'")
        elif key in groups and PRESET_NAME.fullmatch(name):
            group = key
        else:
            rest.append(item)
            continue
        files.append(preset_file(group, name))
    return files, rest


@dataclass
class Combination:
    """One run of a multirun: its overrides (each `key=value`), and the value of each swept key."""

    overrides: List[str]
    swept: Dict[str, str]


def sweep_values(item: str) -> List[str]:
    """The values of an override `key=a,b,c` as `key=a`, `key=b`, `key=c`. The rule: the value splits at every
    comma outside quotes, brackets and braces, so `key=[1,2]` (a list), `key='a,b'` (a string),
    `key={a: 1, b: 2}` and `key=${x}` stay one value, and `key=[1,2],[3,4]` is two lists. A quote opens only at
    the start of a value or after `,`, `[`, `{`, `(` or `:` (so `it's` is plain text)."""
    key, equals, value = item.partition("=")
    if not equals:
        return [item]
    pieces, depth, quote, start, previous = [], 0, "", 0, ","
    for i, char in enumerate(value):
        if quote:
            quote = "" if char == quote and value[i - 1] != "\\" else quote
        elif char in "'\"" and previous in ",[{(:":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append(value[start:i])
            start = i + 1
        previous = char if not char.isspace() else previous
    pieces.append(value[start:])
    if len(pieces) > 1 and not all(piece.strip() for piece in pieces):
        raise ConfigError(f"{COMMAND_LINE}: '{item}': an empty value between commas")
    return [f"{key}={piece}" for piece in pieces]


def override_combinations(overrides: Sequence[str], multirun: bool) -> List[Combination]:
    """The runs a command line asks for: with `multirun` (`-m`), the cartesian product of the comma-separated
    values (`sweep_values`), the last override varying fastest, as in Hydra; without it exactly one run, and a
    value that would split is refused rather than read as text."""
    choices = [sweep_values(item) for item in overrides]
    for item, values in zip(overrides, choices):
        if len(values) > 1 and not multirun:
            raise ConfigError(
                f"{COMMAND_LINE}: '{item}': commas outside quotes and brackets make a sweep; run it with -m "
                f"(--multirun), or {ONE_VALUE_WITH_COMMAS}")
    combinations = []
    for picked in itertools.product(*choices):
        swept = {item.partition("=")[0]: item.partition("=")[2]
                 for item, values in zip(picked, choices) if len(values) > 1}
        combinations.append(Combination(list(picked), swept))
    return combinations


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    parsed = OmegaConf.create()
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"{COMMAND_LINE}: override '{item}' is not of the form key=value")
        if item.split("=", 1)[0].strip() == "extends":
            raise ConfigError(f"{COMMAND_LINE}: '{item}': `extends` is a key of experiment files; on the command "
                              "line a preset is composed with +group=name, e.g. +trainer=gpu")
        try:
            parsed.merge_with_dotlist([_keep_hash(item)])
        except (yaml.YAMLError, OmegaConfBaseException) as error:  # an unclosed [ or {, a broken ${...}
            problem = str(error).splitlines()[0]
            raise ConfigError(f"{COMMAND_LINE}: override '{item}' does not parse: {problem}") from None
    return parsed


def _keep_hash(item: str) -> str:
    """`key=value` with a `#` in the value kept as text: YAML would read it as a comment and cut the value
    (`run.dir=/x/run #1` would train in /x/run). A quoted value is YAML's to read; in a list or mapping the
    item holding the `#` must be quoted."""
    key, value = item.split("=", 1)
    if not YAML_COMMENT.search(value) or value.lstrip()[:1] in ("'", '"'):
        return item
    if value.lstrip()[:1] in ("[", "{"):
        raise ConfigError(f"{COMMAND_LINE}: override '{item}': '#' here starts a YAML comment that would cut the "
                          f"value; quote the item that holds it")
    return f"{key}='{value.replace(chr(39), chr(39) * 2)}'"


# ---------------------------------------------------------------------------------------------
# Lightning's Trainer arguments under `trainer:`, read as ours where ours mean the same, refused with the reason
# and what to write where not. A mapping function returns (our key, value), None where the value is what this
# project always does (nothing to set), or raises `LightningFlagRefused`.

class LightningFlagRefused(ValueError):
    """A Lightning Trainer argument with no equivalent here, or a value of one that has none."""


def _ours(key: str, convert: Callable[[Any], Any] = lambda value: value) -> Callable[[Any], Tuple[str, Any]]:
    return lambda value: (key, convert(value))


def _only(reason: str, *accepted: Any) -> Callable[[Any], None]:
    """A flag whose `accepted` values are what happens here anyway; any other value is refused with `reason`."""
    def check(value: Any) -> None:
        if not any(value == ok and type(value) is type(ok) for ok in accepted):
            raise LightningFlagRefused(reason)
    return check


def _val_check_interval(value: Any) -> Tuple[str, Any]:
    if not _count(value):
        raise LightningFlagRefused("a fraction of an epoch has no equivalent: validation runs every "
                                   "trainer.val_every_n_steps steps; write trainer.val_every_n_steps=N")
    return "trainer.val_every_n_steps", value


def _limit_train_batches(value: Any) -> Tuple[str, Any] | None:
    if _count(value):
        return "data.train_samples_per_epoch", value  # batches; compose multiplies by data.batch_size
    if value == 1.0:
        return None
    raise LightningFlagRefused("a fraction of the training split: write data.train_samples_per_epoch=<samples> (an "
                               "epoch's samples over all ranks), or trainer.max_steps=N for a shorter run")


_STEPS = ("training runs exactly trainer.max_steps steps (growth stages, warm-up and checkpoints count steps; an "
          "epoch is data.train_samples_per_epoch / data.batch_size steps); write trainer.max_steps=N")
LIGHTNING_FLAGS: Dict[str, Callable[[Any], Tuple[str, Any] | None]] = {
    "gradient_clip_val": _ours("optim.grad_clip", lambda value: 0.0 if value is None else value),
    "gradient_clip_algorithm": _only("optim.grad_clip clips the global gradient norm (Lightning's 'norm'); clipping "
                                     "by value is not offered", "norm"),
    "val_check_interval": _val_check_interval,
    "limit_train_batches": _limit_train_batches,
    "enable_progress_bar": _ours("trainer.progress_bar"),
    "default_root_dir": _ours("run.dir"),
    "callbacks": _ours("callbacks"),
    "max_epochs": _only(_STEPS, None, -1),
    "min_epochs": _only(_STEPS, None),
    "min_steps": _only(_STEPS, None),
    "check_val_every_n_epoch": _only("validation is counted in steps: write trainer.val_every_n_steps=N", None),
    "num_sanity_val_steps": _only("no sanity validation runs (the config and data are checked before training); "
                                  "write trainer.val_every_n_steps=N for an early first validation", 0),
    "enable_checkpointing": _only("last.ckpt is what resume and pre-emption rely on; write "
                                  "trainer.checkpoint_every_n_steps=0 to write it only at the end (and on a stop "
                                  "signal), or trainer.fast_dev_run=N for a run that writes none", True),
    "max_time": _only("a time limit is the job's: nativetok submit --time (SLURM warns the run, which checkpoints "
                      "and requeues); locally stop with Ctrl-C and run the same command again to resume", None),
    "overfit_batches": _only("no equivalent (training reads a shuffled shard stream, validation its own split); for "
                             "a short check write trainer.fast_dev_run=N or trainer.max_steps=N", 0),
    "limit_test_batches": _only("there is no test loop: measure with nativetok eval-fid --num N", 1.0),
    "limit_predict_batches": _only("there is no predict loop: nativetok tokenize and sample do that", 1.0),
    "gpus": _only("Lightning 1.x's flag: write trainer.accelerator=gpu trainer.devices=N", None),
    "sync_batchnorm": _only("the models have no BatchNorm (LayerNorm, GroupNorm): nothing to synchronise", False),
    "use_distributed_sampler": _only("the shard stream splits the data over ranks itself; no sampler is used", True),
    "reload_dataloaders_every_n_epochs": _only("the shard stream reshuffles every epoch itself; nothing to reload", 0),
    "detect_anomaly": _only("non-finite losses are caught by the steps (the update is skipped, "
                            "trainer.max_nonfinite_steps in a row stop the run); anomaly mode is not offered", False),
    "benchmark": _only("cuDNN autotuning is not settable here; for reproducible runs write trainer.deterministic=true",
                       None),
    "inference_mode": _only("validation always runs under torch.inference_mode (Lightning's default)", True),
    "enable_model_summary": _only("the parameter counts are logged at start instead; nothing to set", True),
    "barebones": _only("not offered: checkpoints, logs and pre-emption handling are what runs rely on; time steps "
                       "with make bench", False),
    "plugins": _only("the plugins follow trainer.precision and the cluster (SLURM) by themselves; write "
                     "trainer.precision=...", None),
}


def translate_lightning_flags(layers: List[Tuple[str, DictConfig]]) -> List[Tuple[DictConfig, int]]:
    """Replace Lightning's names under `trainer:` in each layer with ours (in the same layer, so a later layer still
    wins and errors name the same source), logging each; raise one ConfigError listing every refused flag. Returns
    (layer, batches) for `limit_train_batches`, whose samples per epoch need the final data.batch_size."""
    refused, batch_counts = [], []
    for source, layer in layers:
        trainer = layer.get("trainer")
        if not isinstance(trainer, DictConfig):
            continue
        for name in [str(key) for key in trainer.keys() if key in LIGHTNING_FLAGS]:
            value = OmegaConf.to_container(trainer, resolve=False)[name]
            del trainer[name]
            try:
                mapped = LIGHTNING_FLAGS[name](value)
            except LightningFlagRefused as reason:
                refused.append(f"  {source}: trainer.{name} (a Lightning Trainer argument): {reason}")
                continue
            if mapped is None:
                continue
            key, ours = mapped
            if OmegaConf.select(layer, key, default=None) is not None:
                refused.append(f"  {source}: trainer.{name} and {key} set the same thing here; keep {key}")
            elif name == "limit_train_batches":
                batch_counts.append((layer, ours))
            else:
                OmegaConf.update(layer, key, ours, merge=False)
            log.info("%s: Lightning's trainer.%s=%r is %s here", source, name, value, key)
    if refused:
        raise ConfigError("Lightning Trainer arguments that cannot be read here:\n" + "\n".join(refused))
    return batch_counts


class LoadedConfig:
    """A validated experiment together with where each value came from."""

    def __init__(self, config: ExperimentConfig, layers: List[Tuple[str, DictConfig]]):
        self.config = config
        self.layers = layers

    def sources(self, key: str, problem: str) -> str:
        """Where `key` came from, and any other config key the problem mentions."""
        schema = OmegaConf.structured(self.config)
        others = [k for k in dict.fromkeys(KEY_PATTERN.findall(problem)) if k != key]
        others = [k for k in others if OmegaConf.select(schema, k, default=None) is not None]
        return "; ".join(f"{k} from {self.source_of(k)}" for k in [key] + others)

    def source_of(self, key: str) -> str:
        missing = object()
        for source, layer in reversed(self.layers):
            if OmegaConf.select(layer, key, default=missing, throw_on_missing=False) is not missing:
                return source
        return SCHEMA_DEFAULT


def merge_layers(schema: type, layers: List[Tuple[str, DictConfig]]) -> Any:
    """Merge (source, layer) pairs in order into a dataclass schema, resolved and typed."""
    merged = OmegaConf.structured(schema)
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except ConfigKeyError as error:
            key = error.full_key or "?"
            raise ConfigError(
                f"{source}: unknown key '{key}'{_suggest(key, getattr(error, 'object_type', None))}"
            ) from None
        except OmegaConfBaseException as error:
            section = None if error.full_key else _section_given_a_value(
                OmegaConf.to_container(layer, resolve=False), schema())
            if section:
                raise ConfigError(_section_message(source, *section, schema())) from None
            raise ConfigError(f"{source}: {error.full_key}: {_describe(error)}") from None
    try:
        OmegaConf.resolve(merged)
    except InterpolationResolutionError as error:
        raise ConfigError(f"{error.full_key}: {_describe(error)}") from None
    return OmegaConf.to_object(merged)


def _section_given_a_value(values: dict, defaults: Any, prefix: str = "") -> Tuple[str, Any] | None:
    """(key, value) for the first key of a layer (as a plain dict) that the schema (`defaults`, an instance) has
    as a section of keys but the layer gives a plain value (`optim: adam`): OmegaConf's error names no key there."""
    for key, value in values.items():
        default = getattr(defaults, str(key), None)
        if not is_dataclass(default):
            continue
        if not isinstance(value, dict):
            return f"{prefix}{key}", value
        found = _section_given_a_value(value, default, f"{prefix}{key}.")
        if found:
            return found
    return None


def _section_message(source: str, section: str, value: Any, defaults: Any) -> str:
    """What to write instead of a value for a section: one of its keys, or a preset when the section is a group."""
    node = defaults
    for part in section.split("."):
        node = getattr(node, part)
    groups = preset_groups()
    preset = (f", or choose a preset of experiments/{section}/ with {section}=<name> ({', '.join(groups[section])})"
              if section in groups else "")
    return (f"{source}: '{section}' is a section of keys, not a value ({value!r}): set its keys, e.g. "
            f"{section}.{fields(node)[0].name}=...{preset}")


def compose(path: str | os.PathLike, overrides: Sequence[str] = ()) -> LoadedConfig:
    """Merge the experiment file (with its parents), the presets (`group=name`) and the `key=value` overrides,
    in that order, into the typed schema; Lightning's names for trainer settings are read as ours first."""
    presets, values = split_presets(overrides)
    layers = _read_yaml(resolve_experiment(path))
    for preset in presets:
        layers += _read_yaml(preset)
    layers.append((COMMAND_LINE, parse_overrides(values)))
    batch_counts = translate_lightning_flags(layers)
    if batch_counts:  # trainer.limit_train_batches: N batches of the batch size the merged config ends with
        batch_size = merge_layers(ExperimentConfig, layers).data.batch_size
        for layer, batches in batch_counts:
            OmegaConf.update(layer, "data.train_samples_per_epoch", batches * batch_size)
    return LoadedConfig(merge_layers(ExperimentConfig, layers), layers)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The experiment at `path` (or named so) with `+group=name` and `key=value` overrides, checked; raises
    ConfigError naming the key."""
    loaded = compose(path, overrides)
    problems = list(check_values(loaded.config))
    if problems:
        lines = [f"  {key}: {problem} ({loaded.sources(key, problem)})" for key, problem in problems]
        raise ConfigError("invalid config:\n" + "\n".join(lines))
    return loaded.config


def load_preset(path: str | os.PathLike) -> ComparePreset:
    """A comparison preset (experiments/compare/*.yaml), checked like an experiment."""
    preset = merge_layers(ComparePreset, _read_yaml(Path(path)))
    problems = []
    if not preset.seeds or len(set(preset.seeds)) != len(preset.seeds):
        problems.append(f"seeds: needs distinct seeds, got {list(preset.seeds)}")
    if not preset.arms:
        problems.append("arms: names no arm")
    for name, arm in preset.arms.items():
        if arm.tokenizer not in preset.tokenizers:
            problems.append(f"arms.{name}.tokenizer: '{arm.tokenizer}' is not one of the tokenizers "
                            f"{sorted(preset.tokenizers)}")
        if arm.order not in TOKEN_ORDERS:
            problems.append(f"arms.{name}.order: '{arm.order}' is not one of {', '.join(TOKEN_ORDERS)}")
    for name, reference in preset.match_parameters.items():
        if name not in preset.tokenizers or reference not in preset.tokenizers:
            problems.append(f"match_parameters.{name}: '{name}' and '{reference}' must both be tokenizers")
    problems += [f"{name}: needs at least 2 images, got {getattr(preset, name)}"
                 for name in ("generator_images", "selection_images", "evaluation_images", "samples")
                 if getattr(preset, name) < 2]
    if preset.inception_images < 0:
        problems.append(f"inception_images: must be >= 0, got {preset.inception_images}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return preset


def load_ablation(path: str | os.PathLike) -> AblationPreset:
    """An ablation preset (experiments/ablation/*.yaml); every variant's config is checked before any training."""
    preset = merge_layers(AblationPreset, _read_yaml(Path(path)))
    problems = []
    if not preset.variants:
        problems.append("variants: no variant to run")
    if preset.reference not in preset.variants:
        problems.append(f"reference: '{preset.reference}' is not one of the variants {', '.join(preset.variants)}")
    if not preset.seeds or len(set(preset.seeds)) != len(preset.seeds):
        problems.append(f"seeds: needs distinct seeds, got {list(preset.seeds)}")
    if preset.images < 1:
        problems.append(f"images: needs at least 1 image, got {preset.images}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    for name, overrides in preset.variants.items():
        try:
            load_config(Path(path).parent / preset.experiment, [*preset.common, *overrides])
        except ConfigError as error:
            raise ConfigError(f"{path}: variant '{name}': {error}") from None
    return preset


def to_yaml(config: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def from_container(container: dict) -> ExperimentConfig:
    """Rebuild a config saved inside a checkpoint or an export (no file, no overrides), checked like the command
    line's (`check_stored_values`): a shared file's config is as untrusted as a typed one. A key this version
    does not know (a checkpoint of another version) or a value the checks refuse is a ConfigError naming it."""
    if not isinstance(container, dict):
        raise ConfigError(f"{SAVED_CONFIG}: not a mapping of keys but {type(container).__name__}")
    if STORED_NEVER in container:  # never written by `to_container`: a crafted file; its classes are not imported
        log.warning("%s: ignoring its `%s` (callbacks come only from your own experiment file or command line)",
                    SAVED_CONFIG, STORED_NEVER)
        container = {key: value for key, value in container.items() if key != STORED_NEVER}
    config = merge_layers(ExperimentConfig, [(SAVED_CONFIG, OmegaConf.create(container))])
    problems = list(check_stored_values(config))
    if problems:
        lines = [f"  {key}: {problem}" for key, problem in problems]
        raise ConfigError(f"{SAVED_CONFIG} is invalid:\n" + "\n".join(lines))
    return config


def to_container(config: ExperimentConfig) -> dict:
    """The config as checkpoints and exports store it: without `callbacks`, which name code to import and are
    honoured only from the user's own experiment file or command line (a resume may add or drop them freely)."""
    container = OmegaConf.to_container(OmegaConf.structured(config))
    del container[STORED_NEVER]
    return container


# ---------------------------------------------------------------------------------------------
# Value checks: each yields (key, problem).

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
    if t.cuda_graphs and t.accelerator == "cpu":
        yield "trainer.cuda_graphs", "needs a CUDA device (trainer.accelerator gpu or auto)"
    if t.cuda_graphs and c.stage != "tokenizer":
        yield "trainer.cuda_graphs", "captures the stage-1 encoder; stage 2 training does not use it"
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


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _trainer_debugging(c: ExperimentConfig) -> Check:
    """Lightning's debugging flags, checked here so that a bad one stops before the run starts."""
    t = c.trainer
    if not (isinstance(t.fast_dev_run, bool) or _count(t.fast_dev_run)):
        yield "trainer.fast_dev_run", f"must be true, false or a batch count >= 0; got {t.fast_dev_run!r}"
    limit = t.limit_val_batches
    if not (_count(limit) or (isinstance(limit, float) and 0.0 <= limit <= 1.0)):
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
