"""Loading trained models from Lightning checkpoints without Lightning, and naming them by content.

A generator decodes with the tokenizer that made its tokens; a path alone does not say which one that is
(a retrained checkpoint at the same path, another working directory), so training pins the tokenizer by
sha256 and records where to find it from anywhere: an absolute path and one relative to the run folder.

Every loader here also takes a folder written by `nativetok export` (model.safetensors, config.json), or a
Hugging Face Hub repo id (`owner/name`, at a `revision`: branch, tag or commit), whose snapshot is downloaded
as `from_pretrained` does and then read exactly as an exported folder: the same checks, no other path. An
exported folder is named by the sha256 of the checkpoint it was exported from, once its weights are checked
against the sha256 recorded beside them: it holds the weights the loaders take from that checkpoint (the
moving average when there is one), so a generator pinned to a tokenizer checkpoint decodes with that
tokenizer's export, and token shards made with either match. Weights replaced or damaged after export are
refused.

A checkpoint or export may come from anyone: its stored config passes the command line's checks, its
shapes are compared with its weights on the meta device before a module is allocated, a pin is matched
against the bytes of the tokenizer's weights (never a sha256 an export's config.json claims), an export's
bundled tokenizer is looked for inside the export only, and its stored `data.index` is never read unless
the user names that data (`named_data`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file

from nativetok.config.checks import ConfigError
from nativetok.config.loading import from_container
from nativetok.config.schema import ExperimentConfig, GeneratorConfig
from nativetok.models import Generator, NativeTokenizer, build_generator, build_tokenizer

log = logging.getLogger(__name__)


KINDS = ("tokenizer", "generator")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FOLDER = "tokenizer"  # where a generator's export bundles its tokenizer
EXPORT_FORMAT = 1
# Config fields that size a module: each is at most the largest dimension or the tensor count of its weights.
SIZE_FIELDS = ("width", "depth", "heads", "mlp_ratio", "num_tokens", "codebook_size", "code_dim", "latent_width",
               "patch_size", "channels", "layers", "num_classes")
# owner/name as the Hub spells repo ids; a name ending in .ckpt is a missing file, not a repo.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?<!\.ckpt)$")
# What a loader downloads from a Hub repo: the files an export's loaders read, never a pickle or anything else.
HUB_FILES = (CONFIG_FILE, WEIGHTS_FILE, f"{TOKENIZER_FOLDER}/{CONFIG_FILE}", f"{TOKENIZER_FOLDER}/{WEIGHTS_FILE}")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another kind than asked for."""


def local_model_path(path: Optional[str | os.PathLike], revision: Optional[str] = None) -> Optional[Path]:
    """`path` itself when it exists or cannot be a Hub repo id; else the local snapshot of Hugging Face Hub repo
    `path` at `revision` (a branch, tag or commit; None: main), downloaded or taken from the Hub's cache as
    `from_pretrained` does, with only the files a loader reads (`HUB_FILES`). Callers that read the model more
    than once (load it, then hash it for a manifest) resolve it once, so that every step reads one commit.
    No model (None) stays None; a revision without one is refused."""
    if path is None:
        if revision is not None:
            raise CheckpointError(f"revision {revision} is given without the model it is a revision of")
        return None
    local = Path(path)
    if local.exists() or not HUB_ID.match(str(path)):
        if revision is not None:
            raise CheckpointError(f"revision {revision} names a version of a Hugging Face Hub repo, but {path} is "
                                  f"{'a path here' if local.exists() else 'no repo id (owner/name)'}")
        return local
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"checkpoint not found: {path} (to read it as a Hugging Face Hub repo id, "
                              f"pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id=str(path), revision=revision, allow_patterns=list(HUB_FILES)))
    except Exception as error:
        at = f" at revision {revision}" if revision is not None else ""
        raise CheckpointError(f"checkpoint not found: {path} is neither a file or folder here nor a Hugging Face "
                              f"Hub repo that could be downloaded{at} ({type(error).__name__}: {error})") from None


