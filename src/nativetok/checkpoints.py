"""Loading trained models from Lightning checkpoints without Lightning, and naming them by content.

A generator decodes with the tokenizer that made its tokens; a path alone does not say which one that is
(a retrained checkpoint at the same path, another working directory), so training pins the tokenizer by
sha256 and records where to find it from anywhere: an absolute path and one relative to the run folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from nativetok.config.loading import from_container
from nativetok.config.schema import ExperimentConfig
from nativetok.models import ARGenerator, MaskGITGenerator, NativeTokenizer, build_generator

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another kind than asked for."""


def read_checkpoint(path: str | os.PathLike, kind: str, map_location="cpu") -> dict:
    """The checkpoint dict, after checking that it is a NativeTok checkpoint of `kind`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    found = checkpoint.get("nativetok", {}).get("kind") if isinstance(checkpoint, dict) else None
    if found != kind:
        raise CheckpointError(f"{path} is {f'a {found}' if found else 'not a NativeTok'} checkpoint, not a {kind}")
    if "state_dict" not in checkpoint or "config" not in checkpoint.get("hyper_parameters", {}):
        raise CheckpointError(f"{path}: a {kind} checkpoint without its weights or config (state_dict, "
                              "hyper_parameters.config): damaged or not written by `nativetok train`")
    return checkpoint


def module_state(checkpoint: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def tokenizer_config(path: str | os.PathLike) -> ExperimentConfig:
    """The experiment a tokenizer checkpoint was trained with (its data, sizes)."""
    return from_container(read_checkpoint(path, "tokenizer")["hyper_parameters"]["config"])


def file_sha256(path: str | os.PathLike) -> str:
    """The content hash that names a checkpoint (or any input) in pins and manifests."""
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
    tokenizer = NativeTokenizer(config.tokenizer, config.data.image_size, config.data.channels)
    state = module_state(checkpoint, "ema.shadow.") if ema else {}
    tokenizer.load_state_dict(state or module_state(checkpoint, "tokenizer."))
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
) -> ARGenerator | MaskGITGenerator:
    """A trained generator in eval mode (its moving-average weights when it has them and `ema` is set)."""
    return generator_from_checkpoint(read_checkpoint(path, "generator"), device, ema)


def generator_from_checkpoint(
    checkpoint: dict, device: str | torch.device = "cpu", ema: bool = True
) -> ARGenerator | MaskGITGenerator:
    """`load_generator` for a checkpoint already read (by a caller that also needs its config and pin)."""
    config = from_container(checkpoint["hyper_parameters"]["config"])
    generator = build_generator(config.generator, config.data.num_classes)
    state = module_state(checkpoint, "ema.shadow.") if ema else {}
    generator.load_state_dict(state or module_state(checkpoint, "generator."))
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
    """The run folder of a checkpoint: the parent of its `checkpoints/` folder, else its own folder."""
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
    else:  # trained before generators pinned their tokenizer: the configured path, as it was
        candidates = [Path(from_container(checkpoint["hyper_parameters"]["config"]).generator.tokenizer)]
    found = [c for c in dict.fromkeys(c.resolve() for c in candidates) if c.is_file()]
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
    checkpoint = read_checkpoint(generator_path, "generator")
    path, _ = pinned_tokenizer(generator_path, checkpoint, tokenizer_path, mismatch_ok)
    g = from_container(checkpoint["hyper_parameters"]["config"]).generator
    return load_matching_tokenizer(path, g.codebook_size, g.num_tokens, device), path
