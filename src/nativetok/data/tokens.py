"""The token shard format: images encoded once by a trained tokenizer, read back for stage-2 training.

A token shard mirrors an image shard: the same keys, with `tokens.npy` (the ids as a compact unsigned
integer array), optionally `flip.npy` (the ids of the horizontally flipped image) and `cls`. Its index
records the codebook size, the sequence length and the tokenizer's sha256, which the generator checks
before training. Writing them runs the tokenizer: pipelines/tokenize.py.
"""

from __future__ import annotations

import functools
import io
import random
from typing import Tuple

import numpy as np
import torch


def encode_ids(ids: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, ids.astype(np.uint16 if ids.max(initial=0) < 2**16 else np.int32))
    return buffer.getvalue()


def decode_ids(data: bytes) -> np.ndarray:
    """The array of an `.npy` file's bytes (read-only), as `np.load(..., allow_pickle=False)` gives it. Every sample of
    a shard has the same header, and numpy parses it as a Python literal (half a stage-2 loader worker's time): it
    is parsed once per distinct header."""
    dtype, shape, fortran_order, offset = npy_layout(data[:npy_header_end(data)])
    array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")


def npy_header_end(data: bytes) -> int:
    """Where an `.npy` file's header ends: magic (6 bytes), version (2), the header's length (2 bytes in version 1,
    4 after) and the header."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        raise ValueError("not an .npy array (bad magic string)")
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    return 12 + int.from_bytes(data[8:12], "little")


@functools.lru_cache(maxsize=64)
def npy_layout(header: bytes) -> Tuple[np.dtype, Tuple[int, ...], bool, int]:
    """(dtype, shape, Fortran order, data offset) from numpy's own header reader; object arrays are refused (they
    would need pickle)."""
    file = io.BytesIO(header)
    version = np.lib.format.read_magic(file)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(file)
    if dtype.hasobject:
        raise ValueError("an .npy array of Python objects cannot be loaded without pickle")
    return dtype, shape, fortran_order, file.tell()


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
