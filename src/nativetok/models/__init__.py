"""Pure-torch models (no Lightning): the transformer block, MIT, MoCET, quantizer, decoder, generators."""

from __future__ import annotations

from nativetok.models.ar import ARGenerator
from nativetok.models.generator import GENERATORS, Generator, build_generator
from nativetok.models.maskgit import MaskGITGenerator
from nativetok.models.tokenizer import TOKENIZERS, NativeTokenizer, build_tokenizer

__all__ = [
    "GENERATORS",
    "ARGenerator",
    "Generator",
    "MaskGITGenerator",
    "NativeTokenizer",
    "TOKENIZERS",
    "build_generator",
    "build_tokenizer",
]
