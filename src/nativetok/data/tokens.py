"""The token shard format: images encoded once by a trained tokenizer, read back for stage-2 training.

A token shard mirrors an image shard: the same keys, with `tokens.npy` (the ids as a compact unsigned
integer array), optionally `flip.npy` (the ids of the horizontally flipped image) and `cls`. Its index
records the codebook size, the sequence length and the tokenizer's sha256, which the generator checks
before training. Writing them runs the tokenizer: pipelines/tokenize.py.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch


def encode_ids(ids: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, ids.astype(np.uint16 if ids.max(initial=0) < 2**16 else np.int32))
    return buffer.getvalue()


def decode_ids(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class TokenDecoder:
    """Token-shard sample -> {"tokens": long [K], "label": int, "key": str}; in training, the flipped
    image's tokens half of the time when the shard has them and `flip` is on."""

    def __init__(self, train: bool, flip: bool):
        self.flip = flip and train

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        if "tokens.npy" not in sample or "cls" not in sample:
            raise KeyError(f"sample {sample.get('__key__')} lacks tokens.npy or cls")
        field = "flip.npy" if self.flip and "flip.npy" in sample and rng.random() < 0.5 else "tokens.npy"
        ids = torch.from_numpy(decode_ids(sample[field]).astype(np.int64))
        return {"tokens": ids, "label": int(sample["cls"]), "key": sample["__key__"]}
