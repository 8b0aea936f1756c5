"""Autocast for inference commands (tokenize, sample, eval-fid), named as Lightning names precisions."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

INFERENCE_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # the autocast settings of config.schema.Precision


def autocast(device: torch.device | str, precision: str) -> ContextManager:
    """The autocast context for `precision` on `device` (nothing for 32-true)."""
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(INFERENCE_PRECISIONS)}; got '{precision}'")
    if precision == "32-true":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)