def is_export(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def read_checkpoint(path: str | os.PathLike, kind: Optional[str], map_location="cpu",
                    revision: Optional[str] = None) -> dict:
    """The checkpoint dict, after checking that it is a NativeTok checkpoint of `kind` (None: either kind).
    An exported folder or Hub repo id (at `revision`) gives the same dict, with only the exported weights in it."""
    path = local_model_path(path, revision)
    if path.is_dir():
        return read_export(path, kind)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    found = checkpoint.get("nativetok", {}).get("kind") if isinstance(checkpoint, dict) else None
    if found not in KINDS or found != (kind or found):
        raise CheckpointError(f"{path} is {f'a {found}' if found else 'not a NativeTok'} checkpoint"
                              + (f", not a {kind}" if kind else ""))
    if "state_dict" not in checkpoint or "config" not in checkpoint.get("hyper_parameters", {}):
        raise CheckpointError(f"{path}: a {kind} checkpoint without its weights or config (state_dict, "
                              "hyper_parameters.config): damaged or not written by `nativetok train`")
    checked_config(checkpoint["hyper_parameters"]["config"], path)
    return checkpoint


def checked_config(container: dict, path: str | os.PathLike) -> ExperimentConfig:
    """The config stored in the checkpoint or export at `path`, through the command line's checks."""
    try:
        return from_container(container)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None


def named_data(data: Optional[str], checkpoint_path: str | os.PathLike, option: str = "--data") -> str:
    """The data index the user named. The `data.index` stored in a checkpoint or export is never read on its own:
    a shared file would choose what this machine reads (a URL, a command, any file)."""
    if data:
        return data
    stored = checked_config(read_checkpoint(checkpoint_path, None)["hyper_parameters"]["config"],
                            checkpoint_path).data.index
    raise CheckpointError(f"{option} is needed: the data.index stored in {checkpoint_path} ('{stored}') is not read "
                          f"unless you name it ({option} {stored} if you trust it)")


def export_metadata(folder: str | os.PathLike) -> Tuple[dict, dict]:
    """(the `nativetok` section, the experiment config) of an exported folder's config.json."""
    path = Path(folder) / CONFIG_FILE
    try:
        body = json.loads(path.read_text())
        meta, config = body["nativetok"], body["config"]
        newer = meta["format"] > EXPORT_FORMAT
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder} is not a `nativetok export` folder ({path}: {type(error).__name__}: "
                              f"{error})") from None
    if newer:
        raise CheckpointError(f"{path}: export format {meta['format']} is newer than this version reads "
                              f"({EXPORT_FORMAT}): upgrade nativetok")
    return meta, config


def export_sha256(folder: str | os.PathLike) -> str:
    """The name of an exported folder: the sha256 of the checkpoint it was exported from, once its weights
    file is found to be the one exported (its sha256 is recorded in config.json)."""
    meta, _ = export_metadata(folder)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: an export without its weights ({WEIGHTS_FILE})")
    found = file_sha256(weights)
    if found != meta["weights"]["sha256"]:
        raise CheckpointError(f"{weights} has sha256 {found[:12]} but {CONFIG_FILE} records "
                              f"{meta['weights']['sha256'][:12]}: the weights were replaced or damaged since "
                              f"export; export the checkpoint again")
    return meta["source"]["sha256"]


def read_export(folder: Path, kind: Optional[str]) -> dict:
    """An exported folder as `read_checkpoint`'s dict: config, pin, and the weights under the name the
    checkpoint had them (ema.shadow. for a moving average), checked against their sha256 first."""
    meta, config = export_metadata(folder)
    found = meta.get("kind")
    if found not in KINDS or found != (kind or found):
        raise CheckpointError(f"{folder} is {f'an exported {found}' if found else 'not a NativeTok export'}"
                              + (f", not a {kind}" if kind else ""))
    checked_config(config, folder / CONFIG_FILE)
    export_sha256(folder)
    try:
        weights = load_file(folder / WEIGHTS_FILE)
    except Exception as error:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: not readable ({type(error).__name__}: {error})") from None
    prefix = "ema.shadow." if meta["weights"]["ema"] else f"{found}."
    state = {prefix + k: v for k, v in {**weights, **meta.get("extra_state", {})}.items()}
    return {"state_dict": state, "hyper_parameters": {"config": config}, "global_step": meta["source"]["global_step"],
            "nativetok": {k: meta[k] for k in ("kind", "version", "tokenizer", "classes") if k in meta}}


