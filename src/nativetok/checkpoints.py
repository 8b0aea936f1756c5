"""Loading trained models from Lightning checkpoints without Lightning, and naming them by content.

A generator decodes with the tokenizer that made its tokens; a path alone does not say which one that is
(a retrained checkpoint at the same path, another working directory), so training pins the tokenizer by
sha256 and records where to find it from anywhere: an absolute path and one relative to the run folder.

Every loader here also takes a folder written by `nativetok export` (model.safetensors, config.json), or a
Hugging Face Hub repo id (`owner/name`, downloaded as `from_pretrained` does). An exported folder is named by
the sha256 of the checkpoint it was exported from, once its weights are checked against the sha256 recorded
beside them: it holds the weights the loaders take from that checkpoint (the moving average when there is
one), so a generator pinned to a tokenizer checkpoint decodes with that tokenizer's export, and token shards
made with either match. Weights replaced or damaged after export are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Optional, Tuple

import torch

from nativetok.config.loading import from_container
from nativetok.config.schema import ExperimentConfig
from nativetok.models import Generator, NativeTokenizer, build_generator, build_tokenizer

log = logging.getLogger(__name__)


KINDS = ("tokenizer", "generator")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_FORMAT = 1
# owner/name as the Hub spells repo ids; a name ending in .ckpt is a missing file, not a repo.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?<!\.ckpt)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another kind than asked for."""


def local_model_path(path: str | os.PathLike) -> Path:
    """`path` itself when it exists or cannot be a Hub repo id; else the local snapshot of Hugging Face Hub repo
    `path` (downloaded, or taken from the Hub's cache, as `from_pretrained` does)."""
    local = Path(path)
    if local.exists() or not HUB_ID.match(str(path)):
        return local
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"checkpoint not found: {path} (to read it as a Hugging Face Hub repo id, "
                              f"pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id=str(path)))
    except Exception as error:
        raise CheckpointError(f"checkpoint not found: {path} is neither a file or folder here nor a Hugging Face "
                              f"Hub repo that could be downloaded ({type(error).__name__}: {error})") from None


def is_export(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def read_checkpoint(path: str | os.PathLike, kind: Optional[str], map_location="cpu") -> dict:
    """The checkpoint dict, after checking that it is a NativeTok checkpoint of `kind` (None: either kind).
    An exported folder or Hub repo id gives the same dict, with only the exported weights in it."""
    path = local_model_path(path)
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
    return checkpoint


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
    export_sha256(folder)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{folder}: reading exported weights needs safetensors: pip install safetensors") \
            from None
    try:
        weights = load_file(folder / WEIGHTS_FILE)
    except Exception as error:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: not readable ({type(error).__name__}: {error})") from None
    prefix = "ema.shadow." if meta["weights"]["ema"] else f"{found}."
    state = {prefix + k: v for k, v in {**weights, **meta.get("extra_state", {})}.items()}
    return {"state_dict": state, "hyper_parameters": {"config": config}, "global_step": meta["source"]["global_step"],
            "nativetok": {k: meta[k] for k in ("kind", "version", "tokenizer") if k in meta}}


def module_state(checkpoint: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def load_weights(model: torch.nn.Module, checkpoint: dict, name: str, ema: bool) -> None:
    """The moving average (when there is one and `ema` is set), else the trained weights; weights that do not
    fit the model the config builds (names, shapes) are a CheckpointError."""
    state = (module_state(checkpoint, "ema.shadow.") if ema else {}) or module_state(checkpoint, f"{name}.")
    if not state:
        raise CheckpointError(f"this {name} holds only its moving-average weights (an export): load it with ema=True")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"the {name}'s weights do not fit its config: {error}") from None


def tokenizer_config(path: str | os.PathLike) -> ExperimentConfig:
    """The experiment a tokenizer checkpoint was trained with (its data, sizes)."""
    return from_container(read_checkpoint(path, "tokenizer")["hyper_parameters"]["config"])


def file_sha256(path: str | os.PathLike) -> str:
    """The content hash that names a checkpoint (or any input) in pins and manifests; for an exported folder,
    that of the checkpoint it was exported from (`export_sha256`)."""
    if Path(path).is_dir():
        return export_sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = True) -> NativeTokenizer:
    """A trained tokenizer in eval mode (its moving-average weights when it has them and `ema` is set)."""
    return tokenizer_from_checkpoint(read_checkpoint(path, "tokenizer"), device, ema)


def tokenizer_from_checkpoint(
    checkpoint: dict, device: str | torch.device = "cpu", ema: bool = True
) -> NativeTokenizer:
    """`load_tokenizer` for a checkpoint already read (by a caller that also needs its step)."""
    config = from_container(checkpoint["hyper_parameters"]["config"])
    tokenizer = build_tokenizer(config.tokenizer, config.data.image_size, config.data.channels)
    load_weights(tokenizer, checkpoint, "tokenizer", ema)
    return tokenizer.to(device).eval()


