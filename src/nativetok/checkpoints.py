"""Loading trained models from Lightning checkpoints without Lightning."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nativetok.config.loading import from_container
from nativetok.config.schema import ExperimentConfig
from nativetok.models import ARGenerator, MaskGITGenerator, NativeTokenizer, build_generator


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
    return checkpoint


def module_state(checkpoint: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def tokenizer_config(path: str | os.PathLike) -> ExperimentConfig:
    """The experiment a tokenizer checkpoint was trained with (its data, sizes)."""
    return from_container(read_checkpoint(path, "tokenizer")["hyper_parameters"]["config"])


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = True) -> NativeTokenizer:
    """A trained tokenizer in eval mode (its moving-average weights when it has them and `ema` is set)."""
    checkpoint = read_checkpoint(path, "tokenizer")
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
    checkpoint = read_checkpoint(path, "generator")
    config = from_container(checkpoint["hyper_parameters"]["config"])
    generator = build_generator(config.generator, config.data.num_classes)
    state = module_state(checkpoint, "ema.shadow.") if ema else {}
    generator.load_state_dict(state or module_state(checkpoint, "generator."))
    return generator.to(device).eval()