def module_state(checkpoint: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def weights_state(checkpoint: dict, name: str, ema: bool) -> dict:
    """The moving average (when there is one and `ema` is set), else the trained weights."""
    state = (module_state(checkpoint, "ema.shadow.") if ema else {}) or module_state(checkpoint, f"{name}.")
    if not state:
        raise CheckpointError(f"this {name} holds only its moving-average weights (an export): load it with ema=True")
    return state


def config_sizes(section, prefix: str) -> Dict[str, float]:
    """key -> value of every field of a config section (and its subsections) that sizes a module."""
    sizes: Dict[str, float] = {}
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            sizes.update(config_sizes(value, f"{prefix}.{f.name}"))
        elif f.name in SIZE_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
            sizes[f"{prefix}.{f.name}"] = value
    return sizes


def build_to_fit(build: Callable[[], torch.nn.Module], sizes: Dict[str, float], state: dict,
                 name: str) -> torch.nn.Module:
    """The module `build` makes, with `state` loaded, built only once a skeleton of it on the meta device (no
    memory) has the weights' names and shapes. A config that does not fit its weights (num_tokens=1e9 beside
    16 experts) is a CheckpointError before anything is allocated; no size may exceed the largest dimension or
    the tensor count of the weights, so that even the skeleton stays small."""
    tensors = [value for value in state.values() if torch.is_tensor(value)]
    bound = max([len(tensors), *(max(t.shape, default=1) for t in tensors)])
    oversized = [f"{key} {value:g}" for key, value in sizes.items() if value > bound]
    if oversized:
        raise CheckpointError(f"the {name}'s weights do not fit its config: {', '.join(oversized)} exceed every "
                              f"size in its weights (largest dimension or tensor count {bound})")
    with torch.device("meta"):
        expected = build().state_dict()
    problems = [f"missing {k}" for k in sorted(expected.keys() - state.keys())]
    problems += [f"unexpected {k}" for k in sorted(state.keys() - expected.keys())]
    problems += [f"{k} is {list(state[k].shape)}, the config builds {list(expected[k].shape)}"
                 for k in sorted(expected.keys() & state.keys())
                 if torch.is_tensor(state[k]) and state[k].shape != expected[k].shape]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise CheckpointError(f"the {name}'s weights do not fit its config: {shown}")
    model = build()
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"the {name}'s weights do not fit its config: {error}") from None
    return model


def tokenizer_config(path: str | os.PathLike) -> ExperimentConfig:
    """The experiment a tokenizer checkpoint was trained with (its data, sizes)."""
    return from_container(read_checkpoint(path, "tokenizer")["hyper_parameters"]["config"])


def file_sha256(path: str | os.PathLike) -> str:
    """The content hash that names a checkpoint (or any input) in pins and manifests; for an exported folder,
    that of the checkpoint it was exported from (`export_sha256`)."""
    if Path(path).is_dir():
        return export_sha256(path)
    return bytes_sha256(path)


def bytes_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = True,
                   revision: Optional[str] = None, fits: Optional[GeneratorConfig] = None) -> NativeTokenizer:
    """A trained tokenizer in eval mode (its moving-average weights when it has them and `ema` is set), from a
    checkpoint, an export, or a Hub repo id at `revision`; with `fits`, refused unless its codebook and token
    count are that generator's (the tokenizer a generator decodes with)."""
    path = local_model_path(path, revision)
    tokenizer = tokenizer_from_checkpoint(read_checkpoint(path, "tokenizer"), device, ema)
    tokenizer.loaded_from = path
    for name, found in (("codebook_size", tokenizer.quantizer.codebook_size), ("num_tokens", tokenizer.num_active)):
        expected = getattr(fits, name, None)
        if expected is not None and found != expected:
            raise CheckpointError(f"tokenizer {path} has {name} {found} but the generator expects {expected}")
    return tokenizer


def with_tokenizer_sizes(config: ExperimentConfig) -> ExperimentConfig:
    """A generator experiment whose generator.codebook_size and num_tokens are filled in from generator.tokenizer
    where it leaves them out: the sizes are the tokenizer's, said once. Sizes given are kept (`load_tokenizer`
    with `fits` refuses a tokenizer without them), and then the tokenizer is not read here."""
    g = config.generator
    if g.codebook_size is not None and g.num_tokens is not None:
        return config
    if not Path(g.tokenizer).exists() and not HUB_ID.match(str(g.tokenizer)):
        raise ConfigError(f"generator.codebook_size and generator.num_tokens are left out, so they are read from "
                          f"generator.tokenizer, but {g.tokenizer} is not found: train the tokenizer first, point "
                          f"generator.tokenizer at it, or give both sizes")
    tokenizer = load_tokenizer(g.tokenizer)
    read = {"codebook_size": tokenizer.quantizer.codebook_size, "num_tokens": tokenizer.num_active}
    return replace(config, generator=replace(g, **{name: value for name, value in read.items()
                                                   if getattr(g, name) is None}))