def load_matching_tokenizer(
    path: str | os.PathLike, codebook_size: int, num_tokens: int, device: str | torch.device = "cpu"
) -> NativeTokenizer:
    """The tokenizer a generator decodes with, refused when its codebook or token count differ."""
    tokenizer = load_tokenizer(path, device)
    for name, found, expected in (
        ("codebook_size", tokenizer.quantizer.codebook_size, codebook_size),
        ("num_tokens", tokenizer.num_active, num_tokens),
    ):
        if found != expected:
            raise CheckpointError(f"tokenizer {path} has {name} {found} but the generator expects {expected}")
    return tokenizer


def generator_config(path: str | os.PathLike) -> ExperimentConfig:
    """The experiment a generator checkpoint was trained with (its tokenizer, sizes, sampling defaults)."""
    return from_container(read_checkpoint(path, "generator")["hyper_parameters"]["config"])


def load_generator(
    path: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = True
) -> Generator:
    """A trained generator in eval mode (its moving-average weights when it has them and `ema` is set)."""
    return generator_from_checkpoint(read_checkpoint(path, "generator"), device, ema)


def generator_from_checkpoint(
    checkpoint: dict, device: str | torch.device = "cpu", ema: bool = True
) -> Generator:
    """`load_generator` for a checkpoint already read (by a caller that also needs its config and pin)."""
    config = from_container(checkpoint["hyper_parameters"]["config"])
    generator = build_generator(config.generator, config.data.num_classes)
    load_weights(generator, checkpoint, "generator", ema)
    return generator.to(device).eval()


def tokenizer_pin(path: str | os.PathLike, run_dir: str | os.PathLike) -> dict:
    """What a generator stores about its tokenizer: the sha256 of the file, and paths that resolve from any
    working directory (absolute, and relative to the generator's run folder, for a moved tree)."""
    absolute = Path(path).resolve()
    return {
        "sha256": file_sha256(absolute),
        "path": str(absolute),
        "run_path": os.path.relpath(absolute, Path(run_dir).resolve()),
    }


def run_folder(checkpoint_path: str | os.PathLike) -> Path:
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
    file, found by its absolute path or relative to the generator's run folder. A file whose sha256 is not
    the pinned one (a retrained tokenizer at the same path) is refused unless `mismatch_ok`."""
    pin = checkpoint.get("nativetok", {}).get("tokenizer")
    if tokenizer_path:
        candidates = [Path(tokenizer_path)]
    elif pin:
        candidates = [Path(pin["path"]), run_folder(generator_path) / pin["run_path"]]
        if Path(generator_path).is_dir():  # an export: the tokenizer bundled in it first
            candidates.reverse()
    else:  # trained before generators pinned their tokenizer: the configured path, as it was
        candidates = [Path(from_container(checkpoint["hyper_parameters"]["config"]).generator.tokenizer)]
    found = [c for c in dict.fromkeys(c.resolve() for c in candidates) if c.is_file() or is_export(c)]
    if not found:
        raise CheckpointError(
            f"the tokenizer of generator {generator_path} is not found (looked at {', '.join(map(str, candidates))}); "
            f"give it with --tokenizer"
        )
    hashes = {path: file_sha256(path) for path in found}
    if not pin:
        log.warning("generator %s does not pin its tokenizer (trained before pins): decoding with %s, unchecked",
                    generator_path, found[0])
        return found[0], hashes[found[0]]
    match = next((path for path, sha in hashes.items() if sha == pin["sha256"]), None)
    if match is not None:
        return match, pin["sha256"]
    message = (
        f"tokenizer {found[0]} has sha256 {hashes[found[0]][:12]} but generator {generator_path} was trained with "
        f"sha256 {pin['sha256'][:12]} ({pin['path']}): its samples would be decoded by another tokenizer"
    )
    if not mismatch_ok:
        raise CheckpointError(message + "; pass --tokenizer-mismatch-ok to use it anyway")
    log.warning("%s (--tokenizer-mismatch-ok)", message)
    return found[0], hashes[found[0]]


def load_generator_tokenizer(
    generator_path: str | os.PathLike, device: str | torch.device = "cpu", tokenizer_path: Optional[str] = None,
    mismatch_ok: bool = False,
) -> Tuple[NativeTokenizer, Path]:
    """The pinned tokenizer of a generator (see `pinned_tokenizer`), checked for its sizes, and its path."""
    generator_path = local_model_path(generator_path)
    checkpoint = read_checkpoint(generator_path, "generator")
    path, _ = pinned_tokenizer(generator_path, checkpoint, tokenizer_path, mismatch_ok)
    g = from_container(checkpoint["hyper_parameters"]["config"]).generator
    return load_matching_tokenizer(path, g.codebook_size, g.num_tokens, device), path
