"""Load an experiment: YAML files composed with `extends`, `key=value` overrides and the schema; the value
checks of `checks.py` run on every config composed here or read back from a checkpoint or an export.

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
import itertools
import logging
import os
import re
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException

from nativetok.config.checks import ConfigError, check_stored_values, check_values, is_count
from nativetok.config.schema import (
    TOKEN_ORDERS,
    AblationPreset,
    ComparePreset,
    ExperimentConfig,
)

COMMAND_LINE = "command line"
KEY_PATTERN = re.compile(r"\b[a-z_]+(?:\.[a-z_0-9]+)+\b")
SCHEMA_DEFAULT = "schema default"
SAVED_CONFIG = "the config saved in the checkpoint"
# The key a stored config (checkpoint, export) never holds and from_container never reads: it names code to import.
STORED_NEVER = "callbacks"
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
    if not is_count(value):
        raise LightningFlagRefused("a fraction of an epoch has no equivalent: validation runs every "
                                   "trainer.val_every_n_steps steps; write trainer.val_every_n_steps=N")
    return "trainer.val_every_n_steps", value


def _limit_train_batches(value: Any) -> Tuple[str, Any] | None:
    if is_count(value):
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
    for pair in preset.paired:
        if len(pair) != 2 or not set(pair) <= set(preset.arms):
            problems.append(f"paired: {list(pair)} must name two of the arms {sorted(preset.arms)}")
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
