"""Pure-torch models (no Lightning): the transformer block, MIT, MoCET, quantizer, decoder, generators."""

from nativetok.models.tokenizer import NativeTokenizer

__all__ = ["NativeTokenizer"]
