"""A straightforward MoCET: the reference the optimised `MixtureOfCausalExperts` must match (tested in
tests/test_reference_mocet.py) and the alternative the bench measures its gains against."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from nativetok.models.mocet import MixtureOfCausalExperts


def reference_mocet(mocet: MixtureOfCausalExperts, z: Tensor, quantizer, count: int) -> Tuple[Tensor, Tensor]:
    """Every layer of every expert over its whole context; the query position's output, quantized, becomes
    the token. Returns the codes [B, count, code_dim] (straight-through, differentiable) and ids [B, count]."""
    codes = z.new_zeros(z.shape[0], 0, mocet.code_dim)
    ids = []
    for expert in mocet.experts[:count]:
        parts = [z]
        if expert.index > 0:
            parts.append(expert.token_in(codes) + expert.token_positions)
        parts.append(expert.query.expand(z.shape[0], -1, -1))
        x = torch.cat(parts, dim=1)
        for block in expert.blocks:
            x = block(x)
        token = quantizer(expert.head(expert.norm(x[:, -1])))
        codes = torch.cat([codes, token.codes[:, None]], dim=1)
        ids.append(token.ids)
    return codes, torch.stack(ids, dim=1)