def tokenizer_from_checkpoint(
    checkpoint: dict, device: str | torch.device = "cpu", ema: bool = True
) -> NativeTokenizer:
    """`load_tokenizer` for a checkpoint already read (by a caller that also needs its step)."""
    config = from_container(checkpoint["hyper_parameters"]["config"])
    sizes = {**config_sizes(config.tokenizer, "tokenizer"), "data.channels": config.data.channels,
             "patches of data.image_size": (config.data.image_size // config.tokenizer.patch_size) ** 2}
    tokenizer = build_to_fit(lambda: build_tokenizer(config.tokenizer, config.data.image_size, config.data.channels),
                             sizes, weights_state(checkpoint, "tokenizer", ema), "tokenizer")
    tokenizer.experiment_config = config
    return tokenizer.to(device).eval()


def generator_config(path: str | os.PathLike) -> ExperimentConfig:
    """The experiment a generator checkpoint was trained with (its tokenizer, sizes, sampling defaults)."""
    return from_container(read_checkpoint(path, "generator")["hyper_parameters"]["config"])


def load_generator(
    path: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = True, revision: Optional[str] = None
) -> Generator:
    """A trained generator in eval mode (its moving-average weights when it has them and `ema` is set), from a
    checkpoint, an export, or a Hub repo id at `revision`."""
    path = local_model_path(path, revision)
    generator = generator_from_checkpoint(read_checkpoint(path, "generator"), device, ema)
    generator.loaded_from = path
    return generator


def generator_from_checkpoint(
    checkpoint: dict, device: str | torch.device = "cpu", ema: bool = True
) -> Generator:
    """`load_generator` for a checkpoint already read (by a caller that also needs its config and pin)."""
    config = from_container(checkpoint["hyper_parameters"]["config"])
    sizes = {**config_sizes(config.generator, "generator"), "data.num_classes": config.data.num_classes}
    generator = build_to_fit(lambda: build_generator(config.generator, config.data.num_classes), sizes,
                             weights_state(checkpoint, "generator", ema), "generator")
    generator.experiment_config = config
    return generator.to(device).eval()


def weights_sha256(folder: str | os.PathLike) -> str:
    """The sha256 of an export's weights file as it is on disk: what a pin checks an exported tokenizer by
    (the checkpoint sha256 in its config.json is a claim anyone can copy)."""
    export_sha256(folder)  # an export whose weights are not those recorded at export is refused first
    return bytes_sha256(Path(folder) / WEIGHTS_FILE)


def tokenizer_pin(path: str | os.PathLike, run_dir: str | os.PathLike) -> dict:
    """What a generator stores about its tokenizer: the sha256 of the file (for an export, of the checkpoint it
    came from, and `weights_sha256` of its weights' bytes), and paths that resolve from any working directory
    (absolute, and relative to the generator's run folder, for a moved tree)."""
    absolute = Path(path).resolve()
    pin = {
        "sha256": file_sha256(absolute),
        "path": str(absolute),
        "run_path": os.path.relpath(absolute, Path(run_dir).resolve()),
    }
    if is_export(absolute):
        pin["weights_sha256"] = weights_sha256(absolute)
    return pin


def bundled_tokenizer(export: Path, relative: str) -> Path:
    """The tokenizer a generator's export names (`relative`, from its config.json), refused unless it is inside
    the export: an export's files never reach outside it."""
    folder = export.resolve()
    path = (folder / relative).resolve()
    if path == folder or folder not in path.parents:
        raise CheckpointError(f"{export / CONFIG_FILE}: its tokenizer '{relative}' is outside the export; refused "
                              f"(give the tokenizer with --tokenizer)")
    return path


def pin_matches(pin: dict, path: Path) -> Tuple[bool, str]:
    """(whether the tokenizer at `path` is the pinned one, the hash compared): a checkpoint file by its bytes'
    sha256, an export by its weights' bytes against the pin's weights_sha256 (a pin without one, made from a
    checkpoint file, cannot vouch for an export)."""
    if not is_export(path):
        found = bytes_sha256(path)
        return found == pin["sha256"], f"sha256 {found[:12]}"
    found = weights_sha256(path)
    return found == pin.get("weights_sha256"), f"weights sha256 {found[:12]}"


def run_folder_of(checkpoint_path: str | os.PathLike) -> Path:
    """The run folder of a checkpoint: the parent of its `checkpoints/` folder, else its own folder; an exported
    folder is its own (its pin's run_path names the tokenizer bundled in it)."""
    if Path(checkpoint_path).is_dir():
        return Path(checkpoint_path).resolve()
    folder = Path(checkpoint_path).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def pinned_tokenizer(
    generator_path: str | os.PathLike, checkpoint: dict, tokenizer_path: Optional[str] = None,
    mismatch_ok: bool = False,
) -> Tuple[Path, str]:
    """(path, sha256) of the tokenizer a generator decodes with: `tokenizer_path` if given, else the pinned
    file, found by its absolute path or relative to the generator's run folder (for an export: only the
    tokenizer bundled inside it). A tokenizer whose bytes are not the pinned ones (a retrained tokenizer at
    the same path, another export claiming the pinned sha256) is refused unless `mismatch_ok`."""
    pin = checkpoint.get("nativetok", {}).get("tokenizer")
    export = Path(generator_path).is_dir()
    if tokenizer_path:
        candidates = [Path(tokenizer_path)]
    elif export:
        candidates = [bundled_tokenizer(Path(generator_path), pin["run_path"] if pin else TOKENIZER_FOLDER)]
    elif pin:
        candidates = [Path(pin["path"]), run_folder_of(generator_path) / pin["run_path"]]
    else:  # trained before generators pinned their tokenizer: the configured path, as it was
        candidates = [Path(from_container(checkpoint["hyper_parameters"]["config"]).generator.tokenizer)]
    found = [c for c in dict.fromkeys(c.resolve() for c in candidates) if c.is_file() or is_export(c)]
    if not found:
        raise CheckpointError(
            f"the tokenizer of generator {generator_path} is not found (looked at {', '.join(map(str, candidates))}); "
            f"give it with --tokenizer"
        )
    if not pin:
        log.warning("generator %s does not pin its tokenizer (trained before pins): decoding with %s, unchecked",
                    generator_path, found[0])
        return found[0], file_sha256(found[0])
    checked = {path: pin_matches(pin, path) for path in found}
    match = next((path for path, (same, _) in checked.items() if same), None)
    if match is not None:
        return match, pin["sha256"]
    wanted = f"sha256 {pin['sha256'][:12]}" + (f", weights sha256 {pin['weights_sha256'][:12]}"
                                                if pin.get("weights_sha256") else "")
    message = (
        f"tokenizer {found[0]} has {checked[found[0]][1]} but generator {generator_path} was trained with "
        f"{wanted} ({pin['path']}): its samples would be decoded by another tokenizer"
    )
    if is_export(found[0]) and not pin.get("weights_sha256"):
        message += " (an export's weights cannot be checked against a checkpoint file's sha256: give that file)"
    if not mismatch_ok:
        raise CheckpointError(message + "; pass --tokenizer-mismatch-ok to use it anyway")
    log.warning("%s (--tokenizer-mismatch-ok)", message)
    return found[0], file_sha256(found[0])


def load_generator_tokenizer(
    generator_path: str | os.PathLike, device: str | torch.device = "cpu", tokenizer_path: Optional[str] = None,
    mismatch_ok: bool = False, revision: Optional[str] = None,
) -> Tuple[NativeTokenizer, Path]:
    """The pinned tokenizer of a generator (see `pinned_tokenizer`; a Hub repo's is the one bundled in the
    snapshot at `revision`), checked for its sizes, and its path."""
    generator_path = local_model_path(generator_path, revision)
    checkpoint = read_checkpoint(generator_path, "generator")
    path, _ = pinned_tokenizer(generator_path, checkpoint, tokenizer_path, mismatch_ok)
    g = from_container(checkpoint["hyper_parameters"]["config"]).generator
    return load_tokenizer(path, device, fits=g), path
